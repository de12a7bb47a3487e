"""Throughput of the AV sharder and of the streaming loader on synthetic clips, from disk and object storage.

Example:
    python -m hipscale.data.bench --clips 24 --workers 2 --loader-workers 2 --remote

Makes ``--clips`` synthetic clips (``--source-size``, ``--duration`` seconds),
shards them at the paper's settings (8 frames of 224x224, 2.56 s of 48 kHz
audio: 1.45 MB a raw sample) in each of ``--encodings`` (raw: one window per
clip; compressed: the whole clip, a window decoded per epoch) with 1 worker
and with ``--workers`` workers, prints the bytes per clip and the compressed
windows' fidelity against the raw sharder's (video PSNR, audio difference), then
reads the shards with :class:`~hipscale.data.StreamingLoader` for
``--epochs`` epochs from the folder and, with ``--remote``, from an
S3-compatible server on loopback (moto, started here; with ``--link``, behind an
emulated link of that latency and bandwidth) through a fresh shard cache as small
as the readers allow, and with byte-range reads for comparison, and downloads
the largest shard with the loader's download path and with one whole-object GET; the ``webdataset`` row is webdataset's own pipeline over the same
tars (shuffle, decode, batch, ``WebLoader``; no resume, no even split over ranks).
The disk and webdataset rows are the medians of ``--rounds`` measurements taken
in turns, the order reversed every round (a process's first loader pays
one-time costs). For each it prints samples/s and MB/s, the same per CPU core (the CPU
time of the loader process and its workers), and the cores one H100 needs to
feed ``--target`` samples/s (the audio+video target: 20 steps/s at batch 8).
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import resource
import shutil
import statistics
import tarfile
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence
from pathlib import Path

from hipscale.data.format.clip_codec import CENTRE, audio_offset
from hipscale.data.format.dataset_info import DatasetInfo, ShardEntry
from hipscale.data.format.keys import key_to_id
from hipscale.data.format.samples import decode_sample
from hipscale.data.loading.loader import StreamingLoader
from hipscale.data.sharding.av_decode import read_audio
from hipscale.data.sharding.clip_decode import ClipFormat, decode_clip
from hipscale.data.sharding.shard_av import ENCODINGS, AVShardConfig, shard_av
from hipscale.data.storage.remote import DOWNLOAD_STREAMS, RemoteLocation, part_bytes
from hipscale.data.storage.shard_store import RemoteSettings, load_dataset_info
from hipscale.data.synthetic_media import make_av_dataset

SHUFFLE_BUFFER = 64  # both loader rows shuffle through a buffer of this many samples


def bench_sharding(config: AVShardConfig, clips: int) -> float:
    """Shards from scratch and returns clips per second."""
    began = time.perf_counter()
    report = shard_av(config)
    if report["written"] != clips:
        raise RuntimeError(f"expected {clips} clips to be written, got {report}")
    return clips / (time.perf_counter() - began)


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


def _cpu_seconds() -> float:
    """User + system CPU time of this process, of its finished children, and of its live children with the
    children they reaped. The loader's workers come from a fork server that lives as long as this process
    and reaps them: their time is in the server's children's time, not in this process's RUSAGE_CHILDREN."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + _fork_servers_cpu_seconds()


def _fork_servers_cpu_seconds() -> float:
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
    cpu_began = _cpu_seconds()
    for _ in range(epochs):
        began = time.perf_counter()
        for step, batch in enumerate(loader):
            if step == 0:
                first_batch += time.perf_counter() - began
            payload_arrays = arrays(batch)
            samples += len(payload_arrays[0])
            payload += sum(array.nbytes for array in payload_arrays)
        wall += time.perf_counter() - began
    cpu = _cpu_seconds() - cpu_began
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


def bench_loader(data_dir: str | Path, batch_size: int, workers: int, epochs: int,
                 remote: RemoteSettings | None = None) -> LoaderRate:
    """:class:`StreamingLoader` over ``epochs`` whole epochs."""
    loader = StreamingLoader(data_dir, batch_size=batch_size, num_workers=workers, shuffle_buffer=SHUFFLE_BUFFER,
                             remote=remote)
    return measure_epochs(loader, lambda batch: [batch[name] for name in loader.info.specs], epochs)


def bench_webdataset(data_dir: str | Path, batch_size: int, workers: int, epochs: int) -> LoaderRate:
    """webdataset's own pipeline over the same tars, for comparison: ``shuffle(SHUFFLE_BUFFER)``, arrays decoded,
    ``batched(batch_size)``, through ``wds.WebLoader`` with ``workers`` workers (each reads whole shards)."""
    import webdataset as wds

    info = load_dataset_info(data_dir)
    urls = [str(Path(data_dir) / shard.name) for shard in info.shards if shard.samples]
    fields = [f"{name}.{spec.encoding}" for name, spec in info.specs.items()]
    dataset = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.single_node_only, empty_check=False)
               .shuffle(SHUFFLE_BUFFER).decode("rgb8").to_tuple(*fields).batched(batch_size))
    return measure_epochs(wds.WebLoader(dataset, batch_size=None, num_workers=workers), lambda batch: batch, epochs)


def bench_remote_loader(data_dir: Path, work: Path, batch_size: int, workers: int, epochs: int,
                        link: tuple[float, float] | None = None) -> tuple[LoaderRate, tuple[float, int, float],
                                                                          tuple[float, float]]:
    """Uploads the shards to an S3-compatible server on loopback and reads them, through a
    :class:`~hipscale.tools.slow_link.SlowLink` of ``link`` = (RTT ms, Mbit/s) when given: (a) with the loader
    through a shard cache as small as its readers allow (each worker holds the shard it reads and the ones it
    prefetches), so every epoch downloads its shards again (a first read), (b) with plain byte-range reads,
    (c) the largest shard with the loader's download path and with one whole-object GET into memory.

    Returns:
        ``(the loader's rate, the byte-range figures (see :func:`bench_range_reads`), (download path MB/s,
        whole-object GET MB/s))``.
    """
    from hipscale.tools.local_storage import S3Server
    from hipscale.tools.slow_link import SlowLink

    info = load_dataset_info(data_dir)
    with S3Server() as s3, (SlowLink(s3.port, *link) if link else contextlib.nullcontext()) as slow:
        os.environ.update(s3.env)
        s3.create_bucket("bench")
        url = s3.upload_folder(data_dir, "s3://bench/shards")
        if slow is not None:
            os.environ["AWS_ENDPOINT_URL"] = slow.endpoint
        held = workers * (1 + RemoteSettings.prefetch_shards)
        cache = RemoteSettings(cache_dir=str(work / "cache"),
                               cache_limit_gb=held * max(shard.bytes for shard in info.shards) / 1e9)
        return (bench_loader(url, batch_size, workers, epochs, cache), bench_range_reads(url, info, workers),
                bench_download(url, max(info.shards, key=lambda shard: shard.bytes), work))


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
    cpu_began = _cpu_seconds()
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
    return samples / (_cpu_seconds() - cpu_began), requests, fetched / 1e6


def compressed_fidelity(media: Any, folder: Path, clip: ClipFormat, clips: int = 8) -> tuple[int, float, float, int]:
    """The centre window of up to `clips` compressed samples against the raw sharder's decode of the same window
    (frames at the window's start, audio sliced from the clip's whole track as the compressed sharder decodes it).

    Returns:
        ``(clips compared, min PSNR dB, mean PSNR dB, audio max abs difference)``.
    """
    info = load_dataset_info(folder)
    psnrs, audio_error, compared = [], 0, 0
    members: dict[str, bytes] = {}
    for shard in info.shards:
        if len({name.split(".")[0] for name in members}) >= clips:
            break
        with tarfile.open(folder / shard.name) as tar:
            members.update({member.name: tar.extractfile(member).read() for member in tar if member.isfile()})
    keys = sorted({name.split(".")[0] for name in members})[:clips]
    for key in keys:
        files = {name[len(key) + 1:]: data for name, data in members.items() if name.startswith(f"{key}.")}
        sample, meta = decode_sample(key, files, info), json.loads(files["meta.json"])
        window = CENTRE.index(key, meta["windows"])
        path = next(p for p in media.videos.iterdir() if p.stem == key_to_id(key))
        start = window / info.frame_rate
        raw, _ = decode_clip(path, start, start + clip.window_seconds, clip, "start", 0, key)
        track = read_audio(path, 0.0, meta["span_seconds"], clip.sample_rate)
        first = audio_offset(window, clip.sample_rate, info.frame_rate)
        mse = float(((sample.arrays["video"].astype("float64") - raw["video"]) ** 2).mean())
        psnrs.append(math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse))
        audio_error = max(audio_error, int(abs(sample.arrays["audio"].astype("int64")
                                               - track[first:first + clip.audio_samples]).max()))
        compared += 1
    return compared, min(psnrs), statistics.mean(psnrs), audio_error


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark and prints the numbers.

    Args:
        argv: Arguments without the program name (default: ``sys.argv``).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--source-size", default="240x320", help="HxW of the synthetic source clips")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per source clip")
    parser.add_argument("--workers", type=int, default=2, help="sharding workers of the parallel run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5,
                        help="measurements of the disk and webdataset rows, alternating which goes first (medians)")
    parser.add_argument("--encodings", default="raw,compressed",
                        help="comma-separated AV shard encodings to shard and read side by side, of "
                             f"{ENCODINGS} (default: %(default)s)")
    parser.add_argument("--remote", action="store_true",
                        help="also read the shards from an S3-compatible server on loopback (needs moto[server])")
    parser.add_argument("--link", default=None, metavar="RTT_MS:MBIT_S",
                        help="with --remote: the server behind an emulated link of this round-trip time and "
                             "bandwidth, e.g. 20:1000 (default: loopback as it is)")
    parser.add_argument("--target", type=float, default=160.0,
                        help="samples/s one GPU consumes (default: the audio+video target, 20 steps/s at batch 8)")
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    link = _parse_link(parser, args.link)
    encodings = [e.strip() for e in args.encodings.split(",") if e.strip()]
    if not encodings or set(encodings) - set(ENCODINGS):
        parser.error(f"--encodings: a comma-separated subset of {ENCODINGS}, got {args.encodings!r}")
    work = args.out or Path(tempfile.mkdtemp(prefix="hipscale-bench-"))
    try:
        height, width = (int(n) for n in args.source_size.split("x"))
        began = time.perf_counter()
        media = make_av_dataset(work / "media", num_clips=args.clips, duration=args.duration,
                                size=(height, width), bad=())
        print(f"made {args.clips} clips of {width}x{height}, {args.duration:g} s in "
              f"{time.perf_counter() - began:.1f} s")
        results, sizes, measurements, folders = {}, {}, {}, {}
        for encoding in encodings:
            folders[encoding] = work / f"shards-{encoding}"
            for workers in sorted({1, args.workers}):
                config = AVShardConfig(media.manifest, media.class_index, media.videos, folders[encoding],
                                       workers=workers, max_samples_per_shard=max(1, args.clips // (4 * workers)),
                                       overwrite=True, encoding=encoding)
                results[encoding, workers] = bench_sharding(config, args.clips)
            sizes[encoding] = sum(shard.bytes for shard in load_dataset_info(folders[encoding]).shards) / args.clips
            reading = (folders[encoding], args.batch_size, args.loader_workers, args.epochs)
            measurements[f"disk, {encoding}"] = functools.partial(bench_loader, *reading)
            if encoding == "raw":  # webdataset decodes .npy members, not a window of a compressed clip
                measurements["webdataset, raw"] = functools.partial(bench_webdataset, *reading)
        rates = alternating_rounds(measurements, args.rounds)
        fidelity = (compressed_fidelity(media, folders["compressed"], config.clip_format)
                    if "compressed" in folders else None)
        if args.remote:
            first = folders[encodings[0]]
            rates[f"object store, {encodings[0]}"], ranged, download = bench_remote_loader(
                first, work, args.batch_size, args.loader_workers, args.epochs, link)
            shards = load_dataset_info(first).shards
            cache_requests = sum(math.ceil(shard.bytes / part_bytes(shard.bytes, DOWNLOAD_STREAMS)) for shard in shards)
            cache_mb = sum(shard.bytes for shard in shards) / 1e6
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"sharding (8x224x224 frames + 122,880 audio samples per window; clips of {args.duration:g} s):")
    for (encoding, workers), rate in results.items():
        print(f"  {encoding:>10}, {workers} worker(s): {rate:6.2f} clips/s, {rate / workers:6.2f} clips/s per worker")
    for encoding, size in sizes.items():
        print(f"  {encoding:>10}: {size / 1e6:.3f} MB per clip in the shards" + (
            " (one window)" if encoding == "raw" else
            f" (the whole clip: {size / 1e6 * 10 / args.duration:.3f} MB per 10 s)"))
    if fidelity is not None:
        print(f"  compressed vs raw on the same window ({fidelity[0]} clips, centre window): video PSNR min "
              f"{fidelity[1]:.1f} dB, mean {fidelity[2]:.1f} dB; audio max abs difference {fidelity[3]} (int16)")
    print(f"loader (batch {args.batch_size}, {args.loader_workers} workers, {args.epochs} whole epochs of "
          f"{args.clips} clips; disk and webdataset: medians of {args.rounds} rounds, alternating which goes "
          f"first):")
    for source, rate in rates.items():
        print(f"  {source:>12}: {rate.describe(args.target)}")
    if args.remote:
        link_name = f"{link[0]:g} ms RTT, {link[1]:g} Mbit/s link" if link else "loopback"
        print(f"object store, one epoch: through the cache (every shard downloaded once per node in up to "
              f"{DOWNLOAD_STREAMS} concurrent ranged GETs) {cache_requests} requests, {cache_mb:.1f} MB; with byte-range "
              f"reads by each of {args.loader_workers} workers (headers walked, own samples read) {ranged[1]} "
              f"requests, {ranged[2]:.1f} MB, {ranged[0]:.1f} samples per CPU-second of fetching alone")
        print(f"object store, the largest shard ({link_name}): the download path {download[0]:.1f} MB/s, one "
              f"whole-object GET into memory {download[1]:.1f} MB/s ({download[0] / download[1]:.2f}x)")


def _parse_link(parser: argparse.ArgumentParser, text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        rtt, mbit = (float(part) for part in text.split(":"))
    except ValueError:
        parser.error(f"--link: RTT_MS:MBIT_S, e.g. 20:1000, got {text!r}")
    if rtt < 0 or mbit <= 0:
        parser.error(f"--link: a round-trip time >= 0 and a bandwidth > 0, got {text!r}")
    return rtt, mbit


if __name__ == "__main__":
    main()
