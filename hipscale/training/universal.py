"""Convert a complete sharded checkpoint to DeepSpeed's universal format (world-size independent)."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from hipscale.training.checkpoint import COMPLETE, write_atomically


def convert_to_universal(tag_dir: Path) -> Path:
    """Run `ds_to_universal` on `tag_dir` once; returns `<tag_dir>/universal`.

    The conversion writes into `universal.tmp` and renames it when done, so an interrupted
    conversion is redone rather than loaded.
    """
    from deepspeed.checkpoint import ds_to_universal

    out = tag_dir / "universal"
    if (out / COMPLETE).is_file():
        return out
    tmp = tag_dir / "universal.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    ds_to_universal.main(argparse.Namespace(
        input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True))
    write_atomically(tmp / COMPLETE, "universal\n")
    tmp.rename(out)
    return out
