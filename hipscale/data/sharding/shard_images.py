"""Sharding of labelled images at a fixed square resolution.

Sources: an ImageFolder tree (one sub-directory per class, classes in sorted
name order, image files found recursively inside each class directory and
sorted) or a CSV list file with the header ``path,label`` (paths relative to
the image root, labels are class names; classes in sorted name order). Files
without an image extension (:data:`IMAGE_EXTENSIONS`) are not items.

The items are shuffled (a permutation seeded by ``shuffle_seed``) before they
are cut into shards: an ImageFolder lists images class by class, and shards of
one or two classes each would leave every rank's stretch of an epoch, and the
loader's shuffle buffer, with a few classes only.

Each image gets its EXIF orientation applied and is converted to RGB, then
:func:`hipscale.data.format.resize.resize_and_crop` scales its shorter side to
``size`` (bicubic) and crops the centre square. It is stored as JPEG (quality
95 by default) or as a raw ``[size, size, 3]`` uint8 array.
"""
import csv
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from hipscale.data.errors import InputError
from hipscale.data.format.dataset_info import DatasetInfo, ModalitySpec
from hipscale.data.format.keys import id_to_key
from hipscale.data.format.resize import IMAGE_POLICY, load_image
from hipscale.data.format.samples import encode_sample
from hipscale.data.sharding.run import shard_dataset
from hipscale.data.sharding.shard_plan import make_plan
from hipscale.data.sharding.shard_workers import DEFAULT_ITEM_TIMEOUT_S
from hipscale.data.sharding.shard_writer import Members, Rejection, plan_shards, samples_per_shard

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
ENCODINGS = ("jpeg", "raw")
MAX_SIZE = 2048
_TAR_OVERHEAD = 3072  # headers, padding and meta.json of one sample, upper estimate


@dataclass(frozen=True)
class ImageShardConfig:
    """Settings of an image sharding run.

    Attributes:
        images: Image root (an ImageFolder tree, or the base of the list's
            paths).
        out: Output folder, or an ``s3://`` / ``gs://`` URL (shards are built in
            ``staging`` and uploaded as they finish, the index last).
        list_file: Optional ``path,label`` CSV; without it ``images`` is read
            as an ImageFolder tree.
        size: Side of the stored square images, 1..2048.
        encoding: ``"jpeg"`` or ``"raw"`` (uint8 .npy).
        quality: JPEG quality.
        workers: Worker processes.
        max_samples_per_shard: Most samples per shard.
        max_shard_bytes: Most bytes per shard (estimated from the raw size,
            an upper bound for JPEG in practice).
        shuffle_seed: Seed of the item order across shards; None keeps the
            listed order (class by class for an ImageFolder).
        overwrite: Delete earlier output instead of resuming.
        staging: Local folder for shards before their upload to a URL ``out``
            (None: ``<temp dir>/hipscale-staging/<dataset>``).
        item_timeout_s: Seconds one image may take to decode; past it its worker
            is killed and the image rejected as ``timeout``.
        plan_units: Only write the plan, in this many units, for ``python -m
            hipscale.data.shard_job work`` on many machines (None: shard here).
    """

    images: Path
    out: str | Path
    list_file: Path | None = None
    size: int = 224
    encoding: str = "jpeg"
    quality: int = 95
    workers: int = 1
    max_samples_per_shard: int = 1000
    max_shard_bytes: int = 1 << 30
    shuffle_seed: int | None = 0
    overwrite: bool = False
    staging: str | None = None
    item_timeout_s: float = DEFAULT_ITEM_TIMEOUT_S
    plan_units: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.size <= MAX_SIZE:
            raise InputError(f"size must be in 1..{MAX_SIZE}, got {self.size}")
        if self.encoding not in ENCODINGS:
            raise InputError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if not 1 <= self.quality <= 100 or self.workers < 1 or self.item_timeout_s <= 0:
            raise InputError(f"quality must be in 1..100, workers and item timeout positive, got {self.quality}, "
                             f"{self.workers}, {self.item_timeout_s}")

    def specs(self) -> dict[str, ModalitySpec]:
        """Returns how the image modality is laid out."""
        return {"image": ModalitySpec((self.size, self.size, 3), "uint8", "jpeg" if self.encoding == "jpeg" else "npy")}

    def settings(self) -> dict[str, Any]:
        """Returns the settings that change the shard bytes."""
        return {"size": self.size, "encoding": self.encoding, "quality": self.quality,
                "shuffle_seed": self.shuffle_seed}


@dataclass(frozen=True)
class ImageItem:
    """One image to shard.

    Attributes:
        id: Path relative to the image root (POSIX separators).
        path: Absolute path.
        label: Class index.
        source: Where the item was listed.
    """

    id: str
    path: str
    label: int
    source: str


def list_image_folder(root: Path) -> tuple[list[ImageItem], list[str]]:
    """Lists an ImageFolder tree.

    Args:
        root: Tree root.

    Returns:
        ``(items, class_names)``.

    Raises:
        InputError: If ``root`` is not a directory or has no class directory.
    """
    if not root.is_dir():
        raise InputError(f"--images {root}: not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"--images {root}: expected one sub-directory per class, found none")
    items = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                relative = path.relative_to(root).as_posix()
                items.append(ImageItem(relative, str(path), label, str(path)))
    return items, classes


def read_image_list(list_file: Path, root: Path) -> tuple[list[ImageItem], list[str], list[Rejection]]:
    """Reads a ``path,label`` CSV list.

    Args:
        list_file: The CSV file, header ``path,label``.
        root: Base directory of the paths.

    Returns:
        ``(items, class_names, rejections)``; a path listed twice is rejected
        as ``duplicate_id`` (the first is kept).

    Raises:
        InputError: On a missing file, a wrong header, or a line without two
            columns.
    """
    if not list_file.is_file():
        raise InputError(f"--list {list_file}: file not found")
    with open(list_file, newline="", encoding="utf-8") as file:
        rows = list(enumerate(csv.reader(file), start=1))
    if not rows or [field.strip() for field in rows[0][1]] != ["path", "label"]:
        raise InputError(f"{list_file}:1: expected the header path,label")
    entries, rejections, first_line = [], [], {}
    for line, fields in rows[1:]:
        if not fields:
            continue
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise InputError(f"{list_file}:{line}: expected 2 non-empty columns (path,label), got {fields}")
        relative, label = fields[0].strip(), fields[1].strip()
        if relative in first_line:
            rejections.append(Rejection(relative, f"{list_file}:{line}", "duplicate_id",
                                        f"path already on line {first_line[relative]}"))
            continue
        first_line[relative] = line
        entries.append((relative, label, f"{list_file}:{line}"))
    classes = sorted({label for _, label, _ in entries})
    index_of = {name: index for index, name in enumerate(classes)}
    items = [ImageItem(relative, str(root / relative), index_of[label], source)
             for relative, label, source in entries]
    return items, classes, rejections


def encode_image(item: ImageItem, config: ImageShardConfig) -> Members | Rejection:
    """Decodes, resizes and encodes one image, or rejects it.

    Args:
        item: The image.
        config: Sharding settings.

    Returns:
        The sample's tar members, or a rejection with its reason.
    """
    path = Path(item.path)
    if not path.is_file():
        return Rejection(item.id, item.source, "missing_file", f"{path} does not exist")
    try:
        array, source_size = load_image(path, config.size, config.size)
    except Exception as error:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ...) on bad files
        return Rejection(item.id, item.source, "unreadable_image", f"{type(error).__name__}: {error}")
    return encode_sample(id_to_key(item.id), item.id, {"image": array}, config.specs(), (item.label,),
                         {"source_size": source_size}, config.quality)


def shard_images(config: ImageShardConfig) -> dict[str, Any]:
    """Shards every listed image; see the module docstring.

    Writes ``shard-NNNNNN.tar``, ``index.json`` and ``report.json`` to
    ``config.out``; a re-run with the same settings keeps complete shards.

    Args:
        config: Sharding settings.

    Returns:
        The content of ``report.json``.

    Raises:
        InputError: On a missing directory or list, a malformed list, or an
            output directory written with other settings.
    """
    if config.list_file is None:
        items, classes = list_image_folder(config.images)
        early: list[Rejection] = []
    else:
        items, classes, early = read_image_list(config.list_file, config.images)
    if not items:
        raise InputError(f"no images found under {config.images}")
    spec = config.specs()["image"]
    per_shard = samples_per_shard(config.max_samples_per_shard, config.max_shard_bytes,
                                  spec.index_dim * spec.channels + _TAR_OVERHEAD)
    if config.shuffle_seed is not None:
        items = [items[i] for i in np.random.default_rng(config.shuffle_seed).permutation(len(items))]
    attributes = {
        "kind": "images",
        "resize": IMAGE_POLICY,
        **config.settings(),
    }
    info = DatasetInfo(config.specs(), tuple(classes), False, (), attributes)
    plan = make_plan("images", config, info, plan_shards(items, per_shard, config.settings()), early,
                     config.plan_units)
    return shard_dataset(plan, partial(encode_image, config=config), config, "image")
