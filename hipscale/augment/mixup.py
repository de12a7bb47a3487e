"""MixUp, CutMix and label smoothing: soft targets [B, K] for single- and multi-label data.

A mixed batch pairs sample i with sample B - 1 - i (the batch reversed), so no second batch is needed and
every sample is in exactly one pair.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch


@dataclass(frozen=True)
class MixDraw:
    """One batch's mixing, drawn on the host (no device synchronisation).

    Attributes:
        kind: "mixup" or "cutmix".
        lam: the weight of each sample itself (for CutMix, the share of the image left uncovered).
        box: CutMix's (top, bottom, left, right) rows and columns, half-open.
    """

    kind: str
    lam: float
    box: Optional[tuple[int, int, int, int]] = None


def draw_mix(rng: np.random.Generator, mixup_alpha: float, cutmix_alpha: float, switch_prob: float,
             mix_prob: float, image_size: Optional[tuple[int, int]]) -> Optional[MixDraw]:
    """Whether and how to mix this batch; None leaves it unmixed.

    Args:
        rng: the step's host generator.
        mixup_alpha, cutmix_alpha: Beta parameters (0: that kind is off).
        switch_prob: with both on, the probability of CutMix.
        mix_prob: the probability of mixing at all.
        image_size: (H, W) of the image modality (CutMix needs one).
    """
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or rng.random() >= mix_prob:
        return None
    cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    if not cutmix:
        return MixDraw("mixup", float(rng.beta(mixup_alpha, mixup_alpha)))
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
    height, width = image_size
    cut_h, cut_w = int(height * np.sqrt(1 - lam)), int(width * np.sqrt(1 - lam))
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, width)
    covered = (bottom - top) * (right - left) / (height * width)
    return MixDraw("cutmix", 1.0 - covered, (top, bottom, left, right))


def apply_mix(inputs: Mapping[str, torch.Tensor], targets: torch.Tensor, draw: MixDraw,
              image_name: Optional[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Mixes every sample with its partner (the reversed batch).

    Args:
        inputs: {name: [B, M, C]}; for CutMix inputs[image_name] is [B, C, H, W].
        targets: [B, K] float.
        draw: from :func:`draw_mix`.
        image_name: the image modality, which CutMix cuts.

    Returns:
        (mixed inputs, mixed targets [B, K]).
    """
    out = dict(inputs)
    if draw.kind == "mixup":
        for name, x in inputs.items():
            out[name] = x * draw.lam + x.flip(0) * (1 - draw.lam)
    else:
        top, bottom, left, right = draw.box
        image = inputs[image_name].clone()
        image[:, :, top:bottom, left:right] = inputs[image_name].flip(0)[:, :, top:bottom, left:right]
        out[image_name] = image
    return out, targets * draw.lam + targets.flip(0) * (1 - draw.lam)


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Float targets [B, K]: one-hot (from class indices [B]) or the multi-hot rows, smoothed to
    (1 - smoothing) * y + smoothing / K."""
    y = labels.float() if labels.is_floating_point() else torch.nn.functional.one_hot(labels, num_classes).float()
    return y * (1 - smoothing) + smoothing / num_classes if smoothing else y
