"""In-memory synthetic data behind the StreamingLoader interface (smoke tests and benchmarks).

Each sample is a deterministic function of (seed, epoch, global index): a class template
plus noise, so the classification and reconstruction losses can fall. An epoch reads the indices
in order, one global batch of world x B after the other; inside a global batch rank r takes
r, r + world, ... The position is the count of indices consumed, so it resumes exactly on any
world size and batch size: the rest of the epoch continues from there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hipscale.config.schema import SyntheticDataConfig

_DTYPES = {"image": np.uint8, "video": np.uint8, "audio": np.int16}


@dataclass
class SyntheticInfo:
    """The DatasetInfo fields the trainer reads."""

    modalities: dict          # name -> (index_dim, channels, dtype name)
    num_classes: int
    class_names: list
    multi_label: bool
    num_samples: int
    clip_seconds = None

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Stored shapes: an "image" with a square number of positions is [H, W, C], the rest [M, C]."""
        out = {}
        for name, (m, c, _) in self.modalities.items():
            side = math.isqrt(m)
            out[name] = (side, side, c) if name == "image" and side * side == m else (m, c)
        return out


def synthetic_info(config: SyntheticDataConfig) -> SyntheticInfo:
    modalities = {name: (m, c, np.dtype(_DTYPES[name]).name) for name, (m, c) in config.modalities.items()}
    return SyntheticInfo(modalities, config.num_classes, [f"class_{k}" for k in range(config.num_classes)],
                         config.multi_label, config.num_samples)


class SyntheticLoader:
    """Batches {modality: [B, M, C], "label": int64 [B], "labels": float32 [B, K], "key": [str]}.

    Args:
        config: shapes and class count.
        batch_size: B per rank.
        rank, world_size: this rank's share of each epoch.
        seed: base seed of the templates and noise.
    """

    def __init__(self, config: SyntheticDataConfig, batch_size: int, rank: int, world_size: int, seed: int):
        self.config, self.batch_size, self.rank, self.world_size, self.seed = (
            config, batch_size, rank, world_size, seed)
        self.batches_per_epoch = config.num_samples // (world_size * batch_size)
        if self.batches_per_epoch < 1:
            raise ValueError(f"data.synthetic.num_samples={config.num_samples} is smaller than one global batch "
                             f"({world_size} ranks x {batch_size})")
        rng = np.random.default_rng(seed)
        self.templates = {name: rng.integers(0, 256 if name != "audio" else 2 ** 12, (config.num_classes, m, c))
                          for name, (m, c) in config.modalities.items()}
        self.epoch, self.consumed = 0, 0  # indices of the epoch read by all ranks together
        self.bad_samples = 0  # generated samples are never unreadable; the trainer counts this like the shards'

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = state["epoch"], state["consumed"]

    def __len__(self) -> int:
        """Batches left in the epoch (its last partial global batch is dropped)."""
        return (self.config.num_samples - self.consumed) // (self.world_size * self.batch_size)

    def __iter__(self):
        while len(self):
            batch = self._batch(self.consumed)
            self.consumed += self.world_size * self.batch_size
            yield batch
        self.epoch, self.consumed = self.epoch + 1, 0

    def _batch(self, consumed: int) -> dict:
        first = consumed + self.rank
        indices = [first + i * self.world_size for i in range(self.batch_size)]
        samples = [self._sample(i) for i in indices]
        batch = {name: np.stack([s[name] for s in samples]) for name in self.config.modalities}
        batch["label"] = np.array([s["label"] for s in samples], dtype=np.int64)
        batch["labels"] = np.stack([s["labels"] for s in samples])
        batch["key"] = [f"synthetic-{self.epoch}-{i}" for i in indices]
        return batch

    def _sample(self, index: int) -> dict:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        k = self.config.num_classes
        label = int(rng.integers(k))
        labels = np.zeros(k, np.float32)
        labels[label] = 1.0
        if self.config.multi_label:
            labels[rng.random(k) < 1.0 / k] = 1.0
        sample = {"label": label, "labels": labels}
        for name, template in self.templates.items():
            noise = rng.normal(0.0, 16.0 if name != "audio" else 256.0, template.shape[1:])
            low, high = np.iinfo(_DTYPES[name]).min, np.iinfo(_DTYPES[name]).max
            sample[name] = np.clip(template[label] + noise, low, high).astype(_DTYPES[name])
        return sample
