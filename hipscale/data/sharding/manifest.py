"""AudioSet-format manifests and class indices.

Manifest (AudioSet segment CSV): ``YTID, start_seconds, end_seconds,
positive_labels`` per line, labels a quoted comma-separated list of mids
(``"/m/09x0r,/m/05zppz"``); lines starting with ``#`` and blank lines are
ignored, and so is an unquoted header line naming those four columns.

Class index (AudioSet ``class_labels_indices.csv``): a header
``index,mid,display_name`` then one row per class, indices ``0..K-1`` in
order.
"""
import csv
from dataclasses import dataclass
from pathlib import Path

from hipscale.data.errors import InputError
from hipscale.data.sharding.shard_writer import Rejection

MANIFEST_COLUMNS = ("YTID", "start_seconds", "end_seconds", "positive_labels")
CLASS_INDEX_COLUMNS = ("index", "mid", "display_name")


@dataclass(frozen=True)
class ClassIndex:
    """The classes of a dataset.

    Attributes:
        mids: Machine ids (e.g. ``"/m/09x0r"``), in class-index order.
        names: Display names, in class-index order.
    """

    mids: tuple[str, ...]
    names: tuple[str, ...]

    def index_of(self) -> dict[str, int]:
        """Returns the mid -> class index mapping."""
        return {mid: index for index, mid in enumerate(self.mids)}


@dataclass(frozen=True)
class Segment:
    """One manifest line.

    Attributes:
        id: The clip id (first column); the video file is ``<id>.<ext>``.
        start: ``start_seconds``.
        end: ``end_seconds``.
        labels: Sorted class indices.
        source: ``"<manifest>:<line>"``.
    """

    id: str
    start: float
    end: float
    labels: tuple[int, ...]
    source: str


def read_class_index(path: Path) -> ClassIndex:
    """Reads an AudioSet-format class index.

    Args:
        path: The CSV file.

    Returns:
        The classes.

    Raises:
        InputError: On a missing file, a wrong header, a row without three
            columns, indices not ``0..K-1`` in order, or a repeated mid.
    """
    rows = _read_csv_rows(path)
    if not rows or tuple(field.strip() for field in rows[0][1]) != CLASS_INDEX_COLUMNS:
        raise InputError(f"{path}:1: expected the header {','.join(CLASS_INDEX_COLUMNS)}")
    mids, names = [], []
    for line, fields in rows[1:]:
        if len(fields) != 3:
            raise InputError(f"{path}:{line}: expected 3 columns ({','.join(CLASS_INDEX_COLUMNS)}), got {len(fields)}")
        if fields[0].strip() != str(len(mids)):
            raise InputError(f"{path}:{line}: expected index {len(mids)}, got {fields[0]!r}")
        mid = fields[1].strip()
        if mid in mids:
            raise InputError(f"{path}:{line}: mid {mid!r} appears twice")
        mids.append(mid)
        names.append(fields[2])
    if not mids:
        raise InputError(f"{path}: no classes")
    return ClassIndex(tuple(mids), tuple(names))


def read_manifest(path: Path, classes: ClassIndex) -> tuple[list[Segment], list[Rejection]]:
    """Reads an AudioSet-format segment manifest.

    Args:
        path: The CSV file.
        classes: The class index the labels refer to.

    Returns:
        ``(segments, rejections)``: the segments in file order, and one
        ``duplicate_id`` rejection for every repeated id (the first one is
        kept).

    Raises:
        InputError: On a missing file, a line without four columns, a time
            that is not a number, ``end_seconds <= start_seconds``, no label,
            a label not in the class index, or no segment at all.
    """
    index_of = classes.index_of()
    segments: list[Segment] = []
    first_line: dict[str, int] = {}
    rejections = []
    for line, fields in _read_csv_rows(path):
        if not segments and not rejections and tuple(f.strip() for f in fields) == MANIFEST_COLUMNS:
            continue
        if len(fields) != 4:
            raise InputError(f"{path}:{line}: expected 4 columns ({', '.join(MANIFEST_COLUMNS)}), got {len(fields)}")
        clip_id = fields[0].strip()
        start, end = (_seconds(path, line, name, value) for name, value in zip(MANIFEST_COLUMNS[1:3], fields[1:3]))
        if not clip_id or end <= start or start < 0:
            raise InputError(f"{path}:{line}: expected a non-empty id and 0 <= start_seconds < end_seconds")
        mids = [mid.strip() for mid in fields[3].split(",") if mid.strip()]
        unknown = [mid for mid in mids if mid not in index_of]
        if not mids or unknown:
            raise InputError(f"{path}:{line}: positive_labels {fields[3]!r} must be a non-empty list of mids "
                             f"from the class index (unknown: {unknown})")
        if clip_id in first_line:
            rejections.append(Rejection(clip_id, f"{path}:{line}", "duplicate_id",
                                        f"id already on line {first_line[clip_id]}"))
            continue
        first_line[clip_id] = line
        labels = tuple(sorted({index_of[mid] for mid in mids}))
        segments.append(Segment(clip_id, start, end, labels, f"{path}:{line}"))
    if not segments:
        raise InputError(f"{path}: no segments")
    return segments, rejections


def _read_csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """Returns ``(line number, fields)`` for every non-blank, non-comment line."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    rows = []
    with open(path, newline="", encoding="utf-8") as file:
        for line, text in enumerate(file, start=1):
            if text.strip() and not text.lstrip().startswith("#"):
                rows.append((line, next(csv.reader([text], skipinitialspace=True))))
    return rows


def _seconds(path: Path, line: int, column: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InputError(f"{path}:{line}: {column} {value!r} is not a number") from None
