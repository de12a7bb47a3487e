"""The build_hip arguments of a run (stored with checkpoints and exports) and the model they build."""
from __future__ import annotations

from typing import Any

from torch import nn

from hipscale.augment import AugmentError, Augmentation
from hipscale.config import ConfigError
from hipscale.config.schema import JobConfig
from hipscale.model import build_hip
from hipscale.training.objective import LABEL


def build_augmentation(config: JobConfig, info: Any) -> Augmentation:
    """The run's augmentation for this dataset (it also fixes the model's input shapes: the clip window).

    Raises:
        ConfigError: naming the augment key the data cannot take.
    """
    try:
        return Augmentation(config.augment, info.shapes, info.clip_seconds, info.num_classes)
    except AugmentError as e:
        raise ConfigError(f"augment.{e}") from None


def model_spec(config: JobConfig, info: Any) -> dict:
    """Plain-data keyword arguments of `build_hip` for this config and dataset."""
    m = config.model
    spec = {
        "variant": m.variant,
        "inputs": build_augmentation(config, info).model_modalities,
        "labels": {LABEL: (1, int(info.num_classes))} if config.objectives.classification_weight > 0 else None,
    }
    spec.update(num_position_encoding_channels=m.num_position_encoding_channels, regroup_type=m.regroup_type,
                processor_index_dim_train=m.processor_index_dim_train,
                processor_index_dim_eval=m.processor_index_dim_eval,
                dropout_prob=m.dropout_prob, drop_path_rate=m.drop_path_rate)
    return spec


def dataset_card(config: JobConfig, info: Any, augment: Augmentation) -> dict:
    """What inference needs to turn media files into this model's inputs and name its outputs (stored with
    checkpoints and exports): class names, multi_label, each modality's shape (after the clip window), the
    clip length in seconds and the sharder's attributes (sample rate, resize policy, ...)."""
    return {"class_names": [str(n) for n in info.class_names], "multi_label": bool(info.multi_label),
            "shapes": {name: [int(n) for n in shape] for name, shape in augment.shapes.items()},
            "clip_seconds": config.augment.clip_seconds or info.clip_seconds,
            "attributes": dict(getattr(info, "attributes", {}))}


def build_model(spec: dict) -> nn.Module:
    """A fresh HiP from a `model_spec` (no DeepSpeed involved)."""
    return build_hip(**spec)
