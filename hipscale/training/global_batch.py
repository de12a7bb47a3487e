"""The global batch rule: G samples per optimizer step, fixed for a run, whatever its world size.

At every start the gradient accumulation is G / (micro batch x world size). The lr schedule counts
optimizer steps, each of G samples, so a run resumed on another number of ranks follows the same
schedule and sees the same number of samples per step.
"""
from __future__ import annotations

from typing import Optional

from hipscale.config import JobConfig
from hipscale.training.components.outcome import SetupError


def dividing_world_sizes(global_batch: int, micro_batch: int) -> list[int]:
    """The world sizes that split G into whole micro-batches on every rank."""
    micro_batches = global_batch // micro_batch
    return [n for n in range(1, micro_batches + 1) if micro_batches % n == 0]


def check_world_sizes(global_batch: int, micro_batch: int, world_sizes: list[int], what: str = "") -> None:
    """Raises SetupError naming the world sizes that do not divide G / micro_batch, and those that do."""
    bad = [w for w in world_sizes if global_batch % (micro_batch * w)]
    if bad:
        sizes = ", ".join(map(str, dividing_world_sizes(global_batch, micro_batch)))
        raise SetupError(f"training.global_batch_size={global_batch} with data.micro_batch_size={micro_batch} "
                         f"cannot be split over {' or '.join(map(str, bad))} ranks{what}; world sizes that divide "
                         f"it: {sizes}")


def accumulation_for(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-steps per optimizer step.

    Raises:
        SetupError: the world size does not divide G / micro_batch (names the world sizes that do).
    """
    check_world_sizes(global_batch, micro_batch, [world_size])
    return global_batch // (micro_batch * world_size)


def resolve_global_batch(config: JobConfig, world_size: int, saved: Optional[int]) -> int:
    """G for this start: the checkpoint's (`saved`), else the config's, else micro x accumulation x world.

    Raises:
        SetupError: the config names another G than the checkpoint that is resumed.
    """
    t = config.training
    if saved is not None and t.global_batch_size not in (None, saved):
        raise SetupError(f"training.global_batch_size={t.global_batch_size}, but the checkpoint resumed was "
                         f"trained with {saved}: the global batch is fixed for a run (start a new run with "
                         f"--init-from to change it)")
    if saved is not None:
        return saved
    if t.global_batch_size is not None:
        return t.global_batch_size
    return config.data.micro_batch_size * t.gradient_accumulation_steps * world_size
