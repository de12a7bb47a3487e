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
``--epochs`` epochs from the folder (beside it, webdataset's own pipeline over
the same tars: shuffle, decode, batch, ``WebLoader``; no resume, no even split
over ranks) and, with ``--remote``, from an S3-compatible server on loopback
(moto, started here; with ``--link``, behind an emulated link of that latency
and bandwidth, each link in turn): hipscale, webdataset over ``curl`` with its cache and LitData
over its own chunks of the same samples, each into a fresh cache for the first
epoch and from it for the later ones, with the share of the link delivered as
samples and the time hipscale's workers waited for downloads; then the
largest shard through the loader's download path against one whole-object GET
(:mod:`hipscale.data.bench_remote`).
The disk and webdataset rows are the medians of ``--rounds`` measurements taken
in turns, the order reversed every round (a process's first loader pays
one-time costs). For each it prints samples/s and MB/s, the same per CPU core (the CPU
time of the loader process and its workers), and the cores one H100 needs to
feed ``--target`` samples/s (the audio+video target: 20 steps/s at batch 8).
"""
import argparse
import functools
import json
import math
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from hipscale.data.bench_loaders import alternating_rounds, bench_loader, bench_webdataset
from hipscale.data.bench_remote import PEERS, ObjectStoreFigures, bench_object_store
from hipscale.data.format.clip_codec import CENTRE, audio_offset
from hipscale.data.format.keys import key_to_id
from hipscale.data.format.samples import decode_sample
from hipscale.data.sharding.av_decode import read_audio
from hipscale.data.sharding.clip_decode import ClipFormat, decode_clip
from hipscale.data.sharding.shard_av import ENCODINGS, AVShardConfig, shard_av
from hipscale.data.storage.remote import DOWNLOAD_STREAMS, part_bytes
from hipscale.data.storage.shard_store import load_dataset_info
from hipscale.data.synthetic_media import make_av_dataset


def bench_sharding(config: AVShardConfig, clips: int) -> float:
    """Shards from scratch and returns clips per second."""
    began = time.perf_counter()
    report = shard_av(config)
    if report["written"] != clips:
        raise RuntimeError(f"expected {clips} clips to be written, got {report}")
    return clips / (time.perf_counter() - began)


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
    parser.add_argument("--clips", type=int, default=48, help="synthetic source clips (default: %(default)s)")
    parser.add_argument("--source-size", default="240x320", help="HxW of the synthetic source clips (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per source clip (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="sharding workers of the parallel run (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per batch (default: %(default)s)")
    parser.add_argument("--loader-workers", type=int, default=2,
                        help="DataLoader workers of every loader (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=3,
                        help="whole epochs per measurement; from object storage, the first and the later ones "
                             "(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="measurements of the disk and webdataset rows, alternating which goes first (medians; "
                             "default: %(default)s)")
    parser.add_argument("--encodings", default="raw,compressed",
                        help="comma-separated AV shard encodings to shard and read side by side, of "
                             f"{ENCODINGS} (default: %(default)s)")
    parser.add_argument("--remote", action="store_true",
                        help="also read the shards from an S3-compatible server on loopback (needs moto[server]; "
                             "default: off)")
    parser.add_argument("--link", action="append", default=None, metavar="RTT_MS:MBIT_S",
                        help="with --remote: the server behind an emulated link of this round-trip time and "
                             "bandwidth, e.g. 20:1000, or 'loopback' for none; give it more than once to measure "
                             "each link in turn (default: loopback)")
    parser.add_argument("--target", type=float, default=160.0,
                        help="samples/s one GPU consumes (default: the audio+video target, 20 steps/s at batch 8: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    links = [_parse_link(parser, text) for text in args.link or ["loopback"]]
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
        object_store = {(link, encoding): bench_object_store(folder, work / f"object-store-{index}", args.batch_size,
                                                             args.loader_workers, args.epochs, link,
                                                             peers=encoding == "raw")
                        for index, link in enumerate(links) for encoding, folder in folders.items()} \
            if args.remote else {}
        shards = {encoding: load_dataset_info(folder).shards for encoding, folder in folders.items()}
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
    for (link, encoding), figures in object_store.items():
        _print_object_store(encoding, figures, shards[encoding], args, link)


def _print_object_store(encoding: str, figures: ObjectStoreFigures, shards: list, args: argparse.Namespace,
                        link: tuple[float, float] | None) -> None:
    link_name = f"{link[0]:g} ms RTT, {link[1]:g} Mbit/s link" if link else "loopback"
    print(f"object store ({link_name}), {encoding}: the first epoch into a fresh cache, the later "
          f"{args.epochs - 1} from it:")
    for name, rate in figures.first.items():
        share = (f"; {rate.samples_per_s * figures.shard_mb_per_sample / (link[1] / 8):.0%} of the link (shard "
                 f"bytes delivered as samples)" if link else "")
        waited = (f"; the workers waited {figures.wait_fraction:.0%} of their time for downloads"
                  if name == "hipscale" else "")
        print(f"  {name}, {encoding}, first epoch: {rate.describe(args.target)}{share}{waited}")
        if name in figures.later:
            print(f"  {name}, {encoding}, later epochs: {figures.later[name].describe(args.target)}")
    for name, why in figures.not_measured.items():
        print(f"  {name}, {encoding}: not measured: {why}")
    peers = {name: rate.samples_per_s for name, rate in figures.first.items() if name in PEERS}
    if peers:
        best = max(peers, key=peers.get)
        print(f"  first epoch, {encoding}: hipscale / the best peer ({best}) = "
              f"{figures.first['hipscale'].samples_per_s / peers[best]:.2f}x")
    requests = sum(math.ceil(shard.bytes / part_bytes(shard.bytes, DOWNLOAD_STREAMS)) for shard in shards)
    ranged = figures.range_reads
    print(f"object store, one epoch, {encoding}: through the cache (every shard downloaded once per node in up "
          f"to {DOWNLOAD_STREAMS} concurrent ranged GETs) {requests} requests, "
          f"{sum(shard.bytes for shard in shards) / 1e6:.1f} MB; with byte-range reads by each of "
          f"{args.loader_workers} workers (headers walked, own samples read) {ranged[1]} requests, "
          f"{ranged[2]:.1f} MB, {ranged[0]:.1f} samples per CPU-second of fetching alone")
    ours, whole = figures.download_mb_s
    print(f"object store, the largest shard, {encoding} ({link_name}): the download path {ours:.1f} MB/s, one "
          f"whole-object GET into memory {whole:.1f} MB/s ({ours / whole:.2f}x)")


def _parse_link(parser: argparse.ArgumentParser, text: str) -> tuple[float, float] | None:
    if text == "loopback":
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
