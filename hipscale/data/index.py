"""An ``index.json`` for image tars written by other tools, made by reading every tar once.

    python -m hipscale.data.index DIR|URL --image-size 224                  # ImageNet-style: .jpg + .cls
    python -m hipscale.data.index s3://bucket/laion --image-size 224 --label json:label   # img2dataset

Reads every ``*.tar`` directly in DIR (or under the s3:// / gs:// prefix) in name order, as the loader
groups them (consecutive members with one key are a sample), and writes DIR/index.json: each shard's
sample count, size and SHA-256, the image modality ``[S, S, 3]`` (decoded and resized at load time; see
:mod:`hipscale.data.format.foreign_shards`), and the classes: ``--label cls`` (the default) takes each ``.cls``
member's integer, ``--label json:FIELD`` a field of the ``.json`` member (integers are class indices;
strings are class names, sorted into the index). Classes run from 0 to the largest index seen, or to
``--num-classes`` - 1. Samples without an image or a label are indexed (they keep their place in the
tar) and counted as bad samples when loaded; the command reports how many there are.
Exit status 0, or 2 on bad input (no tars, an index.json already there without --force or written by our
sharders, mixed label types).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Optional

from tqdm import tqdm

from hipscale.data.errors import InputError
from hipscale.data.format.dataset_info import IMAGE_FILE, INDEX_FILE, DatasetInfo, ModalitySpec, ShardEntry
from hipscale.data.format.foreign_shards import LAYOUT, image_member, raw_label
from hipscale.data.format.resize import IMAGE_POLICY
from hipscale.data.format.samples import SampleError
from hipscale.data.format.keys import every_sample
from hipscale.data.sharding.shard_destination import open_destination
from hipscale.data.storage.remote import open_file, top_level_files

READ_BYTES = 1 << 20


@dataclass
class ShardScan:
    """What one read of a tar found."""

    entry: ShardEntry
    labels: Counter = field(default_factory=Counter)  # raw label value -> samples
    problems: Counter = field(default_factory=Counter)  # reason -> samples that will load as bad


class _HashingReader:
    """A binary stream that hashes and counts what is read through it."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.digest, self.size = stream, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    def read_to_end(self) -> None:
        while self.read(READ_BYTES):
            pass


def scan_shard(stream: BinaryIO, name: str, label: str) -> ShardScan:
    """Reads one tar from `stream` to its end: its samples, labels, size and SHA-256.

    Raises:
        InputError: If it is not a readable tar.
    """
    reader = _HashingReader(stream)
    labels, problems, samples = Counter(), Counter(), 0
    try:
        for _, files in every_sample(reader, name):
            samples += 1
            try:
                image_member(files)
                labels[raw_label(files, label)] += 1
            except SampleError as error:
                problems[str(error).split(" (")[0]] += 1
    except ValueError as error:
        raise InputError(str(error)) from None
    reader.read_to_end()
    return ShardScan(ShardEntry(name, samples, reader.size, reader.digest.hexdigest()), labels, problems)


def class_names(labels: Counter, label: str, num_classes: Optional[int]) -> tuple[str, ...]:
    """The index's classes: ``0..K-1`` for integer labels, the sorted names for string labels.

    Raises:
        InputError: Mixed label types, or a label at or beyond `num_classes`.
    """
    kinds = {type(value) for value in labels}
    if kinds == {str}:
        return tuple(sorted(labels))
    if kinds - {int}:
        raise InputError(f"--label {label}: the labels mix class indices and class names: {sorted(map(str, labels))[:8]}")
    largest = max(labels, default=-1)
    if min(labels, default=0) < 0 or (num_classes is not None and largest >= num_classes):
        raise InputError(f"--label {label}: labels span {min(labels, default=0)}..{largest}, outside "
                         f"0..{(num_classes or largest + 1) - 1}")
    return tuple(str(i) for i in range(num_classes if num_classes is not None else largest + 1))


def index_foreign(location: str, image_size: int, label: str = "cls", num_classes: Optional[int] = None,
                  force: bool = False, progress: bool = True) -> tuple[DatasetInfo, Counter]:
    """Scans the tars at `location`, writes its ``index.json`` and returns it with the bad-sample reasons.

    Raises:
        InputError: See the module docstring.
    """
    destination = open_destination(location, argument="LOCATION (where index.json is written)")
    if destination.size(INDEX_FILE) is not None:
        if destination.read_json(INDEX_FILE).get("attributes", {}).get("layout") != LAYOUT:
            raise InputError(f"{location}/{INDEX_FILE} was written by a hipscale sharder: these are our own shards")
        if not force:
            raise InputError(f"{location}/{INDEX_FILE} exists; pass --force to replace it")
    names = top_level_files(location, ".tar")
    if not names:
        raise InputError(f"{location}: no .tar files to index")
    scans = []
    for name in tqdm(names, desc="index", unit="shard", disable=not progress):
        with open_file(location, name) as stream:
            scans.append(scan_shard(stream, name, label))
    labels = sum((scan.labels for scan in scans), Counter())
    problems = sum((scan.problems for scan in scans), Counter())
    attributes: dict[str, Any] = {"layout": LAYOUT, "label": label, "image_size": image_size, "resize": IMAGE_POLICY,
                                  "made_by": "python -m hipscale.data.index"}
    info = DatasetInfo({"image": ModalitySpec((image_size, image_size, 3), "uint8", IMAGE_FILE)},
                       class_names(labels, label, num_classes), False, tuple(scan.entry for scan in scans),
                       attributes)
    destination.write_json(INDEX_FILE, info.to_json())
    return info, problems


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hipscale.data.index", description=__doc__.splitlines()[0])
    parser.add_argument("location", help="folder or s3:// / gs:// prefix holding the .tar files")
    parser.add_argument("--image-size", type=int, required=True, help="S: images load as [S, S, 3]")
    parser.add_argument("--label", default="cls", help="cls (the .cls member) or json:FIELD (default: cls)")
    parser.add_argument("--num-classes", type=int, default=None, help="K, when the tars hold only some classes")
    parser.add_argument("--force", action="store_true", help="replace an existing index.json")
    args = parser.parse_args(argv)
    if args.image_size < 1 or not (args.label == "cls" or args.label.startswith("json:")):
        parser.error("--image-size must be positive and --label cls or json:FIELD")
    try:
        info, problems = index_foreign(args.location, args.image_size, args.label, args.num_classes, args.force)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.location}/{INDEX_FILE}: {info.num_samples} samples in {len(info.shards)} shards, "
          f"{info.num_classes} classes, images [{args.image_size}, {args.image_size}, 3]"
          + (f"; {sum(problems.values())} will load as bad samples: {dict(problems)}" if problems else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
