"""The epoch plan: which samples each rank reads, in which order.

An epoch is made of *units*: runs of samples of one shard (of one source).
Without mixing every shard is one unit holding all its samples; a mixed
epoch (:mod:`hipscale.data.loading.mixing`) draws each source's units anew every
epoch. For epoch ``e`` the units are permuted with a generator seeded by
``(seed, e)``; laying their samples end to end gives the epoch's global
sequence of positions ``0..N-1`` (unit by unit, samples in file order).

An epoch runs in one or more *phases*, a new one starting whenever a job
resumes with another world size, batch size or shuffle buffer. A phase
splits the pool of not-yet-seen positions (all N at first, in global order)
into ``world_size`` contiguous chunks of ``floor(len(pool) / (world_size *
batch_size)) * batch_size`` positions and drops the remainder at the end of
the pool. Each rank passes its chunk through a shuffle buffer
(:func:`buffer_shuffle`, seeded by ``(seed, e, phase, rank)``) and cuts the
result into batches: batch ``j`` of rank ``r`` is fixed by these numbers
alone. When a phase ends after ``steps`` batches, the first ``steps *
batch_size`` positions of every rank's order are removed from the pool and
the next phase splits what is left, so a resized job sees only samples not
yet seen in the epoch.

Evaluation uses :func:`complete_schedule` instead: every position exactly
once over all ranks, nothing dropped, padding slots marked invalid.
"""
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Phase:
    """A stretch of an epoch run with fixed settings.

    Attributes:
        world_size: Number of ranks.
        batch_size: Samples per batch and rank.
        shuffle_buffer: Size of the shuffle buffer (0 or 1: no shuffling).
        steps: Batches every rank has consumed in this phase.
    """

    world_size: int
    batch_size: int
    shuffle_buffer: int
    steps: int = 0


@dataclass(frozen=True)
class Unit:
    """Samples of one shard that an epoch reads together.

    Attributes:
        source: Index of the source (0 without mixing).
        shard: Index of the shard in the source's ``index.json``.
        members: ``[n]`` ascending sample indices inside the shard.
    """

    source: int
    shard: int
    members: np.ndarray = field(compare=False)


def whole_shards(shard_sizes: Sequence[int], source: int = 0) -> list[Unit]:
    """One unit per shard with all its samples, in ``index.json`` order."""
    return [Unit(source, index, np.arange(size, dtype=np.int64)) for index, size in enumerate(shard_sizes)]


def buffer_shuffle(items: np.ndarray, size: int, rng: np.random.Generator, limit: int | None = None) -> np.ndarray:
    """Reorders items as a streaming shuffle buffer does.

    Items enter in order; whenever ``size`` items are held, one chosen
    uniformly leaves; at the end the remaining ones leave in random order.
    An item therefore leaves at most ``size - 1`` places before it entered.

    Args:
        items: ``[n]`` values.
        size: Buffer size; 0 or 1 keeps the order.
        rng: Random generator; exactly one draw per item is used.
        limit: Return only the first ``limit`` outputs (same values as the
            head of the full output).

    Returns:
        ``[min(n, limit)]`` reordered values.
    """
    count = len(items) if limit is None else min(limit, len(items))
    draws = rng.random(len(items))
    if size <= 1 or count == 0:
        return items[:count].copy()
    out: list[int] = []
    buffer: list[int] = []

    def take() -> None:
        pick = int(draws[len(out)] * len(buffer))
        buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
        out.append(buffer.pop())

    for item in items.tolist():
        buffer.append(item)
        if len(buffer) >= size:
            take()
            if len(out) == count:
                break
    while buffer and len(out) < count:
        take()
    return np.asarray(out, dtype=items.dtype)


def complete_schedule(num_samples: int, world_size: int, batch_size: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Every position of an epoch exactly once over all ranks, in order, none dropped (evaluation).

    The sequence ``0..N-1`` is cut into ``world_size`` contiguous chunks of
    ``ceil(N / world_size)`` positions (the last ones shorter, possibly
    empty). Every rank gets the same number of batches, ``ceil(ceil(N /
    world_size) / batch_size)``, so collectives stay matched; the slots past
    a rank's chunk repeat a real position (its chunk's first, or 0) and are
    marked invalid.

    Args:
        num_samples: N, at least 1.
        world_size: Number of ranks.
        batch_size: B.
        rank: This rank.

    Returns:
        ``(positions, valid)``: ``[num_batches, B]`` global positions and
        ``[num_batches, B]`` bool, True for the slots that count.
    """
    per_rank = -(-num_samples // world_size)
    num_batches = -(-per_rank // batch_size)
    chunk = np.arange(rank * per_rank, min((rank + 1) * per_rank, num_samples), dtype=np.int64)
    positions = np.full(num_batches * batch_size, chunk[0] if len(chunk) else 0, dtype=np.int64)
    positions[:len(chunk)] = chunk
    valid = np.arange(num_batches * batch_size) < len(chunk)
    return positions.reshape(num_batches, batch_size), valid.reshape(num_batches, batch_size)


class EpochPlan:
    """The global order of one epoch and each rank's batches.

    Args:
        units: The epoch's units (:func:`whole_shards`, or a mixed epoch's draw).
        seed: Base seed of the run.
        epoch: Epoch number.

    Attributes:
        units: The units in epoch order.
        num_samples: N, the samples of the epoch.
    """

    def __init__(self, units: Sequence[Unit], seed: int, epoch: int) -> None:
        self.seed = seed
        self.epoch = epoch
        order = np.random.default_rng([seed, epoch]).permutation(len(units))
        self.units = [units[i] for i in order]
        self.offsets = np.concatenate([[0], np.cumsum([len(unit.members) for unit in self.units])]).astype(np.int64)
        self._members = np.concatenate([unit.members for unit in self.units] or [np.zeros(0, np.int64)])
        self.num_samples = int(self.offsets[-1])

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Maps global positions to units and sample indices inside their shards.

        Args:
            positions: ``[n]`` global positions.

        Returns:
            ``(slots, members)``: ``[n]`` indices into :attr:`units` and
            ``[n]`` sample indices within those units' shards.
        """
        return np.searchsorted(self.offsets, positions, side="right") - 1, self._members[positions]

    def schedule(self, phases: Sequence[Phase], rank: int) -> np.ndarray:
        """Returns the batches of one rank in the last phase.

        Args:
            phases: The phases of the epoch so far; the last is the current.
            rank: Rank in the current phase.

        Returns:
            ``[num_batches, batch_size]`` global positions; ``num_batches``
            is the same on every rank.

        Raises:
            ValueError: If a finished phase claims more steps than it had
                batches, or ``rank`` is outside the last phase's world.
        """
        if not 0 <= rank < phases[-1].world_size:
            raise ValueError(f"rank {rank} outside world size {phases[-1].world_size}")
        pool = np.arange(self.num_samples)
        for index, phase in enumerate(phases):
            num_batches = len(pool) // (phase.world_size * phase.batch_size)
            if phase.steps > num_batches:
                raise ValueError(f"phase {index} of epoch {self.epoch} claims {phase.steps} steps "
                                 f"but has {num_batches} batches")
            if index == len(phases) - 1:
                return self._rank_order(pool, phase, index, rank, num_batches).reshape(num_batches, phase.batch_size)
            consumed = [self._rank_order(pool, phase, index, r, num_batches, phase.steps * phase.batch_size)
                        for r in range(phase.world_size)]
            pool = pool[~np.isin(pool, np.concatenate(consumed))]
        raise ValueError("an epoch needs at least one phase")

    def _rank_order(self, pool: np.ndarray, phase: Phase, index: int, rank: int, num_batches: int,
                    limit: int | None = None) -> np.ndarray:
        per_rank = num_batches * phase.batch_size
        chunk = pool[rank * per_rank:(rank + 1) * per_rank]
        rng = np.random.default_rng([self.seed, self.epoch, index, rank])
        return buffer_shuffle(chunk, phase.shuffle_buffer, rng, limit)
