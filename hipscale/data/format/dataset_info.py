"""The dataset description written by the sharders as ``index.json``.

``index.json`` lists every shard with its sample count and size, and holds
what the trainer needs to build a model: the modalities with their stored
shape, dtype and encoding, the class names and whether labels are multi-label.
This module only builds and parses it; reading it from a folder or URL is
:func:`hipscale.data.storage.shard_store.load_dataset_info`.
"""
import hashlib
import json
import math
import os
import re
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INDEX_FILE = "index.json"
REPORT_FILE = "report.json"
FORMAT = "hipscale-shards"
FORMAT_VERSION = 1
IMAGE_FILE = "image-file"  # tars of other tools: any image file, decoded and resized at load time
COMPRESSED_CLIP = ("h264", "flac")  # a whole clip span per sample, a window decoded at load time (clip_codec)
ENCODINGS = ("npy", "jpeg", IMAGE_FILE, *COMPRESSED_CLIP)
_EXTENSIONS = {"jpeg": "jpg", "h264": "mp4", "flac": "flac"}


@dataclass(frozen=True)
class ModalitySpec:
    """How one modality is stored in every sample.

    Attributes:
        shape: Stored array shape: video ``[T, H, W, 3]``, audio ``[S]``,
            image ``[H, W, 3]``.
        dtype: Numpy dtype name, e.g. ``"uint8"`` or ``"int16"``.
        encoding: ``"npy"`` (raw array in numpy's .npy format), ``"jpeg"``, ``"image-file"`` (other
            tools' tars: see :mod:`hipscale.data.format.foreign_shards`), or ``"h264"`` / ``"flac"`` (the clip's
            whole span, of which the loader decodes a window of this shape: :mod:`hipscale.data.format.clip_codec`).
    """

    shape: tuple[int, ...]
    dtype: str
    encoding: str

    @property
    def channels(self) -> int:
        """Channels of the model-ready ``[M, C]`` layout (1 for a 1-D array)."""
        return self.shape[-1] if len(self.shape) > 1 else 1

    @property
    def index_dim(self) -> int:
        """Positions M of the model-ready ``[M, C]`` layout."""
        return math.prod(self.shape) // self.channels

    @property
    def extension(self) -> str:
        """File extension of this modality inside a sample."""
        return _EXTENSIONS.get(self.encoding, "npy")


@dataclass(frozen=True)
class ShardEntry:
    """One shard file listed in ``index.json``.

    Attributes:
        name: File name relative to the dataset directory.
        samples: Number of samples in the shard.
        bytes: Size of the shard file.
        sha256: Hex SHA-256 of the shard file, to verify a copy or a download
            ("" in indexes written before it was recorded).
    """

    name: str
    samples: int
    bytes: int
    sha256: str = ""


@dataclass(frozen=True)
class DatasetInfo:
    """A parsed ``index.json``.

    Attributes:
        specs: Modality name -> :class:`ModalitySpec`.
        class_names: Display name of every class, in class-index order.
        multi_label: Whether a sample may carry several labels.
        shards: Every shard, in writing order.
        attributes: Free-form metadata of the sharding run (sample rate,
            window, resize policy, ...).
        root: The folder or URL the dataset was loaded from (not serialised).
    """

    specs: dict[str, ModalitySpec]
    class_names: tuple[str, ...]
    multi_label: bool
    shards: tuple[ShardEntry, ...]
    attributes: dict[str, Any] = field(default_factory=dict)
    root: str | None = None

    @property
    def modalities(self) -> dict[str, tuple[int, int, str]]:
        """Modality name -> ``(index_dim, channels, dtype)`` of the batches."""
        return {name: (spec.index_dim, spec.channels, spec.dtype) for name, spec in self.specs.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Modality name -> stored array shape (video ``[T, H, W, 3]``, audio ``[S]``, image ``[H, W, 3]``)."""
        return {name: spec.shape for name, spec in self.specs.items()}

    @property
    def clip_seconds(self) -> float | None:
        """Length in seconds of the stored audio/video clips (None for images)."""
        seconds = self.attributes.get("window_seconds")
        return float(seconds) if seconds is not None else None

    @property
    def frame_rate(self) -> float:
        """Stored frames per second of compressed clips: T / window_seconds (``attributes["frame_rate"]``)."""
        return float(self.attributes["frame_rate"])

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return len(self.class_names)

    @property
    def num_samples(self) -> int:
        """Total number of samples over all shards."""
        return sum(shard.samples for shard in self.shards)

    @property
    def fingerprint(self) -> str:
        """A hash of the shard list, to tell datasets apart on resume."""
        listing = json.dumps([[shard.name, shard.samples] for shard in self.shards])
        return hashlib.sha256(listing.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        """Returns the ``index.json`` content.

        Returns:
            A JSON-serialisable dict.
        """
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "modalities": {
                name: {
                    "shape": list(spec.shape),
                    "dtype": spec.dtype,
                    "encoding": spec.encoding,
                    "index_dim": spec.index_dim,
                    "channels": spec.channels,
                }
                for name, spec in self.specs.items()
            },
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "multi_label": self.multi_label,
            "num_samples": self.num_samples,
            "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256} for s in self.shards],
            "attributes": self.attributes,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any], path: str, root: str | None = None) -> "DatasetInfo":
        """Parses ``index.json`` content (``path`` names it in errors; ``root`` goes to the result).

        Raises:
            ValueError: If it is not a hipscale shard index or a field is missing or malformed.
        """
        if raw.get("format") != FORMAT or raw.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: expected format {FORMAT!r} version {FORMAT_VERSION}, "
                             f"got {raw.get('format')!r} version {raw.get('version')!r}")
        try:
            specs = {
                name: ModalitySpec(tuple(int(n) for n in entry["shape"]), str(entry["dtype"]), str(entry["encoding"]))
                for name, entry in raw["modalities"].items()
            }
            shards = tuple(ShardEntry(str(s["name"]), int(s["samples"]), int(s["bytes"]), str(s.get("sha256", "")))
                           for s in raw["shards"])
            info = cls(specs, tuple(raw["class_names"]), bool(raw["multi_label"]), shards,
                       dict(raw.get("attributes", {})), root)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: malformed entry ({type(error).__name__}: {error})") from error
        bad = [name for name, spec in specs.items() if spec.encoding not in ENCODINGS]
        if bad:
            raise ValueError(f"{path}: unknown encoding for {bad}; expected one of {ENCODINGS}")
        if info.num_samples != raw.get("num_samples"):
            raise ValueError(f"{path}: num_samples {raw.get('num_samples')} != sum of shard counts {info.num_samples}")
        return info


def writer_tag() -> str:
    """A name part no other writer (on any machine) uses: host, process id and a random tag."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def temporary_path(path: Path) -> Path:
    """Where a writer puts `path`'s content before renaming it into place: ``.<name>.<host>-<pid>-<tag>.tmp``."""
    return path.with_name(f".{path.name}.{writer_tag()}.tmp")


def is_temporary(name: str) -> bool:
    """Whether file `name` is a :func:`temporary_path`: a writer's file in flight (or a dead writer's), not output."""
    base = name.rpartition("/")[2]
    return base.startswith(".") and base.endswith(".tmp")


def temporary_pid(tmp: Path, host: str) -> int | None:
    """The process id of the writer on `host` of a :func:`temporary_path`; None if it was another host's."""
    found = re.search(rf"\.{re.escape(host)}-(\d+)-[0-9a-f]{{8}}\.tmp$", tmp.name)
    return int(found.group(1)) if found else None


def write_json_atomic(path: Path, content: Any) -> Path:
    """Writes JSON under a temporary name, then renames it into place.

    Args:
        path: Destination file.
        content: JSON-serialisable value.

    Returns:
        ``path``.
    """
    tmp = temporary_path(path)  # writers never share one
    tmp.write_text(json.dumps(content, indent=1) + "\n")
    os.replace(tmp, path)
    return path
