"""Where a sharder's output goes: a local folder, or an ``s3://`` / ``gs://`` URL through a local staging folder.

A local folder is written in place (:func:`hipscale.data.sharding.shard_writer.build_shard` renames each finished
tar into it, then writes its status). For a URL every shard is built in a staging folder of its own attempt
(``<staging>/attempt-<host>-<pid>-<tag>``), then its tar is uploaded, then its status file
(``status/<shard>.json``), and both local copies are deleted; ``report.json`` and ``index.json`` come last.
A re-run trusts a shard whose uploaded status matches its settings and whose uploaded tar has the recorded
size, and builds the rest.

Any number of attempts may write one destination at once (a retried SLURM task next to the slow original,
a Ray task re-run after its node vanished): no attempt deletes a file another attempt is writing. An item
that killed or hung its worker is recorded under ``failed/`` as soon as it is known, so an attempt on
another machine rejects it without running it again. :meth:`LocalDestination.clean_up` and
:meth:`RemoteDestination.clean_up`, called by ``finish`` once every shard checks out, remove what attempts
that died left behind.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from hipscale.data.errors import InputError
from hipscale.data.format.dataset_info import (INDEX_FILE, REPORT_FILE, is_temporary, temporary_pid,
                                               write_json_atomic, writer_tag)
from hipscale.data.sharding.shard_writer import (STATUS_DIR, Rejection, ShardJob, ShardResult,
                                                 completed_shard, file_sha256, result_from_status, status_path)
from hipscale.data.storage.remote import RemoteLocation, RetryPolicy, is_url
from hipscale.data.storage.shard_cache import dataset_folder

WRITABLE_SCHEMES = ("s3", "gs", "gcs")
FAILED_DIR = "failed"
STALE_S = 3600.0  # a temporary file of another machine's attempt untouched this long is left over
_PLAN_OUTPUTS = ("plan.json", "plan/", "progress/")


class LocalDestination:
    """A local output folder, written in place.

    Args:
        folder: The output folder (created if needed).
    """

    def __init__(self, folder: str | Path) -> None:
        self.work_dir = Path(folder)
        self.description = str(folder)

    def prepare(self, overwrite: bool) -> None:
        """Creates the folder; with ``overwrite`` deletes earlier output first."""
        if overwrite:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            for name in self.names():
                if _is_output(name):
                    (self.work_dir / name).unlink()
        (self.work_dir / STATUS_DIR).mkdir(parents=True, exist_ok=True)

    def completed(self, job: ShardJob) -> ShardResult | None:
        """The shard if it is complete already.

        Raises:
            InputError: If it was written with other settings or items.
        """
        return completed_shard(self.work_dir, job)

    def publish(self, result: ShardResult) -> None:
        """Nothing to do: the finished tar is in place."""

    def end_attempt(self) -> None:
        """Nothing to do: a local attempt leaves only finished files (or, killed, a temporary one)."""

    def names(self, prefix: str = "") -> list[str]:
        """Names (relative to the folder, ``/``-separated) of the files under ``prefix``, less temporary ones (a
        writer's in flight, or one a killed attempt left: :meth:`clean_up` deletes those)."""
        base = self.work_dir / prefix
        if not base.exists():
            return []
        names = (p.relative_to(self.work_dir).as_posix() for p in base.rglob("*") if p.is_file())
        return sorted(name for name in names if not is_temporary(name))

    def read_json(self, name: str) -> Any:
        """The content of JSON file ``name``; FileNotFoundError when there is none."""
        return json.loads((self.work_dir / name).read_text())

    def write_json(self, name: str, content: Any) -> None:
        """Writes ``name`` (``report.json``, ``index.json``, a plan file) atomically."""
        (self.work_dir / name).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.work_dir / name, content)

    def size(self, name: str) -> int | None:
        """The size of file ``name`` in bytes, or None when there is none."""
        path = self.work_dir / name
        return path.stat().st_size if path.is_file() else None

    def remove(self, name: str) -> None:
        (self.work_dir / name).unlink(missing_ok=True)

    def sha256(self, name: str, size: int) -> str | None:
        """The SHA-256 of shard ``name``, or None when it is missing or not ``size`` bytes."""
        path = self.work_dir / name
        return file_sha256(path) if path.is_file() and path.stat().st_size == size else None

    def clean_up(self) -> None:
        """Deletes the temporary files of attempts that died: on this machine those whose process is gone, from
        other machines those untouched for :data:`STALE_S` (an attempt there may still be writing)."""
        host = socket.gethostname()
        for stale in (path for path in self.work_dir.rglob("*.tmp") if is_temporary(path.name)):
            pid = temporary_pid(stale, host)
            try:
                left_over = not _alive(pid) if pid is not None else time.time() - stale.stat().st_mtime > STALE_S
            except FileNotFoundError:  # renamed into place meanwhile
                continue
            if left_over:
                stale.unlink(missing_ok=True)


class RemoteDestination:
    """An ``s3://`` or ``gs://`` output prefix, written through a staging folder.

    Args:
        url: The output prefix.
        staging: Local folder for shards being built (None: ``<temp dir>/hipscale-staging/<dataset>``); each
            attempt builds in a sub-folder of its own.
        policy: Timeouts and retries of the uploads.
    """

    def __init__(self, url: str, staging: str | Path | None = None, policy: RetryPolicy = RetryPolicy()) -> None:
        self.remote = RemoteLocation(url, policy)
        self.staging = Path(staging) if staging else (Path(tempfile.gettempdir()) / "hipscale-staging"
                                                     / dataset_folder(url))
        self.work_dir = self.staging / f"attempt-{writer_tag()}"
        self.description = self.remote.url
        self._uploaded_status: set[str] = set()

    def prepare(self, overwrite: bool) -> None:
        """Makes this attempt's staging folder; with ``overwrite`` deletes the earlier output under the prefix."""
        (self.work_dir / STATUS_DIR).mkdir(parents=True, exist_ok=True)
        listed = self.remote.list()
        if overwrite:
            self.remote.remove([name for name in listed if _is_output(name)])
            listed = []
        self._uploaded_status = {name for name in listed if name.startswith(f"{STATUS_DIR}/")}

    def completed(self, job: ShardJob) -> ShardResult | None:
        """The shard if it is uploaded already.

        Raises:
            InputError: If it was written with other settings or items.
        """
        status_name = f"{STATUS_DIR}/{job.name}.json"
        if status_name not in self._uploaded_status:
            return None
        result = result_from_status(self.read_json(status_name), job, self.remote.url_of(job.name))
        return result if self.remote.size(job.name) == result.entry.bytes else None

    def publish(self, result: ShardResult) -> None:
        """Uploads a finished shard, then its status, and deletes the local copies."""
        name = result.entry.name
        status_file = status_path(self.work_dir, name)
        self.remote.upload(self.work_dir / name, name)
        self.remote.upload(status_file, f"{STATUS_DIR}/{name}.json")
        (self.work_dir / name).unlink()
        status_file.unlink()

    def end_attempt(self) -> None:
        """Deletes this attempt's staging folder."""
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def names(self, prefix: str = "") -> list[str]:
        """Names (relative to the prefix) of the objects under ``prefix``."""
        return self.remote.list(prefix)

    def read_json(self, name: str) -> Any:
        """The content of JSON object ``name``; FileNotFoundError when there is none."""
        return json.loads(self.remote.read_bytes(name))

    def write_json(self, name: str, content: Any) -> None:
        """Uploads ``name`` (``report.json``, ``index.json``, a plan file)."""
        self.remote.write_bytes(name, (json.dumps(content, indent=1) + "\n").encode())

    def size(self, name: str) -> int | None:
        """The size of object ``name`` in bytes, or None when there is none."""
        return self.remote.size(name)

    def remove(self, name: str) -> None:
        self.remote.remove([name])

    def sha256(self, name: str, size: int) -> str | None:
        """The SHA-256 of shard ``name`` (downloaded to hash it), or None when it is missing or not ``size`` bytes."""
        if self.remote.size(name) != size:
            return None
        with tempfile.TemporaryDirectory(prefix="hipscale-check-") as folder:
            self.remote.download(name, Path(folder) / name, size, "")
            return file_sha256(Path(folder) / name)

    def clean_up(self) -> None:
        """Deletes the staging folders that attempts on this machine left when they died."""
        host = socket.gethostname()
        for folder in self.staging.glob(f"attempt-{host}-*"):
            pid = int(folder.name[len(f"attempt-{host}-"):].split("-")[0])
            if not _alive(pid):
                shutil.rmtree(folder, ignore_errors=True)


def record_rejection(destination: LocalDestination | RemoteDestination, job: ShardJob, index: int,
                     rejection: Rejection) -> None:
    """Records on the destination that item `index` of `job` killed or hung its worker."""
    destination.write_json(f"{FAILED_DIR}/{job.name}-{index:06d}.json",
                           {"fingerprint": job.fingerprint, "index": index, **dataclasses.asdict(rejection)})


def known_rejections(destination: LocalDestination | RemoteDestination,
                     jobs: Sequence[ShardJob]) -> dict[str, dict[int, Rejection]]:
    """Items of `jobs` that killed or hung a worker of an earlier attempt: shard -> item index -> rejection."""
    fingerprints = {job.name: job.fingerprint for job in jobs}
    known: dict[str, dict[int, Rejection]] = {name: {} for name in fingerprints}
    for name in destination.names(f"{FAILED_DIR}/"):
        shard = name[len(FAILED_DIR) + 1:].rpartition("-")[0]
        if shard in fingerprints:
            record = destination.read_json(name)
            fingerprint, index = record.pop("fingerprint"), int(record.pop("index"))
            if fingerprint == fingerprints[shard]:
                known[shard][index] = Rejection(**record)
    return known


def open_destination(out: str | Path, staging: str | Path | None = None, policy: RetryPolicy = RetryPolicy(),
                     argument: str = "--out") -> LocalDestination | RemoteDestination:
    """The destination of a sharder's ``--out`` (or of another command's ``argument``: its error names it).

    Raises:
        InputError: For a URL that cannot be written (``http(s)://``).
    """
    if not is_url(out):
        return LocalDestination(out)
    if str(out).partition("://")[0].lower() not in WRITABLE_SCHEMES:
        raise InputError(f"{argument} {out}: datasets are written to a folder or to {', '.join(WRITABLE_SCHEMES)}:// "
                         "URLs, not to an http(s) server")
    return RemoteDestination(str(out), staging, policy)


def _is_output(name: str) -> bool:
    return name.startswith((f"{STATUS_DIR}/", f"{FAILED_DIR}/", *_PLAN_OUTPUTS)) or name in (INDEX_FILE, REPORT_FILE) \
        or (name.startswith("shard-") and name.endswith(".tar"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
