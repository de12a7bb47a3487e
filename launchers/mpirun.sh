#!/usr/bin/env bash
# Training under Open MPI: ranks are discovered through mpi4py (deepspeed.init_distributed(auto_mpi_discovery)).
#
# Usage: launchers/mpirun.sh NPROCS CONFIG [--set key=value ...] [--resume auto]
#   With several nodes: MPIRUN_ARGS="--hostfile hosts --map-by ppr:8:node --mca btl_tcp_if_include IF
#   --mca oob_tcp_if_include IF" (IF: the interface the nodes reach each other on; ssh to every host).
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
# Exported to every rank: MASTER_PORT and, when set, PATH, LD_LIBRARY_PATH, TORCH_EXTENSIONS_DIR, DS_ACCELERATOR,
# OMP_NUM_THREADS and every NCCL_*, GLOO_*, TP_*, TORCH_NCCL_*, HIPSCALE_* variable (launchers/forwarded_env.sh);
# add others with -x NAME in MPIRUN_ARGS.
# Preemption: SIGTERM (to mpirun or its process group) or SIGUSR1 (forwarded by mpirun) makes the ranks save a
# checkpoint and exit 143; rerun with --resume auto.
set -euo pipefail
nprocs=$1; config=$2; shift 2
cd "$(dirname "$0")/.."
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export MASTER_PORT="${MASTER_PORT:-29500}"
source launchers/forwarded_env.sh
exports=(-x MASTER_PORT)
for name in $(forwarded_env_names); do exports+=(-x "$name"); done
# shellcheck disable=SC2086
exec mpirun -np "$nprocs" --mca odls_base_sigkill_timeout "${HIPSCALE_STOP_GRACE_S:-20}" ${MPIRUN_ARGS:-} \
  "${exports[@]}" "${PYTHON:-python}" -m hipscale.train --config "$config" "$@"
