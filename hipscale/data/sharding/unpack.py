"""Video tars written by other tools (video2dataset: ``K.mp4`` [+ ``K.m4a``/``K.wav``] + ``K.json``), unpacked into
the media folder, manifest and class index that :mod:`hipscale.data.sharding.shard_av` reads.

Decoding such clips at load time would cost what sharding costs, 6.5-10.6 clips/s per core here, so one
H100 at the audio+video target (160 samples/s) would need 15-25 cores of decoding, against about one core
to read our shards: the clips are converted once instead. Each sample becomes ``videos/<id>.<ext>``: the
video member as it is, or, when the audio is a member of its own, both streams copied (not re-encoded) into
one Matroska file by ffmpeg. Its id is the sample key made file-safe (:func:`hipscale.data.format.keys.id_to_key`),
its segment the whole file (``0`` to the video's length), its classes the ``json:FIELD`` value: a class name
or index, or a list of them (names are sorted into the class index; indices name their class ``class_<i>``).
A sample without a video member or a label is left out and counted.
"""
from __future__ import annotations

import csv
import json
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import imageio_ffmpeg
from tqdm import tqdm

from hipscale.data.errors import InputError
from hipscale.data.format.keys import every_sample, id_to_key
from hipscale.data.sharding.av_decode import VIDEO_EXTENSIONS, MediaError, open_video
from hipscale.data.sharding.manifest import CLASS_INDEX_COLUMNS, MANIFEST_COLUMNS
from hipscale.data.storage.remote import open_file, top_level_files

AUDIO_EXTENSIONS = ("m4a", "aac", "wav", "flac", "mp3", "ogg", "opus")
UNREADABLE_LENGTH_S = 86400.0


@dataclass
class Unpacked:
    """What :func:`unpack_av` wrote and left out."""

    videos: Path
    manifest: Path
    class_index: Path
    clips: int = 0
    left_out: Counter = field(default_factory=Counter)  # reason -> samples


def unpack_av(location: str, to: Path, label: str, progress: bool = True) -> Unpacked:
    """Unpacks every sample of the tars directly in `location` (a folder or s3:// / gs:// prefix) into `to`.

    Args:
        location: Where the tars are.
        to: Output folder (``videos/``, ``manifest.csv``, ``class_index.csv``).
        label: ``json:FIELD``.

    Raises:
        InputError: No tars, an unreadable tar, or no sample with a video and a label.
    """
    if not label.startswith("json:"):
        raise InputError(f"--label {label!r}: expected json:FIELD")
    names = top_level_files(location, ".tar")
    if not names:
        raise InputError(f"{location}: no .tar files to unpack")
    unpacked = Unpacked(to / "videos", to / "manifest.csv", to / "class_index.csv")
    unpacked.videos.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, float, list[Any]]] = []
    for name in tqdm(names, desc="unpack", unit="tar", disable=not progress):
        try:
            with open_file(location, name) as stream:
                for key, files in every_sample(stream, f"{location}/{name}"):
                    row = _unpack_sample(key, files, label.removeprefix("json:"), unpacked)
                    if row is not None:
                        rows.append(row)
        except ValueError as error:  # an unreadable tar (a full disk while writing stays an OSError)
            raise InputError(str(error)) from None
    if not rows:
        raise InputError(f"{location}: no sample with a video and a {label} label ({dict(unpacked.left_out)})")
    _write_csvs(rows, unpacked)
    unpacked.clips = len(rows)
    return unpacked


def _unpack_sample(key: str, files: dict[str, bytes], field_name: str,
                   unpacked: Unpacked) -> tuple[str, float, list[Any]] | None:
    """Writes one sample's media file; returns its manifest row (id, length, labels), or None if left out."""
    lowered = {extension.lower(): data for extension, data in files.items()}
    video = next((ext for ext in lowered if f".{ext}" in VIDEO_EXTENSIONS), None)
    audio = next((ext for ext in AUDIO_EXTENSIONS if ext in lowered), None)
    try:
        labels = json.loads(lowered["json"])[field_name]
    except (KeyError, ValueError, TypeError):
        labels = None
    if video is None or labels in (None, [], ""):
        unpacked.left_out["no video member" if video is None else "no label"] += 1
        return None
    clip_id = id_to_key(key)  # no dots: "<id>.source.<ext>" below cannot be another clip's file
    path = unpacked.videos / f"{clip_id}.{video}"
    if audio is None:
        path.write_bytes(lowered[video])
    else:
        sources = [unpacked.videos / f"{clip_id}.source.{ext}" for ext in (video, audio)]
        for source, ext in zip(sources, (video, audio)):
            source.write_bytes(lowered[ext])
        path = unpacked.videos / f"{clip_id}.mkv"
        _mux(*sources, path)
        for source in sources:
            source.unlink()
    return clip_id, _length_s(path), labels if isinstance(labels, list) else [labels]


def _length_s(path: Path) -> float:
    """The video's length in seconds, the clip's segment; one that decord cannot open gets a day, and the
    sharder rejects it with the reason (``decode_error``)."""
    try:
        reader = open_video(path)
    except MediaError:
        return UNREADABLE_LENGTH_S
    return len(reader) / reader.get_avg_fps()


def _mux(video: Path, audio: Path, out: Path) -> None:
    """Copies the video stream of `video` and the audio stream of `audio` into `out` (no re-encoding)."""
    done = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-i", str(video),
                           "-i", str(audio), "-map", "0:v:0", "-map", "1:a:0", "-c", "copy", str(out)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise InputError(f"ffmpeg could not put {audio.name} next to {video.name}: {done.stderr.strip()[:300]}")


def _write_csvs(rows: Sequence[tuple[str, float, list[Any]]], unpacked: Unpacked) -> None:
    values = {value for _, _, labels in rows for value in labels}
    if values and all(isinstance(v, int) for v in values):
        names = [f"class_{i}" for i in range(max(values) + 1)]
        mid_of = {i: f"class_{i}" for i in values}
    else:
        names = sorted(map(str, values))
        mid_of = {value: str(value) for value in values}
    with open(unpacked.class_index, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CLASS_INDEX_COLUMNS)
        writer.writerows([index, name, name] for index, name in enumerate(names))
    with open(unpacked.manifest, "w", newline="") as file:
        file.write("# " + ", ".join(MANIFEST_COLUMNS) + "\n")
        writer = csv.writer(file)
        writer.writerows([clip_id, "0.000", f"{length:.3f}", ",".join(mid_of[v] for v in labels)]
                         for clip_id, length, labels in rows)
