"""Check a shard folder against its index.json: every shard present, of the recorded size and SHA-256.

    python -m hipscale.data.verify shards/audioset-train [shards/audioset-eval ...]

Run it after copying or syncing a dataset to a cluster's file system. Prints one line per problem
(`missing`, `size`: recorded vs found, `sha256`: recorded vs found, `no sha256 recorded`) and a summary
per folder; exit status 0 when every shard checks out, 1 when any does not, 2 when a folder has no
readable index.json. A progress bar counts the bytes hashed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from hipscale.data.dataset_info import DatasetInfo
from hipscale.data.remote import is_url
from hipscale.data.shard_writer import file_sha256


def shard_problems(info: DatasetInfo, bar: Optional[tqdm] = None) -> list[str]:
    """One "<shard>: <problem>" line for every shard of `info` that is missing, of another size or hash,
    or has no recorded hash; [] when all check out. `bar` advances by each shard's recorded size."""
    problems = []
    for shard in info.shards:
        path = Path(info.root) / shard.name
        if not path.is_file():
            problems.append(f"{shard.name}: missing")
        elif path.stat().st_size != shard.bytes:
            problems.append(f"{shard.name}: size {path.stat().st_size} bytes, index.json says {shard.bytes}")
        elif not shard.sha256:
            problems.append(f"{shard.name}: no sha256 recorded (index.json written before hipscale recorded it)")
        else:
            found = file_sha256(path)
            if found != shard.sha256:
                problems.append(f"{shard.name}: sha256 {found}, index.json says {shard.sha256}")
        if bar is not None:
            bar.update(shard.bytes)
    return problems


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hipscale.data.verify", description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="shard folders (each with index.json)")
    args = parser.parse_args(argv)
    status = 0
    for folder in args.folders:
        if is_url(folder):
            print(f"{folder}: error: verify checks local copies; a URL dataset's shards are verified as the loader "
                  "downloads them", file=sys.stderr)
            status = 2
            continue
        folder = Path(folder)
        try:
            info = DatasetInfo.load(folder)
        except (OSError, ValueError) as error:
            print(f"{folder}: error: {error}", file=sys.stderr)
            status = 2
            continue
        with tqdm(total=sum(s.bytes for s in info.shards), unit="B", unit_scale=True, desc=str(folder),
                  disable=None) as bar:
            problems = shard_problems(info, bar)
        for line in problems:
            print(f"{folder}/{line}")
        print(f"{folder}: {len(info.shards) - len(problems)} of {len(info.shards)} shards check out")
        if problems and status == 0:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
