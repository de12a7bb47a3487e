"""The object-storage part of :mod:`hipscale.data.bench`: loaders reading from S3, first epoch and later ones.

An S3-compatible server (moto) runs on loopback, behind an emulated link
(:class:`~hipscale.tools.slow_link.SlowLink`: latency and a bandwidth cap) when one is given. Each loader
reads the same samples from it into a cache folder of its own, fresh for the first epoch (every shard read
over the link: at AudioSet scale every epoch is a first read, the dataset being far larger than a node's
cache) and kept for the later ones: hipscale's :class:`~hipscale.data.StreamingLoader` through its shard
cache (and the time its workers waited for downloads), webdataset over ``curl`` with its file cache, and
LitData over its own chunks of the samples. Beside them: the largest shard through hipscale's download
path against one plain whole-object GET, and what byte-range reads without a cache would cost.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from hipscale.data.bench_loaders import (LITDATA_MISSING, LoaderRate, Reading, cpu_seconds, litdata_loader,
                                         measure_epochs, streaming_loader, webdataset_loader, write_litdata)
from hipscale.data.format.dataset_info import DatasetInfo, ShardEntry
from hipscale.data.storage.remote import RemoteLocation
from hipscale.data.storage.shard_store import RemoteSettings, load_dataset_info

PEERS = ("webdataset", "LitData")  # they decode stored arrays: raw shards only


@dataclass
class ObjectStoreFigures:
    """What :func:`bench_object_store` measured for one shard folder.

    Attributes:
        first: Loader name -> its first epoch (a fresh cache: every shard over the link).
        later: Loader name -> its later epochs (from its cache); empty with one epoch.
        wait_fraction: hipscale's first epoch: the share of its workers' time spent waiting for downloads.
        shard_mb_per_sample: Megabytes of shards per sample (what crosses the link for a sample).
        not_measured: Loader name -> why it was not measured.
        download_mb_s: The largest shard: ``(hipscale's download path, one whole-object GET)``, MB/s.
        range_reads: See :func:`bench_range_reads`.
    """

    first: dict[str, LoaderRate] = field(default_factory=dict)
    later: dict[str, LoaderRate] = field(default_factory=dict)
    wait_fraction: float = 0.0
    shard_mb_per_sample: float = 0.0
    not_measured: dict[str, str] = field(default_factory=dict)
    download_mb_s: tuple[float, float] = (0.0, 0.0)
    range_reads: tuple[float, int, float] = (0.0, 0, 0.0)


def bench_object_store(data_dir: Path, work: Path, batch_size: int, workers: int, epochs: int,
                       link: tuple[float, float] | None = None, peers: bool = True) -> ObjectStoreFigures:
    """Uploads the shards (and, with `peers`, LitData's chunks of them) to a loopback S3 server and measures
    the loaders through ``link`` = (RTT ms, Mbit/s), or loopback as it is (None)."""
    from hipscale.tools.local_storage import S3Server
    from hipscale.tools.slow_link import SlowLink

    info = load_dataset_info(data_dir)
    work.mkdir(parents=True, exist_ok=True)
    figures = ObjectStoreFigures(shard_mb_per_sample=sum(shard.bytes for shard in info.shards) / 1e6 / info.num_samples)
    with S3Server() as s3, (SlowLink(s3.port, *link) if link else contextlib.nullcontext()) as slow, \
            _environment(s3.env):
        s3.create_bucket("bench")
        url = s3.upload_folder(data_dir, f"s3://bench/{data_dir.name}")
        endpoint = slow.endpoint if slow is not None else s3.env["AWS_ENDPOINT_URL"]
        litdata_url = None
        if peers:
            try:
                write_litdata(data_dir, work / f"litdata-{data_dir.name}")
                litdata_url = s3.upload_folder(work / f"litdata-{data_dir.name}", f"s3://bench/litdata-{data_dir.name}")
            except ImportError:
                figures.not_measured["LitData"] = LITDATA_MISSING
        os.environ["AWS_ENDPOINT_URL"] = endpoint

        loader, arrays = streaming_loader(url, batch_size, workers,
                                          RemoteSettings(cache_dir=str(work / f"cache-hipscale-{data_dir.name}")))
        figures.first["hipscale"] = measure_epochs(loader, arrays, 1)
        first_wall = loader.batches_per_epoch * batch_size / figures.first["hipscale"].samples_per_s
        figures.wait_fraction = loader.fetch_wait_s / (max(workers, 1) * first_wall)
        if epochs > 1:
            figures.later["hipscale"] = measure_epochs(loader, arrays, epochs - 1)
        if peers:
            shard_urls = _presigned_urls(endpoint, "bench", data_dir.name, info)
            cache = work / f"cache-webdataset-{data_dir.name}"
            cache.mkdir()
            _first_and_later(figures, "webdataset",
                             webdataset_loader(shard_urls, info, batch_size, workers, cache), epochs)
        if litdata_url is not None:
            _first_and_later(figures, "LitData", litdata_loader(litdata_url, info, batch_size, workers,
                                                                 work / f"cache-litdata-{data_dir.name}"), epochs)
        figures.range_reads = bench_range_reads(url, info, workers)
        figures.download_mb_s = bench_download(url, max(info.shards, key=lambda shard: shard.bytes), work)
    return figures


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """The server's endpoint and credentials in this process's environment, as before afterwards; fsspec's
    cached filesystems (bound to the endpoint they were made for) are forgotten on the way in and out."""
    import fsspec

    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    try:
        yield
    finally:
        fsspec.get_filesystem_class("s3").clear_instance_cache()
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _presigned_urls(endpoint: str, bucket: str, prefix: str, info: DatasetInfo) -> list[str]:
    """Presigned ``http://`` GET URLs of the shards (the way webdataset reads S3 with ``curl``), signed for
    `endpoint` with the credentials of the environment."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    return [client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": f"{prefix}/{shard.name}"},
                                          ExpiresIn=24 * 3600) for shard in info.shards if shard.samples]


def _first_and_later(figures: ObjectStoreFigures, name: str, reading: Reading, epochs: int) -> None:
    figures.first[name] = measure_epochs(*reading, 1)
    if epochs > 1:
        figures.later[name] = measure_epochs(*reading, epochs - 1)


def bench_download(url: str, shard: ShardEntry, work: Path) -> tuple[float, float]:
    """MB/s of one shard through :meth:`RemoteLocation.download` (to a file, hashed) and of one plain
    whole-object GET into memory, on the same server and link (medians of 3, taken in turns)."""
    remote = RemoteLocation(url)
    fs, path = remote._fs(shard.name)
    ours, whole = [], []
    for _ in range(3):
        began = time.perf_counter()
        remote.download(shard.name, work / "download-bench", shard.bytes, shard.sha256)
        ours.append(shard.bytes / (time.perf_counter() - began) / 1e6)
        began = time.perf_counter()
        fs.cat_file(path)
        whole.append(shard.bytes / (time.perf_counter() - began) / 1e6)
    (work / "download-bench").unlink()
    return statistics.median(ours), statistics.median(whole)


def bench_range_reads(url: str, info: DatasetInfo, workers: int) -> tuple[float, int, float]:
    """The alternative to the cache: each of ``workers`` readers walks every shard's tar headers with ranged
    GETs (64 KiB read-ahead) and reads only its own samples (every ``workers``-th), as a loader without a cache
    and without a per-sample offset table would. Runs the readers one after another in this process.

    Returns:
        ``(samples per CPU-second, GET requests, megabytes fetched)`` over one epoch of all readers.
    """
    remote = RemoteLocation(url)
    samples = requests = fetched = 0
    cpu_began = cpu_seconds()
    for shard in info.shards:
        for worker in range(workers):
            with remote.open(shard.name, block_size=64 << 10, cache_type="readahead") as file, \
                    tarfile.open(fileobj=file, mode="r:") as tar:
                for index, member in enumerate(tar):
                    if member.isfile() and index // (len(info.specs) + 1) % workers == worker:
                        tar.extractfile(member).read()
                        samples += member.name.endswith(".meta.json")
                requests += file.cache.miss_count
                fetched += file.cache.total_requested_bytes
    return samples / (cpu_seconds() - cpu_began), requests, fetched / 1e6
