"""launchers/slurm.sbatch under a real SLURM: preempted, it saves, requeues itself and resumes.

The test starts a one-node SLURM of its own (munged with a fresh key and socket, slurmctld and
slurmd on free ports, state in a temporary folder; Debian's slurm-wlm, installed by the Makefile)
and stops it afterwards. Preemption arrives as SLURM delivers `--signal=B:USR1@180`: USR1 to the
batch script, whose trap sends SIGTERM to the job step (torchrun, the ranks, their workers).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from test_train_distributed import resumed_step
from train_helpers import BIN, CONFIG, REPO, env, records
from hipscale.training.distributed import free_port

STEPS = 30
START_BOUND_S = 180   # submission -> 3 logged steps (a first start builds nothing: the suite prebuilt the ops)
SAVE_BOUND_S = 60     # USR1 to the batch script -> checkpoint saved
RUN_BOUND_S = 300     # requeue -> the job completed


def _slurm_config(root: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=hipscaletest", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={root / 'munge.sock'}",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "ReturnToService=2", "SchedulerType=sched/builtin",
        "SchedulerParameters=sched_interval=2",
        "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none", "MpiDefault=none",
        "KillWait=30", "MinJobAge=600",
        f"NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    return conf


def _stop(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Iterator[dict]:
    """A running one-node SLURM; yields the environment its clients need (SLURM_CONF)."""
    for tool in ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol"):
        assert shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists(), \
            f"{tool} is missing: `make system-deps` installs Debian's slurm-wlm and munge"
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir(mode=0o700)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = _slurm_config(root)
    daemon_env = dict(os.environ, SLURM_CONF=str(conf))
    sbin = "/usr/sbin"
    try:
        subprocess.run([f"{sbin}/munged", "--force", f"--key-file={key}", f"--socket={root / 'munge.sock'}",
                        f"--log-file={root / 'munged.log'}", f"--pid-file={root / 'munged.pid'}",
                        f"--seed-file={root / 'munge' / 'seed'}"], check=True, timeout=30)
        subprocess.run([f"{sbin}/slurmctld", "-f", str(conf)], env=daemon_env, check=True, timeout=30)
        subprocess.run([f"{sbin}/slurmd", "-f", str(conf)], env=daemon_env, check=True, timeout=30)
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=daemon_env, capture_output=True,
                                           text=True, timeout=30).stdout:
            assert time.monotonic() < deadline, (root / "slurmctld.log").read_text()[-3000:]
            time.sleep(0.5)
        yield {"SLURM_CONF": str(conf)}
    finally:
        subprocess.run(["scancel", "--full", "--user=root"], env=daemon_env, capture_output=True, timeout=30)
        for name in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
            _stop(root / name)


def job_state(job: str, slurm_env: dict) -> tuple[str, int]:
    """(JobState, Restarts) of a job, from scontrol."""
    out = subprocess.run(["scontrol", "show", "job", job], env=slurm_env, capture_output=True, text=True,
                         timeout=30).stdout
    state = re.search(r"JobState=(\S+)", out)
    restarts = re.search(r"Restarts=(\d+)", out)
    return (state.group(1) if state else "GONE"), int(restarts.group(1)) if restarts else 0


def node_state(slurm_env: dict) -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%T"], env=slurm_env, capture_output=True, text=True,
                          timeout=30).stdout.strip()


def wait_until(predicate, bound: float, what: str, log: Path) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > bound:
            text = log.read_text(errors="replace")[-4000:] if log.exists() else "(no output yet)"
            raise AssertionError(f"no {what} within {bound} s:\n{text}")
        time.sleep(0.5)
    return time.monotonic() - start


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
