"""The build_hip arguments of a run (stored with checkpoints and exports) and the model they build."""
from __future__ import annotations

from typing import Any

from torch import nn

from hipscale.config.schema import JobConfig
from hipscale.model import build_hip
from hipscale.training.objective import LABEL


def model_spec(config: JobConfig, info: Any) -> dict:
    """Plain-data keyword arguments of `build_hip` for this config and dataset."""
    m = config.model
    spec = {
        "variant": m.variant,
        "inputs": {name: (int(shape[0]), int(shape[1])) for name, shape in info.modalities.items()},
        "labels": {LABEL: (1, int(info.num_classes))} if config.objectives.classification_weight > 0 else None,
    }
    spec.update(num_position_encoding_channels=m.num_position_encoding_channels, regroup_type=m.regroup_type,
                processor_index_dim_train=m.processor_index_dim_train,
                processor_index_dim_eval=m.processor_index_dim_eval,
                dropout_prob=m.dropout_prob, drop_path_rate=m.drop_path_rate)
    return spec


def build_model(spec: dict) -> nn.Module:
    """A fresh HiP from a `model_spec` (no DeepSpeed involved)."""
    return build_hip(**spec)
