"""Where a dataset's shards are read from: a local folder, or a URL through the node's shard cache.

A reader asks the store for the shards it will read, in order; :class:`ShardPrefetcher` downloads them in
that order in background threads, up to ``prefetch_shards`` ahead of the one read, so a remote dataset
streams at the pace of the consumer. Shards another reader is downloading already are passed over for
later ones, so the DataLoader workers of a rank, which read the same shards in the same order, download
different shards at once instead of waiting on the same one. For a local folder both are plain path lookups.
:func:`load_dataset_info` reads a dataset's ``index.json`` from either.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Sequence

from hipscale.data.format.dataset_info import INDEX_FILE, DatasetInfo, ShardEntry
from hipscale.data.storage.remote import RemoteLocation, RetryPolicy, is_url
from hipscale.data.storage.shard_cache import ShardCache


@dataclass(frozen=True)
class RemoteSettings:
    """How remote shards are fetched (the ``data.cache_*``, ``data.prefetch_shards`` and ``data.remote_*`` keys).

    Attributes:
        cache_dir: The node's cache folder; None: ``<temp dir>/hipscale-shard-cache``.
        cache_limit_gb: Most gigabytes (1e9 bytes) of shards the cache keeps.
        prefetch_shards: Shards each reader downloads ahead of the one it reads.
        policy: Timeouts and retries.
    """

    cache_dir: str | None = None
    cache_limit_gb: float = 100.0
    prefetch_shards: int = 2
    policy: RetryPolicy = field(default_factory=RetryPolicy)

    @property
    def cache_root(self) -> Path:
        """The cache folder."""
        return Path(self.cache_dir) if self.cache_dir else Path(tempfile.gettempdir()) / "hipscale-shard-cache"


class _LocalShard:
    """A shard in a local folder: nothing to hold."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def close(self) -> None:
        pass

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        pass


class ShardStore:
    """Opens the shards and small files of one dataset location.

    Picklable, so DataLoader workers get their own copy.

    Args:
        location: A local folder or an ``s3://``, ``gs://``, ``http(s)://`` URL.
        settings: Cache, prefetch and retries for a URL (unused for a folder).
    """

    def __init__(self, location: str | os.PathLike, settings: RemoteSettings = RemoteSettings()) -> None:
        self.location = str(location)
        self.settings = settings
        self.remote = RemoteLocation(self.location, settings.policy) if is_url(self.location) else None
        self.cache = (ShardCache(settings.cache_root, int(settings.cache_limit_gb * 1e9))
                      if self.remote is not None else None)

    @property
    def prefetch_depth(self) -> int:
        """Shards a reader fetches ahead (0 for a local folder)."""
        return self.settings.prefetch_shards if self.remote is not None else 0

    def downloading_elsewhere(self, entry: ShardEntry) -> bool:
        """Whether another reader is downloading the shard now (never for a local folder)."""
        return self.cache is not None and self.cache.downloading_elsewhere(self.remote, entry)

    def read_json(self, name: str) -> Any:
        """Parses a JSON file of the dataset (``index.json``).

        Raises:
            FileNotFoundError: For a folder without it.
            RemoteDataError: For a URL without it, or one that cannot be reached.
            ValueError: If it is not valid JSON.
        """
        text = self.remote.read_bytes(name) if self.remote is not None else (Path(self.location) / name).read_bytes()
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.location}/{name} is not valid JSON: {error}") from error

    def fetch(self, entry: ShardEntry) -> ContextManager[Path]:
        """The shard's local file, held until the returned handle is closed (downloaded first for a URL).

        Raises:
            CorruptDownloadError, RemoteDataError: For a URL, see :meth:`ShardCache.fetch`.
        """
        if self.remote is None:
            return _LocalShard(Path(self.location) / entry.name)
        return self.cache.fetch(self.remote, entry)


def load_dataset_info(data_dir: str | os.PathLike, remote: RemoteSettings | None = None) -> DatasetInfo:
    """Reads and checks ``<data_dir>/index.json``.

    Args:
        data_dir: A folder or URL written by ``preprocess/shard_av.py`` or
            ``preprocess/shard_images.py``.
        remote: :class:`RemoteSettings` (timeouts and retries) for a URL;
            None: the defaults.

    Returns:
        The parsed description, with ``root`` set to ``data_dir``.

    Raises:
        FileNotFoundError: If a folder has no ``index.json``.
        RemoteDataError: If a URL has none or cannot be reached.
        ValueError: If it is not a hipscale shard index or a field is
            missing or malformed.
    """
    path = f"{str(data_dir).rstrip('/')}/{INDEX_FILE}"
    try:
        raw = ShardStore(data_dir, remote or RemoteSettings()).read_json(INDEX_FILE)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: is {data_dir} a directory written by preprocess/shard_*.py?") \
            from None
    return DatasetInfo.from_json(raw, path, str(data_dir))


PREFETCH_HORIZON = 3  # how far ahead (in multiples of the prefetch depth) a reader looks for shards to fetch


class ShardPrefetcher:
    """Fetches a reader's shards in order, a few ahead of the one it reads (``prefetch_depth`` of their stores).

    ``depth`` background threads take the shards in the order the reader needs them, the shard it reads
    now first, so up to ``depth`` downloads run at once; their ranged GETs share the process's
    :mod:`~hipscale.data.storage.request_queue`, the older download's first, so the shard needed soonest
    gets the link and the next one fills what it leaves idle (fetching several shards side by side would
    split the link between them and delay the first batch: on a 1 Gbit/s link with 8 shards of 58 MB,
    3 at once per reader took 2.3 s to the first batch, which needs the first two). Fetched shards the reader
    has not taken and fetches under way together stay within ``depth``; the threads look at most
    ``PREFETCH_HORIZON x depth`` shards ahead, and pass over shards another reader is downloading (the
    reader's :meth:`take` waits for that download when its turn comes).

    Use as a context manager; on exit, fetches under way are awaited and every shard not taken is released.

    Args:
        shards: ``(store, shard)`` pairs the reader will read, in order (a shard may appear more than once).
    """

    def __init__(self, shards: Sequence[tuple[ShardStore, ShardEntry]]) -> None:
        self.shards = list(shards)
        self.depth = max((store.prefetch_depth for store, _ in self.shards), default=0)
        self._changed = threading.Condition()
        self._taken = 0  # the reader has taken (or fetches itself) every shard before this index
        self._claimed = 0  # the threads have claimed every shard before this index
        self._busy: set[int] = set()  # indices being fetched
        self._fetched: dict[int, tuple[ContextManager[Path] | None, BaseException | None]] = {}  # None: passed over
        self._stopping = False
        self._threads = ([threading.Thread(target=self._fetch_ahead, name="shard-fetch", daemon=True)
                          for _ in range(self.depth)] if len(self.shards) > 1 else [])

    def take(self, index: int) -> ContextManager[Path]:
        """The handle of shard ``index`` of the list (read them in increasing order): the threads' fetch of it
        (waited for if under way), else fetched here (waiting for another reader's download of it).

        Raises:
            OSError: Whatever fetching the shard raised.
        """
        store, entry = self.shards[index]
        if not self._threads:
            return store.fetch(entry)
        with self._changed:
            self._taken = max(self._taken, index + 1)
            self._changed.notify_all()
            while index in self._busy:
                self._changed.wait()
            handle, error = self._fetched.pop(index, (None, None))
        if error is not None:
            raise error
        return handle if handle is not None else store.fetch(entry)

    def _next_claim(self) -> int | None:
        """Under the lock: the next index to fetch, once there is room for it; None when stopping or done."""
        while not self._stopping:
            ahead = max(self._claimed, self._taken)
            if ahead >= len(self.shards):
                return None
            held = len(self._busy) + sum(handle is not None for handle, _ in self._fetched.values())
            if ahead < self._taken + PREFETCH_HORIZON * self.depth and held < self.depth:
                self._claimed = ahead + 1
                self._busy.add(ahead)
                return ahead
            self._changed.wait()
        return None

    def _fetch_ahead(self) -> None:
        while True:
            with self._changed:
                ahead = self._next_claim()
            if ahead is None:
                return
            store, entry = self.shards[ahead]
            fetched: tuple[ContextManager[Path] | None, BaseException | None] = (None, None)
            try:  # whatever goes wrong is handed to the reader when it takes the shard (never left busy)
                if store.prefetch_depth and not store.downloading_elsewhere(entry):
                    fetched = (store.fetch(entry), None)
            except Exception as error:
                fetched = (None, error)
            with self._changed:
                self._fetched[ahead] = fetched
                self._busy.discard(ahead)
                self._changed.notify_all()

    def __enter__(self) -> "ShardPrefetcher":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        for thread in self._threads:
            thread.join()
        for handle, _ in self._fetched.values():
            if handle is not None:
                handle.close()
        self._fetched.clear()
