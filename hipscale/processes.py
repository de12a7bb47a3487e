"""Process helpers shared by the sharders and the tools."""
from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the thread that started it exits (no orphan outlives its parent).

    For ``preexec_fn`` or a forked child's first step. It is the starting *thread* that counts: start such
    children from a thread that lives as long as they should (the main thread, usually).
    """
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
