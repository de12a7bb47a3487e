"""The exit statuses of processes that are not the test's children (a launcher's ranks), from the kernel.

A launcher reaps its ranks and reports at most its own status, so the test listens to the kernel's process
events (the netlink proc connector, root only): every exit on the machine, with its pid and wait status.
"""
from __future__ import annotations

import os
import select
import socket
import struct
import threading
from typing import Optional

import pytest

_NETLINK_CONNECTOR, _CN_IDX_PROC, _CN_VAL_PROC = 11, 1, 1
_LISTEN, _EXIT_EVENT = 1, 0x80000000
_NLMSG_DONE = 3
_NLMSG_HEADER, _CN_HEADER = struct.Struct("=IHHII"), struct.Struct("=IIIIHH")
_EVENT_HEADER = struct.Struct("=IIQ")           # what, cpu, timestamp_ns
_EXIT = struct.Struct("=IIII")                  # pid, tgid, exit_code (a wait status), exit_signal


class ExitWatch:
    """Records {pid: wait status} of every process (not thread) that exits while it is open; a context manager.

    `exit_status(pid)` is the status the process left for its parent: its exit code, or minus the signal that
    killed it, as `subprocess` reports one.
    """

    def __init__(self):
        if os.geteuid() != 0:
            pytest.fail("the exit statuses of a launcher's ranks are read from the kernel's proc connector: run "
                        "the suite as root (as CI does)")
        try:
            self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_CONNECTOR)
            self._socket.bind((0, _CN_IDX_PROC))
            listen = struct.pack("=I", _LISTEN)
            message = _CN_HEADER.pack(_CN_IDX_PROC, _CN_VAL_PROC, 0, 0, len(listen), 0) + listen
            self._socket.send(_NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(message), _NLMSG_DONE, 0, 0, 0) + message)
        except OSError as error:
            pytest.fail(f"the kernel's proc connector (NETLINK_CONNECTOR, process events) is not available: {error}")
        self._statuses: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="exit-watch")

    def __enter__(self) -> "ExitWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close()

    def _listen(self) -> None:
        offset = _NLMSG_HEADER.size + _CN_HEADER.size
        while not self._stop.is_set():
            if not select.select([self._socket], [], [], 0.2)[0]:
                continue
            data = self._socket.recv(65536)
            if len(data) < offset + _EVENT_HEADER.size + _EXIT.size:
                continue
            if _EVENT_HEADER.unpack_from(data, offset)[0] != _EXIT_EVENT:
                continue
            pid, tgid, status, _ = _EXIT.unpack_from(data, offset + _EVENT_HEADER.size)
            if pid == tgid:
                with self._lock:
                    self._statuses[pid] = status

    def exit_status(self, pid: int) -> Optional[int]:
        """The exit code of `pid`, minus the signal that killed it, or None if it has not exited (yet)."""
        with self._lock:
            status = self._statuses.get(pid)
        if status is None:
            return None
        return -(status & 0x7F) if status & 0x7F else status >> 8
