"""Throughput of the AV sharder and of the streaming loader on synthetic clips.

Example:
    python -m hipscale.data.bench --clips 24 --workers 2 --loader-workers 2

Makes ``--clips`` synthetic clips (``--source-size``, ``--duration`` seconds),
shards them at the paper's settings (8 frames of 224x224, 2.56 s of 48 kHz
audio) with 1 worker and with ``--workers`` workers, then reads the shards
with :class:`~hipscale.data.StreamingLoader` for ``--epochs`` epochs.
"""
import argparse
import shutil
import tempfile
import time
from pathlib import Path

from hipscale.data.loader import StreamingLoader
from hipscale.data.shard_av import AVShardConfig, shard_av
from hipscale.data.synthetic import make_av_dataset


def bench_sharding(config: AVShardConfig, clips: int) -> float:
    """Shards from scratch and returns clips per second."""
    began = time.perf_counter()
    report = shard_av(config)
    if report["written"] != clips:
        raise RuntimeError(f"expected {clips} clips to be written, got {report}")
    return clips / (time.perf_counter() - began)


def bench_loader(data_dir: Path, batch_size: int, workers: int, epochs: int) -> tuple[float, float, float]:
    """Reads ``epochs`` epochs.

    Returns:
        ``(samples/s, MB/s, seconds to the first batch)``: the rates are
        measured from the first batch of each epoch to its end (steady state;
        DataLoader workers start anew every epoch), the latency is the mean
        over epochs.
    """
    loader = StreamingLoader(data_dir, batch_size=batch_size, num_workers=workers)
    samples = payload = 0
    streaming = first_batch = 0.0
    for _ in range(epochs):
        began = time.perf_counter()
        for step, batch in enumerate(loader):
            if step == 0:
                first = time.perf_counter()
                first_batch += first - began
                continue
            samples += len(batch["key"])
            payload += sum(batch[name].nbytes for name in loader.info.specs)
        streaming += time.perf_counter() - first
    return samples / streaming, payload / streaming / 1e6, first_batch / epochs


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark and prints the numbers.

    Args:
        argv: Arguments without the program name (default: ``sys.argv``).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--source-size", default="240x320", help="HxW of the synthetic source clips")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per source clip")
    parser.add_argument("--workers", type=int, default=2, help="sharding workers of the parallel run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    work = args.out or Path(tempfile.mkdtemp(prefix="hipscale-bench-"))
    try:
        height, width = (int(n) for n in args.source_size.split("x"))
        began = time.perf_counter()
        media = make_av_dataset(work / "media", num_clips=args.clips, duration=args.duration,
                                size=(height, width), bad=())
        print(f"made {args.clips} clips of {width}x{height}, {args.duration:g} s in "
              f"{time.perf_counter() - began:.1f} s")
        results = {}
        for workers in sorted({1, args.workers}):
            config = AVShardConfig(media.manifest, media.class_index, media.videos, work / "shards", workers=workers,
                                   max_samples_per_shard=max(1, args.clips // (4 * workers)), overwrite=True)
            results[workers] = bench_sharding(config, args.clips)
        samples_per_s, mb_per_s, latency = bench_loader(work / "shards", args.batch_size, args.loader_workers,
                                                        args.epochs)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    print("sharding (8x224x224 frames + 122,880 audio samples per clip):")
    for workers, rate in results.items():
        print(f"  {workers} worker(s): {rate:6.2f} clips/s, {rate / workers:6.2f} clips/s per worker")
    print(f"loader (batch {args.batch_size}, {args.loader_workers} workers, {args.epochs} epochs): "
          f"{samples_per_s:7.1f} samples/s, {mb_per_s:7.1f} MB/s after the first batch; "
          f"first batch after {latency:.2f} s")


if __name__ == "__main__":
    main()
