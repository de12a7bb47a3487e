"""Run a trained HiP classifier on media files: top-k classes with scores per file.

    python -m hipscale.predict --checkpoint runs/NAME [--top-k 5] [--json] FILE [FILE ...]

--checkpoint takes a run folder, a checkpoint folder, one checkpoint (step_NNNNNNNN) or an export (model.pt).
Files are decoded as the model's training shards were (hipscale.data.sharding.media_inputs) and run in batches, on the
GPU when there is one. A file that cannot be decoded gets its error and the others are still answered; the
exit status is then 1 (0 when every file was answered, 2 for a bad checkpoint or model). Only the answers go
to standard output (`--json > out.json` is one valid document); progress and library notices go to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, TextIO

import numpy as np
import torch
from tqdm import tqdm

from hipscale.data.sharding.av_decode import MediaError
from hipscale.data.sharding.media_inputs import MediaInputs
from hipscale.results_stdout import results_stdout
from hipscale.training.batches import model_inputs
from hipscale.training.objective import LABEL, Objective, with_zero_labels

EXIT_ANSWERED, EXIT_SOME_FAILED, EXIT_UNUSABLE = 0, 1, 2


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hipscale.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder, checkpoint or model.pt")
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="video, audio or image files")
    parser.add_argument("--top-k", type=int, default=5, help="classes to show per file (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--batch-size", type=int, default=16, help="files per forward pass (default 16)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu' or 'cuda'")
    return parser.parse_args(argv)


class Predictor:
    """A trained classifier and the decoding of its inputs.

    Args:
        model: a class-bottleneck HiP in eval mode.
        card: its dataset card (class names, shapes, clip format).
        device: where the forward passes run.
    """

    def __init__(self, model: torch.nn.Module, card: dict[str, Any], device: torch.device):
        if LABEL not in getattr(model, "label_spec", {}):
            raise ValueError("this model has no class readout (it was trained with objectives.classification_weight "
                             "0, e.g. MAE pretraining): finetune it with --init-from first")
        self.model, self.card, self.device = model.to(device), card, device
        self.inputs = MediaInputs(card)
        self.num_classes = model.label_spec[LABEL][1]

    @torch.no_grad()
    def scores(self, arrays: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Class probabilities [B, K] (sigmoid for multi-label models, softmax otherwise) of decoded files."""
        batch = {name: np.stack([a[name] for a in arrays]) for name in self.inputs.shapes}
        inputs = with_zero_labels(model_inputs(batch, list(self.inputs.shapes), self.device, torch.float32),
                                  self.num_classes)
        logits = Objective.logits(self.model(inputs)).float()
        probabilities = logits.sigmoid() if self.card["multi_label"] else logits.softmax(dim=-1)
        return probabilities.cpu().numpy()


def predict_files(predictor: Predictor, files: list[Path], top_k: int, batch_size: int) -> list[dict]:
    """[{"file", "top": [{"index", "class", "score"}]} or {"file", "error"}] in the order of `files`."""
    results: list[dict] = [{"file": str(f)} for f in files]
    pending: list[int] = []
    decoded: list[dict[str, np.ndarray]] = []
    names = predictor.card["class_names"]

    def flush() -> None:
        for i, row in zip(pending, predictor.scores(decoded)):
            best = np.argsort(-row, kind="stable")[:top_k]
            results[i]["top"] = [{"index": int(k), "class": names[k], "score": float(row[k])} for k in best]
        pending.clear()
        decoded.clear()

    for i, path in enumerate(tqdm(files, desc="predict", unit="file", disable=not sys.stderr.isatty())):
        try:
            decoded.append(predictor.inputs.decode(path))
        except MediaError as error:
            results[i]["error"] = str(error)
            continue
        pending.append(i)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return results


def print_text(results: list[dict], out: TextIO) -> None:
    for r in results:
        if "error" in r:
            print(f"{r['file']}: error: {r['error']}", file=out)
            continue
        print(r["file"], file=out)
        for entry in r["top"]:
            print(f"  {entry['score']:.4f}  {entry['class']}", file=out)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        sys.exit("hipscale.predict: error: --top-k and --batch-size must be >= 1")
    with results_stdout() as out:
        sys.exit(answer(args, out))


def answer(args: argparse.Namespace, out: TextIO) -> int:
    """Writes the answers (text or one JSON document) to `out`, every other line to stderr; the exit status."""
    from hipscale.training.components.checkpoint import CheckpointError
    from hipscale.training.weight_source import load_trained_model

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    try:
        model, metadata, source = load_trained_model(args.checkpoint)
        if metadata["dataset"] is None:
            raise ValueError(f"{source.describe()} predates dataset descriptions in checkpoints; re-export it")
        predictor = Predictor(model, metadata["dataset"], device)
    except (FileNotFoundError, ValueError, KeyError, CheckpointError) as error:
        print(f"hipscale.predict: error: {error}", file=sys.stderr)
        return EXIT_UNUSABLE
    print(f"[hipscale] {source.describe()} on {device}: {predictor.inputs.describe()}", file=sys.stderr)
    results = predict_files(predictor, args.files, args.top_k, args.batch_size)
    if args.json:
        print(json.dumps({"checkpoint": source.describe(), "multi_label": predictor.card["multi_label"],
                          "results": results}, indent=1), file=out)
    else:
        print_text(results, out)
    failed = [r for r in results if "error" in r]
    if failed:
        print(f"hipscale.predict: {len(failed)} of {len(results)} files could not be decoded", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_ANSWERED


if __name__ == "__main__":
    main()
