"""Training objectives the trainer calls: groupwise MAE masking and its loss, classification losses.

Masks are {modality: bool [B, M]} with True where the input's content is dropped.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from hipscale.model.hip import HiP

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


def mask_inputs(inputs: Mapping[str, torch.Tensor],
                masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zeros the content of masked positions: {name: [B, M, C]} -> same, other keys untouched."""
    return {name: x.masked_fill(masks[name].unsqueeze(-1), 0) if name in masks else x
            for name, x in inputs.items()}


def masked_reconstruction_loss(reconstruction: Mapping[str, torch.Tensor],
                               targets: Mapping[str, torch.Tensor],
                               masks: Mapping[str, torch.Tensor], per_sample: bool = False) -> torch.Tensor:
    """Mean squared error at masked positions, averaged over modalities with equal weight.

    Args:
        reconstruction: {name: [B, M, C]} model output.
        targets: {name: [B, M, C]} unmasked inputs.
        masks: {name: bool [B, M]}; only these modalities count.
        per_sample: return each sample's loss [B] (the loss of that sample alone) instead of the batch's.

    Returns:
        A scalar, or [B] (float32). Stays on the device: no host synchronisation.
    """
    losses = []
    for name, mask in masks.items():
        error = (reconstruction[name].float() - targets[name].float()).square().mean(dim=-1)  # [B, M]
        weight = mask.to(error.dtype)
        if per_sample:
            losses.append((error * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0))
        else:
            losses.append((error * weight).sum() / weight.sum().clamp_min(1.0))
    return torch.stack(losses).mean(dim=0)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Cross-entropy (single label, int64 [B]) or sigmoid BCE (multi-hot float [B, K]).

    Args:
        logits: [B, K].
        labels: int64 [B] class indices, or float [B, K] multi-hot targets.
        multi_label: selects the loss.

    Returns:
        A scalar (float32), mean over the batch (and classes for BCE).
    """
    logits = logits.float()
    if multi_label:
        if labels.shape != logits.shape:
            raise ValueError(f"labels: expected multi-hot {tuple(logits.shape)}, got {tuple(labels.shape)}")
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels: expected class indices [{logits.shape[0]}], got {tuple(labels.shape)}")
    return F.cross_entropy(logits, labels.long())
