"""The training objective: groupwise-masked reconstruction (MAE) plus classification, weighted."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from hipscale.config.schema import ObjectiveConfig
from hipscale.training.losses import classification_loss, masked_reconstruction_loss
from hipscale.training.masking import mask_inputs, sample_group_mask

LABEL = "label"
"""Name of the label modality of the class-bottleneck model."""


def with_zero_labels(inputs: dict[str, torch.Tensor], num_classes: int) -> dict[str, torch.Tensor]:
    """The inputs plus the class-bottleneck model's label input, zeroed (the label is the target): [B, 1, K]."""
    x = next(iter(inputs.values()))
    return dict(inputs, **{LABEL: x.new_zeros(x.shape[0], 1, num_classes)})


class Objective:
    """Computes the weighted loss of a batch and, for evaluation, the class logits.

    Args:
        config: loss weights and mask ratio.
        num_classes: K.
        multi_label: multi-hot targets (sigmoid BCE) instead of class indices (cross-entropy).
    """

    def __init__(self, config: ObjectiveConfig, num_classes: int, multi_label: bool):
        self.config, self.num_classes, self.multi_label = config, num_classes, multi_label

    @property
    def classifies(self) -> bool:
        return self.config.classification_weight > 0

    def feed(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model inputs: the given modalities plus zeroed labels [B, 1, K] when classifying."""
        return with_zero_labels(inputs, self.num_classes) if self.classifies else dict(inputs)

    def losses(self, model: nn.Module, module: nn.Module, inputs: dict[str, torch.Tensor],
               labels: torch.Tensor, generator: Optional[torch.Generator]) -> dict[str, torch.Tensor]:
        """{"loss": weighted total, "mae": ..., "cls": ...} (scalars, float32) of one micro-batch.

        Args:
            model: what to call (the DeepSpeed engine or a plain module).
            module: the underlying HiP (its grouping defines the mask).
            inputs: normalised {name: [B, M, C]}.
            labels: int64 [B] or multi-hot float [B, K].
            generator: RNG of the MAE mask.
        """
        c = self.config
        feed = self.feed(inputs)
        masks = None
        if c.mae_weight > 0:
            batch = next(iter(inputs.values())).shape[0]
            device = next(iter(inputs.values())).device
            masks = sample_group_mask(module, batch, c.mask_ratio, generator=generator, device=device)
            feed = mask_inputs(feed, masks)
        out = model(feed)
        parts: dict[str, torch.Tensor] = {}
        if masks is not None:
            parts["mae"] = masked_reconstruction_loss(out["reconstruction"], targets=inputs, masks=masks)
        if self.classifies:
            parts["cls"] = classification_loss(self.logits(out), labels, multi_label=self.multi_label)
        total = sum(w * parts[k] for k, w in (("mae", c.mae_weight), ("cls", c.classification_weight)) if k in parts)
        return {"loss": total, **parts}

    @staticmethod
    def logits(out: dict) -> torch.Tensor:
        """Class logits [B, K] from the model output's label readout [B, 1, K]."""
        return out["reconstruction"][LABEL][:, 0, :]
