"""A node's bounded cache of remote shards, shared by all its ranks and DataLoader workers.

Layout under the cache folder (``data.cache_dir``)::

    <dataset>/<shard>                  a verified shard: size and SHA-256 as index.json lists them
    <dataset>/.<shard>.<bytes>.part    a download in progress; ``bytes`` is reserved against the limit
    <dataset>/.locks/<shard>           readers' lock: held shared by every reader and by the downloader
    <dataset>/.locks/<shard>.download  download lock: held exclusive by the one process downloading it
    .usage.lock                        serialises the space accounting of downloads that start

``<dataset>`` is derived from the dataset URL. Processes coordinate with ``flock`` on the lock files, which
the kernel releases when a process dies. A reader takes the readers' lock (shared) before it looks for the
shard and keeps it while it reads; when the shard is missing it waits for the download lock and downloads
the shard unless the process it waited for did. So a shard is downloaded once at a time per node, and the
eviction, which deletes only files whose readers' lock it gets exclusively without waiting, never removes
a shard somebody reads or waits for, nor a live download. No lock is ever upgraded from shared to
exclusive, so a reader that holds a shard while its consumer waits on another reader cannot deadlock
them. Before a download starts, least recently used shards nobody holds are deleted until the new one fits
in ``data.cache_limit_gb`` (a download proceeds over the limit, with a warning, only when the shards in use
alone exceed it). Only verified downloads get a shard's name, so each shard is verified once per node.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import IO, Iterator

from hipscale.data.format.dataset_info import ShardEntry
from hipscale.data.storage.remote import CorruptDownloadError, RemoteLocation

logger = logging.getLogger(__name__)

LOCKS = ".locks"
DOWNLOAD_LOCK_SUFFIX = ".download"
USAGE_LOCK = ".usage.lock"
_PART = re.compile(r"^\.(?P<name>.+)\.(?P<bytes>\d+)\.part$")


class CachedShard:
    """A shard in the cache, held (shared lock) until :meth:`close`.

    Attributes:
        path: The local file.
    """

    def __init__(self, path: Path, lock: IO[bytes]) -> None:
        self.path = path
        self._lock = lock

    def close(self) -> None:
        """Lets the cache evict the shard again."""
        self._lock.close()

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShardCache:
    """The cache folder of one node.

    Args:
        root: Cache folder (node-local disk; created if needed).
        limit_bytes: Most bytes of shards kept, over all datasets in ``root``.
        downloads: Attempts at a shard whose download arrives corrupt before it counts as bad.
    """

    def __init__(self, root: str | os.PathLike, limit_bytes: int, downloads: int = 3) -> None:
        if limit_bytes < 1 or downloads < 1:
            raise ValueError(f"need a positive cache limit and download count, got {limit_bytes}, {downloads}")
        self.root = Path(root)
        self.limit_bytes = limit_bytes
        self.downloads = downloads

    def fetch(self, remote: RemoteLocation, entry: ShardEntry) -> CachedShard:
        """Returns the shard from the cache, downloading and verifying it first if needed.

        Args:
            remote: The dataset's location.
            entry: The shard as index.json lists it.

        Returns:
            The held shard; close it when done reading.

        Raises:
            CorruptDownloadError: Every one of ``downloads`` attempts arrived with another size or hash.
            RemoteDataError: The download failed for good (see :func:`hipscale.data.storage.remote.retrying`).
        """
        folder = self.root / dataset_folder(remote.url)
        (folder / LOCKS).mkdir(parents=True, exist_ok=True)
        final = folder / entry.name
        lock = open(folder / LOCKS / entry.name, "ab")
        try:
            fcntl.flock(lock, fcntl.LOCK_SH)  # from here on the shard (or its download) is not evicted
            if not _complete(final, entry):
                with open(folder / LOCKS / f"{entry.name}{DOWNLOAD_LOCK_SUFFIX}", "ab") as download_lock:
                    fcntl.flock(download_lock, fcntl.LOCK_EX)  # one download at a time; the others wait for it
                    if not _complete(final, entry):
                        self._download(remote, entry, folder)
            else:
                os.utime(final)
            return CachedShard(final, lock)
        except BaseException:
            lock.close()
            raise

    def downloading_elsewhere(self, remote: RemoteLocation, entry: ShardEntry) -> bool:
        """Whether another reader (a process, or a thread of this one) is downloading the shard right now."""
        folder = self.root / dataset_folder(remote.url)
        if _complete(folder / entry.name, entry):
            return False
        with _locked_now(folder / LOCKS / f"{entry.name}{DOWNLOAD_LOCK_SUFFIX}") as free:
            return free is False

    def usage_bytes(self) -> int:
        """Bytes of shards and reserved downloads in the cache."""
        return sum(size for _, size, _, _ in self._entries())

    def _download(self, remote: RemoteLocation, entry: ShardEntry, folder: Path) -> None:
        """Downloads one shard (under its download lock) and renames it into place once verified."""
        part = folder / f".{entry.name}.{entry.bytes}.part"
        with self._usage_locked():
            self._make_room(entry.bytes, remote.url_of(entry.name))
            part.touch()
        try:
            for attempt in range(1, self.downloads + 1):
                try:
                    remote.download(entry.name, part, entry.bytes, entry.sha256)
                    break
                except CorruptDownloadError as error:
                    if attempt == self.downloads:
                        raise CorruptDownloadError(f"{error} (in each of {attempt} downloads)") from None
                    logger.warning("corrupt download, downloading again (%d of %d): %s", attempt + 1,
                                   self.downloads, error)
            os.replace(part, folder / entry.name)
        finally:
            part.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _usage_locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / USAGE_LOCK, "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _entries(self) -> list[tuple[float, int, Path, Path]]:
        """``(last use, bytes, file, lock file)`` of every shard and download in the cache; a download counts
        with its reserved size."""
        found = []
        for folder in (p for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else ():
            for path in folder.iterdir():
                part = _PART.match(path.name)
                name = part["name"] if part else path.name
                if path.name == LOCKS or (path.name.startswith(".") and not part):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    stat = path.stat()
                    found.append((stat.st_mtime, int(part["bytes"]) if part else stat.st_size, path,
                                  folder / LOCKS / name))
        return found

    def _make_room(self, needed: int, url: str) -> None:
        """Deletes stale downloads, then least recently used shards nobody holds, until ``needed`` fits."""
        entries = self._entries()
        used = sum(size for _, size, _, _ in entries)
        # Stale downloads (their process died) first, then the oldest shards.
        for _, size, path, lock_path in sorted(entries, key=lambda e: (not _PART.match(e[2].name), e[0])):
            if used + needed <= self.limit_bytes:
                return
            if _delete_if_unheld(path, lock_path):
                used -= size
        if used + needed > self.limit_bytes:
            logger.warning("shard cache %s: %.2f GB held by readers, over data.cache_limit_gb=%g with %s; "
                           "downloading it anyway", self.root, used / 1e9, self.limit_bytes / 1e9, url)


def dataset_folder(url: str) -> str:
    """The cache sub-folder of a dataset URL: its last path part and a hash of the whole URL."""
    tail = re.sub(r"[^A-Za-z0-9_-]+", "_", url.rstrip("/").rsplit("/", 1)[-1])[:40]
    return f"{tail}-{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:12]}"


def _complete(path: Path, entry: ShardEntry) -> bool:
    try:
        return path.stat().st_size == entry.bytes
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _locked_now(lock_path: Path) -> Iterator[bool | None]:
    """Takes the lock file (created if missing) exclusively without waiting, for the block: yields True when
    taken, False when somebody holds it, None when its folder does not exist."""
    try:
        lock = open(lock_path, "ab")
    except FileNotFoundError:
        yield None
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def _delete_if_unheld(path: Path, lock_path: Path) -> bool:
    """Deletes ``path`` if no process holds its lock (no reader, no live downloader)."""
    with _locked_now(lock_path) as taken:
        if taken:
            path.unlink(missing_ok=True)
        return bool(taken)
