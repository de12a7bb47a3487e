"""One node of an elastic job: torchrun with c10d rendezvous under a supervisor that ends or rejoins it.

    python -m hipscale.launch.elastic --head node1 --nnodes 1:4 --nproc-per-node 8 --run-id JOB \\
        -- --config configs/hip256_audioset_av.yaml [--set key=value ...]

Run the same command on every node (launchers/elastic.sh, launchers/elastic.sbatch). torchrun's agents meet
in a c10d rendezvous hosted by the head node's agent, start `python -m hipscale.train --elastic` with
`--nproc-per-node` ranks each, and restart the ranks of every node when one fails (a lost node: the
budget `--max-restarts` per agent) or when a node asks to join (a grow: not counted). The ranks resume
from the latest checkpoint at every start, on whatever world size the nodes make
(`hipscale.training.elastic`).

What this supervisor adds to torchrun:
- An agreed stop (NaN guard, too many bad samples, a configuration error) ends the job for good: the
  ranks write its exit status to this node's outcome file and exit 0, so torchrun does not restart
  them, and this command exits with the status.
- A node cut off from the head node (no TCP answer from the rendezvous endpoint for `--cutoff-s`) stops
  its ranks and its agent (whose store requests may hang on a silent network), then waits for the head
  to answer again, for at most `--rejoin-s`, and starts a new agent that joins the running job.
- Losing the head node ends the job: its agent holds the rendezvous, so nothing can continue. From
  another node that looks like a refused connection (its agent died with the node's processes) or like
  silence; the first ends at once, the second after `--rejoin-s`. Either way the line names the host.
- Nothing outlives an attempt: this process is a child subreaper, and after torchrun ends every process
  left below it (ranks in sessions of their own, their DataLoader workers) gets `--stop-grace-s` to
  finish a save, then SIGKILL.
- SIGTERM, SIGINT or SIGUSR1 (a scheduler's preemption) is forwarded to torchrun once, which forwards
  it to the ranks: they save a checkpoint and exit; this command exits 143 and does not rejoin.

Exit status: 0 done; the agreed stop's status (2 configuration, 3 NaN guard, 4 bad samples); 143
preempted; 1 the job failed (the head node was lost, this node stayed cut off, the restart budget was spent).
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hipscale.training.elastic import OUTCOME_VARIABLE, WORLD_SIZES_VARIABLE, read_outcome

_PR_SET_CHILD_SUBREAPER = 36
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EXIT_FAILED, EXIT_PREEMPTED = 1, 143


def say(message: str) -> None:
    print(f"hipscale.launch.elastic: {message}", file=sys.stderr, flush=True)


@dataclass
class Options:
    head: str
    port: int
    min_nodes: int
    max_nodes: int
    nproc_per_node: int
    run_id: str
    max_restarts: int
    last_call_s: int
    keep_alive_s: int
    cutoff_s: float
    join_s: float
    rejoin_s: float
    stop_grace_s: float
    train_args: list[str]


def parse_args(argv: Optional[list[str]]) -> Options:
    parser = argparse.ArgumentParser(prog="python -m hipscale.launch.elastic", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", required=True, metavar="HOST[:PORT]",
                        help="the head node, which hosts the rendezvous (port default 29400)")
    parser.add_argument("--nnodes", required=True, metavar="MIN:MAX", help="node counts the job may train on")
    parser.add_argument("--nproc-per-node", type=int, required=True, help="ranks per node (GPUs per node)")
    parser.add_argument("--run-id", default=os.environ.get("SLURM_JOB_ID"),
                        help="the job's id, the same on every node (default: SLURM_JOB_ID)")
    parser.add_argument("--max-restarts", type=int, default=10,
                        help="restarts of the ranks after a failure, per agent (joins do not count; default 10)")
    parser.add_argument("--last-call-s", type=int, default=10,
                        help="how long a rendezvous with enough nodes waits for more (default 10)")
    parser.add_argument("--keep-alive-s", type=int, default=5,
                        help="agents' keep-alive interval; an agent silent for 3 of them is dropped (default 5)")
    parser.add_argument("--cutoff-s", type=float, default=60,
                        help="a node that gets no answer from the head for this long stops its ranks (default 60)")
    parser.add_argument("--join-s", type=float, default=600,
                        help="how long a node waits for the head at the first start (default 600)")
    parser.add_argument("--rejoin-s", type=float, default=600,
                        help="how long a cut-off node waits for the head before it gives up (default 600)")
    parser.add_argument("--stop-grace-s", type=float, default=float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
                                                                                      120)),
                        help="seconds the ranks get to save after a stop signal before SIGKILL (default: "
                             "TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else 120)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of hipscale.train")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if "--config" not in train_args:
        parser.error("give the training arguments after --, at least --config CONFIG")
    if not args.run_id:
        parser.error("--run-id is needed (outside SLURM): the same id on every node of the job")
    try:
        low, high = (int(v) for v in args.nnodes.split(":")) if ":" in args.nnodes else (int(args.nnodes),) * 2
    except ValueError:
        parser.error(f"--nnodes must be MIN:MAX (or N), got {args.nnodes!r}")
    if not 1 <= low <= high:
        parser.error(f"--nnodes must satisfy 1 <= MIN <= MAX, got {args.nnodes!r}")
    host, _, port = args.head.partition(":")
    return Options(host, int(port or 29400), low, high, args.nproc_per_node, args.run_id, args.max_restarts,
                   args.last_call_s, args.keep_alive_s, args.cutoff_s, args.join_s, args.rejoin_s, args.stop_grace_s,
                   train_args)


def is_local(host: str) -> bool:
    """Does `host` name this machine? (An address of it can be bound.)"""
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return False
    with socket.socket() as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def probe(host: str, port: int, timeout: float = 3.0) -> str:
    """"up" (the endpoint accepts connections), "refused" (the host answers, nothing listens) or "silent"."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "up"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return "refused" if e.errno == errno.ECONNREFUSED else "silent"


def torchrun_command(o: Options, is_head: bool) -> list[str]:
    conf = (f"is_host={int(is_head)},last_call_timeout={o.last_call_s},keep_alive_interval={o.keep_alive_s},"
            f"keep_alive_max_attempt=3,read_timeout={max(10, int(o.cutoff_s))},join_timeout={int(o.join_s)}")
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", f"{o.min_nodes}:{o.max_nodes}",
            "--nproc-per-node", str(o.nproc_per_node), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{o.head}:{o.port}", "--rdzv-id", o.run_id, "--rdzv-conf", conf,
            "--max-restarts", str(o.max_restarts), "--monitor-interval", "1",
            "-m", "hipscale.train", "--elastic", *o.train_args]


def descendants() -> list[int]:
    """PIDs of every live process below this one (orphans come to this subreaper)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    found, frontier = [], [os.getpid()]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def reap() -> None:
    """Collect exited children (orphaned ranks and workers come to this subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def end_everything_below(grace: float) -> None:
    """Give the processes left below this one `grace` seconds to exit, then SIGKILL them."""
    deadline = time.monotonic() + grace
    while (left := descendants()) and time.monotonic() < deadline:
        reap()
        time.sleep(0.2)
    for pid in descendants():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.1)
    reap()
    if left:
        say(f"killed {len(left)} processes left {grace:.0f} s after the agent ended")


class Supervisor:
    """Runs the node's agent until the job ends (see the module docstring)."""

    def __init__(self, options: Options):
        self.o = options
        self.is_head = is_local(options.head)
        self.stop_signal: Optional[int] = None
        self.agent: Optional[subprocess.Popen] = None
        self.rendezvous_closed = False
        self.outcome = Path(tempfile.mkdtemp(prefix="hipscale-elastic-")) / "outcome.json"

    def _on_signal(self, signum: int, frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            say(f"signal {signal.Signals(signum).name}: stopping the ranks (they save a checkpoint)")
            if self.agent is not None and self.agent.poll() is None:
                self.agent.send_signal(signal.SIGTERM)

    def run(self) -> int:
        try:
            return self._supervise()
        finally:
            shutil.rmtree(self.outcome.parent, ignore_errors=True)

    def _supervise(self) -> int:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1)
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        endpoint = f"{self.o.head}:{self.o.port}"
        say(f"{'head node, hosting' if self.is_head else 'joining'} the rendezvous {endpoint} of job "
            f"{self.o.run_id} ({self.o.min_nodes}:{self.o.max_nodes} nodes x {self.o.nproc_per_node} ranks)")
        wait_s, joined = self.o.join_s, False
        while True:
            if not self.is_head:
                status = self._wait_for_head(wait_s, joined)
                if status is not None:
                    return status
            cut_off = self._run_agent()
            joined = True
            status = self._finished(cut_off)
            if status is not None:
                return status
            wait_s = self.o.rejoin_s
            say(f"cut off from the head node: waiting up to {wait_s:.0f} s for {endpoint} to rejoin the job")

    def _wait_for_head(self, wait_s: float, joined: bool) -> Optional[int]:
        """Wait until the rendezvous endpoint answers; an exit status when the job is over for this node."""
        deadline = time.monotonic() + wait_s
        endpoint = f"{self.o.head}:{self.o.port}"
        while True:
            state = probe(self.o.head, self.o.port)
            if state == "up":
                return None
            if self.stop_signal is not None:
                return EXIT_PREEMPTED
            if state == "refused" and joined:
                say(f"error: lost the rendezvous host {endpoint}: it answers but its agent is gone (the head "
                    f"node's job ended or was killed); the job ends")
                return EXIT_FAILED
            if time.monotonic() > deadline:
                say(f"error: lost the rendezvous host {endpoint}: no answer for {wait_s:.0f} s (the head node is "
                    f"gone, or this node stays cut off); the job ends on this node")
                return EXIT_FAILED
            time.sleep(1.0)

    def _run_agent(self) -> bool:
        """Run torchrun to its end, watching the head from other nodes; True if this node was cut off."""
        self.outcome.unlink(missing_ok=True)
        # A fresh store per start, hosted by rank 0: torchrun's agent would otherwise share its own store with
        # the ranks and keep it across restarts, and gloo's connection set-up then reads the addresses of the
        # previous start's ranks (connectFullMesh: connection refused; pytorch/pytorch#135712).
        sizes = ",".join(str(n * self.o.nproc_per_node) for n in range(self.o.min_nodes, self.o.max_nodes + 1))
        env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
                   **{OUTCOME_VARIABLE: str(self.outcome), WORLD_SIZES_VARIABLE: sizes})
        self.agent = subprocess.Popen(torchrun_command(self.o, self.is_head), env=env, start_new_session=True,
                                      stderr=subprocess.PIPE)
        relay = threading.Thread(target=self._relay, args=(self.agent.stderr,), daemon=True)
        relay.start()
        silent_since: Optional[float] = None
        cut_off = False
        while self.agent.poll() is None:
            time.sleep(1.0)
            if self.is_head or self.stop_signal is not None or cut_off:
                continue
            if probe(self.o.head, self.o.port) != "silent":
                silent_since = None
                continue
            silent_since = silent_since or time.monotonic()
            if time.monotonic() - silent_since > self.o.cutoff_s:
                say(f"no answer from the rendezvous host {self.o.head}:{self.o.port} for {self.o.cutoff_s:.0f} s: "
                    f"this node is cut off; stopping its ranks and agent")
                cut_off = True
                self.agent.send_signal(signal.SIGTERM)
                try:
                    self.agent.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.agent.kill()  # hung in a store request to the silent head
        grace = self.o.stop_grace_s if self.stop_signal is not None else 10.0
        end_everything_below(grace)
        relay.join(timeout=5)
        return cut_off

    def _relay(self, stream) -> None:
        """Copy the agent's (and its ranks') stderr to ours, noting a closed rendezvous on the way."""
        for line in iter(stream.readline, b""):
            if b"RendezvousClosedError" in line:
                self.rendezvous_closed = True
            sys.stderr.buffer.write(line)
            sys.stderr.buffer.flush()

    def _finished(self, cut_off: bool) -> Optional[int]:
        """The exit status when the job is over for this node, None when it should rejoin."""
        rc = self.agent.returncode
        outcome = read_outcome(self.outcome)
        if outcome is not None:
            say(f"the ranks stopped the job for good (exit status {outcome['status']}): {outcome['reason']}")
            return int(outcome["status"])
        if self.stop_signal is not None:
            say(f"stopped by signal {signal.Signals(self.stop_signal).name} (the ranks saved a checkpoint); "
                f"rerun the same command on every node to continue")
            return EXIT_PREEMPTED
        if rc == 0:
            return 0
        if self.rendezvous_closed and not self.is_head:
            say("the job's rendezvous is closed: the job ended before this node could join (its outcome is in the "
                "head node's log); nothing to do here")
            return 0
        if self.is_head:
            say(f"error: the agent on the head node ended with status {rc}; the job ends")
            return EXIT_FAILED
        state = "silent" if cut_off else probe(self.o.head, self.o.port)
        endpoint = f"{self.o.head}:{self.o.port}"
        if state == "silent":
            return None
        if state == "refused":
            say(f"error: lost the rendezvous host {endpoint}: it answers but its agent is gone (the head node's "
                f"job ended or was killed); the job ends")
        else:
            say(f"error: the agent ended with status {rc} while the head node still hosts the rendezvous (the "
                f"restart budget was spent, or the job ended); the job ends on this node")
        return EXIT_FAILED


def main(argv: Optional[list[str]] = None) -> None:
    options = parse_args(argv)
    say(f"torchrun: {' '.join(torchrun_command(options, is_local(options.head))[1:])}")
    sys.exit(Supervisor(options).run())


if __name__ == "__main__":
    main()
