"""launchers/slurm.sbatch under a real SLURM: preempted, it saves, requeues itself and resumes.

The test runs on the session's one-node SLURM (tests/slurm_helpers.py). Preemption arrives as SLURM delivers `--signal=B:USR1@180`: USR1 to the
batch script, whose trap sends SIGTERM to the job step (torchrun, the ranks, their workers).
"""
from __future__ import annotations

import os
import re
import subprocess

from slurm_helpers import job_state, node_state, wait_until
from test_train_distributed import resumed_step
from train_helpers import BIN, CONFIG, REPO, env, records
from hipscale.training.distributed import free_port

STEPS = 30
START_BOUND_S = 180   # submission -> 3 logged steps (a first start builds nothing: the suite prebuilt the ops)
SAVE_BOUND_S = 60     # USR1 to the batch script -> checkpoint saved
RUN_BOUND_S = 300     # requeue -> the job completed


def test_slurm_script_saves_on_preemption_requeues_and_resumes(slurm, debug_shards, tmp_path):
    job_env = env(**slurm, GPUS_PER_NODE="2", MASTER_PORT=str(free_port()),
                  PATH=f"{BIN}:{os.environ['PATH']}")  # the script calls torchrun by name
    log = tmp_path / "slurm.out"
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--cpus-per-task={os.cpu_count()}", f"--output={log}", "--open-mode=append",
         str(REPO / "launchers" / "slurm.sbatch"), CONFIG, "--set", f"data.train_dir={debug_shards['train']}",
         f"data.eval_dir={debug_shards['eval']}", f"run.output_dir={tmp_path}", f"training.steps={STEPS}",
         "checkpoint.every_steps=0", "logging.every_steps=1"],
        cwd=REPO, env=job_env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    run_dir = tmp_path / "debug"
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and metrics.read_text().count('"kind": "train"') >= 3, START_BOUND_S,
               "3 logged steps", log)
    # What `#SBATCH --signal=B:USR1@180` delivers: USR1 to the batch script only.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=job_env, check=True, timeout=30)
    saved_in = wait_until(lambda: "preemption signal received at step" in log.read_text(), SAVE_BOUND_S,
                          "save on preemption", log)
    wait_until(lambda: job_state(job, job_env) == ("PENDING", 1) and node_state(job_env) == "idle", SAVE_BOUND_S,
               "the script's requeue and the node cleaned up", log)
    # SLURM holds a requeued job for minutes before it is eligible again; an admin can start it sooner. Two
    # seconds on: a job credential issued in the second the old one was revoked is refused.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+2"], env=job_env, check=True, timeout=30)
    wait_until(lambda: job_state(job, job_env)[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
               RUN_BOUND_S, "the end of the requeued run", log)
    assert job_state(job, job_env) == ("COMPLETED", 1), log.read_text()[-3000:]
    text = log.read_text()
    saved = int(re.search(r"preemption signal received at step (\d+)", text).group(1))
    print(f"slurm: USR1 to the batch script -> save logged in {saved_in:.1f} s; requeued, resumed at {saved}")
    assert resumed_step(text) == saved
    assert sorted(records(run_dir)) == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
