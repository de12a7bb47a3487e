#!/usr/bin/env python
"""Shard AudioSet-format clips into webdataset tar files of raw frames and audio.

Example:
    python preprocess/shard_av.py --manifest balanced_train_segments.csv \
        --class-index class_labels_indices.csv --videos clips/ --out shards/av --workers 16

Exit code 0 when every clip was written or rejected and reported in
``<out>/report.json``; 2 on bad input (a malformed manifest, a missing
directory, an output directory written with other settings).
"""
import sys
from functools import partial

from hipscale.data.cli import parse_av_args, run_sharder
from hipscale.data.sharding.shard_av import shard_av

if __name__ == "__main__":
    sys.exit(run_sharder(partial(parse_av_args, description=__doc__), shard_av, sys.argv[1:], "clips"))
