"""Groupwise MAE masking: which input positions have their content dropped.

Masks are {modality: bool [B, M]} with True where the input's content is dropped.
"""
from __future__ import annotations

import zlib
from typing import Mapping, Optional

import torch
from torch import nn

from hipscale.model.hip import HiP
from hipscale.seeding import seeded_generator

DEFAULT_MASK_RATIO = 0.75
"""Fraction of each group's positions whose content is dropped. The HiP paper does not
state its ratio; 0.75 is MAE's default for images and works for the position-embedding
pre-training here. Set it per experiment in the config."""


def sample_group_mask(model: HiP, batch_size: int, mask_ratio: float = DEFAULT_MASK_RATIO, *,
                      generator: Optional[torch.Generator] = None,
                      device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
    """Samples a groupwise random mask for every input modality (labels excluded).

    Within a modality every group gets the same pattern: per example, exactly
    round(mask_ratio * L) of the L positions of a group are masked, and the pattern is
    repeated over the modality's groups (so masked positions are spread evenly).

    Args:
        model: the model whose grouping the mask follows.
        batch_size: B.
        mask_ratio: fraction in [0, 1) of positions to mask.
        generator: optional RNG on `device` (for reproducible masks).
        device: where to build the masks.

    Returns:
        {modality: bool [B, M]}, True = masked.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio: expected a value in [0, 1), got {mask_ratio}")
    masks = {}
    for layout in model.grouper.layouts:
        group_length = layout.positions_per_group
        num_masked = round(mask_ratio * group_length)
        scores = torch.rand(batch_size, group_length, generator=generator, device=device)
        rank = scores.argsort(dim=-1).argsort(dim=-1)            # [B, L], a random permutation
        pattern = rank < num_masked                               # [B, L], num_masked per row
        masks[layout.name] = pattern.repeat(1, layout.num_groups)[:, :layout.index_dim]
    return masks


def sample_masks_by_key(module: nn.Module, keys: list[str], mask_ratio: float, seed: int,
                        device: torch.device) -> dict[str, torch.Tensor]:
    """MAE masks {modality: bool [B, M]}, each sample's drawn from (seed, its key): an evaluation sample gets
    the same mask whichever rank, batch or slot it lands in, so the eval MAE loss does not depend on the
    world size."""
    per_sample = [sample_group_mask(module, 1, mask_ratio, generator=seeded_generator(device, seed, zlib.crc32(
        key.encode())), device=device) for key in keys]
    return {name: torch.cat([m[name] for m in per_sample]) for name in per_sample[0]}


def mask_inputs(inputs: Mapping[str, torch.Tensor],
                masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zeros the content of masked positions: {name: [B, M, C]} -> same, other keys untouched."""
    return {name: x.masked_fill(masks[name].unsqueeze(-1), 0) if name in masks else x
            for name, x in inputs.items()}
