#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher and a hostfile (pdsh and passwordless ssh to every host).
#
# Usage: launchers/deepspeed_hostfile.sh HOSTFILE CONFIG [--set key=value ...] [--resume auto]
#   HOSTFILE lines look like "node1 slots=8" (slots = GPUs per node); run it on the first host.
#
# Environment:
#   MASTER_ADDR       address of the first host (default: the first hostname in HOSTFILE)
#   MASTER_PORT       rendezvous port (default 29500)
#   TORCH_EXTENSIONS_DIR  where DeepSpeed JIT-compiles ops (default: <repo>/.cache/torch_extensions)
#   DEEPSPEED_ARGS    extra deepspeed launcher options (e.g. "--ssh_port 2222")
# The ranks on every node get PATH, LD_LIBRARY_PATH, TORCH_EXTENSIONS_DIR, DS_ACCELERATOR, OMP_NUM_THREADS and
# every NCCL_*, GLOO_*, TP_*, TORCH_NCCL_*, HIPSCALE_* variable set here, then the lines of ~/.deepspeed_env
# and ./.deepspeed_env (NAME=VALUE, no spaces in VALUE): the deepspeed launcher itself forwards only NCCL_*,
# PYTHON*, UCX_*, MV2_* and MLFLOW_*, and a remote shell starts with the system PATH (another ninja on it
# makes every rank rebuild DeepSpeed's ops). They are written to .cache/deepspeed_env (DS_ENV_FILE);
# the list is in launchers/forwarded_env.sh.
# Before launching, every host must answer over ssh: a missing one would leave the others waiting at
# start-up for distributed.timeout_s.
# Preemption: SIGTERM to the deepspeed launcher (it runs `pkill` on every host) or SIGTERM/SIGUSR1 to the
# training processes saves a checkpoint and exits; rerun the same command with --resume auto to continue.
set -euo pipefail
hostfile=$(realpath "$1"); config=$2; shift 2
cd "$(dirname "$0")/.."
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
hosts=$(awk 'NF && $1 !~ /^#/ {print $1}' "$hostfile" | paste -sd, -)
if ! reply=$(PDSH_RCMD_TYPE=ssh pdsh -S -u 30 -w "$hosts" true 2>&1); then
  echo "deepspeed_hostfile.sh: not every host of $hostfile answers over ssh (pdsh -w $hosts true):" >&2
  echo "$reply" >&2
  exit 2
fi
source launchers/forwarded_env.sh
mkdir -p .cache
env_file=$(mktemp .cache/deepspeed_env.XXXXXX)
{
  for name in $(forwarded_env_names); do printf '%s=%s\n' "$name" "${!name}"; done
  for file in ~/.deepspeed_env ./.deepspeed_env; do
    if [ -f "$file" ]; then grep -v '^\s*\(#\|$\)' "$file" || true; fi
  done
} > "$env_file"
mv "$env_file" .cache/deepspeed_env
export DS_ENV_FILE="$PWD/.cache/deepspeed_env"
master_addr="${MASTER_ADDR:-${hosts%%,*}}"
# shellcheck disable=SC2086
exec deepspeed --hostfile "$hostfile" --master_addr "$master_addr" --master_port "${MASTER_PORT:-29500}" \
  ${DEEPSPEED_ARGS:-} --module hipscale.train --config "$config" "$@"
