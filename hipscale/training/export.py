"""Export consolidated fp32 weights from a sharded checkpoint; load them without DeepSpeed.

Export (needs DeepSpeed, no process group):
    python -m hipscale.training.export --checkpoint-dir runs/NAME/checkpoints [--tag step_00001000] --out model.pt
Load (plain PyTorch):
    from hipscale.training.export import load_exported
    model = load_exported("model.pt")
The checkpoint is verified first (every file against the sizes and CRC-32 in its COMPLETE, every file
loadable without running code it carries): a damaged or unsafe one is refused (exit status 2), and nothing
is written. An export holds tensors and plain data only and loads with torch's weights-only unpickler: it
is the form in which to share trained weights.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from hipscale.training.components.checkpoint import COMPLETE, CheckpointError, DamagedCheckpoint
from hipscale.training.components.checkpoint_integrity import load_weights_only, verify_checkpoint
from hipscale.training.components.disk import writing
from hipscale.training.model_setup import build_model


def check_checkpoint(checkpoint_dir: Path, tag: str) -> None:
    """Verify checkpoint `tag` before anything reads it (in this process).

    Raises:
        CheckpointError: it is not a complete checkpoint.
        DamagedCheckpoint: a file differs from its record, or would run code when unpickled.
    """
    folder = Path(checkpoint_dir) / tag
    try:
        records = json.loads((folder / COMPLETE).read_text()).get("files")
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder} is not a complete checkpoint ({error})") from None
    problems = verify_checkpoint(folder, records, COMPLETE)
    if problems:
        raise DamagedCheckpoint(f"refusing to load {folder}: {'; '.join(problems)}")


def checkpoint_metadata(checkpoint_dir: Path, tag: str) -> dict:
    """{"model_spec", "dataset"} saved with checkpoint `tag` (dataset: None in checkpoints older than it), read
    with the weights-only unpickler."""
    model_states = sorted(glob.glob(str(Path(checkpoint_dir) / tag / "*model_states.pt")))
    if not model_states:
        raise FileNotFoundError(f"no DeepSpeed model states in {Path(checkpoint_dir) / tag}")
    states = load_weights_only(Path(model_states[0]))
    return {"model_spec": states["model_spec"], "dataset": states.get("dataset")}


def export_weights(checkpoint_dir: Path, tag: str, out: Path) -> Path:
    """Write {"model_spec", "dataset", "state_dict"} (fp32, consolidated over ZeRO shards) of checkpoint `tag`
    to `out`, after verifying the checkpoint (`check_checkpoint`)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    check_checkpoint(checkpoint_dir, tag)
    metadata = checkpoint_metadata(checkpoint_dir, tag)
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    out = Path(out)
    with writing(out, "the export"):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        torch.save({**metadata, "state_dict": {k: v.contiguous() for k, v in state_dict.items()}}, tmp)
        os.replace(tmp, out)
    return out


def load_exported(path: str | Path) -> nn.Module:
    """Build the HiP described in an export and load its weights strictly (eval mode)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(blob["model_spec"])
    model.load_state_dict(blob["state_dict"], strict=True)
    return model.eval()


# Largest |exported - engine| over the probe outputs, relative to their largest magnitude, that an export may
# show for the engine's compute precision. An fp32 engine agrees with the fp32 export to round-off; a bf16
# engine (8-bit mantissa, relative step 2**-8) differs by its rounding through every layer. A wrong export
# (a missing, shuffled or stale tensor) differs by the order of the outputs themselves.
PROBE_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def probe_difference(model: nn.Module, probe: dict) -> tuple[float, float]:
    """Compares an exported model with the engine's outputs on the trainer's probe batch (export/probe.pt).

    Args:
        model: From :func:`load_exported` (fp32, eval mode).
        probe: ``{"inputs", "outputs", "dtype"}``: the engine's eval-mode outputs in its compute dtype
            (probes written before the dtype was recorded are fp32).

    Returns:
        ``(difference, tolerance)``: the largest absolute difference relative to the largest |engine output|,
        and :data:`PROBE_TOLERANCE` of the probe's dtype.
    """
    with torch.no_grad():
        out = model(probe["inputs"])["reconstruction"]
    scale = max(float(v.abs().max()) for v in probe["outputs"].values()) or 1.0
    difference = max(float((out[k] - v).abs().max()) for k, v in probe["outputs"].items()) / scale
    return difference, PROBE_TOLERANCE[probe.get("dtype", "float32")]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir", required=True, type=Path,
                        help="the run's checkpoint folder (<run dir>/checkpoints)")
    parser.add_argument("--tag", default=None, help="checkpoint tag, step_NNNNNNNN (default: the one `latest` names)")
    parser.add_argument("--out", required=True, type=Path, help="the export file to write (model.pt)")
    args = parser.parse_args(argv)
    try:
        tag = args.tag or (args.checkpoint_dir / "latest").read_text().strip()
        print(export_weights(args.checkpoint_dir, tag, args.out))
    except (OSError, CheckpointError) as error:
        print(f"hipscale.training.export: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
