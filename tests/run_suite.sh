#!/usr/bin/env bash
# Runs the whole pytest suite; "no tests collected" (exit 5) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
.venv/bin/python -m pytest tests "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "run_suite: pytest collected no tests; failing." >&2
  exit 1
fi
exit "$status"
