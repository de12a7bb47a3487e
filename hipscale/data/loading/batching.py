"""Assembling decoded samples into model-ready numpy batches."""
import functools
import logging
from typing import Any, Callable, Collection, Optional, Sequence

import numpy as np
import torch

from hipscale.data.errors import BadDataError
from hipscale.data.format.clip_codec import CENTRE, WindowChoice
from hipscale.data.format.dataset_info import DatasetInfo
from hipscale.data.format.foreign_shards import decode_foreign_sample, is_foreign
from hipscale.data.format.samples import Sample, SampleError, decode_sample
from hipscale.data.loading.tar_reader import RawSample

logger = logging.getLogger(__name__)


def decode_batch(raw: Sequence[RawSample], info: DatasetInfo, fallback: Sample | None,
                 before_each: Optional[Callable[[RawSample], None]] = None,
                 window: WindowChoice = CENTRE) -> tuple[list[Sample], list[str | None]]:
    """Decodes the samples of a batch, replacing unreadable ones.

    Each unreadable sample is logged and skipped; its slot is filled with a
    copy of a readable sample of the same batch (cyclically in batch order),
    or with ``fallback`` when none is readable, so that the batch keeps its
    size and every rank its step count.

    Args:
        raw: The B samples of the batch, in batch order.
        info: The dataset description.
        fallback: A readable sample of an earlier batch, or None.
        before_each: Called with each readable sample before it is decoded.
        window: The window of each compressed clip (:class:`~hipscale.data.format.clip_codec.WindowChoice`).

    Returns:
        ``(samples, problems)``: B samples, and per slot None (readable) or
        ``"<name>: <reason>"``.

    Raises:
        BadDataError: If no sample of the batch is readable and there is no
            fallback.
    """
    decode = decode_foreign_sample if is_foreign(info) else functools.partial(decode_sample, window=window)
    decoded: list[Sample | None] = []
    problems: list[str | None] = []
    for sample in raw:
        reason = sample.error
        if reason is None:
            if before_each is not None:
                before_each(sample)
            try:
                decoded.append(decode(sample.key, sample.files, info))
                problems.append(None)
                continue
            except SampleError as error:
                reason = str(error)
        logger.warning("skipping bad sample %s: %s", sample.name, reason)
        problems.append(f"{sample.name}: {reason}")
        decoded.append(None)
    good = [sample for sample in decoded if sample is not None] or ([fallback] if fallback else [])
    if not good:
        raise BadDataError(f"no readable sample in a batch and none before it: {[p for p in problems if p]}")
    fills = iter(good * len(decoded))
    return [sample if sample is not None else next(fills) for sample in decoded], problems


def collate(samples: Sequence[Sample], info: DatasetInfo) -> dict[str, Any]:
    """Stacks samples into a model-ready batch.

    Args:
        samples: B decoded samples.
        info: The dataset description.

    Returns:
        A dict of numpy arrays: each modality ``[B, M, C]`` in its stored
        dtype (``video`` ``[B, T*H*W, 3]`` uint8, ``audio`` ``[B, S, 1]``
        int16, ``image`` ``[B, H*W, 3]`` uint8), ``labels`` ``[B, K]`` float32
        multi-hot, ``label`` ``[B]`` int64 for single-label datasets, and
        ``key``, a list of B strings.
    """
    batch: dict[str, Any] = {
        name: np.stack([s.arrays[name] for s in samples]).reshape(len(samples), spec.index_dim, spec.channels)
        for name, spec in info.specs.items()
    }
    labels = np.zeros((len(samples), info.num_classes), dtype=np.float32)
    for row, sample in enumerate(samples):
        labels[row, list(sample.labels)] = 1.0
    batch["labels"] = labels
    if not info.multi_label:
        batch["label"] = np.array([sample.labels[0] for sample in samples], dtype=np.int64)
    batch["key"] = [sample.key for sample in samples]
    return batch


def to_torch(batch: dict[str, Any], names: Collection[str] | None = None) -> dict[str, Any]:
    """Wraps numpy arrays of a batch as tensors without copying.

    Args:
        batch: From :func:`collate`.
        names: Which arrays (None: all).

    Returns:
        The same dict with ``torch.from_numpy`` tensors.
    """
    return {name: torch.from_numpy(value) if isinstance(value, np.ndarray) and (names is None or name in names)
            else value for name, value in batch.items()}
