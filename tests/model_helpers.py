"""Shared helpers for the model tests: the fixture's tiny variant and random inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# The reference JAX HiP's parameters, inputs and eval-mode outputs of a tiny image model (keys `param/<haiku
# name>`, `input/<modality>`, `output/<modality>`; the project's shared fixture, kept in the repository so that
# a clone tests alone).
FIXTURE = Path(__file__).resolve().parent / "assets" / "haiku_tiny_hip_image.npz"

TINY_VARIANT = {
    "num_groups": (2, 1, 2),
    "num_self_attends_per_block": (1, 1, 1),
    "z_index_dim": (4, 8, 4),
    "num_z_channels": (8, 16, 8),
    "num_cross_attend_heads": (1, 1, 1),
    "num_self_attend_heads": (1, 2, 1),
    "cross_attend_widening_factor": (1, 1, 1),
    "self_attend_widening_factor": (4, 4, 4),
    "num_embedding_channels": 4,
}

FIVE_BLOCKS = {
    "num_groups": (4, 2, 1, 2, 4),
    "num_self_attends_per_block": (1, 1, 2, 1, 1),
    "z_index_dim": (4, 6, 8, 6, 4),
    "num_z_channels": (8, 12, 16, 10, 6),
    "num_cross_attend_heads": (1, 1, 1, 1, 1),
    "num_self_attend_heads": (2, 3, 4, 2, 1),
    "cross_attend_widening_factor": (1, 2, 1, 1, 1),
    "self_attend_widening_factor": (4, 4, 4, 4, 4),
    "num_embedding_channels": 4,
}
"""A deeper variant whose U-Net skips change width (so they need projections)."""


def load_fixture() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as archive:
        return {k: archive[k] for k in archive.files}


def random_inputs(spec: dict[str, tuple[int, int]], batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, m, c, generator=g) for name, (m, c) in spec.items()}
