"""The building blocks of sharding: items planned into shards, one shard built into a tar file.

Items are assigned to shards by position alone (shard ``i`` holds items
``[i * n, (i + 1) * n)`` of the item list), so a re-run knows which items
belong to which shard before decoding anything. Each shard is written under a
temporary name of its own attempt (host, process, random tag: attempts on other
machines never touch it), renamed into place, and its status file
(``status/<shard>.json``: fingerprint, counts, sample keys, rejected items) is
written last: a status always describes a complete tar. Tar members carry fixed
metadata (mtime 0, mode 0644), so a shard's bytes depend only on its items, and
two attempts at the same shard leave the same bytes. :mod:`hipscale.data.sharding.run` runs the shards of a
dataset in worker processes and publishes them to their destination.
"""
import dataclasses
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hipscale.data.errors import InputError
from hipscale.data.format.dataset_info import ShardEntry, temporary_path, write_json_atomic

STATUS_DIR = "status"
SHARD_PATTERN = "shard-{:06d}.tar"

Members = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Rejection:
    """An item that was not written, and why.

    Attributes:
        id: The item's id.
        source: Where it came from (file path, manifest line).
        reason: One of ``missing_file``, ``decode_error``, ``too_short``,
            ``no_audio``, ``unreadable_image``, ``duplicate_id``, ``timeout``
            (decoding took longer than the per-item timeout), ``worker_died``
            (its worker process was killed or crashed while encoding it).
        detail: A human-readable explanation.
    """

    id: str
    source: str
    reason: str
    detail: str


Encoder = Callable[[Any], "Members | Rejection"]


@dataclass(frozen=True)
class ShardJob:
    """The items of one shard.

    Attributes:
        name: Shard file name.
        items: Picklable dataclass items, in writing order.
        fingerprint: Hash of the settings and items; a re-run only reuses a
            shard whose status has the same fingerprint.
    """

    name: str
    items: tuple[Any, ...]
    fingerprint: str


@dataclass(frozen=True)
class ShardResult:
    """A complete shard.

    Attributes:
        entry: Name, sample count and size.
        rejections: Items of this shard that were not written.
    """

    entry: ShardEntry
    rejections: tuple[Rejection, ...]


def samples_per_shard(max_samples: int, max_bytes: int, bytes_per_sample: int) -> int:
    """Turns the shard limits into a fixed sample count per shard.

    Args:
        max_samples: Most samples in a shard.
        max_bytes: Most bytes in a shard.
        bytes_per_sample: An upper estimate of one sample's size in the tar.

    Returns:
        ``min(max_samples, max_bytes // bytes_per_sample)``, at least 1.

    Raises:
        InputError: If a limit is not positive.
    """
    if max_samples < 1 or max_bytes < 1:
        raise InputError(f"shard limits must be positive, got {max_samples} samples and {max_bytes} bytes")
    return max(1, min(max_samples, max_bytes // bytes_per_sample))


def plan_shards(items: Sequence[Any], per_shard: int, settings: dict[str, Any]) -> list[ShardJob]:
    """Assigns items to shards by position.

    Args:
        items: Dataclass items in a deterministic order.
        per_shard: Items per shard (the last shard may hold fewer).
        settings: Everything else that changes the shard bytes.

    Returns:
        One job per shard.
    """
    jobs = []
    for index, start in enumerate(range(0, len(items), per_shard)):
        chunk = tuple(items[start:start + per_shard])
        described = json.dumps({"settings": settings, "items": [dataclasses.asdict(item) for item in chunk]},
                               sort_keys=True, default=str)
        jobs.append(ShardJob(SHARD_PATTERN.format(index), chunk, hashlib.sha256(described.encode()).hexdigest()))
    return jobs


def build_shard(job: ShardJob, encode: Encoder, out_dir: Path, on_item: Callable[[], None],
                on_start: Callable[[int], None] = lambda index: None,
                failed: Mapping[int, Rejection] = {}) -> ShardResult:
    """Encodes the items of one shard, writes it under a temporary name, then its status, then renames it.

    Args:
        job: The shard.
        encode: Turns an item into tar members, or into a rejection; it must
            be picklable and must reject, not raise, on bad media.
        out_dir: Folder of the tar and of ``status/``.
        on_item: Called after every item (progress).
        on_start: Called with an item's index before it is encoded.
        failed: Items (by index in the job) already known to fail, with their rejection: not encoded again.

    Returns:
        The complete shard.
    """
    tmp = temporary_path(out_dir / job.name)
    rejections = []
    keys = []
    with open(tmp, "wb") as file:
        with tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for index, item in enumerate(job.items):
                if index in failed:
                    result = failed[index]
                else:
                    on_start(index)
                    result = encode(item)
                if isinstance(result, Rejection):
                    rejections.append(result)
                else:
                    for name, data in result:
                        _add_member(tar, name, data)
                    keys.append(result[0][0].partition(".")[0])
                on_item()
        file.flush()
        os.fsync(file.fileno())
    result = ShardResult(ShardEntry(job.name, len(keys), tmp.stat().st_size, file_sha256(tmp)), tuple(rejections))
    os.replace(tmp, out_dir / job.name)
    write_json_atomic(status_path(out_dir, job.name), status_content(job, result, keys))
    return result


def status_content(job: ShardJob, result: ShardResult, keys: Sequence[str]) -> dict[str, Any]:
    """The content of a shard's status file (`keys`: the sample keys, in tar order)."""
    return {"fingerprint": job.fingerprint, "entry": dataclasses.asdict(result.entry), "keys": list(keys),
            "rejections": [dataclasses.asdict(r) for r in result.rejections]}


def result_from_status(status: dict[str, Any], job: ShardJob, where: str) -> ShardResult:
    """The shard a status file describes.

    Raises:
        InputError: If it was written for other settings or items (``where`` names the shard).
    """
    if status["fingerprint"] != job.fingerprint:
        raise InputError(f"{where} was written with other settings or other items; "
                         "use a fresh --out directory or pass --overwrite")
    return ShardResult(ShardEntry(**status["entry"]), tuple(Rejection(**r) for r in status["rejections"]))


def completed_shard(out_dir: Path, job: ShardJob) -> ShardResult | None:
    """The shard if ``out_dir`` holds it complete (its tar and a matching status), else None.

    Raises:
        InputError: As :func:`result_from_status`.
    """
    status_file = status_path(out_dir, job.name)
    tar_path = out_dir / job.name
    if not (status_file.is_file() and tar_path.is_file()):
        return None
    result = result_from_status(json.loads(status_file.read_text()), job, str(tar_path))
    return result if result.entry.bytes == tar_path.stat().st_size else None


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (a just-written shard comes from the page cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def status_path(out_dir: Path, name: str) -> Path:
    """Where a shard's status file lives in ``out_dir``."""
    return out_dir / STATUS_DIR / f"{name}.json"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
