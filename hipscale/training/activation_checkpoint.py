"""Activation-checkpointing policies over the HiP blocks, applied from outside the model.

A chosen block's `forward` is replaced (on the instance) by one that runs the original under
`torch.utils.checkpoint.checkpoint(use_reentrant=False)`: module structure and state_dict keys
stay unchanged. It works with ZeRO-3: the recomputation calls the block's sub-modules through
`__call__`, so DeepSpeed's hooks gather their partitioned parameters again (the block itself
owns no direct parameters).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hipscale.config.schema import ActivationCheckpointConfig


def select_blocks(blocks: nn.ModuleList, config: ActivationCheckpointConfig) -> list[int]:
    """Indices of the blocks the policy checkpoints.

    "none": []; "all": every block; "every_k": 0, k, 2k, ...; "outer": blocks whose
    `num_groups` >= config.min_groups (the high-resolution encoder and decoder ends).
    """
    indices = range(len(blocks))
    if config.policy == "none":
        return []
    if config.policy == "all":
        return list(indices)
    if config.policy == "every_k":
        return [i for i in indices if i % config.every_k == 0]
    if config.policy == "outer":
        return [i for i in indices if blocks[i].num_groups >= config.min_groups]
    raise ValueError(f"activation_checkpoint.policy: unknown policy {config.policy!r}")


def _checkpointed(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_activation_checkpointing(model: nn.Module, config: ActivationCheckpointConfig) -> list[int]:
    """Checkpoint the blocks of `model.blocks` that the policy selects; returns their indices."""
    chosen = select_blocks(model.blocks, config)
    for i in chosen:
        block = model.blocks[i]
        block.forward = _checkpointed(block.forward)
    return chosen
