"""What the sharding command lines share: output options, run, report, exit code."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

from hipscale.data.errors import InputError
from hipscale.data.sharding.clip_window import PLACEMENTS
from hipscale.data.sharding.shard_av import ENCODINGS, MODALITIES, TIMELINES, AVShardConfig

AV_DESCRIPTION = "Shard AudioSet-format clips into webdataset tar files of raw frames and audio."


def add_output_arguments(parser: argparse.ArgumentParser, defaults: Any, unit: str) -> None:
    """Adds the options of where and how shards are written (--out, --staging, --workers, limits, ...).

    Args:
        parser: The sharder's parser.
        defaults: Its config class (defaults of the shard limits and the timeout).
        unit: What one item is called in the help ("clip", "image").
    """
    parser.add_argument("--out", required=True,
                        help="output folder, or an s3:// or gs:// URL (credentials and endpoint from the standard "
                             "environment, e.g. AWS_ENDPOINT_URL)")
    parser.add_argument("--staging", default=None,
                        help="local folder for shards before their upload to a URL --out "
                             "(default: <temp dir>/hipscale-staging/<dataset>)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes (default: all cores)")
    parser.add_argument("--max-samples-per-shard", type=int, default=defaults.max_samples_per_shard)
    parser.add_argument("--max-shard-bytes", type=int, default=defaults.max_shard_bytes)
    parser.add_argument("--item-timeout", dest="item_timeout_s", type=float, default=defaults.item_timeout_s,
                        help=f"seconds one {unit} may take to decode; past it the {unit} is rejected as timeout")
    parser.add_argument("--overwrite", action="store_true", help="delete earlier output instead of resuming")
    parser.add_argument("--plan-units", type=int, default=None, metavar="N",
                        help="only write the plan (OUT/plan.json) in N units, for `python -m hipscale.data.shard_job "
                             "work --plan OUT --units I..J` on many machines, then `... finish --plan OUT`")


def run_sharder(parse_args: Callable[[list[str]], Any], shard: Callable[[Any], dict], argv: list[str],
                noun: str) -> int:
    """Parses `argv`, shards, prints a one-line summary.

    Args:
        parse_args: Turns the arguments into a sharding config (with an `out` directory).
        shard: Runs the sharder on that config and returns the content of report.json.
        argv: Arguments without the program name.
        noun: What the items are called in the summary ("clips", "images").

    Returns:
        The exit code: 0 when every item was written or rejected and reported, 2 on bad input.
    """
    try:
        config = parse_args(argv)
        report = shard(config)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if "planned" in report:
        print(f"planned {report['items']} {noun} in {report['planned']} shards, {report['units']} units, to "
              f"{config.out}/plan.json ({report['rejected']} rejected while listing); next: python -m "
              f"hipscale.data.shard_job work --plan {config.out} --units 0..{report['units'] - 1} (then finish), "
              f"launchers/shard_slurm.sh or python -m hipscale.data.shard_ray --plan {config.out}")
        return 0
    print(f"wrote {report['written']} {noun} to {config.out}; rejected {report['rejected']} "
          f"{report['by_reason']} (see report.json)")
    return 0


def parse_av_args(argv: list[str], description: str = AV_DESCRIPTION) -> AVShardConfig:
    """Parses the command line into a config.

    Args:
        argv: Arguments without the program name.

    Returns:
        The sharding settings.
    """
    d = AVShardConfig
    parser = argparse.ArgumentParser(prog="preprocess/shard_av.py", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, required=True, help="AudioSet segment CSV")
    parser.add_argument("--class-index", type=Path, required=True, help="index,mid,display_name CSV")
    parser.add_argument("--videos", type=Path, required=True, help="directory of <id>.<ext> media files")
    parser.add_argument("--modalities", default=",".join(d.modalities), help=f"comma-separated subset of {MODALITIES}")
    parser.add_argument("--encoding", choices=ENCODINGS, default=d.encoding,
                        help="raw: one window per clip as raw frames and samples; compressed: the clip's whole "
                             "span as H.264 (frame size and rate of the window) + FLAC, a fresh window decoded "
                             "by the loader every epoch (default: %(default)s)")
    parser.add_argument("--crf", dest="video_crf", type=int, default=d.video_crf,
                        help="--encoding compressed: libx264's constant rate factor, 0-51; lower is larger and "
                             "closer to the raw frames (default: %(default)s)")
    parser.add_argument("--window-seconds", type=float, default=d.window_seconds,
                        help="window length in seconds (default: %(default)s)")
    parser.add_argument("--placement", choices=PLACEMENTS, default=d.placement,
                        help="where the window of a raw clip lies in its segment (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of --placement random (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=d.frames,
                        help="frames T per window, evenly spaced (default: %(default)s)")
    parser.add_argument("--height", type=int, default=d.height, help="frame height (default: %(default)s)")
    parser.add_argument("--width", type=int, default=d.width, help="frame width (default: %(default)s)")
    parser.add_argument("--sample-rate", type=int, default=d.sample_rate,
                        help="audio sample rate in Hz, mono (default: %(default)s)")
    parser.add_argument("--timeline", choices=TIMELINES, default=d.timeline,
                        help="segment: files hold only their segment; video: files are whole videos")
    add_output_arguments(parser, d, "clip")
    args = parser.parse_args(argv)
    options = vars(args)
    options["modalities"] = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    return AVShardConfig(**options)
