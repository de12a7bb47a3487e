"""Where a sharder's output goes: a local folder, or an ``s3://`` / ``gs://`` URL through a local staging folder.

A local folder is written in place (:func:`hipscale.data.shard_writer.build_shard` renames each finished
tar into it). For a URL every shard is built in the staging folder, then its tar is uploaded, then its
status file (``status/<shard>.json``), and both local copies are deleted; ``report.json`` and ``index.json``
come last. A re-run trusts a shard whose uploaded status matches its settings and whose uploaded tar has the
recorded size, uploads shards that were built but not yet uploaded, and builds the rest.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hipscale.data.dataset_info import INDEX_FILE, REPORT_FILE, write_json_atomic
from hipscale.data.errors import InputError
from hipscale.data.remote import RemoteLocation, RetryPolicy, is_url
from hipscale.data.shard_cache import dataset_folder
from hipscale.data.shard_writer import (STATUS_DIR, ShardJob, ShardResult, completed_shard, result_from_status,
                                        status_path)

WRITABLE_SCHEMES = ("s3", "gs", "gcs")


class LocalDestination:
    """A local output folder, written in place.

    Args:
        folder: The output folder (created if needed).
    """

    def __init__(self, folder: str | Path) -> None:
        self.work_dir = Path(folder)
        self.description = str(folder)

    def prepare(self, overwrite: bool) -> None:
        """Creates the folder, deletes earlier output with ``overwrite``, and stale temporary files."""
        _prepare_folder(self.work_dir, overwrite)

    def completed(self, job: ShardJob) -> ShardResult | None:
        """The shard if it is complete already.

        Raises:
            InputError: If it was written with other settings or items.
        """
        return completed_shard(self.work_dir, job)

    def publish(self, result: ShardResult) -> None:
        """Nothing to do: the finished tar is in place."""

    def write_json(self, name: str, content: Any) -> None:
        """Writes ``name`` (``report.json``, ``index.json``) atomically."""
        write_json_atomic(self.work_dir / name, content)


class RemoteDestination:
    """An ``s3://`` or ``gs://`` output prefix, written through a staging folder.

    Args:
        url: The output prefix.
        staging: Local folder for shards being built (None: ``<temp dir>/hipscale-staging/<dataset>``).
        policy: Timeouts and retries of the uploads.
    """

    def __init__(self, url: str, staging: str | Path | None = None, policy: RetryPolicy = RetryPolicy()) -> None:
        self.remote = RemoteLocation(url, policy)
        self.work_dir = Path(staging) if staging else (Path(tempfile.gettempdir()) / "hipscale-staging"
                                                      / dataset_folder(url))
        self.description = self.remote.url
        self._uploaded_status: set[str] = set()

    def prepare(self, overwrite: bool) -> None:
        """Prepares the staging folder; with ``overwrite`` deletes the earlier output under the prefix first."""
        _prepare_folder(self.work_dir, overwrite)
        listed = self.remote.list()
        if overwrite:
            self.remote.remove([name for name in listed if _is_output(name)])
            listed = []
        self._uploaded_status = {name for name in listed if name.startswith(f"{STATUS_DIR}/")}

    def completed(self, job: ShardJob) -> ShardResult | None:
        """The shard if it is uploaded already (a shard built in staging but not uploaded is uploaded now).

        Raises:
            InputError: If it was written with other settings or items.
        """
        staged = completed_shard(self.work_dir, job)
        if staged is not None:
            self.publish(staged)
            return staged
        status_name = f"{STATUS_DIR}/{job.name}.json"
        if status_name not in self._uploaded_status:
            return None
        result = result_from_status(json.loads(self.remote.read_bytes(status_name)), job,
                                    self.remote.url_of(job.name))
        return result if self.remote.size(job.name) == result.entry.bytes else None

    def publish(self, result: ShardResult) -> None:
        """Uploads a finished shard, then its status, and deletes the local copies."""
        name = result.entry.name
        status_file = status_path(self.work_dir, name)
        self.remote.upload(self.work_dir / name, name)
        self.remote.upload(status_file, f"{STATUS_DIR}/{name}.json")
        (self.work_dir / name).unlink()
        status_file.unlink()

    def write_json(self, name: str, content: Any) -> None:
        """Uploads ``name`` (``report.json``, ``index.json``)."""
        self.remote.write_bytes(name, (json.dumps(content, indent=1) + "\n").encode())


def open_destination(out: str | Path, staging: str | Path | None = None,
                     policy: RetryPolicy = RetryPolicy()) -> LocalDestination | RemoteDestination:
    """The destination of a sharder's ``--out``.

    Raises:
        InputError: For a URL that cannot be written (``http(s)://``).
    """
    if not is_url(out):
        return LocalDestination(out)
    if str(out).partition("://")[0].lower() not in WRITABLE_SCHEMES:
        raise InputError(f"--out {out}: sharders write to a folder or to {', '.join(WRITABLE_SCHEMES)}:// URLs, "
                         "not to an http(s) server")
    return RemoteDestination(str(out), staging, policy)


def _is_output(name: str) -> bool:
    return name.startswith(f"{STATUS_DIR}/") or name in (INDEX_FILE, REPORT_FILE) or (
        name.startswith("shard-") and name.endswith(".tar"))


def _prepare_folder(folder: Path, overwrite: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in [*folder.glob("shard-*.tar"), folder / INDEX_FILE, folder / REPORT_FILE]:
            path.unlink(missing_ok=True)
        shutil.rmtree(folder / STATUS_DIR, ignore_errors=True)
    (folder / STATUS_DIR).mkdir(exist_ok=True)
    for stale in [*folder.glob(".*.tmp"), *(folder / STATUS_DIR).glob(".*.tmp")]:
        stale.unlink()
