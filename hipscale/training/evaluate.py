"""Evaluation loop: classification metric (top-1, or mAP for multi-label) and MAE loss."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from hipscale.training.batches import labels_of
from hipscale.training.components.metrics import mean_average_precision, top1_accuracy
from hipscale.training.losses import classification_loss, masked_reconstruction_loss
from hipscale.training.masking import mask_inputs, sample_masks_by_key
from hipscale.training.objective import Objective


def eval_batch_count(loader: Any, max_batches: int | None, device: torch.device) -> int:
    """Batches every rank evaluates: the smallest rank's count (ZeRO-3 needs equal forward passes)."""
    n = torch.tensor([loader.batches_per_epoch if max_batches is None else min(max_batches,
                                                                                loader.batches_per_epoch)],
                     device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    return int(n.item())


@torch.no_grad()
def evaluate(model: nn.Module, module: nn.Module, loader: Any, objective: Objective,
             prepare: Callable[[dict], dict[str, torch.Tensor]], num_batches: int, seed: int, device: torch.device,
             stop: Callable[[], bool] = lambda: False,
             examples: Optional[dict] = None) -> Optional[dict[str, float]]:
    """Metrics over the first `num_batches` batches per rank of a fresh `loader`, identical on every rank.

    A batch's `valid` mask [B] (the loader pads the last batches so every rank has as many; unreadable samples
    are invalid too) selects the samples that count, so with every batch evaluated (eval.max_batches null)
    each sample of the eval set counts once, whatever the world size. Classification uses unmasked inputs;
    the MAE loss masks each sample by its key (`sample_masks_by_key`).

    Args:
        prepare: a loader batch -> the model's normalised inputs {name: [B, M, C]} on the device.
        stop: a collective asked before every batch; True ends the evaluation early.
        examples: filled with the first batch's MAE {"inputs", "masks", "reconstruction"} (CPU) when given.

    Returns:
        {"top1" or "mAP" and "mAP_classes": ..., "cls_loss": ..., "mae_loss": ..., "samples": ...,
        "bad_samples": ...} for the enabled objectives (samples: the samples that counted; bad_samples:
        unreadable eval samples, both over all ranks; mAP_classes: the classes with a positive, which mAP
        averages), or None if `stop` ended it. A metric that is undefined (no sample counted, no class with a
        positive) is NaN; `undefined_metrics` says why.
    """
    was_training = module.training
    model.eval()
    logits, targets = [], []
    mae_sum, counted = torch.zeros((), dtype=torch.float64), 0
    batches = iter(loader)
    for _ in range(num_batches):
        if stop():
            model.train(was_training)
            return None
        batch = next(batches)
        inputs = prepare(batch)
        labels = labels_of(batch, objective.multi_label, device)
        keep = batch.get("valid", torch.ones(labels.shape[0], dtype=torch.bool))
        counted += int(keep.sum())
        if objective.classifies:
            logits.append(Objective.logits(model(objective.feed(inputs))).float().cpu()[keep])
            targets.append(labels.cpu()[keep])
        if objective.config.mae_weight > 0:
            masks = sample_masks_by_key(module, batch["key"], objective.config.mask_ratio, seed, device)
            out = model(mask_inputs(objective.feed(inputs), masks))
            per_sample = masked_reconstruction_loss(out["reconstruction"], inputs, masks, per_sample=True)
            if examples is not None and not examples:
                examples.update(inputs={k: v.float().cpu() for k, v in inputs.items()},
                                masks={k: v.cpu() for k, v in masks.items()},
                                reconstruction={k: v.float().cpu() for k, v in out["reconstruction"].items()})
            mae_sum += per_sample.double().cpu()[keep].sum()
    model.train(was_training)
    totals = torch.tensor([getattr(loader, "bad_samples", 0), counted, float(mae_sum)], dtype=torch.float64,
                          device=device)
    dist.all_reduce(totals)
    metrics: dict[str, float] = {"bad_samples": float(totals[0]), "samples": float(totals[1])}
    if objective.config.mae_weight > 0:
        metrics["mae_loss"] = float(totals[2] / totals[1]) if totals[1] else math.nan
    if objective.classifies:
        gathered: list = [None] * dist.get_world_size()
        if logits:
            mine = torch.cat(logits), torch.cat(targets)
        else:  # no batch on this rank (an empty eval set)
            target_shape = (0, objective.num_classes) if objective.multi_label else (0,)
            mine = torch.empty(0, objective.num_classes), torch.empty(target_shape, dtype=labels_dtype(objective))
        dist.all_gather_object(gathered, mine)
        all_logits = torch.cat([g[0] for g in gathered])
        all_targets = torch.cat([g[1] for g in gathered])
        no_samples = all_targets.shape[0] == 0
        metrics["cls_loss"] = (math.nan if no_samples else
                               float(classification_loss(all_logits, all_targets, objective.multi_label)))
        if objective.multi_label:
            metrics["mAP"], metrics["mAP_classes"] = mean_average_precision(all_logits.sigmoid(), all_targets)
        else:
            metrics["top1"] = math.nan if no_samples else top1_accuracy(all_logits, all_targets)
    return metrics


def labels_dtype(objective: Objective) -> torch.dtype:
    """The dtype of `labels_of` targets: float multi-hot, or int64 class indices."""
    return torch.float32 if objective.multi_label else torch.int64


def undefined_metrics(metrics: dict[str, float]) -> list[str]:
    """Why metrics of an evaluation are undefined (NaN), one reason each; [] when all are defined."""
    if metrics["samples"] == 0:
        return ["no eval sample counted (the eval set is empty, or every sample was unreadable): "
                "losses and the classification metric are undefined"]
    if metrics.get("mAP_classes") == 0:
        return ["mAP is undefined: no class has a positive among the eval samples"]
    return []
