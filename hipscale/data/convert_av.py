"""Video tars written by other tools, converted into our shards in one command.

    python -m hipscale.data.convert_av /data/v2d --label json:label --unpack-to /scratch/v2d-media \
        --out /data/shards/v2d [any preprocess/shard_av.py option: --workers 32, --plan-units 64, ...]

Unpacks every sample (:mod:`hipscale.data.sharding.unpack`: ``K.mp4`` [+ ``K.m4a``/``K.wav``] + ``K.json``)
into ``--unpack-to`` (media, ``manifest.csv``, ``class_index.csv``; keep it, or delete it once the shards are
finished), then shards it exactly as ``preprocess/shard_av.py --manifest ... --class-index ... --videos ...``
with the remaining options (with ``--plan-units`` the unpacked folder must be reachable by every worker).
Exit status: the sharder's (0 done, 2 bad input).
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Optional

from hipscale.data.cli import parse_av_args, run_sharder
from hipscale.data.errors import InputError
from hipscale.data.sharding.shard_av import shard_av
from hipscale.data.sharding.unpack import unpack_av


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hipscale.data.convert_av", description=__doc__.splitlines()[0],
                                     epilog="Other options go to preprocess/shard_av.py (--out is required).")
    parser.add_argument("source", help="folder or s3:// / gs:// prefix holding the .tar files")
    parser.add_argument("--label", required=True, help="json:FIELD: a class name or index, or a list of them")
    parser.add_argument("--unpack-to", type=Path, required=True, help="folder for the unpacked media and CSVs")
    args, sharder_options = parser.parse_known_args(argv)
    try:
        unpacked = unpack_av(args.source, args.unpack_to, args.label)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    left_out = f"; left out {dict(unpacked.left_out)}" if unpacked.left_out else ""
    print(f"unpacked {unpacked.clips} clips to {args.unpack_to}{left_out}", file=sys.stderr)
    inputs = ["--manifest", str(unpacked.manifest), "--class-index", str(unpacked.class_index),
              "--videos", str(unpacked.videos)]
    return run_sharder(partial(parse_av_args, description=__doc__), shard_av, inputs + sharder_options, "clips")


if __name__ == "__main__":
    sys.exit(main())
