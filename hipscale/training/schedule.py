"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""
from __future__ import annotations

import functools
import math

import torch

from hipscale.config.schema import ScheduleConfig


def lr_factor(step: int, total_steps: int, config: ScheduleConfig) -> float:
    """Multiplier of the peak lr for the update that follows `step` completed optimizer steps.

    Warmup: (step + 1) / warmup_steps for step < warmup_steps; then cosine from 1 to
    min_lr_ratio at total_steps.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  config: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_factor`; DeepSpeed steps it after every applied update and checkpoints it."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, total_steps=total_steps, config=config))


def reapply(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the optimizer's learning rates from the scheduler's current lambdas at its restored position.

    A loaded LambdaLR keeps the learning rates the saving run computed; a resumed run may have changed
    training.steps (a longer run), and its first update must follow the new schedule like the rest.
    """
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() (and DeepSpeed's get_lr()) report
