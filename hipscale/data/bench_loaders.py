"""The loaders :mod:`hipscale.data.bench` measures, and how it measures them.

A measurement reads whole epochs of a loader (an iterable of batches) and counts samples, payload bytes,
wall-clock time and the CPU time of the process and its workers (:func:`measure_epochs`). The loaders:
hipscale's :class:`~hipscale.data.StreamingLoader`, webdataset's own pipeline over the same tars (from a
folder, or over HTTP with ``curl`` and webdataset's cache), and LitData's ``StreamingDataset`` over its own
chunks of the same samples (:func:`write_litdata`; optional: ``pip install --no-deps litdata``, which
``make`` installs).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import resource
import statistics
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from hipscale.data.format.dataset_info import DatasetInfo
from hipscale.data.format.samples import decode_sample
from hipscale.data.loading.loader import StreamingLoader
from hipscale.data.storage.shard_store import RemoteSettings, load_dataset_info

SHUFFLE_BUFFER = 64  # every loader shuffles through a buffer of this many samples
LITDATA_MISSING = "LitData is not installed (pip install --no-deps litdata==0.2.76 lightning-utilities tifffile)"

Reading = tuple[Iterable[Any], Callable[[Any], Sequence[Any]]]  # a loader, and the payload arrays of its batch


@dataclass(frozen=True)
class LoaderRate:
    """What reading took, whole epochs (DataLoader workers start anew every epoch, and that counts).

    Attributes:
        samples_per_s: Samples per wall-clock second.
        mb_per_s: Payload megabytes (1e6) per wall-clock second.
        cpu_s_per_sample: CPU seconds of the loader process and its workers per sample.
        first_batch_s: Mean seconds from an epoch's start to its first batch.
    """

    samples_per_s: float
    mb_per_s: float
    cpu_s_per_sample: float
    first_batch_s: float

    def cores_for(self, target: float) -> float:
        """CPU cores that deliver ``target`` samples/s."""
        return target * self.cpu_s_per_sample

    def describe(self, target: float) -> str:
        per_core = 1 / self.cpu_s_per_sample
        mb_per_sample = self.mb_per_s / self.samples_per_s
        return (f"{self.samples_per_s:6.1f} samples/s, {self.mb_per_s:6.1f} MB/s; per core {per_core:6.1f} samples/s, "
                f"{per_core * mb_per_sample:6.1f} MB/s; {self.cores_for(target):4.1f} cores for {target:g} samples/s; "
                f"first batch after {self.first_batch_s:.2f} s")


def cpu_seconds() -> float:
    """User + system CPU time of this process, of its finished children, and of its live children with the
    children they reaped. The loader's workers come from a fork server that lives as long as this process
    and reaps them: their time is in the server's children's time, not in this process's RUSAGE_CHILDREN."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + _fork_serverscpu_seconds()


def _fork_serverscpu_seconds() -> float:
    """utime + stime + cutime + cstime (/proc/PID/stat) of this process's live multiprocessing fork servers
    (not of the object store server, also a child here: a cluster's loader does not pay for it)."""
    total_ticks = 0
    for process in Path("/proc").glob("[0-9]*"):
        try:
            fields = (process / "stat").read_text().rpartition(")")[2].split()  # from the state on
            command = (process / "cmdline").read_bytes()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == os.getpid() and b"multiprocessing.forkserver" in command:  # fields[1]: the ppid
            total_ticks += sum(int(field) for field in fields[11:15])
    return total_ticks / os.sysconf("SC_CLK_TCK")


def measure_epochs(loader: Iterable[Any], arrays: Callable[[Any], Sequence[Any]], epochs: int) -> LoaderRate:
    """Reads ``epochs`` whole epochs of `loader` and measures them (see :class:`LoaderRate`); `arrays` picks a
    batch's payload arrays (``[B, ...]`` each). Workers that exit at an epoch's end count with their CPU time."""
    samples = payload = 0
    wall = first_batch = 0.0
    cpu_began = cpu_seconds()
    for _ in range(epochs):
        began = time.perf_counter()
        for step, batch in enumerate(loader):
            if step == 0:
                first_batch += time.perf_counter() - began
            payload_arrays = arrays(batch)
            samples += len(payload_arrays[0])
            payload += sum(array.nbytes for array in payload_arrays)
        wall += time.perf_counter() - began
    cpu = cpu_seconds() - cpu_began
    return LoaderRate(samples / wall, payload / wall / 1e6, cpu / samples, first_batch / epochs)


def alternating_rounds(measurements: dict[str, Callable[[], LoaderRate]], rounds: int) -> dict[str, LoaderRate]:
    """Takes each measurement ``rounds`` times, the order reversed every round (the process's first loader pays
    one-time costs that later ones do not: whichever went first would look slower), and returns each one's
    field-by-field median."""
    taken: dict[str, list[LoaderRate]] = {name: [] for name in measurements}
    for round_index in range(rounds):
        names = list(measurements)
        for name in names[::-1] if round_index % 2 else names:
            taken[name].append(measurements[name]())
    return {name: LoaderRate(*(statistics.median(getattr(rate, field.name) for rate in rates)
                               for field in dataclasses.fields(LoaderRate)))
            for name, rates in taken.items()}


def streaming_loader(location: str | Path, batch_size: int, workers: int,
                     remote: RemoteSettings | None = None) -> tuple[StreamingLoader, Callable[[Any], Sequence[Any]]]:
    """hipscale's loader over a folder or URL (through the shard cache of `remote`)."""
    loader = StreamingLoader(location, batch_size=batch_size, num_workers=workers, shuffle_buffer=SHUFFLE_BUFFER,
                             remote=remote)
    return loader, lambda batch: [batch[name] for name in loader.info.specs]


def webdataset_loader(urls: Sequence[str], info: DatasetInfo, batch_size: int, workers: int,
                      cache_dir: Path | None = None) -> Reading:
    """webdataset's own pipeline over the tars at `urls` (paths, or ``http://`` URLs that it reads with
    ``curl``; with `cache_dir`, through its file cache): ``shuffle(SHUFFLE_BUFFER)``, arrays decoded,
    ``batched(batch_size)``, through ``wds.WebLoader`` with `workers` workers (each reads whole shards)."""
    import webdataset as wds

    fields = [f"{name}.{spec.encoding}" for name, spec in info.specs.items()]
    dataset = (wds.WebDataset(list(urls), shardshuffle=False, nodesplitter=wds.single_node_only, empty_check=False,
                              cache_dir=None if cache_dir is None else str(cache_dir))
               .shuffle(SHUFFLE_BUFFER).decode("rgb8").to_tuple(*fields).batched(batch_size))
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers), lambda batch: batch


def write_litdata(data_dir: Path, out: Path) -> None:
    """LitData's chunks of the samples of the shards in `data_dir` (their decoded arrays and first label), about
    one chunk per shard.

    Raises:
        ImportError: Without LitData (:data:`LITDATA_MISSING`).
    """
    import litdata

    info = load_dataset_info(data_dir)
    litdata.optimize(functools.partial(_litdata_samples, str(data_dir)), [s.name for s in info.shards if s.samples],
                     output_dir=str(out), chunk_bytes=max(shard.bytes for shard in info.shards), num_workers=1,
                     start_method="fork", verbose=False)


def _litdata_samples(data_dir: str, shard: str) -> Iterable[dict[str, Any]]:
    info = load_dataset_info(data_dir)
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(Path(data_dir) / shard) as tar:
        for member in tar:
            if member.isfile():
                key, _, extension = member.name.partition(".")
                members.setdefault(key, {})[extension] = tar.extractfile(member).read()
    for key, files in members.items():
        sample = decode_sample(key, files, info)
        yield {**sample.arrays, "label": sample.labels[0]}


def litdata_loader(url: str, info: DatasetInfo, batch_size: int, workers: int, cache_dir: Path) -> Reading:
    """LitData's ``StreamingDataset`` (shuffled, its cache in `cache_dir`) over chunks that :func:`write_litdata`
    wrote, through its ``StreamingDataLoader`` with `workers` workers."""
    import litdata

    dataset = litdata.StreamingDataset(url, cache_dir=str(cache_dir), shuffle=True, max_cache_size="1000GB")
    loader = litdata.StreamingDataLoader(dataset, batch_size=batch_size, num_workers=workers)
    return loader, lambda batch: [batch[name] for name in info.specs]


def bench_loader(data_dir: str | Path, batch_size: int, workers: int, epochs: int) -> LoaderRate:
    """:class:`StreamingLoader` over ``epochs`` whole epochs of a folder."""
    return measure_epochs(*streaming_loader(data_dir, batch_size, workers), epochs)


def bench_webdataset(data_dir: str | Path, batch_size: int, workers: int, epochs: int) -> LoaderRate:
    """webdataset's pipeline (:func:`webdataset_loader`) over ``epochs`` whole epochs of a folder."""
    info = load_dataset_info(data_dir)
    urls = [str(Path(data_dir) / shard.name) for shard in info.shards if shard.samples]
    return measure_epochs(*webdataset_loader(urls, info, batch_size, workers), epochs)
