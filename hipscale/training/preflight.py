"""Checks that must pass before any process group starts: data present, output folders writable,
the model buildable for the data."""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Any

from hipscale.config import ConfigError, JobConfig
from hipscale.training.data_setup import dataset_info
from hipscale.training.ds_config import load_base
from hipscale.training.model_setup import build_model, model_spec


def run_dir(config: JobConfig) -> Path:
    return Path(config.run.output_dir) / config.run.name


def checkpoint_dir(config: JobConfig) -> Path:
    return Path(config.checkpoint.dir) if config.checkpoint.dir else run_dir(config) / "checkpoints"


def check_writable(path: Path, key: str) -> None:
    """Create `path` if needed and prove a file can be written there; ConfigError naming `key` otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{key}: directory {path} is not writable ({e.strerror or e})") from None


def check_data_dir(path: str, key: str) -> None:
    """A local data folder must exist (a URL is checked by reading its index.json)."""
    from hipscale.data.storage.remote import is_url

    if not is_url(path) and not os.path.isdir(path):
        raise ConfigError(f"{key}: data directory {path} does not exist")


def preflight(config: JobConfig) -> Any:
    """Check data and output folders; returns the dataset info.

    Raises:
        ConfigError: missing data folder or dataset info, unwritable run/checkpoint folder,
            unreadable DeepSpeed config.
    """
    if config.data.source == "shards":
        if config.data.train_dir:
            check_data_dir(config.data.train_dir, "data.train_dir")
        for i, source in enumerate(config.data.train_mix):
            check_data_dir(source.dir, f"data.train_mix[{i}].dir")
        if config.data.eval_dir is not None:
            check_data_dir(config.data.eval_dir, "data.eval_dir")
    check_writable(run_dir(config), "run.output_dir")
    check_writable(checkpoint_dir(config), "checkpoint.dir")
    load_base(config.deepspeed_config)
    try:
        info = dataset_info(config)
    except (OSError, ValueError) as e:
        key = "data.train_mix" if config.data.train_mix else "data.train_dir"
        raise ConfigError(f"{key}: cannot read the dataset info of {config.data.train_dir or 'the sources'}: {e}") \
            from None
    check_model(config, info)
    check_init_source(config)
    warn_empty_eval(config)
    return info


def warn_empty_eval(config: JobConfig) -> None:
    """An eval set without samples is not an error (evaluations then report no metrics), but it is said at once."""
    if config.data.source != "shards" or config.data.eval_dir is None:
        return
    from hipscale.data import load_dataset_info
    from hipscale.training.data_setup import remote_settings
    from hipscale.training.distributed import launcher_rank

    try:
        samples = load_dataset_info(config.data.eval_dir, remote_settings(config.data)).num_samples
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.eval_dir: cannot read the dataset info of {config.data.eval_dir}: {e}") from None
    if samples == 0 and launcher_rank() == 0:
        print(f"hipscale.train: warning: data.eval_dir {config.data.eval_dir} holds no samples; every evaluation "
              f"will report its metrics as undefined", file=sys.stderr, flush=True)


def check_init_source(config: JobConfig) -> None:
    """model.init_from must name weights, unless this run has a checkpoint to resume (then it is not read)."""
    from hipscale.training.components.checkpoint import CheckpointManager
    from hipscale.training.weight_source import find_source

    if config.model.init_from is None or CheckpointManager(checkpoint_dir(config), 1, 0, 1).complete_tags():
        return
    try:
        find_source(config.model.init_from)
    except FileNotFoundError as e:
        raise ConfigError(f"model.init_from: {e}") from None


def check_model(config: JobConfig, info: Any) -> None:
    """Build the model on the meta device (no memory) so that a variant that cannot take these inputs
    (e.g. groups that do not divide evenly) fails here with one line, not on every rank later."""
    import torch

    try:
        with torch.device("meta"):
            build_model(model_spec(config, info))
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
