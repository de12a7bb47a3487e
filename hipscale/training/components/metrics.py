"""Evaluation metrics (top-1, mAP) and throughput figures (samples/s, TFLOP/s, MFU)."""
from __future__ import annotations

from typing import Optional

import torch

# Dense bf16 peak TFLOP/s of one device, by a substring of torch.cuda.get_device_name().
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows of logits [N, K] whose argmax equals labels int64 [N] (torchmetrics)."""
    from torchmetrics.functional.classification import multiclass_accuracy  # 2 s of imports (scipy): at first use

    return float(multiclass_accuracy(logits, labels, num_classes=logits.shape[1], average="micro"))


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """mAP of scores [N, K] against multi-hot targets [N, K] (torchmetrics; it sums in float32), and the number
    of classes it averages.

    Classes without a positive in `targets` are left out (their AP is undefined), as AudioSet evaluations do;
    with one class left it is that class's AP, with none (or no rows) it is NaN (undefined).
    """
    from torchmetrics.functional.classification import binary_average_precision, multilabel_average_precision

    has_positive = targets.bool().any(dim=0)
    classes = int(has_positive.sum())
    if classes == 0:
        return float("nan"), 0
    scores, targets = scores[:, has_positive].float(), targets[:, has_positive].long()
    if classes == 1:  # torchmetrics' multilabel form wants at least two labels
        return float(binary_average_precision(scores[:, 0], targets[:, 0])), 1
    return float(multilabel_average_precision(scores, targets, num_labels=classes, average="macro")), classes


def peak_tflops(configured: Optional[float]) -> Optional[float]:
    """Peak TFLOP/s of one device: the configured value, else the detected GPU's, else None (CPU)."""
    if configured is not None:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in KNOWN_PEAK_TFLOPS.items() if k in name), None)


def throughput(samples: int, seconds: float, flops_per_sample: float, inputs_per_sample: int,
               world_size: int, peak: Optional[float]) -> dict[str, float]:
    """Global samples/s and raw inputs/s, TFLOP/s per device and MFU (when the peak is known)."""
    samples_per_s = samples / seconds
    tflops_per_device = samples_per_s * flops_per_sample / world_size / 1e12
    out = {"samples_per_s": samples_per_s, "inputs_per_s": samples_per_s * inputs_per_sample,
           "tflops_per_device": tflops_per_device}
    if peak:
        out["mfu"] = tflops_per_device / peak
    return out
