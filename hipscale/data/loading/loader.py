"""A resumable, multi-rank streaming loader over hipscale shards.

Every rank builds the same epoch plan (:mod:`hipscale.data.loading.plan`) and reads
its own batches; nothing is exchanged between ranks. Inside a rank, DataLoader
worker ``w`` of ``k`` makes batches ``start + w, start + w + k, ...``; the
DataLoader hands batches out round-robin over its workers, so they arrive in
plan order whatever ``k`` is, and batch contents do not depend on ``k``.
Workers read the shards of their rank's chunk front to back and skip what
other workers read.

Guarantees:
    * Every rank yields ``floor(pool / (world_size * batch_size))`` batches
      per epoch; the remainder of the (shuffled) global sequence is dropped
      for that epoch only. With ``drop_remainder=False`` (evaluation) every
      sample is read exactly once over all ranks instead, in order, and each
      batch has a ``valid`` mask ``[B]`` that is False for padding slots and
      unreadable samples (:func:`hipscale.data.loading.plan.complete_schedule`).
    * Within an epoch no sample reaches two ranks or two batches (apart from
      the copies that fill the slots of unreadable samples, below).
    * :meth:`StreamingLoader.state_dict` after step k, loaded into a new
      loader with the same world size and batch size, continues with batch
      k+1 of the uninterrupted run. The state depends only on the epoch,
      seed and step counts, so rank 0's state resumes every rank. With
      another world size, batch size or shuffle buffer, the epoch continues
      with a new phase over the samples no rank has consumed yet.
    * An unreadable sample (or the rest of a truncated or corrupt shard) is
      logged, counted in :attr:`StreamingLoader.bad_samples` and skipped; its
      slot is filled with a copy of a readable sample of the same batch.
      More than ``max_bad_samples`` raises :class:`BadDataError` (None: no
      limit here; the trainer applies one limit to the count over all ranks).
    * With ``worker_timeout_s``, a worker busy on one sample (or one shard
      read) for longer is killed from the rank and the iteration raises
      :class:`~hipscale.data.errors.WorkerStalledError` naming the worker,
      the shard and the sample (:mod:`hipscale.data.loading.worker_watch`).
    * Worker processes ignore SIGTERM, SIGUSR1 and SIGINT: a scheduler signals
      the whole process group, and it is the rank's main process that decides
      how to stop (save, then shut its workers down). Workers still exit when
      their parent dies. They draw nothing from the parent's global torch RNG.
    * In a training rank workers are started by a fork server (one per rank,
      preloading :mod:`hipscale.data.loading.worker_server`), not forked from the
      rank: a rank has threads (gloo's, the heartbeat's), and CPython 3.11
      deadlocks a child forked while another thread holds the interpreter's
      thread-list lock (measured: an eval worker hung in
      ``PyOS_AfterFork_Child`` waiting for ``_PyRuntime.interpreters.mutex``,
      held by a gloo thread's short-lived thread state at the moment of the
      fork). A process without a process group (a script, a notebook, the
      benchmark) forks its workers directly, as webdataset's do, and skips the
      fork server's one-time start (about 1 s: it imports torch). Either way workers do not import the script that made
      the loader again, so a script needs no ``if __name__ == "__main__":``
      guard.
"""
import collections
import contextlib
import ctypes
import dataclasses
import functools
import logging
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import select
import signal
import sys
import threading
from typing import Any, Iterator, Sequence

import numpy as np
import torch.distributed
import torch.utils.data

from hipscale.data.errors import BadDataError, DatasetChangedError
from hipscale.data.format.clip_codec import WindowChoice
from hipscale.data.format.dataset_info import DatasetInfo
from hipscale.data.format.samples import Sample
from hipscale.data.loading.batching import collate, decode_batch, to_torch
from hipscale.data.loading.mixing import Source, load_sources, mix_fingerprint, mixed_units
from hipscale.data.loading.plan import EpochPlan, Phase, complete_schedule, whole_shards
from hipscale.data.loading.tar_reader import RawSample, read_samples
from hipscale.data.loading.worker_watch import NoProgress, StallWatch, WorkerProgress
from hipscale.data.storage.shard_store import RemoteSettings, ShardStore, load_dataset_info

logger = logging.getLogger(__name__)

STATE_FORMAT = "hipscale-loader"
STATE_VERSION = 1


class StreamingLoader:
    """Streams model-ready batches of one rank, resumably.

    Args:
        data_dir: Folder or ``s3://``, ``gs://``, ``http(s)://`` URL with
            ``index.json`` and the shards; a URL's shards are read through the
            node's cache (``remote``). Or a list of
            :class:`~hipscale.data.loading.mixing.Source`: several datasets mixed by
            weight, every epoch drawn anew (:mod:`hipscale.data.loading.mixing`).
        batch_size: Samples per batch on this rank (B).
        rank: This rank, ``0 <= rank < world_size``.
        world_size: Number of ranks.
        num_workers: DataLoader worker processes (0: read in this process).
        seed: Seed of the shard permutation and shuffle buffers.
        shuffle_buffer: Shuffle buffer size in samples (0: no sample
            shuffling, shards are still permuted). Memory: about this many
            encoded samples per rank, spread over the workers.
        max_bad_samples: Unreadable samples tolerated over the loader's life
            on this rank before :class:`BadDataError` is raised (None: no
            limit; :attr:`bad_samples` still counts them).
        pin_memory: Pin batch tensors (for faster host-to-GPU copies).
        prefetch_factor: Batches each worker prepares ahead.
        drop_remainder: True (training): equal full batches, the epoch's
            remainder dropped, resumable; compressed clips give each sample a
            window drawn from (seed, epoch, key). False (evaluation): every
            sample once, padded batches with a ``valid`` mask, no shuffle
            buffer, not resumable, the centre window of compressed clips.
        remote: Cache, prefetch, timeouts and retries for a URL (None: the
            defaults of :class:`~hipscale.data.storage.shard_store.RemoteSettings`).
        worker_timeout_s: Seconds a worker may spend on one sample or one
            shard read (a download included) before it is killed and the
            iteration raises :class:`~hipscale.data.errors.WorkerStalledError`
            (None: no limit; workers only).
        stall_sample: Fault injection (tests): the worker that is about to
            decode the sample with this key blocks forever, holding the GIL.

    Attributes:
        bad_samples: Unreadable samples met so far.
        fetch_wait_s: Seconds the readers (the workers, or this process)
            spent waiting for shard files, summed over readers, for the
            batches delivered so far: on a URL, the downloads they waited
            for; about 0 once the cache holds the shards.

    Raises:
        ValueError: On invalid arguments or a dataset with fewer than
            ``world_size * batch_size`` samples (with ``drop_remainder``; an
            evaluation loader may have none).
    """

    def __init__(self, data_dir: str | os.PathLike | Sequence[Source], batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, shuffle_buffer: int = 256,
                 max_bad_samples: int | None = None, pin_memory: bool = False, prefetch_factor: int = 2,
                 drop_remainder: bool = True,
                 remote: RemoteSettings | None = None, worker_timeout_s: float | None = None,
                 stall_sample: str | None = None) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        if num_workers < 0 or shuffle_buffer < 0 or (max_bad_samples or 0) < 0 or seed < 0:
            raise ValueError("num_workers, shuffle_buffer, max_bad_samples and seed must be non-negative")
        if worker_timeout_s is not None and worker_timeout_s <= 0:
            raise ValueError(f"worker_timeout_s must be positive or None, got {worker_timeout_s}")
        remote = remote or RemoteSettings()
        self.mixed = not isinstance(data_dir, (str, os.PathLike))
        self.sources = list(data_dir) if self.mixed else [Source(data_dir)]
        self.stores = [ShardStore(source.location, remote) for source in self.sources]
        self.infos = load_sources(self.sources, remote) if self.mixed else [load_dataset_info(data_dir, remote)]
        self.info = self.infos[0]  # what the sources share: modalities, classes
        self.num_samples = sum(info.num_samples for info in self.infos)
        self.fingerprint = (mix_fingerprint(self.infos, [source.weight for source in self.sources]) if self.mixed
                            else self.info.fingerprint)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.max_bad_samples = max_bad_samples
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.drop_remainder = drop_remainder
        self.worker_timeout_s = worker_timeout_s
        self.stall_sample = stall_sample
        if drop_remainder:
            self.batches_per_epoch = self.num_samples // (world_size * batch_size)
        else:
            self.shuffle_buffer = 0
            per_rank = -(-self.num_samples // world_size)  # ceil, as complete_schedule splits
            self.batches_per_epoch = -(-per_rank // batch_size)
        if self.batches_per_epoch == 0 and drop_remainder:
            raise ValueError(f"{data_dir} has {self.num_samples} samples, fewer than world_size * batch_size "
                             f"= {world_size * batch_size}")
        self.bad_samples = 0
        self.fetch_wait_s = 0.0
        self._epoch = 0
        self._phases = [self._fresh_phase()]
        self._cache: tuple[Any, EpochPlan, np.ndarray, np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        """The epoch the next iteration reads."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch to read; the current epoch keeps its position.

        Args:
            epoch: Epoch number; a different one starts from its beginning.
        """
        if epoch != self._epoch:
            self._epoch = epoch
            self._phases = [self._fresh_phase()]

    def __len__(self) -> int:
        """Batches the next iteration yields (the rest of the current epoch)."""
        return len(self._schedule()[1]) - self._phases[-1].steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yields the remaining batches of the current epoch, then moves to the next epoch.

        Yields:
            Dicts of tensors as described in :func:`hipscale.data.loading.batching.collate`.

        Raises:
            BadDataError: When more than ``max_bad_samples`` samples were unreadable.
        """
        plan, schedule, valid = self._schedule()
        start = self._phases[-1].steps
        if start < len(schedule):
            context = _worker_context() if self.num_workers else None
            watched = self.num_workers > 0 and self.worker_timeout_s is not None
            progress = WorkerProgress(self.num_workers) if watched else None
            loader = torch.utils.data.DataLoader(
                _RankBatches(self.stores, self.infos, plan, schedule, None if self.drop_remainder else valid, start,
                             progress, self.stall_sample),
                batch_size=None, num_workers=self.num_workers,
                pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor if self.num_workers else None,
                worker_init_fn=functools.partial(_start_worker, rank_pid=os.getpid(), environ=dict(os.environ),
                                                 cwd=os.getcwd()),
                generator=torch.Generator().manual_seed(self.seed),
                multiprocessing_context=context)
            with _stop_signals_blocked(context), _main_module_hidden():  # workers start with the signals blocked
                batches = iter(loader)
            watch = StallWatch(progress, self.worker_timeout_s, self.rank) if watched else None
            try:
                with watch or contextlib.nullcontext():
                    for expected, batch in enumerate(_handed_over(batches, watch), start=start):
                        if batch.pop("_index") != expected:
                            raise RuntimeError(f"batch order broken: expected batch {expected}")
                        self._count_bad(batch.pop("_bad"))
                        self.fetch_wait_s += batch.pop("_fetch_wait_s")
                        self._phases[-1] = dataclasses.replace(self._phases[-1], steps=expected + 1)
                        yield to_torch(batch)
            finally:
                _stop_workers(batches)
        self.set_epoch(self._epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        """Returns the position as a plain picklable dict.

        Returns:
            ``{"format", "version", "dataset", "seed", "epoch", "phases"}``
            where ``phases`` lists the epoch's phases with their world size,
            batch size, shuffle buffer and steps taken.
        """
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "dataset": self.fingerprint,
            "seed": self.seed,
            "epoch": self._epoch,
            "phases": [dataclasses.asdict(phase) for phase in self._phases],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a position saved by :meth:`state_dict` (of any rank).

        With the same world size, batch size and shuffle buffer the epoch
        continues where it stopped; otherwise a new phase continues it with
        the samples not yet consumed by any rank. The saved seed is adopted.

        Args:
            state: From :meth:`state_dict`.

        Raises:
            DatasetChangedError: If the state is of another dataset (other
                shards or sample counts; :meth:`dataset_listing` and
                :func:`~hipscale.data.loading.dataset_change.describe_change`
                say what changed).
            ValueError: If the state is of another format, or inconsistent
                with the dataset.
        """
        if not self.drop_remainder:
            raise ValueError("a loader with drop_remainder=False (evaluation) has no position to restore")
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a {STATE_FORMAT} v{STATE_VERSION} state: {state.get('format')!r}")
        if state["dataset"] != self.fingerprint:
            raise DatasetChangedError(f"the state is of dataset {state['dataset']}, the loader reads {self.fingerprint}")
        if state["seed"] != self.seed:
            logger.warning("resuming with the saved seed %d instead of %d", state["seed"], self.seed)
        phases = [Phase(**phase) for phase in state["phases"]]
        current = self._fresh_phase()
        if dataclasses.replace(phases[-1], steps=0) != current:
            phases = phases[:-1] if phases[-1].steps == 0 else phases
            phases.append(current)
        self._cache = self._build(state["seed"], state["epoch"], phases)  # validates before changing anything
        self.seed = state["seed"]
        self._epoch = state["epoch"]
        self._phases = phases

    def dataset_listing(self) -> list[dict[str, Any]]:
        """What the loader reads, to tell later what changed: per source ``{"location", "weight", "shards":
        [[name, samples, sha256 prefix], ...]}`` (about 50 bytes per shard)."""
        return [{"location": source.location, "weight": source.weight,
                 "shards": [[shard.name, shard.samples, shard.sha256[:16]] for shard in info.shards]}
                for source, info in zip(self.sources, self.infos)]

    def _fresh_phase(self) -> Phase:
        return Phase(self.world_size, self.batch_size, self.shuffle_buffer)

    def _schedule(self) -> tuple[EpochPlan, np.ndarray, np.ndarray]:
        """Returns the current epoch's plan and this rank's ``[num_batches, B]`` schedule and valid slots (cached)."""
        key = _cache_key(self.seed, self._epoch, self._phases)
        if self._cache is None or self._cache[0] != key:
            self._cache = self._build(self.seed, self._epoch, self._phases)
        return self._cache[1], self._cache[2], self._cache[3]

    def _build(self, seed: int, epoch: int, phases: list[Phase]) -> tuple[Any, EpochPlan, np.ndarray, np.ndarray]:
        shard_sizes = [[shard.samples for shard in info.shards] for info in self.infos]
        units = (mixed_units(shard_sizes, [source.weight for source in self.sources], seed, epoch) if self.mixed
                 else whole_shards(shard_sizes[0]))
        plan = EpochPlan(units, seed, epoch)
        if self.drop_remainder:
            schedule = plan.schedule(phases, self.rank)
            valid = np.ones_like(schedule, dtype=bool)
        else:
            schedule, valid = complete_schedule(plan.num_samples, self.world_size, self.batch_size, self.rank)
        return _cache_key(seed, epoch, phases), plan, schedule, valid

    def _count_bad(self, bad: list[str]) -> None:
        self.bad_samples += len(bad)
        if self.max_bad_samples is not None and self.bad_samples > self.max_bad_samples:
            raise BadDataError(f"{self.bad_samples} unreadable samples on rank {self.rank}, more than "
                               f"max_bad_samples={self.max_bad_samples}; latest: {bad}")


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _worker_context() -> multiprocessing.context.BaseContext:
    """How DataLoader workers start. Forked from this process when that is safe (:func:`_forking_is_safe`);
    else from a fork server: a single-threaded process that imported this module (torch, numpy, the
    decoders) once, so a worker starts in milliseconds, and that ignores the stop signals
    (:mod:`hipscale.data.loading.worker_server`). The server starts on first use and exits when the rank does."""
    if _forking_is_safe():
        return multiprocessing.get_context("fork")
    multiprocessing.forkserver.set_forkserver_preload(["hipscale.data.loading.worker_server"])
    return multiprocessing.get_context("forkserver")


def _forking_is_safe() -> bool:
    """No process group: gloo's threads enter Python on their own, making a thread state under the
    interpreter's thread-list lock without holding the GIL, so a child forked at that moment finds the lock
    taken forever. Python's own threads (tqdm's monitor, a thread pool) take it only while holding the GIL,
    which the forking thread holds: forking next to them is safe, as PyTorch's default start method assumes."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


@contextlib.contextmanager
def _stop_signals_blocked(context: multiprocessing.context.BaseContext | None) -> Iterator[None]:
    """Block the stop signals while DataLoader workers start. A worker forked here, or the workers' fork
    server started here on first use (it keeps the mask through its exec, its import of torch included, and
    forks every worker with it), starts with them blocked: a signal sent to the process group meanwhile waits
    until :func:`_start_worker` ignores it. (Ignoring alone is not enough: PyTorch's worker loop catches
    SIGTERM, dying of it, before the worker's init runs.) A signal meant for this process stays pending and is
    delivered when the block ends.

    The fork server (``context``'s start method "forkserver") needs multiprocessing's resource tracker,
    which is then started here too, with the three blocked: it ignores SIGINT and SIGTERM itself but not
    SIGUSR1, which must stay blocked in it. Once it has started it unblocks SIGINT and SIGTERM in the calling
    thread (Python 3.11-3.13): they are blocked again before the fork server starts."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        if context is not None and context.get_start_method() == "forkserver":
            multiprocessing.resource_tracker.ensure_running()
            signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start workers without the caller's main module: multiprocessing would have each worker run the
    script that made the loader again (as ``__mp_main__``), which fails in a script without an
    ``if __name__ == "__main__":`` guard (the worker would start workers) and repeats its top-level work
    in every worker. The workers need none of it: what they run lives in this module."""
    main = sys.modules["__main__"]
    saved = {name: main.__dict__[name] for name in ("__spec__", "__file__") if name in main.__dict__}
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.update(saved)


def _start_worker(worker_id: int, rank_pid: int, environ: dict[str, str], cwd: str) -> None:
    """DataLoader worker init. A worker comes from the fork server, which started with the rank's first
    loader: it takes the environment and working folder the rank has now (an object store's endpoint and
    credentials, say), as a worker forked from the rank would, and it exits when the rank does (PyTorch's
    own watchdog looks at the worker's parent, the fork server, which in turn waits for its workers). The
    stop signals a scheduler sends the process group are the rank's to act on."""
    _exit_with(rank_pid)
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _stop_workers(batches: Iterator[dict[str, Any]]) -> None:
    """Ends the epoch's workers now, also when the epoch ends early (an exception, from a worker too, or a
    `break`). Workers ignore SIGTERM, and the interpreter's exit SIGTERMs, then joins, the daemonic children
    still running: an iterator kept alive by a traceback would leave its workers waiting on their queues and
    the process waiting for them."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # absent without workers
    if shutdown is not None:
        shutdown()


def _handed_over(batches: Iterator[dict[str, Any]], watch: StallWatch | None) -> Iterator[dict[str, Any]]:
    """The DataLoader's batches, with a worker that stalled or died named as such.

    A worker the watch killed for making no progress surfaces as PyTorch's "worker exited unexpectedly" (its
    liveness check runs every 5 s) or as a reset connection: the watch's record replaces it. A batch's tensors
    travel as shared memory whose file descriptors the rank fetches from the worker that made it; a worker
    killed at that moment (the OOM killer) surfaces as a reset connection, before PyTorch's own check sees the
    worker gone (under the fork server its exit is reported a moment later)."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:
            if watch is not None and watch.error is not None:
                raise watch.error from e
            if isinstance(e, (ConnectionError, EOFError)):
                raise RuntimeError(f"a DataLoader worker died while handing over a batch ({type(e).__name__}: "
                                   f"{e}); was it killed (out of memory)?") from e
            raise
        yield batch


def _exit_with(pid: int) -> None:
    """End this process as soon as process `pid` (alive now) has ended, SIGKILL included: a daemon thread
    waits on its pidfd (no pid-reuse race)."""
    pidfd = os.pidfd_open(pid)

    def wait() -> None:
        select.select([pidfd], [], [])
        os._exit(0)

    threading.Thread(target=wait, name="hipscale-exit-with-rank", daemon=True).start()


def _cache_key(seed: int, epoch: int, phases: list[Phase]) -> tuple[Any, ...]:
    """What a schedule depends on: everything but the current phase's step count."""
    return seed, epoch, tuple(phases[:-1]), dataclasses.replace(phases[-1], steps=0)


class _RankBatches(torch.utils.data.IterableDataset):
    """The batches ``start..`` of one rank's schedule, split over DataLoader workers.

    With ``valid`` (``[num_batches, B]`` bool, evaluation) each batch gets a ``valid`` mask ``[B]``: False for
    padding slots and for unreadable samples (whose slots are filled as in training); only unreadable valid
    slots count as bad. With ``progress`` each worker records the shard it reads and the sample it decodes.
    """

    def __init__(self, stores: Sequence[ShardStore], infos: Sequence[DatasetInfo], plan: EpochPlan,
                 schedule: np.ndarray, valid: np.ndarray | None, start: int,
                 progress: WorkerProgress | None = None, stall_sample: str | None = None) -> None:
        super().__init__()
        # Compressed clips: training draws each sample's window from (seed, epoch, key); evaluation takes the centre.
        self.window = WindowChoice(plan.seed, plan.epoch, random=valid is None)
        self.stores = stores
        self.infos = infos
        self.info = infos[0]
        self.plan = plan
        self.schedule = schedule
        self.valid = valid
        self.start = start
        self.progress = progress
        self.stall_sample = stall_sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        mine = list(range(self.start + worker_id, len(self.schedule), num_workers))
        if not mine:
            return
        progress = self.progress or NoProgress()
        if self.progress is not None:
            self.progress.bind(worker_id)
        shard = ["", ""]  # the shard being read, the last sample read from it

        def reading(location: str) -> None:
            shard[:] = [location, ""]
            progress.working(f"fetching or opening shard {location}")

        datasets = ", ".join(store.location for store in self.stores)

        def decoding(sample: RawSample) -> None:
            progress.working(f"decoding sample {sample.name} (shard/key) of {datasets}")
            if sample.key == self.stall_sample:
                _block_forever(worker_id, sample.key)

        # Padding slots repeat a position: read each once, keep it until its last use.
        uses = collections.Counter(self.schedule[mine].ravel().tolist())
        waits: list[float] = []  # seconds waited on each shard file since the last batch
        stream = read_samples(self.stores, [info.shards for info in self.infos], self.plan,
                              np.array(sorted(uses), dtype=np.int64), on_shard=reading, on_wait=waits.append)
        pending: dict[int, RawSample] = {}
        fallback: Sample | None = None
        for index in mine:
            raw = []
            for position in self.schedule[index].tolist():
                while position not in pending:
                    progress.working(f"reading shard {shard[0]} after sample {shard[1] or '(none yet)'}")
                    sample = next(stream)
                    shard[1] = sample.key or shard[1]
                    pending[sample.position] = sample
                raw.append(pending[position])
                uses[position] -= 1
                if not uses[position]:
                    del pending[position]
            samples, problems = decode_batch(raw, self.info, fallback, before_each=decoding, window=self.window)
            fallback = samples[-1]
            # The payload travels as tensors (shared memory); the small arrays are pickled along with the batch
            # (a tensor costs the rank a file-descriptor transfer from this worker), and wrapped by the rank.
            batch = {**to_torch(collate(samples, self.info), self.info.specs), "_index": index,
                     "_fetch_wait_s": sum(waits)}
            waits.clear()
            counted = np.ones(len(raw), dtype=bool) if self.valid is None else self.valid[index]
            batch["_bad"] = [problem for problem, c in zip(problems, counted) if c and problem]
            if self.valid is not None:
                batch["valid"] = counted & np.array([p is None for p in problems])
            progress.idle()
            yield batch


def _block_forever(worker_id: int, key: str) -> None:
    """Fault injection: what a deadlocked decoder does. Native code that keeps the GIL and never returns
    (ctypes.PyDLL calls do not release it), so no thread of this worker runs again."""
    print(f"hipscale fault injection: DataLoader worker {worker_id} blocks forever on sample {key}",
          file=sys.stderr, flush=True)
    libc = ctypes.PyDLL(None)
    while True:
        libc.pause()
