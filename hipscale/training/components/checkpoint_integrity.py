"""Whether a checkpoint can be trusted to load: every file as it was written, and no pickled code.

A checkpoint complete when it was written can be damaged later: a partial copy to another cluster or
bucket, a bad disk, a file replaced by hand. So at save time every rank records the size and CRC-32 of
the files it wrote (ISA-L's CRC-32, about 8 GB/s on one core, reading back from the page cache the write
just filled, while the checkpoint is being fsynced), and rank 0 stores the records in the checkpoint's
COMPLETE marker. Before a load the files are checked against them.

The same check opens every `.pt` file with torch's weights-only unpickler, which builds tensors, plain
containers and the few classes listed in `safe_globals()` and nothing else. DeepSpeed's own loaders
unpickle with `weights_only=False` (any object, so any code); a file that fails the weights-only load is
refused before they see it.
"""
from __future__ import annotations

import mmap
import pickle
import re
from pathlib import Path
from typing import Iterable, Optional

import torch
from isal.isal_zlib import crc32

# DeepSpeed's files (one per data-parallel rank) and ours (rank_NNNNN.pt) name the rank that writes them.
_RANK_IN_NAME = (re.compile(r"(?:^|_)zero_pp_rank_(\d+)_"), re.compile(r"^rank_(\d+)\.pt$"))


def writer_rank(name: str, world_size: int) -> int:
    """The rank that writes checkpoint file `name` (rank 0 for the files no rank number names)."""
    for pattern in _RANK_IN_NAME:
        found = pattern.search(name)
        if found and int(found.group(1)) < world_size:
            return int(found.group(1))
    return 0


def checkpoint_files(folder: Path, marker: str) -> list[str]:
    """The file names a checkpoint folder holds at its top level, `marker` (COMPLETE) left out; folders made
    after the save (`universal/`) are not part of it."""
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file() and p.name != marker)


def file_record(path: Path) -> dict:
    """{"bytes": size, "crc32": 8 hex digits} of a file."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            return {"bytes": 0, "crc32": f"{crc32(b''):08x}"}
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return {"bytes": size, "crc32": f"{crc32(view):08x}"}


def record_files(folder: Path, names: Iterable[str]) -> dict[str, dict]:
    """file_record of each named file of `folder`."""
    return {name: file_record(Path(folder) / name) for name in names}


def safe_globals() -> list:
    """The classes and functions our checkpoint files pickle besides tensors and plain containers: NumPy's
    array reconstruction (the NumPy RNG state in rank_NNNNN.pt) and DeepSpeed's ZeRO stage enum, loss scalers
    and tensor-fragment addresses (its optimizer states). None of them runs code from the file."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # NumPy 2 / 1
    allowed: list = [np.ndarray, np.dtype, multiarray._reconstruct, type(np.dtype(np.uint32))]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # without DeepSpeed: our own files and exports only
        return allowed
    return allowed + [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load_weights_only(path: Path, mmap: bool = False) -> object:
    """torch.load of a checkpoint file with the weights-only unpickler and `safe_globals()` (on the CPU; `mmap`:
    tensors memory-mapped, read when used)."""
    with torch.serialization.safe_globals(safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def unpickling_problem(path: Path) -> Optional[str]:
    """Why `path` cannot be loaded without running code it carries (None: it can). Tensors are memory-mapped,
    not read: this costs the pickle's size, not the file's."""
    try:
        load_weights_only(path, mmap=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)|Unsupported operand \d+|Trying to call .*", str(error))
        what = found.group(0) if found else str(error).strip().splitlines()[0][:200]
        return (f"holds a pickled object that would run code when loaded ({what}); hipscale loads checkpoint "
                f"files only with torch's weights-only unpickler")
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file: report it, whatever the reader raised
        return f"unreadable ({type(error).__name__}: {str(error).strip().splitlines()[0][:200]})"
    return None


def file_problems(folder: Path, records: Optional[dict[str, dict]], names: Iterable[str]) -> list[str]:
    """One "<file>: <problem>" line for each named file of the checkpoint `folder` that is missing, of another
    size or CRC-32 than `records` (None: written before hipscale recorded them; not compared), or cannot be
    unpickled without running code."""
    problems = []
    for name in names:
        path = Path(folder) / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        if records is not None:
            expected, found = records[name], path.stat().st_size
            if found != expected["bytes"]:
                problems.append(f"{name}: {found} bytes, {expected['bytes']} when it was written")
                continue
            crc = file_record(path)["crc32"]
            if crc != expected["crc32"]:
                problems.append(f"{name}: CRC-32 {crc}, {expected['crc32']} when it was written")
                continue
        if name.endswith(".pt"):
            problem = unpickling_problem(path)
            if problem:
                problems.append(f"{name}: {problem}")
    return problems


def verify_checkpoint(folder: Path, records: Optional[dict[str, dict]], marker: str) -> list[str]:
    """file_problems of every file of a checkpoint (in one process): those `records` name, else those there."""
    names = sorted(records) if records is not None else checkpoint_files(folder, marker)
    return file_problems(folder, records, names)
