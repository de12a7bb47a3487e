"""Evaluation loop: classification metric (top-1, or mAP for multi-label) and MAE loss."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from hipscale.objectives import classification_loss
from hipscale.training.batches import labels_of, model_inputs
from hipscale.training.metrics import mean_average_precision, top1_accuracy
from hipscale.training.objective import Objective, mask_generator


def eval_batch_count(loader: Any, max_batches: int | None, device: torch.device) -> int:
    """Batches every rank evaluates: the smallest rank's count (ZeRO-3 needs equal forward passes)."""
    n = torch.tensor([loader.batches_per_epoch if max_batches is None else min(max_batches,
                                                                                loader.batches_per_epoch)],
                     device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    return int(n.item())


@torch.no_grad()
def evaluate(model: nn.Module, module: nn.Module, loader: Any, objective: Objective, modalities: list[str],
             num_batches: int, dtype: torch.dtype, device: torch.device, seed: int,
             stop: Callable[[], bool] = lambda: False) -> Optional[dict[str, float]]:
    """Metrics over the first `num_batches` batches per rank of a fresh `loader`, identical on every rank.

    Classification uses unmasked inputs; the MAE loss uses masks seeded by (seed, rank, batch).

    Args:
        stop: a collective asked before every batch; True ends the evaluation early.

    Returns:
        {"top1" or "mAP": ..., "cls_loss": ..., "mae_loss": ..., "bad_samples": ...} for the enabled
        objectives (bad_samples: unreadable eval samples over all ranks), or None if `stop` ended it.
    """
    was_training = module.training
    model.eval()
    rank = dist.get_rank()
    logits, targets, mae_sum = [], [], 0.0
    batches = iter(loader)
    for i in range(num_batches):
        if stop():
            model.train(was_training)
            return None
        batch = next(batches)
        inputs = model_inputs(batch, modalities, device, dtype)
        labels = labels_of(batch, objective.multi_label, device)
        if objective.classifies:
            logits.append(Objective.logits(model(objective.feed(inputs))).float().cpu())
            targets.append(labels.cpu())
        if objective.config.mae_weight > 0:
            parts = objective.losses(model, module, inputs, labels, mask_generator(device, seed, rank, i))
            mae_sum += float(parts["mae"])
    model.train(was_training)
    bad = torch.tensor([getattr(loader, "bad_samples", 0)], dtype=torch.float64, device=device)
    dist.all_reduce(bad)
    metrics: dict[str, float] = {"bad_samples": float(bad.item())}
    if objective.config.mae_weight > 0:
        total = torch.tensor([mae_sum, num_batches], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        metrics["mae_loss"] = float(total[0] / total[1])
    if objective.classifies:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (torch.cat(logits), torch.cat(targets)))
        all_logits = torch.cat([g[0] for g in gathered])
        all_targets = torch.cat([g[1] for g in gathered])
        metrics["cls_loss"] = float(classification_loss(all_logits, all_targets, objective.multi_label))
        if objective.multi_label:
            metrics["mAP"] = mean_average_precision(all_logits.sigmoid(), all_targets)
        else:
            metrics["top1"] = top1_accuracy(all_logits, all_targets)
    return metrics

