"""Decoding of video frames (decord) and audio (ffmpeg) from media files.

Audio comes from the imageio-ffmpeg static binary through ffmpeg-python, never
from decord's AudioReader/AVReader, which leak about 2 MB per reader.
"""
from pathlib import Path

import decord
import ffmpeg
import imageio_ffmpeg
import numpy as np
from PIL import Image

from hipscale.data.format.clip_codec import decoder_message
from hipscale.data.format.resize import resize_and_crop

VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".ts", ".3gp"})


class MediaError(Exception):
    """A media file that cannot give the requested clip.

    Attributes:
        reason: Rejection reason (``decode_error``, ``no_audio``, ``too_short``).
        detail: A human-readable explanation.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def index_media(directory: Path) -> dict[str, Path]:
    """Maps each id to its media file in a directory.

    The id of ``abc_30.000.mp4`` is ``abc_30.000`` (only the last suffix is
    removed). Files with other extensions than :data:`VIDEO_EXTENSIONS` are
    ignored; when several files share an id the first in sorted order wins.

    Args:
        directory: Directory holding ``<id>.<ext>`` files.

    Returns:
        Id -> path.
    """
    media: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() in VIDEO_EXTENSIONS and path.is_file():
            media.setdefault(path.stem, path)
    return media


def open_video(path: Path) -> decord.VideoReader:
    """Opens a video with decord (one decoding thread).

    Args:
        path: Media file.

    Returns:
        A reader; ``len(reader)`` frames at ``reader.get_avg_fps()``.

    Raises:
        MediaError: ``decode_error`` if decord cannot open it.
    """
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except (RuntimeError, decord.DECORDError) as error:
        raise MediaError("decode_error", f"decord cannot open the video: {decoder_message(error)}") from error
    if len(reader) == 0 or reader.get_avg_fps() <= 0:
        raise MediaError("decode_error", "the video has no frames")
    return reader


def read_frames(reader: decord.VideoReader, indices: list[int], height: int, width: int) -> np.ndarray:
    """Decodes frames and applies :func:`resize_and_crop` to each.

    Args:
        reader: From :func:`open_video`.
        indices: T frame indices.
        height: Target H.
        width: Target W.

    Returns:
        ``[T, H, W, 3]`` uint8.

    Raises:
        MediaError: ``decode_error`` if a frame cannot be decoded.
    """
    try:
        frames = reader.get_batch(indices).asnumpy()
    except (RuntimeError, decord.DECORDError) as error:
        raise MediaError("decode_error", f"decord cannot decode frames {indices}: {decoder_message(error)}") from error
    return np.stack([resize_and_crop(Image.fromarray(frame), height, width) for frame in frames])


def read_audio(path: Path, begin: float, duration: float, sample_rate: int) -> np.ndarray:
    """Decodes an audio span as mono signed 16-bit samples.

    Runs ``ffmpeg [-ss begin] -t duration -i path -vn -ac 1 -ar sample_rate
    -f s16le pipe:`` (``-ss`` only when ``begin > 0``).

    Args:
        path: Media file.
        begin: Span start in seconds.
        duration: Span length in seconds.
        sample_rate: Output rate in Hz.

    Returns:
        ``[n]`` int16, ``n <= duration * sample_rate`` (fewer where the
        track ends earlier).

    Raises:
        MediaError: ``no_audio`` without an audio track or samples,
            ``decode_error`` if ffmpeg fails otherwise.
    """
    seek = {"ss": begin} if begin > 0 else {}
    stream = ffmpeg.input(str(path), t=duration, **seek).output(
        "pipe:", format="s16le", acodec="pcm_s16le", ac=1, ar=sample_rate, vn=None)
    try:
        pcm, _ = stream.global_args("-nostdin", "-v", "error").run(
            cmd=imageio_ffmpeg.get_ffmpeg_exe(), capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as error:
        message = error.stderr.decode(errors="replace")
        if "does not contain any stream" in message:
            raise MediaError("no_audio", "the file has no audio track") from error
        raise MediaError("decode_error", f"ffmpeg cannot decode the audio: {decoder_message(message)}") from error
    if not pcm:
        raise MediaError("no_audio", f"the audio track has no samples in [{begin:.3f}, {begin + duration:.3f}] s")
    return np.frombuffer(pcm, dtype="<i2").astype(np.int16)

