"""What DeepSpeed 0.19.8's ZeRO-3 universal load gets wrong in the optimizer, put right after it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hipscale.training.components.checkpoint_integrity import load_weights_only


def restore_zero3_optimizer_groups(engine: Any, universal_dir: Path) -> None:
    """Undo what DeepSpeed 0.19.8's ZeRO-3 universal load changes in the optimizer, after `engine.load_checkpoint`.

    `DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3` (a) gives every param
    group the hyperparameters of the checkpoint's first group (our second group, without weight decay, gets the
    first one's `weight_decay`) and (b) puts one and the same `step` tensor into the state of every sub-group,
    which torch's Adam then increments once per sub-group and step (the bias corrections run ahead). The ZeRO-1/2
    path restores both per group. Here each group gets its own saved hyperparameters back (from the universal
    folder's `zero/optimizer_state.pt`, tensors memory-mapped) and each sub-group its own copy of the step.
    """
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT

    saved = load_weights_only(universal_dir / "zero" / "optimizer_state.pt", mmap=True)
    saved_groups = saved[OPTIMIZER_STATE_DICT]["param_groups"]
    base = engine.optimizer.optimizer
    if len(saved_groups) != len(base.param_groups):
        raise RuntimeError(f"{universal_dir}: the checkpoint has {len(saved_groups)} optimizer param groups, the "
                           f"optimizer {len(base.param_groups)}")
    for group, saved_group in zip(base.param_groups, saved_groups):
        group.update({key: value for key, value in saved_group.items() if key != "params"})
    for flat in engine.optimizer.fp32_partitioned_groups_flat:
        state = base.state[flat]
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
