"""Writes into the run folder that name their file when the disk is full.

A full disk surfaces in many shapes: `OSError: [Errno 28] No space left on device` without a file name
(a buffered flush of metrics.jsonl, TensorBoard's writer thread), or `RuntimeError: [enforce fail at
inline_container.cc] ... unexpected pos` from `torch.save` (errno lost in C++). `writing(path, what)` turns
each into a `DiskFullError` that names the path, what was being written and the space left, so that the
failing rank's report says what to free.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path
from typing import Iterator

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# After a write failed for lack of space the filesystem is (almost) full: partial writes took what was left.
_NEARLY_FULL_BYTES = 16 << 20
# A collective inside a write (DeepSpeed's save has barriers) that lost a peer is not a full disk.
_PEER_ERROR = re.compile(r"gloo|NCCL|Connection|Socket|ProcessGroup|Broken pipe")


class DiskFullError(OSError):
    """No space (or quota) left on the device of a file the run writes."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def free_bytes(path: Path) -> tuple[int, int] | None:
    """(bytes available to this user, total bytes) of the filesystem holding `path` (or its nearest existing
    parent); None if it cannot be told."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize, stats.f_blocks * stats.f_frsize


def is_disk_full(error: BaseException, path: Path) -> bool:
    """Whether `error`, raised while writing under `path`, means the disk (or a quota) is full: ENOSPC/EDQUOT
    anywhere in its chain, or a failed write (an OSError or torch's RuntimeError) on a filesystem that now has
    less than 16 MiB left."""
    if any(isinstance(e, OSError) and e.errno in _FULL_ERRNOS for e in _chain(error)):
        return True
    if not isinstance(error, (OSError, RuntimeError)) or _PEER_ERROR.search(str(error)):
        return False
    space = free_bytes(path)
    return space is not None and space[0] < _NEARLY_FULL_BYTES


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def describe_full(path: Path, what: str) -> str:
    space = free_bytes(path)
    left = f"{_mib(space[0])} free of {_mib(space[1])}" if space else "free space unknown"
    return f"disk full: no space left on the device of {path} ({what}; {left})"


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Run a write of `what` to `path` (a file or folder); a full disk raises `DiskFullError` naming both."""
    try:
        yield
    except DiskFullError:
        raise
    except (OSError, RuntimeError) as error:
        if is_disk_full(error, path):
            raise DiskFullError(describe_full(path, what)) from error
        raise
