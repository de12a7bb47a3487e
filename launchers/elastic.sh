#!/usr/bin/env bash
# Elastic multi-node training: run this on every node; the job trains on the nodes it has, shrinks when one
# is lost and grows when one (re)joins, resuming from the latest checkpoint each time (docs/multinode.md).
#
# Usage: launchers/elastic.sh HEAD_NODE MIN:MAX NPROC_PER_NODE CONFIG [--set key=value ...]
#   HEAD_NODE hosts the rendezvous (torchrun's c10d store; losing it ends the job); MIN:MAX the node counts
#   the job may train on; NPROC_PER_NODE ranks per node (GPUs per node).
#
# Environment:
#   HIPSCALE_RUN_ID   the job's id, the same on every node (default: SLURM_JOB_ID)
#   RDZV_PORT         rendezvous port on the head node (default 29400)
#   HIPSCALE_ELASTIC_ARGS  more options of python -m hipscale.launch.elastic, e.g. "--max-restarts 20
#                     --cutoff-s 60 --rejoin-s 600 --last-call-s 10 --keep-alive-s 5"
#   TORCH_EXTENSIONS_DIR  where DeepSpeed JIT-compiles ops (default: <repo>/.cache/torch_extensions)
#   PYTHON            the interpreter (default: python)
# Exit status: 0 done, 2/3/4 an agreed stop (configuration, NaN guard, bad samples), 143 preempted, 1 failed.
set -euo pipefail
head=$1; nodes=$2; nproc=$3; config=$4; shift 4
cd "$(dirname "$0")/.."
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
run_id=${HIPSCALE_RUN_ID:-${SLURM_JOB_ID:-}}
# shellcheck disable=SC2086
exec "${PYTHON:-python}" -m hipscale.launch.elastic --head "$head:${RDZV_PORT:-29400}" --nnodes "$nodes" \
  --nproc-per-node "$nproc" ${run_id:+--run-id "$run_id"} ${HIPSCALE_ELASTIC_ARGS:-} -- --config "$config" "$@"
