"""Where a dataset's shards are read from: a local folder, or a URL through the node's shard cache.

A reader asks the store for the shards it will read, in order; :class:`ShardPrefetcher` keeps
``prefetch_shards`` of the next ones downloading in background threads while the current one is read, so a
remote dataset streams at the pace of the consumer. Shards another reader is downloading already are
passed over for later ones, so the DataLoader workers of a rank, which read the same shards in the same
order, download different shards at once instead of waiting on the same one. For a local folder both are plain path lookups.
:func:`load_dataset_info` reads a dataset's ``index.json`` from either.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import tempfile
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

    Use as a context manager; on exit, fetches still running are awaited and every shard not taken is
    released.

    Args:
        shards: ``(store, shard)`` pairs the reader will read, in order (a shard may appear more than once).
    """

    def __init__(self, shards: Sequence[tuple[ShardStore, ShardEntry]]) -> None:
        self.shards = list(shards)
        self.depth = max((store.prefetch_depth for store, _ in self.shards), default=0)
        self._pool = (concurrent.futures.ThreadPoolExecutor(self.depth, thread_name_prefix="shard-fetch")
                      if self.depth and len(self.shards) > 1 else None)
        self._ahead: dict[int, concurrent.futures.Future] = {}

    def take(self, index: int) -> ContextManager[Path]:
        """The handle of shard ``index`` of the list (read them in increasing order); starts the next fetches:
        up to ``depth`` of the next shards at most ``PREFETCH_HORIZON x depth`` ahead, passing over those
        another reader is downloading (this reader's fetch of one waits for it when its turn comes).

        Raises:
            OSError: Whatever fetching the shard raised.
        """
        if self._pool is not None:
            started = sum(1 for ahead in self._ahead if ahead > index)
            for ahead in range(index + 1, min(index + 1 + PREFETCH_HORIZON * self.depth, len(self.shards))):
                if started == self.depth:
                    break
                store, entry = self.shards[ahead]
                if ahead in self._ahead or not store.prefetch_depth or store.downloading_elsewhere(entry):
                    continue
                self._ahead[ahead] = self._pool.submit(store.fetch, entry)
                started += 1
        future = self._ahead.pop(index, None)
        store, entry = self.shards[index]
        return future.result() if future is not None else store.fetch(entry)

    def __enter__(self) -> "ShardPrefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is None:
            return
        for future in self._ahead.values():
            future.cancel()
        self._pool.shutdown(wait=True)
        for future in self._ahead.values():
            if not future.cancelled() and future.exception() is None:
                future.result().close()
        self._ahead.clear()
