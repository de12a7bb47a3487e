"""Media files -> a trained model's raw inputs, decoded the way the sharders decoded its training data.

Images: EXIF orientation, RGB, bicubic scale to cover H x W and centre crop (as preprocess/shard_images.py).
Clips (video and audio files): the centre window of the model's clip length, T frames evenly spaced in it
and mono int16 audio at the training sample rate (as preprocess/shard_av.py with --placement centre; an
audio-only model takes the audio track of any file ffmpeg reads).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hipscale.data.sharding.av_decode import MediaError
from hipscale.data.sharding.clip_decode import ClipFormat, decode_clip
from hipscale.data.format.resize import load_image

_LONGEST_SECONDS = 86_400.0  # the span handed to the decoders: cut to the media's own length


class MediaInputs:
    """Decodes files for a model described by a dataset card (hipscale.training.model_setup.dataset_card).

    Args:
        card: {"shapes": {name: stored shape}, "clip_seconds", "attributes": {"sample_rate", ...}, ...}.

    Raises:
        ValueError: the model's inputs are not images, video or audio made by our sharders.
    """

    def __init__(self, card: dict[str, Any]):
        self.shapes = {name: tuple(shape) for name, shape in card["shapes"].items()}
        self.clip: ClipFormat | None = None
        if set(self.shapes) == {"image"} and len(self.shapes["image"]) == 3:
            return
        unknown = set(self.shapes) - {"video", "audio"}
        if unknown or not card.get("clip_seconds") or "sample_rate" not in card.get("attributes", {}):
            raise ValueError(f"this model's inputs ({', '.join(f'{k} {list(v)}' for k, v in self.shapes.items())}) "
                             "were not made by the image or audio/video sharder; there is no media decoding for them")
        video = self.shapes.get("video", (1, 1, 1, 3))
        self.clip = ClipFormat(tuple(self.shapes), float(card["clip_seconds"]), video[0], video[1], video[2],
                               int(card["attributes"]["sample_rate"]))

    def describe(self) -> str:
        if self.clip is None:
            height, width, _ = self.shapes["image"]
            return f"images at {height}x{width}"
        c = self.clip
        parts = ([f"{c.frames} frames of {c.height}x{c.width}"] if "video" in c.modalities else []) + (
            [f"{c.audio_samples} audio samples at {c.sample_rate} Hz"] if "audio" in c.modalities else [])
        return f"the centre {c.window_seconds:g} s of each clip: " + " and ".join(parts)

    def decode(self, path: Path) -> dict[str, np.ndarray]:
        """{name: [M, C]} raw uint8/int16 arrays of one file.

        Raises:
            MediaError: the file is missing or cannot be decoded into these inputs.
        """
        path = Path(path)
        if not path.is_file():
            raise MediaError("missing_file", f"{path} does not exist")
        if self.clip is None:
            height, width, channels = self.shapes["image"]
            try:
                image, _ = load_image(path, height, width)
            except Exception as error:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ...)
                raise MediaError("decode_error", f"not a readable image ({type(error).__name__}: {error})") from None
            return {"image": image.reshape(height * width, channels)}
        arrays, _ = decode_clip(path, 0.0, _LONGEST_SECONDS, self.clip, "centre", 0, path.name)
        return {name: array.reshape(-1, self.shapes[name][-1] if len(self.shapes[name]) > 1 else 1)
                for name, array in arrays.items()}
