#!/usr/bin/env bash
# Training under Open MPI: ranks are discovered through mpi4py (deepspeed.init_distributed(auto_mpi_discovery)).
#
# Usage: launchers/mpirun.sh NPROCS CONFIG [--set key=value ...] [--resume auto]
#   With several nodes add a hostfile through MPIRUN_ARGS="--hostfile hosts".
#
# Environment:
#   MASTER_PORT       rendezvous port on rank 0's host (default 29500); rank 0's address comes from `hostname -I`
#   MPIRUN_ARGS       extra mpirun options (e.g. "--hostfile hosts --map-by ppr:8:node"; as root, Open MPI
#                     also needs "--allow-run-as-root")
#   TORCH_EXTENSIONS_DIR  where DeepSpeed JIT-compiles ops (default: <repo>/.cache/torch_extensions)
#   PYTHON            interpreter (default: python)
#   HIPSCALE_STOP_GRACE_S  seconds mpirun gives the ranks after forwarding SIGTERM before it SIGKILLs them
#                     (default 20; Open MPI's own default of 1 s is too short to save a checkpoint).
#                     Open MPI 4.1 waits this long twice, so mpirun itself exits about 2x this after the signal.
# Exported to every rank: MASTER_PORT, TORCH_EXTENSIONS_DIR, DS_ACCELERATOR (if set), PATH, LD_LIBRARY_PATH.
# Preemption: SIGTERM (to mpirun or its process group) or SIGUSR1 (forwarded by mpirun) makes the ranks save a
# checkpoint and exit 143; rerun with --resume auto.
set -euo pipefail
nprocs=$1; config=$2; shift 2
cd "$(dirname "$0")/.."
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export MASTER_PORT="${MASTER_PORT:-29500}"
extra=()
[ -n "${DS_ACCELERATOR:-}" ] && extra+=(-x DS_ACCELERATOR)
# shellcheck disable=SC2086
exec mpirun -np "$nprocs" --mca odls_base_sigkill_timeout "${HIPSCALE_STOP_GRACE_S:-20}" ${MPIRUN_ARGS:-} -x MASTER_PORT -x TORCH_EXTENSIONS_DIR -x PATH -x LD_LIBRARY_PATH \
  "${extra[@]}" "${PYTHON:-python}" -m hipscale.train --config "$config" "$@"
