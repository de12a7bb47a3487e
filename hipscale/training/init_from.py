"""Starting a run from another run's weights: MAE pretraining -> finetuning with another readout.

The source is a run folder, a checkpoint folder, one checkpoint (`step_NNNNNNNN`) or an export (`model.pt`)
(hipscale.training.weight_source). Tensors whose name and shape match the new model are copied; the rest of
the model keeps its fresh initialisation, and source tensors the model lacks are dropped. Every rank reads the
source (a sharded checkpoint is consolidated on each; an export is cheaper to read for large jobs).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from hipscale.training.weight_source import find_source, read_weights


@dataclass
class InitReport:
    """What an initialisation copied.

    Attributes:
        source: the file or checkpoint read.
        loaded: names copied from the source.
        new: names of the model the source lacks, or has with another shape -> "[model shape]" or
            "[model shape] (source [shape])".
        dropped: names of the source the model lacks -> "[shape]".
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    new: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """Several lines: the counts, then every new and every dropped tensor."""
        lines = [f"init from {self.source}: {len(self.loaded)} tensors loaded, {len(self.new)} new "
                 f"(freshly initialised), {len(self.dropped)} dropped"]
        lines += [f"  new     {name} {shape}" for name, shape in self.new.items()]
        lines += [f"  dropped {name} {shape}" for name, shape in self.dropped.items()]
        return "\n".join(lines)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def init_from(model: nn.Module, path: str) -> InitReport:
    """Copies into `model` every tensor of the source at `path` with the same name and shape.

    Args:
        model: a freshly built HiP (before DeepSpeed takes it).
        path: see :func:`find_source`.

    Returns:
        The report of loaded, new and dropped tensors.
    """
    source = find_source(path)
    weights = read_weights(source)
    own = model.state_dict()
    report = InitReport(source.describe())
    matching = {}
    for name, tensor in own.items():
        theirs = weights.get(name)
        if theirs is not None and theirs.shape == tensor.shape:
            matching[name] = theirs
            report.loaded.append(name)
        else:
            report.new[name] = _shape(tensor) + (f" (source {_shape(theirs)})" if theirs is not None else "")
    report.dropped = {name: _shape(t) for name, t in weights.items() if name not in own}
    with torch.no_grad():
        for name, tensor in matching.items():
            own[name].copy_(tensor.to(own[name].dtype))
    return report
