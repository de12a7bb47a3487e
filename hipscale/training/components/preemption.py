"""SIGTERM / SIGUSR1 mark the run for a checkpoint-and-exit at the next step boundary."""
from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Optional

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Set by a preemption signal; the trainer all-reduces it so every rank stops at the same step."""

    def __init__(self):
        self.signal: Optional[int] = None
        self.time: Optional[float] = None  # wall time of the first signal

    def install(self) -> None:
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signal is None:
            self.signal, self.time = signum, time.time()

    @property
    def raised(self) -> bool:
        return self.signal is not None
