"""How a training process ends: exit statuses, stops every rank agrees on, and the report of a failure.

Exit statuses of `python -m hipscale.train` (each rank; launchers pass on the first non-zero one):
    0    training finished
    1    this rank failed (an exception, or it lost the other ranks); the job is ended at once
    2    bad configuration or setup (before any step, or a checkpoint folder that is not shared)
    3    the NaN guard stopped the run
    4    more unreadable training samples than data.max_bad_samples, counted over all ranks
    5    training finished and its last checkpoint (and export) are saved, but the final evaluation failed; or
         a periodic evaluation failed (the checkpoint before it is the one to resume)
    75   (--elastic) this rank lost another node, a rank or the rendezvous store: torchrun restarts the ranks
         on the nodes that are left (EX_TEMPFAIL)
    143  preempted (SIGTERM/SIGUSR1): a checkpoint was saved; requeue and run with --resume auto.
         128 + SIGTERM is what Kubernetes' ExitCode restart policy and most schedulers treat as retryable.
Under --elastic with launchers/elastic.sh, statuses 2, 3, 4 and 5 are handed to the launcher
(hipscale.training.elastic) and the ranks exit 0, so that torchrun does not restart them.
"""
from __future__ import annotations

import re
import sys
import traceback
from typing import Optional

from hipscale.data.errors import WorkerStalledError
from hipscale.training.components.disk import DiskFullError

EXIT_DONE, EXIT_FAILED, EXIT_CONFIG, EXIT_NONFINITE, EXIT_BAD_DATA, EXIT_EVAL, EXIT_PREEMPTED = 0, 1, 2, 3, 4, 5, 143
EXIT_RESTART = 75

# What torch.distributed's backends say when a peer process is gone or a collective timed out.
_LOST_PEER = re.compile(r"Connection (closed|reset) by peer|Broken pipe|NCCL communicator was aborted|"
                        r"ProcessGroup.*(abort|terminated)|Socket Timeout|Connection refused", re.IGNORECASE)
_PEER_ADDRESS = re.compile(r"\[([0-9A-Fa-f.:]+)\]:\d+")  # gloo: "Read error [198.18.0.2]:31390: Connection reset"
_TIMED_OUT = re.compile(r"Timed out|timeout|Watchdog caught collective operation timeout", re.IGNORECASE)


class AgreedStop(RuntimeError):
    """A stop every rank decides at the same step from all-reduced values; rank 0 reports it."""

    exit_status = EXIT_FAILED


class NonFiniteError(AgreedStop):
    """Too many optimizer steps in a row were skipped for a NaN/inf loss or gradient."""

    exit_status = EXIT_NONFINITE


class TooManyBadSamples(AgreedStop):
    """More unreadable training samples than data.max_bad_samples, over all ranks."""

    exit_status = EXIT_BAD_DATA


class SetupError(AgreedStop):
    """A setup problem found after the process group started (e.g. a checkpoint folder that is not shared)."""

    exit_status = EXIT_CONFIG


class EvaluationError(RuntimeError):
    """An evaluation failed (its loader, its data, its metric); the message says which checkpoint holds the
    training so far. Raised on each rank it happens on; the rank exits with EXIT_EVAL."""

    exit_status = EXIT_EVAL


# Errors whose message says everything: reported without their type name.
_SAYS_ALL = (DiskFullError, EvaluationError, WorkerStalledError)


def exit_status_of(error: BaseException) -> int:
    """The exit status of a rank that failed with its own `error`."""
    return EXIT_EVAL if isinstance(error, EvaluationError) else EXIT_FAILED


def describe_failure(error: BaseException, rank: int, where: str, timeout_s: int,
                     hosts: Optional[list[str]] = None) -> tuple[str, bool]:
    """The one-line report of a rank's failure, and whether it is this rank's own fault.

    A rank that merely lost the others (a peer died, or a collective timed out) is not the cause: its
    line says so briefly, names the peer's node when the backend's message gives its address and
    `hosts` (every rank's "hostname (address)") knows it, and the rank whose own error ended the job
    prints the traceback.
    """
    first = (str(error).strip().splitlines() or [""])[0][:300]
    is_dist = isinstance(error, RuntimeError) and ("gloo" in str(error) or "NCCL" in str(error)
                                                   or type(error).__module__.startswith("torch.distributed"))
    if is_dist and _TIMED_OUT.search(str(error)) and not _LOST_PEER.search(str(error)):
        return (f"rank {rank} stopped {where}: no answer from the other ranks within distributed.timeout_s="
                f"{timeout_s} s; a rank stalled or died in this step ({first})"), False
    if is_dist and _LOST_PEER.search(str(error)):
        return f"rank {rank} stopped {where}: lost {_lost_peer(str(error), hosts, rank)} ({first})", False
    if isinstance(error, _SAYS_ALL):  # its message names the cause in full ("disk full: ...")
        return f"rank {rank} failed {where}: {(str(error).strip().splitlines() or [''])[0][:1000]}", True
    return f"rank {rank} failed {where}: {type(error).__name__}: {first}", True


def is_own_failure(error: BaseException) -> bool:
    """False when `error` only means this rank lost the others (a peer died, a collective timed out)."""
    return describe_failure(error, 0, "", 0)[1]


def _lost_peer(message: str, hosts: Optional[list[str]], rank: int) -> str:
    """Which peer a backend's "lost connection" message is about: "node2 (198.18.0.2): ranks 2, 3" when it is
    another node than this rank's (on its own node the address does not tell the ranks apart)."""
    from hipscale.training.components.heartbeat import describe_ranks

    peer = _PEER_ADDRESS.search(message)
    if peer and hosts:
        ranks = [r for r, host in enumerate(hosts) if host.endswith(f"({peer.group(1)})")]
        if ranks and rank not in ranks:
            return f"the connection to {describe_ranks(ranks, hosts)}; that node or rank failed"
    return "the other ranks; another rank failed"


def report_failure(error: BaseException, rank: int, where: str, timeout_s: int,
                   hosts: Optional[list[str]] = None) -> tuple[str, bool]:
    """Print a rank's failure to stderr: the traceback if it is its own fault, then one summary line.

    `where` is "during setup" or "in step N". Returns what `describe_failure` returns."""
    line, own = describe_failure(error, rank, where, timeout_s, hosts)
    if own:
        traceback.print_exception(error, file=sys.stderr)
    print(f"hipscale.train: error: {line}", file=sys.stderr, flush=True)
    return line, own
