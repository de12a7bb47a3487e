"""What clusters do to a training job, done to configs/debug.yaml on 2 CPU processes with DataLoader workers.

Every job runs under a real launcher in a session of its own, and faults arrive the way schedulers
and failing machines deliver them: a signal to the whole process group, a worker process killed (as
the OOM killer does), a rank that stops answering, ranks that do not share the checkpoint folder,
unreadable samples. Each test bounds the time from the fault to the last process of the job gone.
"""
from __future__ import annotations

import math
import re
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import psutil
import pytest

from exit_watch import ExitWatch
from test_train_distributed import resumed_step
from train_helpers import (CONFIG, PY, REPO, STOP_GRACE_S, Job, deepspeed, env, mpirun_sh, only, records, run, torchrun,
                           wait_steps)
from hipscale.training.distributed import free_port

STOP_BOUND_S = 25     # signal -> every process gone: below the 30 s the deepspeed launcher and torchrun let a rank
                      # save before they SIGKILL it (launchers/mpirun.sh: STOP_GRACE_S, so a rank it kills exits -9)
FAIL_BOUND_S = 60     # a rank's error -> every process gone
STALL_TIMEOUT_S = 10  # distributed.timeout_s of the stalled-rank test


def settings(data: dict, out: Path, *extra: str) -> list[str]:
    return ["--set", f"data.train_dir={data['train']}", f"data.eval_dir={data['eval']}", f"run.output_dir={out}",
            "training.steps=1000", "checkpoint.every_steps=0", "logging.every_steps=1", "model.dropout_prob=0.02",
            *extra]


PREEMPTION_CASES = {
    # launcher, signal, config, whether the signal lands during an evaluation
    "deepspeed-SIGTERM-zero2": (deepspeed, signal.SIGTERM, ["zero.stage=2"], False),
    "torchrun-SIGTERM-during-eval-zero3-offload": (
        torchrun, signal.SIGTERM, ["zero.stage=3", "zero.offload_params=cpu", "zero.offload_optimizer=cpu",
                                   "eval.every_steps=3", "eval.micro_batch_size=1", "eval.max_batches=null"], True),
    "mpirun.sh-SIGUSR1-zero2-offload": (mpirun_sh, signal.SIGUSR1, ["zero.stage=2", "zero.offload_optimizer=cpu"],
                                        False),
}


@pytest.mark.parametrize("case", list(PREEMPTION_CASES))
def test_preemption_of_the_process_group_saves_exits_and_resumes(case, debug_shards, tmp_path):
    launcher, sig, extra, in_eval = PREEMPTION_CASES[case]
    data = dict(debug_shards, eval=debug_shards["train"]) if in_eval else debug_shards  # a long eval
    args = settings(data, tmp_path, *extra)
    run_dir = tmp_path / "debug"
    with ExitWatch() as exits:
        job = Job(launcher() + args, tmp_path / "job.log")
        try:
            if in_eval:
                job.wait_for(lambda: "evaluating at step 3" in job.text(), 180, "the eval at step 3")
            else:
                wait_steps(job, run_dir, 3)
            ranks = {rank: job.rank_process(rank).pid for rank in (0, 1)}
            under_way = max(records(run_dir)) + (0 if in_eval else 1)  # the step the signal interrupts
            sent = job.signal_group(sig)
            seconds = job.wait_gone(sent, STOP_BOUND_S)
        finally:
            job.kill()
        statuses = {rank: exits.exit_status(pid) for rank, pid in ranks.items()}
    text = job.text()
    print(f"{case}: signal during step {under_way} -> last process gone in {seconds:.1f} s, rank exit statuses "
          f"{statuses}")
    assert statuses == {0: 143, 1: 143}, text[-3000:]  # saved and left by itself, not killed by its launcher
    assert "preemption signal received at step" in text, text[-3000:]
    ckpts = run_dir / "checkpoints"
    tag = (ckpts / "latest").read_text()
    saved = int(tag.split("_")[1])
    assert (ckpts / tag / "COMPLETE").is_file()
    # The step boundary right after the signal: the step under way, or the next one when the signal came after
    # the under-way step's all-reduce, where the ranks agree on it.
    assert saved == max(records(run_dir)) and under_way <= saved <= under_way + 1, (under_way, saved)
    if in_eval:
        assert saved == 3 and "evaluation at step 3 interrupted by the preemption signal" in text
        assert 3 not in records(run_dir, "eval")
    # --resume auto continues from the saved step and trains on.
    resumed = run(launcher() + ["--resume", "auto"] + args + [f"training.steps={saved + 3}", "eval.every_steps=0"])
    assert resumed_step(resumed.stdout) == saved
    after = records(run_dir)
    assert [s for s in after if s > saved] == [saved + 1, saved + 2, saved + 3]
    assert all(math.isfinite(after[s]["loss"]) for s in after)


def test_sigusr1_to_one_process_exits_143_with_a_checkpoint(debug_shards, tmp_path):
    """The exit status a preempted rank leaves for its launcher or scheduler (a requeue)."""
    cmd = [PY, "-m", "hipscale.train", "--config", CONFIG] + settings(debug_shards, tmp_path)
    job = Job(cmd, tmp_path / "job.log")
    try:
        wait_steps(job, tmp_path / "debug", 2)
        job.signal_group(signal.SIGUSR1)
        assert job.proc.wait(STOP_BOUND_S) == 143, job.text()[-3000:]
    finally:
        job.kill()
    assert (tmp_path / "debug" / "checkpoints" / "latest").is_file()


def rank_worker(job: Job, rank: int) -> psutil.Process:
    """A DataLoader worker of the rank: a child of the rank's worker fork server (hipscale.data.loading.loader)."""
    workers = [worker for child in job.rank_process(rank).children() for worker in child.children()]
    assert workers, "no DataLoader worker on the rank"
    return workers[0]


def test_a_rank_whose_worker_is_killed_ends_the_job_with_its_error_once(debug_shards, tmp_path):
    cmd = deepspeed() + settings(debug_shards, tmp_path)
    port = cmd[cmd.index("--master_port") + 1]
    job = Job(cmd, tmp_path / "job.log")
    try:
        wait_steps(job, tmp_path / "debug", 3)
        for _ in range(3):  # a worker may finish its epoch between the look-up and the kill
            try:
                rank_worker(job, 1).kill()  # what the OOM killer does
                break
            except psutil.NoSuchProcess:
                continue
        killed = time.monotonic()
        seconds = job.wait_gone(killed, FAIL_BOUND_S)
    finally:
        job.kill()
    print(f"worker killed on rank 1 -> last process gone in {seconds:.1f} s")
    assert job.proc.returncode != 0
    lines = job.text().splitlines()
    line = only(lines, "hipscale.train: error: rank 1 failed")
    assert line and "DataLoader worker" in line, job.text()[-3000:]
    step = int(re.search(r"in step (\d+)", line).group(1))
    assert step > 3
    other = only(lines, "hipscale.train: error: rank 0")
    assert other is None or f"rank 0 stopped in step {step}: lost the other ranks" in other
    # The failing ranks released DeepSpeed's per-rank /dev/shm all-reduce segments (66 MiB each).
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_a_stalled_rank_ends_the_job_after_the_timeout_naming_the_step(debug_shards, tmp_path):
    """Through launchers/mpirun.sh, whose stop grace is set (torchrun waits a fixed 30 s for a rank it stops)."""
    job = Job(mpirun_sh() + settings(debug_shards, tmp_path, f"distributed.timeout_s={STALL_TIMEOUT_S}"),
              tmp_path / "job.log")
    try:
        wait_steps(job, tmp_path / "debug", 3)
        job.rank_process(1).suspend()  # SIGSTOP: a hung GPU or stuck I/O
        stalled = time.monotonic()
        seconds = job.wait_gone(stalled, STALL_TIMEOUT_S + STOP_GRACE_S + 20)
    finally:
        job.kill()
    print(f"rank 1 stopped -> last process gone in {seconds:.1f} s")
    assert job.proc.returncode != 0 and seconds >= STALL_TIMEOUT_S
    line = only(job.text().splitlines(), "hipscale.train: error: rank 0 stopped")
    assert line and f"no answer from the other ranks within distributed.timeout_s={STALL_TIMEOUT_S}" in line, \
        job.text()[-3000:]
    step = int(re.search(r"in step (\d+)", line).group(1))
    assert step == max(records(tmp_path / "debug")) + 1  # the step no rank finished


def test_a_checkpoint_folder_that_ranks_do_not_share_fails_before_training(debug_shards, tmp_path):
    """Each rank in its own working directory with a relative output folder: node-local disks, emulated."""
    assert shutil.which("mpirun"), "mpirun (openmpi) is required: make system-deps"
    rank_cmd = [PY, "-m", "hipscale.train", "--config", CONFIG] + settings(
        debug_shards, Path("runs"), f"deepspeed_config={REPO / 'ds_config.json'}")
    exports = ["-x", "DS_ACCELERATOR", "-x", "TORCH_EXTENSIONS_DIR", "-x", "PYTHONUNBUFFERED",
               "-x", f"MASTER_PORT={free_port()}"]  # per app context: Open MPI applies -x to its own context only
    # By name: an absolute path makes Open MPI put /usr/bin first on the ranks' PATH, whose other ninja
    # rebuilds DeepSpeed's JIT op (a minute).
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe"]
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
        cmd += ["-np", "1", "-wdir", str(tmp_path / f"node{rank}"), *exports, *rank_cmd] + ([":"] if rank == 0 else [])
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    line = only(output.splitlines(), "is not one folder shared by every rank")
    assert line and "rank 1 on" in line and "rank 0 on" not in line, output[-3000:]
    assert "train step" not in output


def corrupt_first_sample_of_each_shard(source: Path, target: Path) -> None:
    """A copy of a shard folder with one flipped byte in the first sample of every shard."""
    shutil.copytree(source, target)
    for shard in sorted(target.glob("*.tar")):
        with tarfile.open(shard) as tar:
            member = next(m for m in tar if not m.name.endswith(".json") and m.size > 64)
        with open(shard, "r+b") as f:
            f.seek(member.offset_data + member.size // 2)
            byte = f.read(1)
            f.seek(member.offset_data + member.size // 2)
            f.write(bytes([byte[0] ^ 0xFF]))


def test_unreadable_samples_are_counted_over_all_ranks_and_across_a_resume(debug_shards, tmp_path):
    data = dict(debug_shards, train=tmp_path / "damaged")
    corrupt_first_sample_of_each_shard(debug_shards["train"], data["train"])
    args = settings(data, tmp_path, "training.steps=8", "checkpoint.every_steps=4", "data.max_bad_samples=1000")
    run(deepspeed() + args)
    logged = records(tmp_path / "debug")
    seen_by_4, seen_by_8 = logged[4]["bad_samples"], logged[8]["bad_samples"]
    assert 0 < seen_by_4 < seen_by_8, (seen_by_4, seen_by_8)
    # Resume at step 4 allowing exactly the samples counted so far: the next unreadable one stops the job.
    stopped = run(deepspeed() + ["--resume", "step_00000004"] + args + [f"data.max_bad_samples={seen_by_4:.0f}"],
                  check=False)
    assert stopped.returncode == 4, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    line = only(stopped.stderr.splitlines(), "hipscale.train: error: stopped at step")
    assert line and f"more than data.max_bad_samples={seen_by_4:.0f}" in line, stopped.stderr[-3000:]
    first_bad_step = min(s for s in logged if logged[s]["bad_samples"] > seen_by_4)
    assert f"stopped at step {first_bad_step}:" in line
