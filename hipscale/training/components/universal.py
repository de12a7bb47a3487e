"""Convert a complete sharded checkpoint to DeepSpeed's universal format (world-size independent)."""
from __future__ import annotations

import argparse
import shutil
import uuid
from pathlib import Path

from hipscale.training.components.checkpoint import COMPLETE, write_atomically


def convert_to_universal(tag_dir: Path) -> Path:
    """Run `ds_to_universal` on `tag_dir` once; returns `<tag_dir>/universal`.

    Safe when several converters run at once (ranks 0 of two starts of an elastic job, or two jobs): each
    writes into a folder of its own, `universal.tmp-<random>`, marks it complete and renames it to
    `universal`; a rename that finds `universal` already there lost the race and is discarded. A converter
    never deletes another one's folder; the leftovers of killed ones go with the checkpoint when it is pruned.
    """
    from deepspeed.checkpoint import ds_to_universal

    out = tag_dir / "universal"
    if (out / COMPLETE).is_file():
        return out
    tmp = tag_dir / f"universal.tmp-{uuid.uuid4().hex[:8]}"
    ds_to_universal.main(argparse.Namespace(
        input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True))
    write_atomically(tmp / COMPLETE, "universal\n")
    try:
        tmp.rename(out)
    except OSError:
        if not (out / COMPLETE).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another converter finished first: use its folder
    return out
