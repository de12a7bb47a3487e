"""Progress of the attempts working a plan, published next to the shards for ``python -m hipscale.data.status``.

Each ``work`` attempt writes ``progress/<attempt>.json`` every few seconds and when it ends: its host, units,
the items it encoded, the items encoded in shards it has not finished yet, its rejections, and when it started
and last wrote. Together with the status files of the finished shards that is the whole job's progress,
whichever engine (SLURM, Ray, a shell loop) runs the attempts.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Sequence

from hipscale.data.format.dataset_info import writer_tag

PROGRESS_DIR = "progress"


class ProgressReport:
    """This attempt's progress, written to `destination` at most every `every_s` seconds (and at the end).

    Args:
        destination: A :mod:`hipscale.data.sharding.shard_destination` destination (``write_json``).
        units: The units this attempt works on.
        every_s: Least seconds between two writes.
    """

    def __init__(self, destination: Any, units: Sequence[int], every_s: float = 5.0):
        self.destination, self.every_s = destination, every_s
        self.name = f"{PROGRESS_DIR}/{writer_tag()}.json"
        self.content: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "units": list(units),
                                        "items_done": 0, "items_in_flight": 0, "rejected": 0,
                                        "started": time.time(), "updated": 0.0, "finished": False}
        self._write()

    def advanced(self, items: int) -> None:
        """`items` more items encoded (or rejected) in shards not finished yet."""
        self.content["items_done"] += items
        self.content["items_in_flight"] += items
        self._maybe_write()

    def shard_finished(self, items: int) -> None:
        """A shard of `items` items was published: they count in its status from now on."""
        self.content["items_in_flight"] = max(0, self.content["items_in_flight"] - items)
        self._maybe_write()

    def rejected(self, items: int) -> None:
        self.content["rejected"] += items
        self._maybe_write()

    def close(self, finished: bool) -> None:
        """The last write: `finished` when every shard of the units is complete."""
        self.content["finished"] = finished
        self._write()

    def _maybe_write(self) -> None:
        if time.time() - self.content["updated"] >= self.every_s:
            self._write()

    def _write(self) -> None:
        self.content["updated"] = time.time()
        self.destination.write_json(self.name, self.content)
