"""Where the window of a clip lies and which frames it samples."""
import hashlib
import math

import numpy as np

PLACEMENTS = ("start", "centre", "random")
_BOUNDARY_TOLERANCE = 1e-6


def place_window(begin: float, end: float, length: float, placement: str, seed: int, clip_id: str) -> float:
    """Chooses the window start inside the usable span of a clip.

    Args:
        begin: Start of the usable span (seconds, file time).
        end: End of the usable span; ``end - begin >= length``.
        length: Window length in seconds.
        placement: ``"start"`` (at ``begin``), ``"centre"`` (centred), or
            ``"random"`` (uniform, drawn from ``seed`` and ``clip_id`` only, so
            the same clip gets the same window in every run and worker).
        seed: Seed of ``"random"``.
        clip_id: The clip id.

    Returns:
        The window start in seconds.

    Raises:
        ValueError: On an unknown placement.
    """
    slack = end - begin - length
    if placement == "start":
        return begin
    if placement == "centre":
        return begin + slack / 2
    if placement == "random":
        clip_hash = int.from_bytes(hashlib.sha256(clip_id.encode()).digest()[:8], "little")
        return begin + slack * float(np.random.default_rng([seed, clip_hash]).random())
    raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")


def frame_indices(start: float, length: float, frames: int, fps: float, num_frames: int) -> list[int]:
    """Picks T frames evenly spaced in a window.

    Frame i is the one shown at the centre of the i-th of T equal slices of
    the window: ``floor((start + (i + 0.5) * length / T) * fps + 1e-6)``,
    clipped to the last frame. (The 1e-6 makes a time that falls exactly on a
    frame boundary, as with 8 frames of 2.56 s at 25 fps, pick the frame that
    starts there despite float rounding.)

    Args:
        start: Window start in seconds.
        length: Window length in seconds.
        frames: T.
        fps: Frame rate of the video.
        num_frames: Number of frames in the video.

    Returns:
        T frame indices, non-decreasing.
    """
    return [min(num_frames - 1, math.floor((start + (i + 0.5) * length / frames) * fps + _BOUNDARY_TOLERANCE))
            for i in range(frames)]
