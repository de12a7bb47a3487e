"""Finding a DataLoader worker that makes no progress, from outside it, and naming what it was on.

A worker can hang on one sample: a decoder that deadlocks (in native code, maybe holding the GIL), a read
of a network filesystem that never returns. PyTorch's DataLoader then waits forever (or, with `timeout=`,
raises without naming the worker or the sample), and a watchdog thread inside the worker can be starved
by the very decoder it watches. So each worker writes what it is doing into shared memory, `WorkerProgress`
(a few stores per sample), and a thread of the rank, `StallWatch`, reads it: a worker busy on the same
thing for longer than the timeout is SIGKILLed, after its record was kept. The rank's DataLoader then
finds the worker dead and raises, and the loader raises `WorkerStalledError` with the record instead.
A worker waiting for its next batch request is idle and never counts as stalled.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

import numpy as np
import torch

from hipscale.data.errors import WorkerStalledError

_IDLE, _BUSY = 0.0, 1.0
_PID, _STATE, _SINCE, _LENGTH = range(4)
_TEXT_BYTES = 480


class WorkerProgress:
    """What each worker of one DataLoader is doing, in shared memory (works across fork and the fork server).

    Args:
        num_workers: the DataLoader's workers.
    """

    def __init__(self, num_workers: int):
        self.numbers = torch.zeros(num_workers, 4, dtype=torch.float64).share_memory_()  # pid, state, since, length
        self.text = torch.zeros(num_workers, _TEXT_BYTES, dtype=torch.uint8).share_memory_()
        self._all_numbers, self._all_text = self.numbers.numpy(), self.text.numpy()
        self._row: Optional[np.ndarray] = None
        self._chars: Optional[np.ndarray] = None

    def __getstate__(self) -> dict:
        """Workers get the shared tensors only (their views are made in `bind`)."""
        return {"numbers": self.numbers, "text": self.text}

    def __setstate__(self, state: dict) -> None:
        self.numbers, self.text = state["numbers"], state["text"]
        self._all_numbers, self._all_text = self.numbers.numpy(), self.text.numpy()
        self._row = self._chars = None

    # In the worker.
    def bind(self, worker_id: int) -> None:
        """Called once in worker `worker_id`: its row, and its pid for the watch."""
        self._row, self._chars = self._all_numbers[worker_id], self._all_text[worker_id]
        self._row[_PID] = os.getpid()

    def working(self, what: str) -> None:
        """The worker starts on `what` now ("decoding sample <shard>/<key> of <dataset>", ...)."""
        if self._row is None:
            return
        data = what.encode()[:_TEXT_BYTES]
        self._chars[:len(data)] = np.frombuffer(data, dtype=np.uint8)
        self._row[_LENGTH] = len(data)
        self._row[_SINCE] = time.monotonic()
        self._row[_STATE] = _BUSY

    def idle(self) -> None:
        """The worker handed its batch over and waits for the next request."""
        if self._row is not None:
            self._row[_STATE] = _IDLE

    # In the rank.
    def stalled(self, timeout_s: float) -> Optional[tuple[int, int, float, str]]:
        """(worker, pid, seconds, what) of a worker busy on one thing for more than `timeout_s`, else None."""
        now = time.monotonic()
        for worker, row in enumerate(self._all_numbers):
            if row[_STATE] == _BUSY and now - row[_SINCE] > timeout_s:
                what = bytes(self._all_text[worker, :int(row[_LENGTH])]).decode(errors="replace")
                return worker, int(row[_PID]), now - row[_SINCE], what
        return None


class NoProgress:
    """What a worker records when nobody watches: nothing."""

    def working(self, what: str) -> None:
        pass

    def idle(self) -> None:
        pass


class StallWatch:
    """A thread of the rank that SIGKILLs a stalled worker and keeps why (`error`).

    Args:
        progress: the DataLoader's `WorkerProgress`.
        timeout_s: seconds a worker may spend on one sample (or one read) before it counts as stalled.
        rank: the rank, for the message.
    """

    def __init__(self, progress: WorkerProgress, timeout_s: float, rank: int):
        self.progress, self.timeout_s, self.rank = progress, timeout_s, rank
        self.error: Optional[WorkerStalledError] = None
        self._stop = threading.Event()
        # Not a daemon: the interpreter's exit would stop a daemon thread wherever it is, and when it holds the
        # last reference to the shared tensors, inside torch's C++ deallocation, which aborts the process
        # ("terminate called without an active exception"). This one ends by itself once the main thread has
        # finished (an iteration left unfinished at exit) or the iteration ends, within a poll.
        self._thread = threading.Thread(target=self._watch, name="hipscale-worker-watch")

    def __enter__(self) -> "StallWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _watch(self) -> None:
        main = threading.main_thread()
        while not self._stop.wait(min(0.25, self.timeout_s / 4)) and main.is_alive():
            found = self.progress.stalled(self.timeout_s)
            if found is None:
                continue
            worker, pid, seconds, what = found
            self.error = WorkerStalledError(
                f"DataLoader worker {worker} (pid {pid}) of rank {self.rank} made no progress for {seconds:.0f} s "
                f"(data.worker_timeout_s={self.timeout_s:g}) while {what}; it was killed")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
