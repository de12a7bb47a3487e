"""Shards built in supervised worker processes: an item that hangs or kills its worker is rejected, not fatal.

Every shard is built by a process of its own (forked, in its own process group, killed when the parent
dies), which shares with the parent three numbers: the item it is encoding, since when, and how many items
it has finished. The parent polls them. An item that takes longer than ``item_timeout_s`` gets its worker's
whole process group killed (ffmpeg children included) and is rejected as ``timeout``; a worker that dies
while encoding an item (killed for memory, a crash in a decoder, an exception) gets that item rejected as
``worker_died``. Either way the shard is built again from its start with that item left out, so a shard
needs at most one attempt per item it holds.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from hipscale.data.sharding.shard_writer import Encoder, Rejection, ShardJob, ShardResult, build_shard, completed_shard
from hipscale.processes import die_with_parent

DEFAULT_ITEM_TIMEOUT_S = 300.0
_ITEM, _SINCE, _DONE = range(3)  # the shared numbers of a worker


@dataclass
class _Worker:
    job: ShardJob
    process: Any  # multiprocessing Process
    state: Any  # shared doubles: item being encoded (-1: none), since (monotonic), items finished


def run_supervised(work_dir: Path, jobs: Sequence[ShardJob], encode: Encoder, workers: int, item_timeout_s: float,
                   on_items: Callable[[int], None], known: Mapping[str, Mapping[int, Rejection]] = {},
                   on_rejected: Callable[[ShardJob, int, Rejection], None] = lambda job, index, rejection: None,
                   ) -> Iterator[ShardResult]:
    """Builds the shards in ``workers`` processes and yields each as it completes (in completion order).

    Args:
        work_dir: Folder of the tars and of ``status/``.
        jobs: The shards to build.
        encode: See :func:`hipscale.data.sharding.shard_writer.build_shard`.
        workers: Processes at once.
        item_timeout_s: Seconds one item may take to encode.
        on_items: Called with the number of items newly finished (progress).
        known: Items (shard -> index in the shard -> rejection) that killed or hung a worker of an earlier
            attempt: rejected again without running them.
        on_rejected: Called as soon as an item killed or hung its worker (to record it for other attempts).

    Yields:
        Each complete shard.

    Raises:
        RuntimeError: A worker died twice outside any item (writing its tar, say: a full disk).
    """
    context = mp.get_context("fork")
    errors = context.SimpleQueue()
    pending = collections.deque(jobs)
    running: list[_Worker] = []
    failed: dict[str, dict[int, Rejection]] = collections.defaultdict(dict, {n: dict(r) for n, r in known.items()})
    counted: dict[str, int] = collections.defaultdict(int)
    outside_items: collections.Counter = collections.Counter()
    messages: dict[str, str] = {}  # the exception that ended a worker, by shard
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.popleft()
                state = context.RawArray("d", [-1.0, 0.0, 0.0])
                process = context.Process(target=_build_in_child, name=f"shard {job.name}",
                                          args=(job, encode, work_dir, state, dict(failed[job.name]), errors,
                                                os.getpid()))
                process.start()
                running.append(_Worker(job, process, state))
            multiprocessing.connection.wait([w.process.sentinel for w in running], timeout=0.2)
            for worker in list(running):
                name = worker.job.name
                finished = int(worker.state[_DONE])
                if finished > counted[name]:
                    on_items(finished - counted[name])
                    counted[name] = finished
                item = int(worker.state[_ITEM])
                code = worker.process.exitcode
                if code is None:
                    if item >= 0 and time.monotonic() - worker.state[_SINCE] > item_timeout_s:
                        _kill(worker.process)
                        running.remove(worker)
                        failed[name][item] = _rejection(worker.job, item, "timeout",
                                                        f"encoding took more than {item_timeout_s:g} s "
                                                        "(the per-item timeout); its worker was killed")
                        on_rejected(worker.job, item, failed[name][item])
                        pending.appendleft(worker.job)
                    continue
                running.remove(worker)
                if code == 0:
                    result = completed_shard(work_dir, worker.job)
                    if result is None:
                        raise RuntimeError(f"the worker building {name} exited without writing it to {work_dir}")
                    yield result
                    continue
                messages.update(_drain(errors))  # a worker's message is in the pipe before it exits
                cause = f"raised {messages.pop(name)}" if name in messages else _describe_exit(code)
                if item < 0:
                    outside_items[name] += 1
                    if outside_items[name] > 1:
                        raise RuntimeError(f"the worker building {name} {cause} twice outside any item")
                else:
                    failed[name][item] = _rejection(worker.job, item, "worker_died",
                                                    f"its worker process {cause} while encoding it")
                    on_rejected(worker.job, item, failed[name][item])
                pending.appendleft(worker.job)
    finally:
        for worker in running:
            _kill(worker.process)


def _build_in_child(job: ShardJob, encode: Encoder, work_dir: Path, state: Any, failed: dict[int, Rejection],
                    errors: Any, parent: int) -> None:
    os.setpgid(0, 0)  # the parent kills this group: ffmpeg children go too
    die_with_parent()
    if os.getppid() != parent:
        os._exit(1)

    def start(index: int) -> None:
        state[_SINCE] = time.monotonic()
        state[_ITEM] = index

    def finish() -> None:
        state[_ITEM] = -1
        state[_DONE] += 1

    try:
        build_shard(job, encode, work_dir, finish, start, failed)
    except Exception as error:  # noqa: BLE001 - reported to the parent, which rejects the item
        traceback.print_exc()
        errors.put((job.name, f"{type(error).__name__}: {error}"))
        os._exit(1)


def _drain(errors: Any) -> dict[str, str]:
    messages = {}
    while not errors.empty():
        name, message = errors.get()
        messages[name] = message
    return messages


def _rejection(job: ShardJob, index: int, reason: str, detail: str) -> Rejection:
    item = job.items[index]
    return Rejection(item.id, item.source, reason, detail)


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _kill(process: Any) -> None:
    """SIGKILL to the worker's process group (or the worker alone, before it made its group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        process.kill()
    process.join()
