#!/usr/bin/env bash
# Shard a planned dataset on a SLURM cluster: a job array over the plan's units (at most MAX_PARALLEL at
# once, each task requeued if preempted), then a finish job that runs when every task has ended (afterany)
# and names the shards and units that are missing. Resubmit only those units with UNITS=3,7; the finish job
# then writes report.json and index.json. docs/data.md "Sharding on a cluster" walks through it.
#
# Usage: launchers/shard_slurm.sh OUT MAX_PARALLEL [sbatch options ...]
#   OUT           the sharder's --out holding plan.json (preprocess/shard_*.py ... --out OUT --plan-units N)
#   MAX_PARALLEL  array tasks running at once (sbatch --array=...%MAX_PARALLEL)
#   sbatch options go to both jobs: --partition, --time, --cpus-per-task (the workers of each task), --output
# Environment:
#   UNITS   the units to run, as an sbatch array spec (default: all, 0-(N-1))
#   PYTHON  the interpreter (default: python)
# Prints "array JOB_ID" and "finish JOB_ID".
set -euo pipefail
out=$1; max_parallel=$2; shift 2
here="$(cd "$(dirname "$0")" && pwd)"
units=${UNITS:-0-$(( $("${PYTHON:-python}" -m hipscale.data.shard_job units "$out") - 1 ))}
array=$(sbatch --parsable --array="$units%$max_parallel" "$@" "$here/shard_array.sbatch" "$out")
array=${array%%;*}
finish=$(sbatch --parsable --dependency="afterany:$array" "$@" "$here/shard_finish.sbatch" "$out")
echo "array ${array}"
echo "finish ${finish%%;*}"
