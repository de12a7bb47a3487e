#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher and a hostfile (passwordless ssh to every host).
#
# Usage: launchers/deepspeed_hostfile.sh HOSTFILE CONFIG [--set key=value ...] [--resume auto]
#   HOSTFILE lines look like "node1 slots=8" (slots = GPUs per node).
#
# Environment:
#   MASTER_ADDR       address of the first host (default: first hostname in HOSTFILE)
#   MASTER_PORT       rendezvous port (default 29500)
#   TORCH_EXTENSIONS_DIR  where DeepSpeed JIT-compiles ops (default: <repo>/.cache/torch_extensions)
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...  network settings; the launcher exports variables listed in
#                     ~/.deepspeed_env or ./.deepspeed_env (one NAME=VALUE a line) to every node
# Preemption: SIGTERM or SIGUSR1 to the training processes saves a checkpoint and exits; rerun the same
# command with --resume auto to continue.
set -euo pipefail
hostfile=$1; config=$2; shift 2
cd "$(dirname "$0")/.."
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
master_addr="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")}"
exec deepspeed --hostfile "$hostfile" --master_addr "$master_addr" --master_port "${MASTER_PORT:-29500}" \
  --module hipscale.train --config "$config" "$@"
