"""Losses: the reconstruction error at masked positions (MAE) and the classification loss."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F


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


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Cross-entropy (one class per sample) or sigmoid BCE (multi-label).

    Args:
        logits: [B, K].
        targets: single label: int64 class indices [B], or a float distribution over classes [B, K] (label
            smoothing, MixUp, CutMix); multi-label: float targets in [0, 1], [B, K] (multi-hot or mixed).
        multi_label: selects the loss.

    Returns:
        A scalar (float32), mean over the batch (and classes for BCE).
    """
    logits = logits.float()
    if multi_label:
        if targets.shape != logits.shape:
            raise ValueError(f"labels: expected multi-hot {tuple(logits.shape)}, got {tuple(targets.shape)}")
        return F.binary_cross_entropy_with_logits(logits, targets.float())
    if targets.is_floating_point():
        if targets.shape != logits.shape:
            raise ValueError(f"labels: expected class probabilities {tuple(logits.shape)}, got {tuple(targets.shape)}")
        return F.cross_entropy(logits, targets.float())
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"labels: expected class indices [{logits.shape[0]}], got {tuple(targets.shape)}")
    return F.cross_entropy(logits, targets.long())
