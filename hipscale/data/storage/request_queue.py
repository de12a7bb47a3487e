"""The ranged GETs of every download in a process, on a fixed number of streams, the oldest download's first.

A reader downloads the shard it needs next and, at the same time, the one after it
(:class:`~hipscale.data.storage.shard_store.ShardPrefetcher`). Were each download to run its own requests,
the two would split the link and the needed shard would arrive later. Here the requests of both wait in one
queue ordered by (download, offset): the older download's parts go first, and the younger one's fill the
streams the older one leaves idle (while it waits for its HEAD, its first bytes, or is hashing its tail),
so the link stays busy and the shards arrive in the order they are needed.

    queue = request_queue(streams=4)        # this process's queue (made on first use)
    download = queue.new_download()         # a priority: older downloads first
    future = queue.submit(download, offset, lambda: fetch(offset))
"""
from __future__ import annotations

import concurrent.futures
import itertools
import os
import queue
import threading
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

_process_queue: Optional["RequestQueue"] = None
_made = threading.Lock()


def _forget_after_fork() -> None:
    """A forked child has none of the parent's threads (nor a lock one of them held): it makes its own."""
    global _process_queue, _made
    _process_queue, _made = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


class RequestQueue:
    """`streams` threads running requests, the lowest (download, offset) first.

    Args:
        streams: Requests running at once.
    """

    def __init__(self, streams: int) -> None:
        self._waiting: queue.PriorityQueue = queue.PriorityQueue()
        self._downloads = itertools.count()
        self._ties = itertools.count()  # equal priorities run in the order submitted; futures never compare
        for index in range(streams):
            threading.Thread(target=self._serve, name=f"shard-request-{index}", daemon=True).start()

    def new_download(self) -> int:
        """A download's priority: lower than every earlier download's."""
        return next(self._downloads)

    def submit(self, download: int, offset: int, request: Callable[[], T]) -> concurrent.futures.Future:
        """Queues ``request`` (the part at byte `offset` of `download`); the future holds its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._waiting.put((download, offset, next(self._ties), request, future))
        return future

    def _serve(self) -> None:
        while True:
            *_, request, future = self._waiting.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(request())
            except BaseException as error:  # the download that waits on it raises it
                future.set_exception(error)


def request_queue(streams: int) -> RequestQueue:
    """This process's queue (made with `streams` threads on first use in the process)."""
    global _process_queue
    with _made:
        if _process_queue is None:
            _process_queue = RequestQueue(streams)
        return _process_queue
