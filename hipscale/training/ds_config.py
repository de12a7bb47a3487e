"""Render the DeepSpeed config from a JobConfig and merge it over ds_config.json.

The JobConfig wins every conflict; each conflict is reported as one line.
"""
from __future__ import annotations

import json
from typing import Any

from hipscale.config import ConfigError, JobConfig

# DeepSpeed keys this trainer owns outright: it passes the optimizer and scheduler objects itself,
# and the global batch follows from micro batch x accumulation x world size.
_OWNED_KEYS = {
    "optimizer": "optimizer",
    "scheduler": "schedule",
    "train_batch_size": "data.micro_batch_size x training.gradient_accumulation_steps x world size",
}


def render_deepspeed(config: JobConfig, bf16: bool, load_universal: bool = False) -> dict:
    """The DeepSpeed keys implied by `config` (bf16: resolved precision; load_universal: resume path)."""
    zero: dict[str, Any] = {"stage": config.zero.stage,
                            "offload_optimizer": {"device": config.zero.offload_optimizer}}
    if config.zero.stage == 3:
        zero["offload_param"] = {"device": config.zero.offload_params}
    offload = {}
    if config.zero.offload_optimizer != "none":
        # Our optimizer is torch's AdamW (or our LAMB) stepping on the offloaded fp32 partitions on the
        # CPU; without this DeepSpeed insists on its own JIT-compiled DeepSpeedCPUAdam.
        offload["zero_force_ds_cpu_optimizer"] = False
    return {
        **offload,
        "train_micro_batch_size_per_gpu": config.data.micro_batch_size,
        "gradient_accumulation_steps": config.training.gradient_accumulation_steps,
        "gradient_clipping": config.optimizer.grad_clip,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "checkpoint": {"load_universal": load_universal},
    }


def load_base(path: str | None) -> dict:
    """Read the DeepSpeed JSON file (`deepspeed_config`), or {} when path is None."""
    if path is None:
        return {}
    try:
        with open(path) as f:
            base = json.load(f)
    except OSError as e:
        raise ConfigError(f"deepspeed_config: cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed_config: {path} is not valid JSON: {e}") from None
    if not isinstance(base, dict):
        raise ConfigError(f"deepspeed_config: {path} must hold a JSON object")
    return base


def merge(base: dict, rendered: dict) -> tuple[dict, list[str]]:
    """Deep-merge `rendered` over `base`; return the result and one message per conflicting key."""
    conflicts = []
    merged = {k: v for k, v in base.items() if k not in _OWNED_KEYS}
    for key, owner in _OWNED_KEYS.items():
        if key in base:
            conflicts.append(f"ds_config.json key '{key}' ignored: set by the YAML config ({owner})")
    _merge_into(merged, rendered, "", conflicts)
    return merged, conflicts


def _merge_into(target: dict, source: dict, path: str, conflicts: list[str]) -> None:
    for key, value in source.items():
        where = f"{path}.{key}" if path else key
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            target[key] = dict(target[key])
            _merge_into(target[key], value, where, conflicts)
            continue
        if key in target and target[key] != value:
            conflicts.append(f"ds_config.json {where}={target[key]!r} overridden by the YAML config: {value!r}")
        target[key] = value


def build_deepspeed_config(config: JobConfig, bf16: bool, load_universal: bool = False) -> tuple[dict, list[str]]:
    """The final DeepSpeed config dict and the conflict messages (the YAML config wins)."""
    return merge(load_base(config.deepspeed_config), render_deepspeed(config, bf16, load_universal))
