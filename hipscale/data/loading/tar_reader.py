"""Sequential reading of selected samples from shards.

Shards are read front to back with :mod:`tarfile` in random-access mode:
samples that are not wanted are skipped by seeking over their data (only
their 512-byte headers are read). Shards come from a
:class:`~hipscale.data.storage.shard_store.ShardStore` (a local folder, or a URL
through the node's cache, fetched ahead of the reader). A shard that cannot
be opened or fetched, is truncated, or has a broken header turns every wanted
sample after the damage into an error record instead of an exception; the
caller counts and skips them.
"""
import functools
import logging
import tarfile
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import numpy as np

from hipscale.data.format.dataset_info import ShardEntry
from hipscale.data.format.keys import sample_groups
from hipscale.data.loading.plan import EpochPlan
from hipscale.data.storage.shard_store import ShardPrefetcher, ShardStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawSample:
    """The undecoded files of one sample, or why they could not be read.

    Attributes:
        position: Global position in the epoch plan.
        name: ``"<shard>/<key>"``, or ``"<shard>#<index>"`` if unread.
        key: The sample key, or None if unread.
        files: File extension -> bytes, or None if unread.
        error: Why the sample could not be read, or None.
    """

    position: int
    name: str
    key: str | None
    files: dict[str, bytes] | None
    error: str | None


def read_samples(stores: Sequence[ShardStore], shards: Sequence[Sequence[ShardEntry]], plan: EpochPlan,
                 positions: np.ndarray, on_shard: Optional[Callable[[str], None]] = None,
                 on_wait: Optional[Callable[[float], None]] = None) -> Iterator[RawSample]:
    """Reads the samples at the given positions, unit by unit.

    Args:
        stores: Where each source's shards are.
        shards: Each source's shard list of ``index.json``.
        plan: Maps positions to units (source, shard) and sample indices.
        positions: ``[n]`` ascending global positions.
        on_shard: Called with ``"<location>/<shard>"`` before each shard is fetched and opened.
        on_wait: Called with the seconds the reader waited for each shard's file (its download, or the
            prefetch of it; about 0 for a local folder or a shard prefetched in time).

    Yields:
        One :class:`RawSample` per position, in ascending order.
    """
    slots, members = plan.locate(positions)
    starts = np.flatnonzero(np.diff(slots)) + 1
    runs = [run for run in np.split(np.arange(len(positions)), starts) if len(run)]
    units = [plan.units[int(slots[run[0]])] for run in runs]
    entries = [shards[unit.source][unit.shard] for unit in units]
    with ShardPrefetcher([(stores[unit.source], entry) for unit, entry in zip(units, entries)]) as prefetcher:

        def fetch(order: int) -> ContextManager:
            began = time.perf_counter()
            try:
                return prefetcher.take(order)
            finally:
                if on_wait is not None:
                    on_wait(time.perf_counter() - began)

        for order, (run, unit, entry) in enumerate(zip(runs, units, entries)):
            wanted = dict(zip(members[run].tolist(), positions[run].tolist()))
            if on_shard is not None:
                on_shard(f"{stores[unit.source].location.rstrip('/')}/{entry.name}")
            yield from _read_shard(functools.partial(fetch, order), entry, wanted)


def _read_shard(fetch: Callable[[], ContextManager], shard: ShardEntry,
                wanted: dict[int, int]) -> Iterator[RawSample]:
    """Yields the wanted samples of one shard (``wanted``: index -> position); ``fetch`` gives its file."""
    found: set[int] = set()
    error = None
    try:
        with fetch() as path, tarfile.open(path, mode="r:") as tar:
            for index, key, files in sample_groups(tar, wanted.keys(), max(wanted)):
                found.add(index)
                yield RawSample(wanted[index], f"{shard.name}/{key}", key, files, None)
    except (OSError, EOFError, tarfile.TarError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    missing = [index for index in wanted if index not in found]
    if missing:
        error = error or f"the shard ends before sample {missing[0]} (index.json lists {shard.samples})"
        logger.warning("shard %s: %d wanted samples unreadable: %s", shard.name, len(missing), error)
        for index in missing:
            yield RawSample(wanted[index], f"{shard.name}#{index}", None, None, error)
