"""Sharding of AudioSet-format clips into raw video frames and raw audio.

For each manifest segment the usable span is the segment, cut to the length
of the video and of the audio track. A window of ``window_seconds`` is placed
in it (:func:`hipscale.data.sharding.clip_window.place_window`); T frames evenly spaced
in the window are decoded with decord and resized with
:func:`hipscale.data.format.resize.resize_and_crop`; the window's audio is decoded
with ffmpeg as mono int16 at ``sample_rate`` and brought to exactly
``round(window_seconds * sample_rate)`` samples: trimmed if longer, padded with
zeros at the end if shorter (the number of padded samples goes to
``meta.json`` as ``audio_padded``). A clip whose usable span is shorter than
the window is rejected (``too_short``), not padded.
"""
import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from hipscale.data.errors import InputError
from hipscale.data.format.dataset_info import DatasetInfo, ModalitySpec
from hipscale.data.format.keys import id_to_key
from hipscale.data.format.clip_codec import ClipCodecError, VIDEO_CRF, VIDEO_GOP, VIDEO_PIX_FMT, encode_audio, encode_video
from hipscale.data.format.samples import encode_sample, sample_members
from hipscale.data.sharding.av_decode import MediaError, index_media
from hipscale.data.sharding.clip_decode import ClipFormat, decode_clip, decode_span
from hipscale.data.sharding.clip_window import PLACEMENTS
from hipscale.data.sharding.manifest import read_class_index, read_manifest
from hipscale.data.sharding.run import shard_dataset
from hipscale.data.sharding.shard_plan import make_plan
from hipscale.data.sharding.shard_workers import DEFAULT_ITEM_TIMEOUT_S
from hipscale.data.sharding.shard_writer import Members, Rejection, plan_shards, samples_per_shard

MODALITIES = ("video", "audio")
TIMELINES = ("segment", "video")
ENCODINGS = ("raw", "compressed")
# Bytes of a compressed 10 s clip at 224x224 (H.264 + FLAC), an upper estimate for sizing shards.
_COMPRESSED_BYTES_PER_SECOND = 200_000
_TAR_OVERHEAD = 4096  # headers, padding and meta.json of one sample, upper estimate


@dataclass(frozen=True)
class AVShardConfig:
    """Settings of an audio-visual sharding run.

    Attributes:
        manifest: AudioSet-format segment CSV.
        class_index: AudioSet-format ``index,mid,display_name`` CSV.
        videos: Directory of ``<id>.<ext>`` media files.
        out: Output folder, or an ``s3://`` / ``gs://`` URL (shards are built in
            ``staging`` and uploaded as they finish, the index last).
        modalities: Subset of ``("video", "audio")`` to store.
        window_seconds: Window length.
        placement: ``"start"``, ``"centre"`` or ``"random"``.
        seed: Seed of the random placement.
        frames: T, frames per window.
        height: Frame height H.
        width: Frame width W.
        sample_rate: Audio rate in Hz.
        timeline: ``"segment"``: each file holds just its segment (AudioSet
            downloads cut to 10 s), so the segment is ``[0, end - start]`` in
            file time; ``"video"``: files are whole videos and the segment is
            ``[start, end]``.
        workers: Worker processes.
        max_samples_per_shard: Most samples per shard.
        max_shard_bytes: Most bytes per shard (from the exact sample size).
        overwrite: Delete earlier output instead of resuming.
        staging: Local folder for shards before their upload to a URL ``out``
            (None: ``<temp dir>/hipscale-staging/<dataset>``).
        item_timeout_s: Seconds one clip may take to decode; past it its worker
            is killed and the clip rejected as ``timeout``.
        plan_units: Only write the plan, in this many units, for ``python -m
            hipscale.data.shard_job work`` on many machines (None: shard here).
        encoding: ``"raw"``: one window per clip as raw frames and samples (``.npy``); ``"compressed"``: the
            clip's whole usable span as H.264 at the frame size and rate of the window (``frames /
            window_seconds``) and FLAC audio, of which the loader decodes a fresh window every epoch
            (:mod:`hipscale.data.format.clip_codec`; ``placement`` does not apply).
        video_crf: libx264's constant rate factor of compressed clips (lower: larger and closer to the raw
            frames).
    """

    manifest: Path
    class_index: Path
    videos: Path
    out: str | Path
    modalities: tuple[str, ...] = MODALITIES
    window_seconds: float = 2.56
    placement: str = "centre"
    seed: int = 0
    frames: int = 8
    height: int = 224
    width: int = 224
    sample_rate: int = 48_000
    timeline: str = "segment"
    workers: int = 1
    max_samples_per_shard: int = 1000
    max_shard_bytes: int = 1 << 30
    overwrite: bool = False
    staging: str | None = None
    item_timeout_s: float = DEFAULT_ITEM_TIMEOUT_S
    plan_units: int | None = None
    encoding: str = "raw"
    video_crf: int = VIDEO_CRF

    def __post_init__(self) -> None:
        problems = []
        if self.encoding not in ENCODINGS:
            problems.append(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if not 0 <= self.video_crf <= 51:
            problems.append(f"video_crf must be in 0..51 (libx264), got {self.video_crf}")
        if not self.modalities or set(self.modalities) - set(MODALITIES):
            problems.append(f"modalities must be a non-empty subset of {MODALITIES}, got {self.modalities}")
        if self.placement not in PLACEMENTS:
            problems.append(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.timeline not in TIMELINES:
            problems.append(f"timeline must be one of {TIMELINES}, got {self.timeline!r}")
        if min(self.window_seconds, self.frames, self.height, self.width, self.sample_rate, self.workers,
               self.item_timeout_s) <= 0:
            problems.append("window, frames, height, width, sample rate, workers and item timeout must be positive")
        if problems:
            raise InputError("; ".join(problems))

    @property
    def clip_format(self) -> ClipFormat:
        """What each clip is decoded into."""
        return ClipFormat(self.modalities, self.window_seconds, self.frames, self.height, self.width,
                          self.sample_rate)

    @property
    def audio_samples(self) -> int:
        """S, the exact number of audio samples per clip."""
        return self.clip_format.audio_samples

    def specs(self) -> dict[str, ModalitySpec]:
        """Returns how each stored modality is laid out."""
        compressed = self.encoding == "compressed"
        all_specs = {
            "video": ModalitySpec((self.frames, self.height, self.width, 3), "uint8", "h264" if compressed else "npy"),
            "audio": ModalitySpec((self.audio_samples,), "int16", "flac" if compressed else "npy"),
        }
        return {name: spec for name, spec in all_specs.items() if name in self.modalities}

    def settings(self) -> dict[str, Any]:
        """Returns the settings that change the shard bytes."""
        return {name: value for name, value in dataclasses.asdict(self).items()
                if name not in ("manifest", "class_index", "videos", "out", "workers", "overwrite", "staging",
                                "item_timeout_s", "plan_units")}


@dataclass(frozen=True)
class ClipItem:
    """One clip to shard.

    Attributes:
        id: Clip id.
        path: Media file, or None if no ``<id>.*`` file exists.
        start: ``start_seconds`` of the segment.
        end: ``end_seconds`` of the segment.
        labels: Class indices.
        source: ``"<manifest>:<line>"``.
    """

    id: str
    path: str | None
    start: float
    end: float
    labels: tuple[int, ...]
    source: str


def encode_clip(item: ClipItem, config: AVShardConfig) -> Members | Rejection:
    """Decodes one clip into tar members, or rejects it.

    Args:
        item: The clip.
        config: Sharding settings.

    Returns:
        The sample's tar members, or a rejection with its reason.
    """
    if item.path is None:
        return Rejection(item.id, item.source, "missing_file", f"no {item.id}.<ext> file in {config.videos}")
    begin = item.start if config.timeline == "video" else 0.0
    end = begin + item.end - item.start
    try:
        if config.encoding == "compressed":
            arrays, meta = decode_span(Path(item.path), begin, end, config.clip_format)
            payloads = {}
            if "video" in arrays:
                payloads["video.mp4"] = encode_video(arrays["video"], config.frames / config.window_seconds,
                                                     config.video_crf)
            if "audio" in arrays:
                payloads["audio.flac"] = encode_audio(arrays["audio"], config.sample_rate)
            return sample_members(id_to_key(item.id), item.id, payloads, item.labels, meta)
        arrays, meta = decode_clip(Path(item.path), begin, end, config.clip_format, config.placement, config.seed,
                                   item.id)
    except MediaError as error:
        return Rejection(item.id, f"{item.source} ({item.path})", error.reason, error.detail)
    except ClipCodecError as error:
        return Rejection(item.id, f"{item.source} ({item.path})", "encode_error", str(error))
    return encode_sample(id_to_key(item.id), item.id, arrays, config.specs(), item.labels, meta)


def shard_av(config: AVShardConfig) -> dict[str, Any]:
    """Shards every clip of a manifest; see the module docstring.

    Writes ``shard-NNNNNN.tar``, ``index.json`` and ``report.json`` to
    ``config.out``; a re-run with the same settings keeps complete shards.

    Args:
        config: Sharding settings.

    Returns:
        The content of ``report.json``.

    Raises:
        InputError: On a missing directory, a malformed manifest or class
            index, or an output directory written with other settings.
    """
    if not config.videos.is_dir():
        raise InputError(f"--videos {config.videos}: not a directory")
    classes = read_class_index(config.class_index)
    segments, early_rejections = read_manifest(config.manifest, classes)
    media = index_media(config.videos)
    items = [ClipItem(s.id, str(media[s.id]) if s.id in media else None, s.start, s.end, s.labels, s.source)
             for s in segments]
    specs = config.specs()
    sample_bytes = (sum(spec.index_dim * spec.channels * np.dtype(spec.dtype).itemsize for spec in specs.values())
                    if config.encoding == "raw" else _COMPRESSED_BYTES_PER_SECOND * 10)
    per_shard = samples_per_shard(config.max_samples_per_shard, config.max_shard_bytes, sample_bytes + _TAR_OVERHEAD)
    attributes = {
        "kind": "audio-visual",
        "class_mids": list(classes.mids),
        "sample_rate": config.sample_rate,
        "window_seconds": config.window_seconds,
        "placement": config.placement,
        "timeline": config.timeline,
        "resize": "bicubic scale to cover HxW, centre crop",
        "audio": "mono int16, trimmed or zero-padded at the end to the exact sample count",
        "encoding": config.encoding,
    }
    if config.encoding == "compressed":
        attributes.update(placement="a window per epoch (the loader's)", frame_rate=config.frames / config.window_seconds,
                          audio="mono int16 FLAC of the whole usable span", video=f"H.264 CRF {config.video_crf} fastdecode, keyframe "
                          f"every {VIDEO_GOP} frames, {VIDEO_PIX_FMT}")
    info = DatasetInfo(specs, classes.names, True, (), attributes)
    plan = make_plan("av", config, info, plan_shards(items, per_shard, config.settings()), early_rejections,
                     config.plan_units)
    return shard_dataset(plan, partial(encode_clip, config=config), config, "clip")
