"""Decoding the window of one media file into raw frames and audio: the sharder's and predict's shared path."""
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hipscale.data.format.clip_codec import audio_offset, window_count
from hipscale.data.sharding.av_decode import MediaError, open_video, read_audio, read_frames
from hipscale.data.sharding.clip_window import frame_indices, place_window


@dataclass(frozen=True)
class ClipFormat:
    """What a clip is decoded into.

    Attributes:
        modalities: Subset of ``("video", "audio")``.
        window_seconds: Window length.
        frames: T, frames evenly spaced in the window.
        height: Frame height H.
        width: Frame width W.
        sample_rate: Audio rate in Hz.
    """

    modalities: tuple[str, ...]
    window_seconds: float
    frames: int
    height: int
    width: int
    sample_rate: int

    @property
    def audio_samples(self) -> int:
        """S, the exact number of audio samples per window."""
        return round(self.window_seconds * self.sample_rate)


def decode_clip(path: Path, begin: float, end: float, clip: ClipFormat, placement: str, seed: int,
                clip_id: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Decodes a window of ``clip.window_seconds`` placed in ``[begin, end]`` (file time, cut to the media).

    Args:
        path: Media file.
        begin, end: The usable span in seconds (``end`` may run past the media; it is cut).
        clip: The decoded format.
        placement, seed, clip_id: Where the window goes (:func:`hipscale.data.sharding.clip_window.place_window`).

    Returns:
        ``({"video": [T, H, W, 3] uint8, "audio": [S] int16}, meta)`` with meta's ``window_start``,
        ``frame_indices`` and ``audio_padded`` (samples of zeros added where the track ends early).

    Raises:
        MediaError: ``decode_error``, ``no_audio`` or ``too_short``.
    """
    audio, reader, end = _usable_span(path, begin, end, clip)
    start = place_window(begin, end, clip.window_seconds, placement, seed, clip_id)
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"window_start": start}
    if reader is not None:
        indices = frame_indices(start, clip.window_seconds, clip.frames, reader.get_avg_fps(), len(reader))
        arrays["video"] = read_frames(reader, indices, clip.height, clip.width)
        meta["frame_indices"] = indices
    if audio is not None:
        offset = round((start - begin) * clip.sample_rate)
        window = audio[offset:offset + clip.audio_samples]
        meta["audio_padded"] = clip.audio_samples - len(window)
        arrays["audio"] = np.pad(window, (0, clip.audio_samples - len(window)))
    return arrays, meta


def decode_span(path: Path, begin: float, end: float, clip: ClipFormat) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Decodes the whole usable span ``[begin, end]`` for a compressed shard (:mod:`hipscale.data.format.clip_codec`):
    the frames at the model's rate ``r = T / window_seconds`` that every window of the span needs, and all its audio.

    Returns:
        ``({"video": [N, H, W, 3] uint8, "audio": [A] int16}, meta)``: N = windows + T - 1 stored frames (frame k
        is the source frame shown at ``begin + (k + 0.5) / r``), A the span's samples; meta's ``windows``,
        ``span_seconds`` and the source ``frame_indices``.

    Raises:
        MediaError: ``decode_error``, ``no_audio`` or ``too_short``.
    """
    audio, reader, end = _usable_span(path, begin, end, clip)
    rate = clip.frames / clip.window_seconds
    windows = window_count(end - begin, clip.window_seconds, rate)
    if audio is not None:  # the last window's audio within the track, whatever the rounding
        audio = audio[:round((end - begin) * clip.sample_rate)]
        while windows and audio_offset(windows - 1, clip.sample_rate, rate) + clip.audio_samples > len(audio):
            windows -= 1
    if not windows:
        raise MediaError("too_short", f"the {len(audio)} audio samples of the span hold no whole window")
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"windows": windows, "span_seconds": end - begin}
    if reader is not None:
        stored = windows + clip.frames - 1
        indices = frame_indices(begin, stored / rate, stored, reader.get_avg_fps(), len(reader))
        arrays["video"] = read_frames(reader, indices, clip.height, clip.width)
        meta["frame_indices"] = indices
    if audio is not None:
        arrays["audio"] = audio
    return arrays, meta


def _usable_span(path: Path, begin: float, end: float, clip: ClipFormat) -> tuple[Any, Any, float]:
    """(audio of the span or None, the video reader or None, the span's end cut to the media)."""
    audio = reader = None
    if "audio" in clip.modalities:
        audio = read_audio(path, begin, end - begin, clip.sample_rate)
        end = min(end, begin + len(audio) / clip.sample_rate)
    if "video" in clip.modalities:
        reader = open_video(path)
        end = min(end, len(reader) / reader.get_avg_fps())
    if end - begin + 1e-9 < clip.window_seconds:
        raise MediaError("too_short", f"usable span {max(0.0, end - begin):.3f} s (segment cut to the media length) "
                                      f"is shorter than the {clip.window_seconds} s window")
    return audio, reader, end
