"""Regional torch.compile: each HiP block's forward compiled on its own, applied from outside the model.

Compiling block by block keeps the first step short: blocks of the same shapes reuse one compiled
graph, and a block's graph is far smaller than the whole model's. The module structure and state_dict
keys do not change (only `forward` is replaced), so checkpoints and exports are the same as eager ones.
Apply it before activation checkpointing, which then wraps the compiled forward.
"""
from __future__ import annotations

import torch
from torch import nn


def compile_blocks(model: nn.Module, policy: str) -> list[int]:
    """Compile the forward of every block of `model.blocks` when `policy` is "blocks"; returns their indices."""
    if policy == "none":
        return []
    if policy != "blocks":
        raise ValueError(f"compile.policy: unknown policy {policy!r}")
    for block in model.blocks:
        block.forward = torch.compile(block.forward, dynamic=False)
    return list(range(len(model.blocks)))
