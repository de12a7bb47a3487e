#!/usr/bin/env bash
# Runs the whole pytest suite; "no tests collected" (exit 5) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
# Lint first (ruff is pinned in setup.py's test extra): a finding fails the suite.
.venv/bin/ruff check hipscale tests preprocess tools || { echo "run_suite: ruff check failed" >&2; exit 1; }
# One toolchain for every process of the suite: torch's JIT builds use the first `ninja` on PATH, and a
# different ninja (the venv's vs Debian's) rebuilds DeepSpeed's cached shm op from scratch.
export PATH="$PWD/.venv/bin:$PATH"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
# DeepSpeed JIT-compiles its CPU shm all-reduce op on first use (25-80 s); build it once up front
# (cached in TORCH_EXTENSIONS_DIR) so no distributed test spends its time budget compiling.
DS_ACCELERATOR=cpu .venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" \
  >/dev/null || { echo "run_suite: building DeepSpeed's shm_comm op failed" >&2; exit 1; }
# PYTEST_TARGETS: what to run (default: every test; `make test-multinode` runs tests/test_multinode.py).
# shellcheck disable=SC2086
.venv/bin/python -m pytest ${PYTEST_TARGETS:-tests} "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "run_suite: pytest collected no tests; failing." >&2
  exit 1
fi
exit "$status"
