"""Rank-0 progress lines, TensorBoard scalars and pictures (a full disk raises DiskFullError naming the file)."""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hipscale.training.components.disk import writing


def memory_gib() -> tuple[str, float]:
    """("gpu", peak allocated GiB) on GPU, else ("rss", peak resident GiB of this process)."""
    if torch.cuda.is_available():
        return "gpu", torch.cuda.max_memory_allocated() / 2 ** 30
    return "rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


class MetricLogger:
    """Prints one line per logged step, appends it to metrics.jsonl and writes TensorBoard scalars (rank 0 only).

    Args:
        rank: global rank.
        tensorboard_dir: event-file folder, or None for none.
        jsonl_path: file that gets one JSON object per logged step (appended), or None.
    """

    def __init__(self, rank: int, tensorboard_dir: Optional[Path], jsonl_path: Optional[Path]):
        self.enabled = rank == 0
        self.writer = self.jsonl = None
        self.jsonl_path, self.tensorboard_dir = jsonl_path, tensorboard_dir
        if self.enabled and jsonl_path is not None:
            with writing(jsonl_path, "metrics"):
                self.jsonl = open(jsonl_path, "a")
        if self.enabled and tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            with writing(tensorboard_dir, "TensorBoard events"):
                self.writer = SummaryWriter(log_dir=str(tensorboard_dir))

    def info(self, message: str) -> None:
        if self.enabled:
            print(f"[hipscale] {message}", flush=True)

    def log(self, step: int, prefix: str, scalars: dict[str, float]) -> None:
        """Print `prefix step k | name value | ...` and add each scalar as `<prefix>/<name>`."""
        if not self.enabled:
            return
        fields = " | ".join(f"{k} {_format(v)}" for k, v in scalars.items())
        print(f"[hipscale] {prefix} step {step} | {fields}", file=sys.stdout, flush=True)
        self.event(step, prefix, scalars)
        if self.writer is not None:
            with writing(self.tensorboard_dir, "TensorBoard events"):
                for k, v in scalars.items():
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)
                self.writer.flush()

    def event(self, step: int, kind: str, fields: dict) -> None:
        """Append `{"kind": kind, "step": step, **fields}` to metrics.jsonl (no line, no TensorBoard)."""
        if self.jsonl is not None:
            with writing(self.jsonl_path, "metrics"):
                self.jsonl.write(json.dumps({"kind": kind, "step": step, **fields}) + "\n")
                self.jsonl.flush()

    def pictures(self, step: int, pictures: dict[str, np.ndarray], folder: Optional[Path]) -> list[Path]:
        """Adds each [H, W, 3] uint8 picture as a TensorBoard image `<tag>` and writes it as
        `<folder>/<tag with / as _>.png`; returns the files written."""
        if not self.enabled or not pictures:
            return []
        from PIL import Image

        written = []
        with writing(folder or self.tensorboard_dir, "pictures"):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
            for tag, picture in pictures.items():
                if self.writer is not None:
                    self.writer.add_image(tag, picture, step, dataformats="HWC")
                if folder is not None:
                    path = folder / f"{tag.replace('/', '_')}.png"
                    Image.fromarray(picture).save(path)
                    written.append(path)
            if self.writer is not None:
                self.writer.flush()
        return written

    def close(self) -> None:
        """Close metrics.jsonl and the TensorBoard writer; both are closed (and unusable) even when closing one
        raises (a full disk), and then the first error is raised."""
        jsonl, writer, self.jsonl, self.writer = self.jsonl, self.writer, None, None
        errors = []
        for handle, path, what in ((jsonl, self.jsonl_path, "metrics"),
                                   (writer, self.tensorboard_dir, "TensorBoard events")):
            if handle is None:
                continue
            try:
                with writing(path, what):
                    handle.close()
            except Exception as error:  # noqa: BLE001 - close the other one too, then raise
                errors.append(error)
        if errors:
            raise errors[0]


def _format(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.6g}" if abs(value) < 1e4 else f"{value:.4g}"
