"""Check a shard folder against its index.json: every shard present, of the recorded size and SHA-256, and
its first sample decoding as the loader decodes it.

    python -m hipscale.data.verify shards/audioset-train [shards/audioset-eval ...]

Run it after copying or syncing a dataset to a cluster's file system. Prints one line per problem
(`missing`, `size`: recorded vs found, `sha256`: recorded vs found, `no sha256 recorded`, `first sample KEY`:
why it does not decode; compressed clips at their centre window, H.264 and FLAC decoded) and a summary
per folder; exit status 0 when every shard checks out, 1 when any does not, 2 when a folder has no
readable index.json. A progress bar counts the bytes hashed. `--json` prints one document instead:
{"folders": [{"folder", "shards", "problems": [LINE, ...]} or {"folder", "error"}]}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, TextIO

from tqdm import tqdm

from hipscale.data.format.dataset_info import DatasetInfo
from hipscale.data.format.keys import every_sample
from hipscale.data.format.samples import SampleError, decode_sample
from hipscale.data.sharding.shard_writer import file_sha256
from hipscale.data.storage.remote import is_url
from hipscale.data.storage.shard_store import load_dataset_info
from hipscale.results_stdout import print_folder_reports


def shard_problems(info: DatasetInfo, bar: Optional[tqdm] = None) -> list[str]:
    """One "<shard>: <problem>" line for every shard of `info` that is missing, of another size or hash,
    has no recorded hash, or whose first sample (if it has one) does not decode; [] when all check out. `bar` advances by
    each shard's recorded size."""
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
            elif shard.samples:
                problems += _first_sample_problems(path, info)
        if bar is not None:
            bar.update(shard.bytes)
    return problems


def _first_sample_problems(path: Path, info: DatasetInfo) -> list[str]:
    """[] when the shard's first sample decodes (the centre window of a compressed clip), else why not."""
    try:
        with open(path, "rb") as stream:
            samples = every_sample(stream, path.name)
            first = next(samples, None)
            samples.close()
        if first is None:
            return [f"{path.name}: no sample in the tar"]
        decode_sample(*first, info)
    except ValueError as error:  # not a readable tar: the message names it
        return [str(error)]
    except SampleError as error:
        return [f"{path.name}: first sample {first[0]}: {error}"]
    return []


def verify_folder(folder: str) -> dict:
    """{"folder", "shards", "problems": [...]} of one shard folder, or {"folder", "error"} when it cannot be checked."""
    if is_url(folder):
        return {"folder": folder, "error": "verify checks local copies; a URL dataset's shards are verified as the "
                                           "loader downloads them"}
    folder = str(Path(folder))
    try:
        info = load_dataset_info(Path(folder))
    except (OSError, ValueError) as error:
        return {"folder": folder, "error": str(error)}
    with tqdm(total=sum(s.bytes for s in info.shards), unit="B", unit_scale=True, desc=folder, disable=None) as bar:
        problems = shard_problems(info, bar)
    return {"folder": folder, "shards": len(info.shards), "problems": problems}


def print_text(report: dict, out: TextIO) -> None:
    if "error" in report:
        print(f"{report['folder']}: error: {report['error']}", file=sys.stderr)
        return
    for line in report["problems"]:
        print(f"{report['folder']}/{line}", file=out)
    print(f"{report['folder']}: {report['shards'] - len(report['problems'])} of {report['shards']} shards check out",
          file=out)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hipscale.data.verify", description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="shard folders (each with index.json)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    args = parser.parse_args(argv)
    reports = print_folder_reports(args.folders, verify_folder, print_text, args.json)
    if any("error" in r for r in reports):
        return 2
    return 1 if any(r["problems"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
