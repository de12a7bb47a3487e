#!/usr/bin/env python
"""Shard labelled images into webdataset tar files at a fixed square resolution.

Example:
    python preprocess/shard_images.py --images imagenet/train --out shards/in1k-train --size 224 --workers 16
    python preprocess/shard_images.py --images photos/ --list labels.csv --out shards/photos --encoding raw

Exit code 0 when every image was written or rejected and reported in
``<out>/report.json``; 2 on bad input.
"""
import argparse
import sys
from pathlib import Path

from hipscale.data.cli import add_output_arguments, run_sharder
from hipscale.data.sharding.shard_images import ENCODINGS, MAX_SIZE, ImageShardConfig, shard_images


def parse_args(argv: list[str]) -> ImageShardConfig:
    """Parses the command line into a config.

    Args:
        argv: Arguments without the program name.

    Returns:
        The sharding settings.
    """
    d = ImageShardConfig
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True,
                        help="ImageFolder root (one sub-directory per class), or the base of --list paths")
    parser.add_argument("--list", dest="list_file", type=Path, default=None, help="CSV with the header path,label")
    parser.add_argument("--size", type=int, default=d.size, help=f"side of the square images, up to {MAX_SIZE}")
    parser.add_argument("--encoding", choices=ENCODINGS, default=d.encoding)
    parser.add_argument("--shuffle-seed", type=int, default=d.shuffle_seed,
                        help="seed of the image order across shards (default %(default)s)")
    parser.add_argument("--keep-order", dest="shuffle_seed", action="store_const", const=None,
                        help="shard in the listed order (class by class for an ImageFolder)")
    parser.add_argument("--quality", type=int, default=d.quality, help="JPEG quality")
    add_output_arguments(parser, d, "image")
    return ImageShardConfig(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(run_sharder(parse_args, shard_images, sys.argv[1:], "images"))
