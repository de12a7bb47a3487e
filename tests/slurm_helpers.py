"""A one-node SLURM of the test's own (Debian's slurm-wlm and munge, installed by the Makefile).

munged with a fresh key and socket, slurmctld and slurmd on free ports, state in a temporary folder;
stopped (every job cancelled first) when the session ends.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hipscale.training.distributed import free_port


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


@contextmanager
def one_node_slurm(root: Path) -> Iterator[dict]:
    """A running one-node SLURM with its state in `root`; yields the environment its clients need (SLURM_CONF)."""
    for tool in ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol"):
        assert shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists(), \
            f"{tool} is missing: `make system-deps` installs Debian's slurm-wlm and munge"
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


def job_exit(job: str, slurm_env: dict) -> str:
    """ExitCode (e.g. ``0:0``, ``1:0``) of a job, from scontrol."""
    out = subprocess.run(["scontrol", "show", "job", job], env=slurm_env, capture_output=True, text=True,
                         timeout=30).stdout
    found = re.search(r"ExitCode=(\S+)", out)
    return found.group(1) if found else "?"


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
