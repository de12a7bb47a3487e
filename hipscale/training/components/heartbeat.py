"""Finding a lost node in seconds, not at the collective timeout.

A node that dies cleanly (its processes killed, its kernel alive) resets its TCP connections and the
other ranks fail at once. A node that vanishes (power, a cable, a switch port, a kernel panic) sends
nothing: the others wait in their collective until `distributed.timeout_s`, which must be long enough
for legitimate waits (a first-step compile, a large save), 30 minutes by default.

So every rank beats: a thread bumps the rank's counter in the job's rendezvous store (the TCPStore at
MASTER_ADDR:MASTER_PORT that rank 0 or, under torchrun, the launcher agent on the first node serves)
a few times per `distributed.heartbeat_timeout_s`. Rank 0 watches every counter; one that has not moved
for the timeout names its rank and node, with the node's other ranks that fell silent too, and posts what
it found in the store, where every other rank reads it at its next beat and leaves too (a rank blocked in
a collective with the lost node would otherwise wait for distributed.timeout_s). A rank that cannot reach
the store for the timeout has lost the first node. Either way the watcher calls `on_lost` with a one-line
description and the wall time of the loss (the last sign of life), which ends the process (a launcher
then ends the rest of the job, or an elastic one restarts it on the nodes left).
Keys live under the start's id: a launcher may keep its store across restarts of the ranks (torchrun's agent
shares its own with them unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which launchers/elastic.sh sets).
Traffic: two small requests per rank per beat, and one per rank from rank 0.
"""
from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from typing import Callable, Optional

import torch.distributed as dist

BEATS_PER_TIMEOUT = 6


def describe_ranks(ranks: list[int], hosts: list[str]) -> str:
    """'node2 (198.18.0.2): ranks 2, 3' for lost ranks, grouped by the host they ran on."""
    by_host: dict[str, list[int]] = {}
    for r in ranks:
        by_host.setdefault(hosts[r], []).append(r)
    return "; ".join(f"{host}: rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}"
                     for host, rs in by_host.items())


class Heartbeat:
    """Beats for this rank and, on rank 0, watches every rank's beats (daemon threads)."""

    def __init__(self, timeout_s: int, hosts: list[str], start: str, on_lost: Callable[[str, float], None]):
        """
        Args:
            timeout_s: seconds without a beat (or without the store) after which a rank counts as lost.
            hosts: every rank's "hostname (address)", indexed by rank (`distributed.rank_hosts()`).
            start: this start's id (`elastic.start_id()`), the prefix of its keys.
            on_lost: called once, from a heartbeat thread, with the description of what was lost and the wall
                time it was last heard of; it should end the process (it runs while the main thread may be
                blocked in a collective).
        """
        self.timeout_s = timeout_s
        self.interval = timeout_s / BEATS_PER_TIMEOUT
        self.hosts = hosts
        self.prefix = f"hipscale/heartbeat/{start}/"
        self.on_lost = on_lost
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.store_name = (f"the job's rendezvous store at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
                           f"on {hosts[0]}, rank 0's node")
        self._stop = threading.Event()
        self._reported = threading.Lock()
        self._last_answer = time.monotonic()
        self._threads = [threading.Thread(target=self._beat, name="hipscale-heartbeat", daemon=True),
                         # A store request to a vanished node can block far longer than the timeout (no
                         # reset ever arrives), so a second thread watches how old the last answer is.
                         threading.Thread(target=self._watch_store, name="hipscale-store-watch", daemon=True)]

    def start(self) -> "Heartbeat":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and watching (before the final barrier: after it, rank 0's store may be gone)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s)

    def _report(self, what: str, since: float) -> None:
        """`since`: the monotonic time of the last sign of life of what was lost."""
        if not self._stop.is_set() and self._reported.acquire(blocking=False):
            self.on_lost(what, time.time() - (time.monotonic() - since))

    def _beat(self) -> None:
        lost_key = f"{self.prefix}lost"
        try:
            # A connection of its own: the default group's store client is not shared with another thread.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  wait_for_workers=False, timeout=datetime.timedelta(seconds=self.timeout_s))
            last_count = [-1] * self.world_size
            last_change = [time.monotonic()] * self.world_size
            while not self._stop.wait(self.interval):
                store.add(f"{self.prefix}{self.rank}", 1)
                if self.rank != 0 and store.check([lost_key]):
                    self._last_answer = time.monotonic()
                    return self._report(f"rank 0 found: {store.get(lost_key).decode()}", self._last_answer)
                # add(key, 0) reads a counter without waiting for a rank that has not beaten yet (get would).
                counts = ([store.add(f"{self.prefix}{r}", 0) for r in range(self.world_size)]
                          if self.rank == 0 else [])
                now = self._last_answer = time.monotonic()
                for r, count in enumerate(counts):
                    if count != last_count[r]:
                        last_count[r], last_change[r] = count, now
                silent = [r for r in range(len(counts)) if now - last_change[r] > self.timeout_s]
                if silent:
                    # The other ranks of a lost node fell silent at the same moment, give or take a beat.
                    lost_hosts = {self.hosts[r] for r in silent}
                    silent += [r for r in range(len(counts)) if r not in silent and self.hosts[r] in lost_hosts
                               and now - last_change[r] > 2 * self.interval]
                    what = (f"lost {describe_ranks(sorted(silent), self.hosts)}: no heartbeat for "
                            f"{self.timeout_s} s (distributed.heartbeat_timeout_s)")
                    store.set(lost_key, what)  # the other ranks leave at their next beat
                    return self._report(what, min(last_change[r] for r in silent))
        except Exception as e:  # noqa: BLE001 - a refused, reset or timed-out connection all mean the same
            first = (str(e).strip().splitlines() or [""])[0][:200]
            self._report(f"lost {self.store_name}: {first}", self._last_answer)

    def _watch_store(self) -> None:
        while not self._stop.wait(self.interval):
            if time.monotonic() - self._last_answer > self.timeout_s:
                return self._report(f"lost {self.store_name}: no answer for {self.timeout_s} s "
                                    f"(distributed.heartbeat_timeout_s)", self._last_answer)


def start_heartbeat(timeout_s: int, hosts: list[str], start: str,
                    on_lost: Callable[[str, float], None]) -> Optional[Heartbeat]:
    """A started `Heartbeat`, or None when there is nothing to watch (timeout 0, a single rank) or no store
    address to beat to (no MASTER_ADDR/MASTER_PORT; rank 0 then says so)."""
    if not timeout_s or len(hosts) < 2:
        return None
    if not {"MASTER_ADDR", "MASTER_PORT"} <= set(os.environ):
        if dist.get_rank() == 0:
            print("hipscale.train: warning: no MASTER_ADDR/MASTER_PORT to send heartbeats to; a silent node is "
                  "found after distributed.timeout_s only", file=sys.stderr, flush=True)
        return None
    return Heartbeat(timeout_s, hosts, start, on_lost).start()
