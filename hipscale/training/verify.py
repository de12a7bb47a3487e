"""Check a run's checkpoints without starting a job: every file as it was written, none that runs code.

    python -m hipscale.training.verify runs/NAME [runs/OTHER/checkpoints runs/NAME/checkpoints/step_00001000 ...]

Takes run folders, checkpoint folders or single checkpoints. Every file of every complete checkpoint is
compared with the size and CRC-32 its COMPLETE marker recorded at save time, and every `.pt` file is opened
with torch's weights-only unpickler (a file that would run code when loaded is reported). Prints one line
per checkpoint (`ok`, or each damaged file and why) and, per checkpoint folder, the checkpoint `latest`
names and the one `--resume auto` would load (the newest that verifies, up to `latest`). Exit status 0
when every checkpoint verifies, 1 when any does not, 2 when a folder holds no complete checkpoint or cannot
be read. A progress bar counts the bytes checked. `--json` prints one document instead:
{"folders": [{"folder", "latest", "resume_auto", "checkpoints": [{"tag", "files", "bytes", "checksums",
"problems": [LINE, ...]}]} or {"folder", "error"}]}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, TextIO

from tqdm import tqdm

from hipscale.results_stdout import print_folder_reports
from hipscale.training.components.checkpoint import COMPLETE, CheckpointError, CheckpointManager
from hipscale.training.components.checkpoint_integrity import checkpoint_files, file_problems


def checkpoint_folder_of(path: Path) -> tuple[Path, Optional[str]]:
    """(checkpoint folder, one tag or None for all) of a run folder, checkpoint folder or single checkpoint."""
    if (path / COMPLETE).is_file():
        return path.parent, path.name
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    return path, None


def verify_one(folder: Path, tag: str, bar: Optional[tqdm] = None) -> dict:
    """{"tag", "files", "bytes", "checksums", "problems"} of checkpoint `tag` in `folder`."""
    marker = json.loads((folder / tag / COMPLETE).read_text())
    records = marker.get("files")
    names = sorted(records) if records is not None else checkpoint_files(folder / tag, COMPLETE)
    problems, size = [], 0
    for name in names:
        problems += file_problems(folder / tag, records, [name])
        path = folder / tag / name
        grown = path.stat().st_size if path.is_file() else 0
        size += grown
        if bar is not None:
            bar.update(grown)
    return {"tag": tag, "files": len(names), "bytes": size, "checksums": records is not None, "problems": problems}


def verify_folder(path: Path) -> dict:
    """The report of one run folder, checkpoint folder or checkpoint (see the module docstring)."""
    try:
        return _verify_folder(Path(path))
    except (OSError, ValueError) as error:  # an unreadable folder or COMPLETE
        return {"folder": str(path), "error": f"{type(error).__name__}: {error}"}


def _verify_folder(path: Path) -> dict:
    if not path.exists():
        return {"folder": str(path), "error": "does not exist"}
    folder, only = checkpoint_folder_of(path)
    manager = CheckpointManager(folder, 1, 0, 1)
    tags = [only] if only else manager.complete_tags()
    if not tags:
        return {"folder": str(folder), "error": "no complete checkpoint (step_NNNNNNNN/COMPLETE) here"}
    try:
        latest = manager.latest()
    except CheckpointError as error:
        latest, broken_latest = None, str(error)
    else:
        broken_latest = None
    total = sum(p.stat().st_size for tag in tags for p in (folder / tag).iterdir() if p.is_file())
    with tqdm(total=total, unit="B", unit_scale=True, desc=str(folder), disable=None, file=sys.stderr) as bar:
        reports = [verify_one(folder, tag, bar) for tag in tags]
    report = {"folder": str(folder), "latest": latest, "checkpoints": reports}
    if broken_latest:
        report["latest_error"] = broken_latest
    if only is None and latest is not None:
        whole = {r["tag"] for r in reports if not r["problems"]}
        report["resume_auto"] = next((t for t in manager.resume_candidates(latest) if t in whole), None)
    return report


def print_text(report: dict, out: TextIO) -> None:
    if "error" in report:
        print(f"{report['folder']}: error: {report['error']}", file=sys.stderr)
        return
    for r in report["checkpoints"]:
        where = f"{report['folder']}/{r['tag']}"
        unchecked = "" if r["checksums"] else "; no checksums recorded (saved before hipscale recorded them)"
        if not r["problems"]:
            print(f"{where}: ok ({r['files']} files, {r['bytes'] / 1e6:.1f} MB{unchecked})", file=out)
        for line in r["problems"]:
            print(f"{where}: damaged: {line}", file=out)
    if "latest_error" in report:
        print(f"{report['folder']}: error: {report['latest_error']}", file=out)
    if "resume_auto" in report:
        pick = report["resume_auto"] or "nothing (no checkpoint verifies)"
        print(f"{report['folder']}: latest names {report['latest']}; --resume auto would load {pick}", file=out)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hipscale.training.verify", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path,
                        help="run folders, checkpoint folders (<run dir>/checkpoints) or single checkpoints")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    args = parser.parse_args(argv)
    reports = print_folder_reports(args.paths, verify_folder, print_text, args.json)
    if any("error" in r for r in reports):
        return 2
    return 1 if any(c["problems"] for r in reports for c in r["checkpoints"]) or \
        any("latest_error" in r for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
