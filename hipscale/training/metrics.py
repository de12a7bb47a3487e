"""Evaluation metrics (top-1, mAP) and throughput figures (samples/s, TFLOP/s, MFU)."""
from __future__ import annotations

from typing import Optional

import torch

# Dense bf16 peak TFLOP/s of one device, by a substring of torch.cuda.get_device_name().
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows of logits [N, K] whose argmax equals labels int64 [N]."""
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Average precision of one class: scores [N], targets bool [N] (at least one positive).

    Sum over distinct score thresholds of (recall step) x precision, as scikit-learn computes it.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    s, t = scores[order], targets[order].double()
    tp, fp = torch.cumsum(t, 0), torch.cumsum(1.0 - t, 0)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]          # the last position of each run of tied scores
    tp, fp = tp[last], fp[last]
    precision, recall = tp / (tp + fp), tp / tp[-1]
    steps = recall - torch.cat([recall.new_zeros(1), recall[:-1]])
    return float((steps * precision).sum())


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """mAP over classes of scores [N, K] and multi-hot targets [N, K]; classes without positives are left out."""
    positives = targets.bool()
    per_class = [average_precision(scores[:, k], positives[:, k])
                 for k in range(scores.shape[1]) if positives[:, k].any()]
    return sum(per_class) / len(per_class) if per_class else float("nan")


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
