"""Jobs on emulated nodes (hipscale.tools.local_cluster): a cluster per test module, launchers started on nodes."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import Iterator

import pytest

from hipscale.tools.local_cluster import Cluster, unavailable_reason
from train_helpers import BIN, PY, REPO, env, records

# Where a rank that loses a node says it was (a periodic save takes part of every few steps).
STOPPED_AT = r"(?:in step \d+|while saving the checkpoint of step \d+)"


def emulated_cluster(tmp_path_factory, name: str, nodes: int = 2) -> Iterator[Cluster]:
    """A module's cluster of `nodes` nodes, removed afterwards. Where they cannot be made the test fails with the
    reason when it runs as root (as CI and `make test` do: a missing tool or a kernel without network namespaces
    is a broken machine, not a reason to pass) or under `make test-multinode` (HIPSCALE_REQUIRE_MULTINODE=1), and
    is skipped with the reason otherwise (a user's suite without root)."""
    reason = unavailable_reason()
    if reason:
        if os.geteuid() == 0 or os.environ.get("HIPSCALE_REQUIRE_MULTINODE"):
            pytest.fail(f"emulated nodes are not available: {reason}")
        pytest.skip(f"emulated nodes are not available: {reason}")
    cluster = Cluster(name=f"{name}{os.getpid()}", state=tmp_path_factory.mktemp("cluster"))
    cluster.up(nodes)
    yield cluster
    cluster.down()


class NodeJob:
    """One job: a launcher command started on each of some nodes, each in a session of its own."""

    def __init__(self, cluster: Cluster, commands: dict[str, list[str]], log_dir: Path, **extra_env: str):
        self.cluster, self.log_dir = cluster, log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        # What a SIGKILLed node leaves in its temp dir goes with the job (a short path: sockets live there).
        tmp = tempfile.mkdtemp(prefix="hsn-")
        weakref.finalize(self, shutil.rmtree, tmp, True)
        self.env = env(PATH=f"{BIN}:{os.environ['PATH']}", PYTHON=PY, TMPDIR=tmp, **extra_env)
        self.started = time.monotonic()
        self.procs: dict[str, subprocess.Popen] = {}
        for node, cmd in commands.items():
            self.start(node, cmd)

    def start(self, node: str, cmd: list[str]) -> None:
        """Start `cmd` on `node` (again, after the node was lost: its log goes on)."""
        with open(self.log_dir / f"{node}.log", "a") as out:
            self.procs[node] = subprocess.Popen(self.cluster.exec_prefix(node) + cmd, cwd=REPO, env=self.env,
                                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))

    def wait_for_step(self, run_dir: Path, step: int, timeout: float = 240) -> float:
        """Seconds from the start until `step` is logged."""
        deadline = time.monotonic() + timeout
        while not (run_dir / "metrics.jsonl").exists() or step not in records(run_dir):
            if any(p.poll() is not None for p in self.procs.values()) or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"step {step} was not logged:\n{self.text()[-6000:]}")
            time.sleep(0.1)
        return time.monotonic() - self.started

    def wait(self, timeout: float = 300) -> dict[str, int]:
        """Every launcher's exit status; fails (after killing the job) past `timeout` s from the start."""
        try:
            return {node: p.wait(timeout=max(1.0, self.started + timeout - time.monotonic()))
                    for node, p in self.procs.items()}
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the job did not end within {timeout} s:\n{self.text()[-6000:]}")

    def kill(self) -> None:
        for node in self.cluster.node_names():
            self.cluster.kill(node)
        for p in self.procs.values():
            p.wait()

    def assert_nothing_left(self, since: float, bound: float) -> float:
        """Seconds from `since` until no process but sshd's listener is left on any node; fails past `bound`."""
        while True:
            left = {node: self.cluster.processes(node) for node in self.cluster.node_names()}
            if not any(left.values()):
                return time.monotonic() - since
            if time.monotonic() > since + bound:
                names = {n: [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in pids] for n, pids in left.items()}
                self.kill()
                raise AssertionError(f"processes left {bound} s after the event: {names}\n{self.text()[-4000:]}")
            time.sleep(0.2)
