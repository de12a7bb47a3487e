"""Compressed clips: a clip's whole usable span stored once, a window of it decoded at load time.

The sharder (``--encoding compressed``) stores, per clip:

- ``K.video.mp4``: H.264 (libx264 at the sharder's CRF, default :data:`VIDEO_CRF`, a keyframe every
  :data:`VIDEO_GOP` frames, no B-frames, 4:4:4 chroma, ``-tune fastdecode``: 40% less decoding time for 3% more
  bytes) of the span's frames, already at the model's frame size and at the model's frame rate
  ``r = T / window_seconds``: stored frame ``k`` is the source frame shown at ``(k + 0.5) / r`` seconds into the
  span, resized by :func:`hipscale.data.format.resize.resize_and_crop` like the raw sharder's frames;
- ``K.audio.flac``: the span's mono int16 audio at the dataset's sample rate (FLAC: lossless);
- ``meta.json``'s ``windows``: how many window starts the span holds (one every ``1 / r`` seconds).

Window ``w`` is stored frames ``w .. w + T - 1`` and audio samples ``[w * sample_rate / r, + S)``: exactly the
frames and samples the raw sharder stores for a window starting ``w / r`` seconds into the span, up to the
video compression. Which window a sample gets is :class:`WindowChoice`'s: a function of (seed, epoch, key) in
training, the centre one in evaluation and prediction.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass

import av  # imported with the loader, before its workers fork: 0.2 s each if every worker imported it
import av.video.reformatter
import numpy as np

VIDEO_CRF = 16      # libx264 constant rate factor, the sharder's default (PSNR and bytes measured: docs/data.md)
VIDEO_GOP = 4       # a keyframe every 4 stored frames: a window decodes at most 3 frames it does not use
VIDEO_PIX_FMT = "yuv444p"


class ClipCodecError(Exception):
    """An undecodable or too short compressed member."""


def decoder_message(message: object) -> str:
    """The first line of a decoder's message without what differs between runs (ffmpeg's object addresses
    ``[in#0 @ 0x55...]``, decord's ``[10:26:37] /path/video_reader.cc:486:`` prefix), for reports."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "no message"
    line = re.sub(r"^\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", lines[0])
    return re.sub(r" @ 0x[0-9a-f]+\]", "]", line)[:300]


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _encode(what: str, inputs: list[str], payload: bytes, outputs: list[str], suffix: str) -> bytes:
    """Runs ffmpeg on raw `payload` from stdin into a file (so that it can write its index and seek table)."""
    with tempfile.TemporaryDirectory(prefix="hipscale-encode-") as folder:
        out = os.path.join(folder, f"clip{suffix}")
        command = [_ffmpeg(), "-nostdin", "-v", "error", *inputs, "-i", "-", *outputs, "-threads", "1", out]
        done = subprocess.run(command, input=payload, capture_output=True, timeout=600)
        if done.returncode != 0:
            raise ClipCodecError(f"ffmpeg could not encode {what}: {done.stderr.decode(errors='replace').strip()}")
        with open(out, "rb") as f:
            return f.read()


def encode_video(frames: np.ndarray, frame_rate: float, crf: int = VIDEO_CRF) -> bytes:
    """``[N, H, W, 3]`` uint8 frames as an H.264 mp4 at `frame_rate` (frames per second) and libx264's `crf`."""
    count, height, width, _ = frames.shape
    return _encode(f"{count} frames", ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
                                       "-r", f"{frame_rate:.9g}"],
                   np.ascontiguousarray(frames, dtype=np.uint8).tobytes(),
                   ["-c:v", "libx264", "-preset", "medium", "-tune", "fastdecode", "-crf", str(crf),
                    "-g", str(VIDEO_GOP), "-bf", "0", "-pix_fmt", VIDEO_PIX_FMT, "-movflags", "+faststart"], ".mp4")


def encode_audio(samples: np.ndarray, sample_rate: int) -> bytes:
    """``[S]`` int16 mono samples as FLAC (with its seek table)."""
    return _encode(f"{len(samples)} audio samples", ["-f", "s16le", "-ar", str(sample_rate), "-ac", "1"],
                   np.ascontiguousarray(samples, dtype="<i2").tobytes(), ["-c:a", "flac"], ".flac")


def decode_video(data: bytes, first: int, count: int) -> np.ndarray:
    """Stored frames ``first .. first + count - 1`` of an mp4 member: ``[count, H, W, 3]`` uint8. Seeks to the
    keyframe at or before `first` and decodes from there (at most ``VIDEO_GOP - 1`` frames it does not return);
    frame ``k`` is the one whose time stamp is ``k`` frame durations after the stream's start."""
    try:
        with av.open(io.BytesIO(data), format="mp4") as container:
            stream = container.streams.video[0]
            # One thread, in the decoder and in the conversion (FFmpeg's default, 0, starts a pool per call:
            # more CPU, and threads a forked worker does not have): the loader's parallelism is its workers.
            stream.thread_type, stream.codec_context.thread_count = "NONE", 1
            rate, time_base, start = stream.average_rate, stream.time_base, stream.start_time or 0
            if not rate or not time_base:
                raise ClipCodecError("a video stream without a frame rate or time base")
            if first + count > stream.frames:
                raise ClipCodecError(f"frames {first}..{first + count - 1} asked of a video of {stream.frames} frames")
            container.seek(start + int(first / rate / time_base), stream=stream, backward=True)
            frames = []
            for frame in container.decode(stream):
                index = round((frame.pts - start) * time_base * rate)
                if index < first:
                    continue
                if index != first + len(frames):
                    raise ClipCodecError(f"frame {first + len(frames)} missing (the next frame is {index})")
                frames.append(_rgb_reformatter().reformat(frame, format="rgb24", threads=1).to_ndarray())
                if len(frames) == count:
                    return np.stack(frames)
    except av.FFmpegError as error:
        raise ClipCodecError(f"undecodable video ({decoder_message(error)})") from error
    raise ClipCodecError(f"frames {first}..{first + count - 1} asked, the video ends after {len(frames)} of them")


_THREAD_STATE = threading.local()


def _rgb_reformatter() -> av.video.reformatter.VideoReformatter:
    """This thread's converter to RGB, kept: a frame's own ``to_ndarray(format=...)`` sets up a new one for
    every frame, which costs 3x the conversion (0.77 against 0.2 ms a 224x224 frame). One per process too: a
    forked DataLoader worker makes its own rather than use its parent's."""
    if getattr(_THREAD_STATE, "pid", None) != os.getpid():
        _THREAD_STATE.reformatter, _THREAD_STATE.pid = av.video.reformatter.VideoReformatter(), os.getpid()
    return _THREAD_STATE.reformatter


def decode_audio(data: bytes, first: int, count: int) -> np.ndarray:
    """Samples ``[first, first + count)`` of a mono int16 FLAC member: ``[count]`` int16. Seeks to the FLAC
    frame that holds `first` (exact: FLAC frames carry their sample number) and decodes only what it needs."""
    try:
        with av.open(io.BytesIO(data), format="flac") as container:
            stream = container.streams.audio[0]
            container.seek(first, stream=stream)  # the stream's time base is one sample
            chunks, start = [], None
            for frame in container.decode(stream):
                if start is None:
                    start = frame.pts if frame.pts is not None and frame.pts <= first else None
                    if start is None:
                        raise ClipCodecError(f"seeking to sample {first} landed after it")
                chunks.append(frame.to_ndarray().reshape(-1))
                if start + sum(map(len, chunks)) >= first + count:
                    break
    except av.FFmpegError as error:
        raise ClipCodecError(f"undecodable audio ({decoder_message(error)})") from error
    samples = np.concatenate(chunks)[first - start:first - start + count] if chunks else np.zeros(0, np.int16)
    if samples.dtype != np.int16:
        raise ClipCodecError(f"audio of {samples.dtype} samples (int16 expected)")
    if len(samples) < count:
        raise ClipCodecError(f"samples [{first}, {first + count}) asked of an audio track that ends sooner")
    return samples


@dataclass(frozen=True)
class WindowChoice:
    """Which window of a compressed clip a sample gets.

    Attributes:
        seed: The loader's seed.
        epoch: The epoch being read.
        random: True (training): drawn from (seed, epoch, key) alone, so every rank, worker and resume of the
            epoch gets the same one, and so that a clip of W windows gets each of them once in epochs 0..W-1,
            again in W..2W-1 (in another order), and so on; False: the centre window.
    """

    seed: int = 0
    epoch: int = 0
    random: bool = False

    def index(self, key: str, windows: int) -> int:
        """The window (0 .. windows - 1) of sample `key`."""
        if not self.random:
            return (windows - 1) // 2
        key_hash = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        cycle, turn = divmod(self.epoch, windows)
        return int(np.random.default_rng([self.seed, key_hash, cycle]).permutation(windows)[turn])


CENTRE = WindowChoice()


def window_count(span_seconds: float, window_seconds: float, frame_rate: float) -> int:
    """Window starts (one every ``1 / frame_rate`` s) of a span: 0 when the span is shorter than a window."""
    if span_seconds + 1e-9 < window_seconds:
        return 0
    return int(np.floor((span_seconds - window_seconds) * frame_rate + 1e-6)) + 1


def audio_offset(window: int, sample_rate: int, frame_rate: float) -> int:
    """The first audio sample of window `window` (it starts ``window / frame_rate`` s into the span)."""
    return round(window * sample_rate / frame_rate)
