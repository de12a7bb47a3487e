"""The augmentation a config switches on, applied to the normalised inputs and targets of a micro-batch."""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from hipscale.augment.colour import random_colour
from hipscale.augment.geometry import crop_and_flip
from hipscale.augment.mixup import apply_mix, draw_mix, soft_targets
from hipscale.augment.window import ClipWindow
from hipscale.config.schema import AugmentConfig
from hipscale.seeding import seeded_generator, seeded_numpy

IMAGE = "image"
"""The modality that crops, flips, colour operations and CutMix act on: stored [H, W, C]."""

_DEVICE_STREAM, _HOST_STREAM = 101, 102  # seed parts that keep these draws apart from the MAE masks'


class AugmentError(ValueError):
    """An augmentation option the data cannot take; `key` names the option (e.g. "clip_seconds")."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class Augmentation:
    """Training-time augmentation of one run; evaluation only cuts the centre clip window.

    Args:
        config: the augment section.
        shapes: stored shape of every modality ({"image": (H, W, C)}, {"video": (T, H, W, 3), "audio": (S,)}).
        stored_seconds: clip length of audio/video shards (index.json's window_seconds), else None.
        num_classes: K.

    Raises:
        AugmentError: an option the data cannot take (image operations without an image modality, a clip
            window the clips cannot give).
    """

    def __init__(self, config: AugmentConfig, shapes: Mapping[str, tuple[int, ...]],
                 stored_seconds: Optional[float], num_classes: int):
        self.config, self.num_classes = config, num_classes
        try:
            self.window = (ClipWindow.build(shapes, stored_seconds, config.clip_seconds)
                           if config.clip_seconds is not None else None)
        except ValueError as e:
            raise AugmentError("clip_seconds", str(e)) from None
        self.shapes = self.window.model_shapes(shapes) if self.window else dict(shapes)
        c = config
        wanted = [key for key, on in (("random_resized_crop", c.random_resized_crop),
                                      ("horizontal_flip", c.horizontal_flip), ("color_ops", c.color_ops > 0),
                                      ("cutmix_alpha", c.cutmix_alpha > 0)) if on]
        if wanted and (IMAGE not in self.shapes or len(self.shapes[IMAGE]) != 3):
            raise AugmentError(wanted[0], f"needs an '{IMAGE}' modality stored as [H, W, C]; the data holds "
                               + ", ".join(f"{k} {list(v)}" for k, v in self.shapes.items()))
        self.image_size = tuple(self.shapes[IMAGE][:2]) if IMAGE in self.shapes and len(self.shapes[IMAGE]) == 3 \
            else None

    @property
    def model_modalities(self) -> dict[str, tuple[int, int]]:
        """{name: (index_dim, channels)} of the model's inputs (after the clip window)."""
        out = {}
        for name, shape in self.shapes.items():
            channels = shape[-1] if len(shape) > 1 else 1
            out[name] = (int(torch.Size(shape).numel()) // channels, int(channels))
        return out

    @property
    def changes_targets(self) -> bool:
        c = self.config
        return c.label_smoothing > 0 or c.mixup_alpha > 0 or c.cutmix_alpha > 0

    def evaluation(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs of evaluation and prediction: the centre clip window, nothing else."""
        return self.window.crop(inputs, None) if self.window else dict(inputs)

    def train(self, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor,
              *seed_parts: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Augments one micro-batch; the same `seed_parts` (run seed, rank, step, micro-step) draw the same.

        Args:
            inputs: normalised {name: [B, M, C]} as stored.
            labels: int64 [B] or multi-hot float [B, K].

        Returns:
            (inputs at the model's shapes, targets): the labels as given when no option changes them, else
            float [B, K] (smoothed and/or mixed).
        """
        c = self.config
        if c == AugmentConfig():  # nothing on: no generators to build on the hot path
            return dict(inputs), labels
        device = next(iter(inputs.values())).device
        generator = seeded_generator(device, *seed_parts, _DEVICE_STREAM)
        out = self.window.crop(inputs, generator) if self.window else dict(inputs)
        image_ops = c.random_resized_crop or c.horizontal_flip or c.color_ops > 0 or c.cutmix_alpha > 0
        if image_ops:
            out[IMAGE] = self._to_grid(out[IMAGE])
            if c.random_resized_crop or c.horizontal_flip:
                out[IMAGE] = crop_and_flip(out[IMAGE], generator, c.crop_scale, c.crop_ratio,
                                           c.random_resized_crop, c.horizontal_flip)
            if c.color_ops > 0:
                out[IMAGE] = random_colour(out[IMAGE], generator, c.color_ops, c.color_magnitude)
        targets = soft_targets(labels, self.num_classes, c.label_smoothing) if self.changes_targets else labels
        draw = draw_mix(seeded_numpy(*seed_parts, _HOST_STREAM), c.mixup_alpha, c.cutmix_alpha,
                        c.cutmix_switch_prob, c.mix_prob, self.image_size)
        if draw is not None:
            out, targets = apply_mix(out, targets, draw, IMAGE)
        if image_ops:
            out[IMAGE] = self._from_grid(out[IMAGE])
        return out, targets

    def _to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H*W, C] -> [B, C, H, W]."""
        height, width = self.image_size
        return x.view(x.shape[0], height, width, x.shape[2]).permute(0, 3, 1, 2)

    @staticmethod
    def _from_grid(x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, H*W, C] (contiguous)."""
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])
