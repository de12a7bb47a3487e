"""Running `hipscale.train` under the real launchers, and watching a job the way a scheduler does.

A `Job` starts its launcher in a new session (its own process group, as a scheduler's job step),
so a test can signal the whole group and check that every process of the job is gone.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import psutil

from hipscale.training.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent
CONFIG = str(REPO / "configs" / "debug.yaml")


def env(**extra: str) -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
             **extra)
    e.pop("RANK", None)
    return e


def new_user_env() -> dict:
    """A new user's shell: the venv on PATH and none of hipscale's, DeepSpeed's or a launcher's variables."""
    launcher = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"}
    return {name: value for name, value in dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}").items()
            if not name.startswith(("DS_", "DEEPSPEED", "HIPSCALE_")) and name not in launcher}


def run(cmd: list[str], timeout: int = 600, check: bool = True,
        extra_env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Runs a command (a launcher) to its end; `extra_env` adds variables (an object store's endpoint, say)."""
    proc = subprocess.run(cmd, cwd=REPO, env={**launcher_env(cmd), **(extra_env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:6])}... exited {proc.returncode}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def records(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    """The metrics.jsonl records of `kind` by step (the last record of a step wins, i.e. a resumed run's)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["kind"] == kind}


def deepspeed(nprocs: int = 2, config: str = CONFIG) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(free_port()),
            "--module", "hipscale.train", "--config", config]


def torchrun(nprocs: int = 2, config: str = CONFIG) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc-per-node", str(nprocs), "--master-port", str(free_port()),
            "-m", "hipscale.train", "--config", config]


def mpirun_sh(nprocs: int = 2) -> list[str]:
    """launchers/mpirun.sh; its environment comes from `launcher_env` (MASTER_PORT, PYTHON, MPIRUN_ARGS)."""
    return ["bash", str(REPO / "launchers" / "mpirun.sh"), str(nprocs), CONFIG]


# launchers/mpirun.sh SIGKILLs a rank this long after mpirun's SIGTERM (HIPSCALE_STOP_GRACE_S), and waits it twice
# even when the ranks are gone: the debug config's ranks save and exit in about a second.
STOP_GRACE_S = 5


def launcher_env(cmd: list[str]) -> dict:
    if cmd[0] == "bash":  # launchers/*.sh
        return env(MASTER_PORT=str(free_port()), PYTHON=PY, MPIRUN_ARGS="--allow-run-as-root --oversubscribe",
                   HIPSCALE_STOP_GRACE_S=str(STOP_GRACE_S))
    return env()


def shard_debug_data(root: Path, make_image_folder: Callable[..., Path], classes: int = 4,
                     train_per_class: int = 24) -> dict[str, Path]:
    """Train (4 x 24 = 96 images by default) and eval (8 per class) shards of 16x16 class-striped images, made by
    our sharder, 16 (train) and 8 (eval) samples per shard."""
    dirs = {}
    for split, per_class, per_shard in (("train", train_per_class, 16), ("eval", 8, 8)):
        images = make_image_folder(root / f"{split}_images", per_class=per_class, seed=len(split), classes=classes)
        dirs[split] = root / split
        run([PY, "preprocess/shard_images.py", "--images", str(images), "--out", str(dirs[split]), "--size", "16",
             "--workers", "1", "--max-samples-per-shard", str(per_shard)])
    return dirs


DIGITS_TIMEOUT_S = 900  # the digits training, from its start to its end


def start_digits_training(root: Path) -> tuple[Job, Path]:
    """Writes scikit-learn's digits as ImageFolder trees (seeded 80/20 split), shards both with our sharder
    (raw 8x8 pixels) and starts configs/digits.yaml on them under the deepspeed launcher (2 processes).

    Returns:
        ``(the running job, its run folder)``.
    """
    from hipscale.data.synthetic_media import write_digits_imagefolder

    shards = {}
    for split, tree in write_digits_imagefolder(root / "images", test_fraction=0.2, seed=0).items():
        shards[split] = root / "shards" / split
        run([PY, "preprocess/shard_images.py", "--images", str(tree), "--out", str(shards[split]),
             "--size", "8", "--encoding", "raw", "--workers", "1"])
    job = Job(deepspeed(config=str(REPO / "configs" / "digits.yaml")) + [
        "--set", f"data.train_dir={shards['train']}", f"data.eval_dir={shards['test']}",
        f"run.output_dir={root / 'runs'}"], root / "digits.log")
    return job, root / "runs" / "digits"


class Job:
    """A training job whose launcher runs in its own session, with stdout+stderr in `log`."""

    def __init__(self, cmd: list[str], log: Path):
        self.log = log
        self.out = open(log, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=launcher_env(cmd), stdout=self.out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.sid = self.proc.pid
        self._known: dict[int, psutil.Process] = {}

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def processes(self) -> list[psutil.Process]:
        """Every live process of the job: its session (launcher, ranks, DataLoader workers), and every process
        seen descending from it, also after it moved to a session of its own (torchrun's ranks) or lost its
        parent."""
        candidates = list(self._known.values())
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == self.sid:
                    candidates.append(p)
            except (ProcessLookupError, psutil.Error):
                pass
        alive: dict[int, psutil.Process] = {}
        for p in candidates:
            try:
                for q in [p, *p.children(recursive=True)]:
                    if q.is_running() and q.status() != psutil.STATUS_ZOMBIE:
                        alive[q.pid] = q
            except psutil.Error:
                pass
        self._known.update(alive)
        return list(alive.values())

    def rank_process(self, rank: int) -> psutil.Process:
        """The main process of `rank`: it has the rank variable its launcher set, and a parent without it
        (its DataLoader workers inherit the variable from it)."""
        procs = []
        for p in self.processes():
            try:
                e = p.environ()
            except psutil.Error:
                continue
            if e.get("RANK", e.get("OMPI_COMM_WORLD_RANK")) == str(rank) and "hipscale.train" in " ".join(p.cmdline()):
                procs.append(p)
        mains = [p for p in procs if p.ppid() not in {q.pid for q in procs}]
        assert len(mains) == 1, f"rank {rank}: {mains}"
        return mains[0]

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None and not predicate():
                raise AssertionError(f"the job ended (exit {self.proc.returncode}) before {what}:\n{self.text()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s:\n{self.text()[-4000:]}")
            time.sleep(0.1)

    def signal_group(self, sig: int) -> float:
        """Signal the whole process group, as a scheduler does; returns the time it was sent."""
        os.killpg(self.sid, sig)
        return time.monotonic()

    def wait_gone(self, since: float, bound: float) -> float:
        """Seconds from `since` until no process of the job is left; fails past `bound` (and kills them)."""
        deadline = since + bound
        while self.proc.poll() is None or self.processes():
            if time.monotonic() > deadline:
                left = [" ".join(p.cmdline())[:120] for p in self.processes()]
                for p in self.processes():
                    p.kill()
                raise AssertionError(f"processes left {bound} s after the event: {left}\n{self.text()[-4000:]}")
            time.sleep(0.1)
        self.out.close()
        return time.monotonic() - since

    def kill(self) -> None:
        """Clean-up: SIGKILL whatever is left of the job."""
        for p in self.processes():
            try:
                p.kill()
            except psutil.Error:
                pass
        self.proc.wait()
        self.out.close()


def wait_steps(job: Job, run_dir: Path, steps: int, timeout: float = 180) -> None:
    """Wait until `steps` train records are logged."""
    path = run_dir / "metrics.jsonl"
    job.wait_for(lambda: path.exists() and path.read_text().count('"kind": "train"') >= steps, timeout,
                 f"{steps} logged steps")


def only(lines: list[str], needle: str) -> Optional[str]:
    """The single line containing `needle`, or None if there is none; fails if there are several."""
    found = [line for line in lines if needle in line]
    assert len(found) <= 1, found
    return found[0] if found else None
