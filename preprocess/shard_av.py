#!/usr/bin/env python
"""Shard AudioSet-format clips into webdataset tar files of raw frames and audio.

Example:
    python preprocess/shard_av.py --manifest balanced_train_segments.csv \
        --class-index class_labels_indices.csv --videos clips/ --out shards/av --workers 16

Exit code 0 when every clip was written or rejected and reported in
``<out>/report.json``; 2 on bad input (a malformed manifest, a missing
directory, an output directory written with other settings).
"""
import argparse
import sys
from pathlib import Path

from hipscale.data.cli import add_output_arguments, run_sharder
from hipscale.data.sharding.clip_window import PLACEMENTS
from hipscale.data.sharding.shard_av import MODALITIES, TIMELINES, AVShardConfig, shard_av


def parse_args(argv: list[str]) -> AVShardConfig:
    """Parses the command line into a config.

    Args:
        argv: Arguments without the program name.

    Returns:
        The sharding settings.
    """
    d = AVShardConfig
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, required=True, help="AudioSet segment CSV")
    parser.add_argument("--class-index", type=Path, required=True, help="index,mid,display_name CSV")
    parser.add_argument("--videos", type=Path, required=True, help="directory of <id>.<ext> media files")
    parser.add_argument("--modalities", default=",".join(d.modalities), help=f"comma-separated subset of {MODALITIES}")
    parser.add_argument("--window-seconds", type=float, default=d.window_seconds)
    parser.add_argument("--placement", choices=PLACEMENTS, default=d.placement)
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of --placement random")
    parser.add_argument("--frames", type=int, default=d.frames)
    parser.add_argument("--height", type=int, default=d.height)
    parser.add_argument("--width", type=int, default=d.width)
    parser.add_argument("--sample-rate", type=int, default=d.sample_rate)
    parser.add_argument("--timeline", choices=TIMELINES, default=d.timeline,
                        help="segment: files hold only their segment; video: files are whole videos")
    add_output_arguments(parser, d, "clip")
    args = parser.parse_args(argv)
    options = vars(args)
    options["modalities"] = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    return AVShardConfig(**options)


if __name__ == "__main__":
    sys.exit(run_sharder(parse_args, shard_av, sys.argv[1:], "clips"))
