"""Weighted mixing of several sources (AudioSet balanced and unbalanced, say) into one resumable epoch.

An epoch has as many samples as the sources together, ``N = sum(N_s)``; source ``s`` contributes
``n_s = w_s / sum(w) * N`` of them (largest-remainder rounding, so they add up to N). A source with
``n_s <= N_s`` contributes a random subset of ``n_s`` samples, drawn anew every epoch; one with more repeats
all its samples ``n_s // N_s`` times and adds a random subset of the remainder. The draw depends only on the
seed, the epoch and the sources' shard lists, so every rank makes the same one, a resumed job makes it
again, and exact resume (also on another world size) works as without mixing. Each pass over a source is
cut into one unit per shard (:class:`hipscale.data.loading.plan.Unit`); the units of all sources are then permuted
together and the shuffle buffer mixes samples across neighbouring units.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from hipscale.data.format.dataset_info import DatasetInfo
from hipscale.data.loading.plan import Unit
from hipscale.data.storage.shard_store import load_dataset_info


@dataclass(frozen=True)
class Source:
    """One dataset of a mix.

    Attributes:
        location: Its folder or URL.
        weight: Its share of every epoch's samples, relative to the other sources' weights.
    """

    location: str | os.PathLike
    weight: float = 1.0


def load_sources(sources: Sequence[Source], remote: Any = None) -> list[DatasetInfo]:
    """Reads every source's ``index.json`` and checks that they can be mixed.

    Args:
        sources: The mix (at least one source, positive weights).
        remote: RemoteSettings for URL sources (None: defaults).

    Returns:
        Their dataset infos, in order.

    Raises:
        ValueError: No source, a weight that is not positive, or a source whose modalities, classes or
            labelling differ from the first one's.
    """
    if not sources or any(source.weight <= 0 for source in sources):
        raise ValueError(f"a mix needs at least one source and positive weights, got {list(sources)}")
    infos = [load_dataset_info(source.location, remote) for source in sources]
    first = infos[0]
    for source, info in zip(sources[1:], infos[1:]):
        for what, mine, theirs in (("modalities", info.specs, first.specs), ("classes", info.class_names,
                                   first.class_names), ("multi_label", info.multi_label, first.multi_label)):
            if mine != theirs:
                raise ValueError(f"cannot mix {source.location} with {sources[0].location}: their {what} differ "
                                 f"({_short(mine)} vs {_short(theirs)})")
    return infos


def sample_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Samples each source contributes to an epoch of ``sum(sizes)`` samples.

    Args:
        sizes: ``N_s``, the samples of each source.
        weights: ``w_s``, positive.

    Returns:
        ``n_s``, proportional to the weights, adding up to ``sum(sizes)``.
    """
    total = sum(sizes)
    exact = np.asarray(weights, dtype=np.float64) / sum(weights) * total
    counts = np.floor(exact).astype(np.int64)
    for index in np.argsort(-(exact - counts), kind="stable")[:total - int(counts.sum())]:
        counts[index] += 1
    return counts.tolist()


def mixed_units(shard_sizes: Sequence[Sequence[int]], weights: Sequence[float], seed: int, epoch: int) -> list[Unit]:
    """The units of one mixed epoch (see the module docstring).

    Args:
        shard_sizes: Per source, the samples of each shard in ``index.json`` order.
        weights: Per source, its weight.
        seed: Base seed of the run.
        epoch: Epoch number.

    Returns:
        Units of all sources, source by source, pass by pass, shard by shard (the plan permutes them).
    """
    sizes = [sum(shards) for shards in shard_sizes]
    units = []
    for source, (shards, count) in enumerate(zip(shard_sizes, sample_counts(sizes, weights))):
        size = sizes[source]
        if size == 0:
            continue
        repeats, rest = divmod(count, size)
        rng = np.random.default_rng([seed, epoch, 7919, source])
        passes = [np.arange(size)] * repeats + [np.sort(rng.choice(size, rest, replace=False))] * (rest > 0)
        starts = np.concatenate([[0], np.cumsum(shards)])
        for chosen in passes:
            shard_of = np.searchsorted(starts, chosen, side="right") - 1
            for shard in np.unique(shard_of):
                members = chosen[shard_of == shard] - starts[shard]
                units.append(Unit(source, int(shard), members.astype(np.int64)))
    return units


def mix_fingerprint(infos: Sequence[DatasetInfo], weights: Sequence[float]) -> str:
    """Tells mixes apart on resume: the sources' fingerprints and weights."""
    listing = json.dumps([[info.fingerprint, float(weight)] for info, weight in zip(infos, weights)])
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."
