"""Remote dataset locations: ``s3://``, ``gs://`` and ``http(s)://`` URLs through fsspec, with timeouts and retries.

Credentials and endpoints come from each backend's standard environment, never from hipscale's config:
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_ENDPOINT_URL`` (or ``~/.aws``) for s3fs,
``GOOGLE_APPLICATION_CREDENTIALS`` (or the metadata server) for gcsfs. The backends are optional extras:
``pip install hipscale[remote]``.

Every operation is retried on transient errors (timeouts, refused or reset connections, 5xx answers) with
exponential backoff until :attr:`RetryPolicy.retry_for_s` has passed; a permanent error (missing object,
denied access, a 4xx answer) fails at once. Both end in :class:`RemoteDataError` naming the URL.
"""
from __future__ import annotations

import collections
import concurrent.futures
import errno
import hashlib
import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from hipscale.data.storage.request_queue import request_queue

logger = logging.getLogger(__name__)

REMOTE_SCHEMES = ("s3", "gs", "gcs", "http", "https")
CHUNK_BYTES = 8 << 20  # the block of a file opened for ranged reads, and the smallest part of a download
MAX_PART_BYTES = 64 << 20  # the largest part of a download (memory: streams x part per download)
DOWNLOAD_STREAMS = 4  # concurrent ranged GETs per download, and per process (request_queue)

T = TypeVar("T")


def is_url(location: str | os.PathLike) -> bool:
    """Whether ``location`` names remote storage (``s3://``, ``gs://``, ``gcs://``, ``http(s)://``)."""
    scheme, sep, _ = str(location).partition("://")
    return bool(sep) and scheme.lower() in REMOTE_SCHEMES


def join(location: str | os.PathLike, name: str) -> str:
    """``location/name`` for a URL or a local folder."""
    return f"{str(location).rstrip('/')}/{name}" if is_url(location) else str(Path(location) / name)


class RemoteDataError(OSError):
    """A remote operation failed for good: a permanent error, or transient ones past the retry budget.
    The message names the URL."""


class CorruptDownloadError(OSError):
    """A downloaded object's size or SHA-256 differs from the index."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long remote operations wait and retry.

    Attributes:
        request_timeout_s: Seconds one request may wait to connect or for the next bytes.
        retry_for_s: Seconds an operation keeps retrying transient errors before it fails.
        first_backoff_s: Pause before the first retry; it doubles after every failure.
        max_backoff_s: Longest pause between two attempts.
    """

    request_timeout_s: float = 60.0
    retry_for_s: float = 300.0
    first_backoff_s: float = 0.5
    max_backoff_s: float = 10.0


def _transient_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, TimeoutError, EOFError]
    try:
        import botocore.exceptions
        errors.append(botocore.exceptions.BotoCoreError)
    except ImportError:
        pass
    try:
        import aiohttp
        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(errors)


def _is_permanent(error: BaseException) -> bool:
    cause = error.__cause__
    if isinstance(error, FileNotFoundError) and cause is not None and not isinstance(cause, FileNotFoundError):
        return _is_permanent(cause)  # fsspec's http backend reports a refused connection as FileNotFoundError
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    if isinstance(error, OSError) and error.errno == errno.EINVAL:  # s3fs's 416 and other invalid requests
        return True
    status = getattr(error, "status", None)  # aiohttp.ClientResponseError of an http(s) source
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def retrying(what: str, url: str, policy: RetryPolicy, operation: Callable[[], T]) -> T:
    """Runs ``operation`` until it succeeds, retrying transient errors with exponential backoff.

    Args:
        what: What the operation does, for messages ("read", "download", ...).
        url: The URL it works on, for messages.
        policy: Timeouts and the retry budget.
        operation: The work; it is called again from the start after a transient error.

    Returns:
        What ``operation`` returns.

    Raises:
        RemoteDataError: On a permanent error, or when transient errors last past ``policy.retry_for_s``.
    """
    began = time.monotonic()
    pause = policy.first_backoff_s
    for attempt in itertools.count(1):
        try:
            return operation()
        except _transient_errors() as error:
            elapsed = time.monotonic() - began
            detail = _describe(error)
            if _is_permanent(error):
                raise RemoteDataError(f"cannot {what} {url}: {detail}") from error
            if elapsed + pause > policy.retry_for_s:
                raise RemoteDataError(f"cannot {what} {url}: still failing after {attempt} attempts in {elapsed:.0f} s "
                                      f"(data.remote_retry_s={policy.retry_for_s:g}): {detail}") from error
            logger.warning("%s %s failed (attempt %d, %s); retrying in %.1f s", what, url, attempt, detail, pause)
            time.sleep(pause)
            pause = min(2 * pause, policy.max_backoff_s)


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    cause = error.__cause__
    return f"{text} (from {type(cause).__name__}: {str(cause).strip()[:200]})" if cause is not None else text


class RemoteLocation:
    """A URL prefix (a dataset folder in a bucket or on a web server) and the objects under it.

    Picklable: the fsspec filesystem is created lazily in each process (DataLoader workers fork).

    Args:
        url: The prefix, e.g. ``s3://bucket/audioset/train``.
        policy: Timeouts and retries of every operation.
    """

    def __init__(self, url: str, policy: RetryPolicy = RetryPolicy()) -> None:
        if not is_url(url):
            raise ValueError(f"{url!r} is not an {'/'.join(REMOTE_SCHEMES)} URL")
        self.url = url.rstrip("/")
        self.policy = policy
        self._filesystem: tuple[int, Any, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "policy": self.policy, "_filesystem": None}

    def url_of(self, name: str) -> str:
        """The URL of ``name`` under the prefix."""
        return f"{self.url}/{name}"

    def read_bytes(self, name: str) -> bytes:
        """The content of object ``name`` (small objects: index.json, status files)."""
        fs, path = self._fs(name)
        return retrying("read", self.url_of(name), self.policy, lambda: fs.cat_file(path))

    def size(self, name: str) -> int | None:
        """The size of object ``name`` in bytes, or None when there is none."""
        fs, path = self._fs(name)

        def stat() -> int | None:
            try:
                return int(fs.info(path)["size"])
            except FileNotFoundError:
                return None

        return retrying("stat", self.url_of(name), self.policy, stat)

    def list(self, prefix: str = "") -> list[str]:
        """Names (relative to the location) of the objects under ``prefix`` (s3 and gs; not http)."""
        fs, path = self._fs(prefix)

        def find() -> list[str]:
            fs.invalidate_cache()
            try:
                return sorted(fs.find(path))
            except FileNotFoundError:  # a bucket prefix with nothing under it yet
                return []

        base = self._fs("")[1].rstrip("/") + "/"
        return [found[len(base):] for found in retrying("list", self.url_of(prefix), self.policy, find)]

    def write_bytes(self, name: str, data: bytes) -> None:
        """Writes object ``name`` (replacing it)."""
        fs, path = self._fs(name)
        retrying("write", self.url_of(name), self.policy, lambda: fs.pipe_file(path, data))

    def upload(self, local: Path, name: str) -> None:
        """Uploads a local file as object ``name``; the object appears whole or not at all."""
        fs, path = self._fs(name)
        retrying("upload", self.url_of(name), self.policy, lambda: fs.put_file(str(local), path))

    def remove(self, names: list[str]) -> None:
        """Deletes the named objects (missing ones are fine)."""
        fs, _ = self._fs("")
        for name in names:
            path = self._fs(name)[1]

            def delete(path: str = path) -> None:
                try:
                    fs.rm_file(path)
                except FileNotFoundError:
                    pass

            retrying("delete", self.url_of(name), self.policy, delete)

    def open(self, name: str, block_size: int = CHUNK_BYTES, cache_type: str = "none") -> Any:
        """Object ``name`` as an fsspec file for ranged reads (no retries: the caller's operation retries)."""
        fs, path = self._fs(name)
        return fs.open(path, "rb", block_size=block_size, cache_type=cache_type)

    def download(self, name: str, dest: Path, size: int, sha256: str, streams: int = DOWNLOAD_STREAMS) -> None:
        """Downloads object ``name`` to ``dest``, checking its size and SHA-256.

        The object is fetched as ranged GETs of :func:`part_bytes`, up to `streams` at a time, written and
        hashed in order as they arrive (no second pass), with at most `streams` parts in memory. The GETs
        wait in the process's :mod:`~hipscale.data.storage.request_queue`, behind those of downloads that
        began earlier. A transient error repeats only the part it hit, within the retry budget.

        Args:
            name: Object name under the location.
            dest: Local file to write (created or truncated).
            size: Expected size in bytes.
            sha256: Expected hex SHA-256, or "" to check the size only.
            streams: Parts requested at once (and held in memory).

        Raises:
            CorruptDownloadError: The object has another size or hash.
            RemoteDataError: As :func:`retrying`.
        """
        fs, path = self._fs(name)
        url = self.url_of(name)
        found = retrying("download", url, self.policy, lambda: int(fs.info(path)["size"]))
        if found != size:
            raise CorruptDownloadError(f"{url}: {found} bytes, index.json says {size}")
        part = part_bytes(size, streams)
        parts = iter(range(0, size, part))
        digest = hashlib.sha256()
        requests = request_queue(DOWNLOAD_STREAMS)
        download = requests.new_download()

        def get(start: int) -> concurrent.futures.Future:
            return requests.submit(download, start, lambda: retrying(
                "download", url, self.policy, lambda: fs.cat_file(path, start=start, end=min(start + part, size))))

        ahead = collections.deque(get(start) for start in itertools.islice(parts, streams))
        try:
            with open(dest, "wb") as out:
                while ahead:
                    data = ahead.popleft().result()
                    ahead.extend(get(start) for start in itertools.islice(parts, 1))
                    out.write(data)
                    digest.update(data)
                found = out.tell()
        finally:
            for future in ahead:  # a failed part: the rest are not fetched
                future.cancel()
        if found != size:
            raise CorruptDownloadError(f"{url}: {found} bytes arrived, index.json says {size}")
        if sha256 and digest.hexdigest() != sha256:
            raise CorruptDownloadError(f"{url}: sha256 {digest.hexdigest()}, index.json says {sha256}")

    def _fs(self, name: str) -> tuple[Any, str]:
        """The process's fsspec filesystem and the backend path of ``name``."""
        if self._filesystem is None or self._filesystem[0] != os.getpid():
            self._filesystem = (os.getpid(), *_filesystem(self.url, self.policy))
        _, fs, root = self._filesystem
        return fs, f"{root.rstrip('/')}/{name}" if name else root


_parents_loop: list[Any] = [None]  # fsspec's event loop in the process about to fork


def _note_fsspec_loop() -> None:
    asyn = sys.modules.get("fsspec.asyn")
    _parents_loop[0] = asyn.loop[0] if asyn is not None else None


def _inherited_loop_stopped() -> None:
    """In a forked child: the parent's fsspec event loop says it is not running (its thread was not copied).
    Otherwise every filesystem the child inherited and frees (fsspec empties its instance cache in a new
    process; the garbage collector frees the rest wherever it runs) closes its session through that loop:
    s3fs waits a whole second on it before giving up, a stall of a DataLoader worker per filesystem, every
    epoch. Seeing the loop stopped, s3fs closes the inherited sockets at once instead; aiohttp's reports of
    the sessions left unclosed on that dead loop are dropped."""
    if _parents_loop[0] is not None:
        _parents_loop[0].is_running = lambda: False
        _parents_loop[0].call_exception_handler = lambda context: None
        _parents_loop[0] = None


os.register_at_fork(before=_note_fsspec_loop, after_in_child=_inherited_loop_stopped)


def part_bytes(size: int, streams: int) -> int:
    """The ranged GETs of a download of `size` bytes: split over `streams`, within CHUNK_BYTES..MAX_PART_BYTES
    (a 46 MB shard: 4 GETs of 11.6 MB; a 1 GiB one: 16 of 64 MiB)."""
    return min(MAX_PART_BYTES, max(CHUNK_BYTES, -(-size // streams)))


def _filesystem(url: str, policy: RetryPolicy) -> tuple[Any, str]:
    """An fsspec filesystem for ``url`` whose requests time out after ``policy.request_timeout_s`` and do not
    retry on their own (:func:`retrying` does, within one budget), and the backend path of ``url``."""
    try:
        import fsspec
    except ImportError:
        raise RemoteDataError(f"{url}: remote data needs fsspec and its backends: pip install 'hipscale[remote]'") \
            from None
    scheme = url.partition("://")[0].lower()
    timeout = policy.request_timeout_s
    if scheme == "s3":
        options: dict[str, Any] = {"config_kwargs": {
            "connect_timeout": timeout, "read_timeout": timeout, "retries": {"max_attempts": 1}}}
    elif scheme in ("http", "https"):
        import aiohttp
        options = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(sock_connect=timeout, sock_read=timeout)}}
    else:
        options = {"requests_timeout": timeout}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as error:
        raise RemoteDataError(f"{url}: the {scheme}:// backend is not installed ({error}); "
                              "pip install 'hipscale[remote]'") from None
    if scheme == "s3":
        fs.retries = 1  # s3fs's own retry loop (a class attribute, not a constructor option)
    return fs, path


def top_level_files(location: str | os.PathLike, suffix: str) -> list[str]:
    """Names of the files ending in `suffix` directly in a folder or under a URL prefix, sorted."""
    if is_url(location):
        return [name for name in RemoteLocation(str(location)).list() if name.endswith(suffix) and "/" not in name]
    return sorted(path.name for path in Path(location).iterdir() if path.name.endswith(suffix) and path.is_file())


def open_file(location: str | os.PathLike, name: str) -> Any:
    """File `name` of a folder or URL prefix, open for reading (binary; a URL's streamed in pieces)."""
    return RemoteLocation(str(location)).open(name) if is_url(location) else open(Path(location) / name, "rb")
