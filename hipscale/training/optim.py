"""Build the torch optimizer DeepSpeed wraps (AdamW or LAMB) from the config."""
from __future__ import annotations

import torch
from torch import nn

from hipscale.config.schema import OptimizerConfig
from hipscale.training.lamb import Lamb


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices decay; biases, LayerNorm scales (1-d tensors) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """torch AdamW or LAMB over `model`'s parameters with the config's hyperparameters."""
    groups = param_groups(model, config.weight_decay)
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    if config.name == "lamb":
        return Lamb(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    raise ValueError(f"optimizer.name: unknown optimizer {config.name!r}")
