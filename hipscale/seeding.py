"""Random generators seeded from tuples of integers (run seed, rank, step, micro-step, stream).

Everything the trainer draws per step (MAE masks, augmentation) comes from such a generator, so the
same step draws the same numbers after a resume, whatever happened before it.
"""
from __future__ import annotations

import numpy as np
import torch


def seed_of(*seed_parts: int) -> int:
    """A 32-bit seed mixed from integers (NumPy's SeedSequence: nearby tuples give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) for p in seed_parts]).generate_state(1)[0])


def seeded_generator(device: torch.device, *seed_parts: int) -> torch.Generator:
    """A torch generator on `device` seeded from `seed_parts`."""
    g = torch.Generator(device=device)
    g.manual_seed(seed_of(*seed_parts))
    return g


def seeded_numpy(*seed_parts: int) -> np.random.Generator:
    """A NumPy generator seeded from `seed_parts` (host-side draws: no device synchronisation)."""
    return np.random.default_rng(seed_of(*seed_parts))
