"""Trained weights on disk: a run folder, a checkpoint folder, one checkpoint, or an export, read without
DeepSpeed's engine (a sharded checkpoint is verified, then consolidated with its zero_to_fp32 reader; an
export is read with the weights-only unpickler)."""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hipscale.training.components.checkpoint import COMPLETE, CheckpointError, CheckpointManager
from hipscale.training.export import check_checkpoint, checkpoint_metadata
from hipscale.training.model_setup import build_model


@dataclass(frozen=True)
class WeightSource:
    """Where the weights come from: an export file, or checkpoint `tag` in folder `checkpoint_dir`."""

    export: Path | None = None
    checkpoint_dir: Path | None = None
    tag: str | None = None

    def describe(self) -> str:
        return str(self.export) if self.export else str(self.checkpoint_dir / self.tag)


def find_source(path: str) -> WeightSource:
    """Resolves `path` (run folder, checkpoint folder, checkpoint, or export file).

    Raises:
        FileNotFoundError: nothing there, or no complete checkpoint and no export in it.
    """
    p = Path(path)
    if p.is_file():
        return WeightSource(export=p)
    if (p / COMPLETE).is_file():
        return WeightSource(checkpoint_dir=p.parent, tag=p.name)
    for folder in (p, p / "checkpoints"):
        if folder.is_dir():
            try:
                tag = CheckpointManager(folder, 1, 0, 1).latest()
            except CheckpointError as e:
                raise FileNotFoundError(str(e)) from None
            if tag is not None:
                return WeightSource(checkpoint_dir=folder, tag=tag)
    if (p / "export" / "model.pt").is_file():
        return WeightSource(export=p / "export" / "model.pt")
    what = "does not exist" if not p.exists() else "holds no complete checkpoint and no export/model.pt"
    raise FileNotFoundError(f"{path} {what} (expected a run folder, a checkpoint folder, a step_NNNNNNNN "
                            f"checkpoint or an exported model.pt)")


def read_weights(source: WeightSource, verify: bool = True) -> dict[str, torch.Tensor]:
    """The fp32 tensors of the source, by state_dict name; a checkpoint is verified first (`check_checkpoint`)
    unless `verify` is False (the caller did)."""
    if source.export is not None:
        blob = torch.load(source.export, map_location="cpu", weights_only=True)
        return blob["state_dict"] if isinstance(blob, dict) and "state_dict" in blob else blob
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if verify:
        check_checkpoint(source.checkpoint_dir, source.tag)
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines must not mix with a command's output
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(source.checkpoint_dir), tag=source.tag))


def read_metadata(source: WeightSource) -> dict:
    """{"model_spec", "dataset"} of the source (see hipscale.training.model_setup.dataset_card), read with the
    weights-only unpickler."""
    if source.export is not None:
        blob = torch.load(source.export, map_location="cpu", weights_only=True)
        return {"model_spec": blob["model_spec"], "dataset": blob.get("dataset")}
    return checkpoint_metadata(source.checkpoint_dir, source.tag)


def load_trained_model(path: str) -> tuple[nn.Module, dict, WeightSource]:
    """The model of a run, checkpoint or export with its weights loaded strictly (eval mode, CPU).

    Returns:
        (model, metadata {"model_spec", "dataset"}, source).

    Raises:
        FileNotFoundError: no weights at `path`.
        CheckpointError: a checkpoint that is incomplete, damaged, or would run code when unpickled.
    """
    source = find_source(path)
    if source.export is None:
        check_checkpoint(source.checkpoint_dir, source.tag)
    metadata = read_metadata(source)
    model = build_model(metadata["model_spec"])
    model.load_state_dict(read_weights(source, verify=False), strict=True)
    return model.eval(), metadata, source
