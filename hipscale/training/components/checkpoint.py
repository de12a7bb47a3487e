"""Sharded DeepSpeed checkpoints that are either complete and durable, or ignored.

Layout under the checkpoint folder (one folder shared by every rank):
    step_00000100/            DeepSpeed's files (model, ZeRO shards) of step 100
        rank_00000.pt         per-rank client state: RNG states, data-stream position
        COMPLETE              written by rank 0 after every rank wrote and fsynced its files: step,
                              world size, global batch, and the size and CRC-32 of every file
    latest                    tag of the checkpoint to resume from (written after COMPLETE)

The save protocol: every rank writes its files, then fsyncs every file and folder of the
checkpoint while it computes the CRC-32 of the files it wrote; rank 0 gathers the records and
writes COMPLETE, then `latest` (each through a synced temporary file, a rename and a synced
folder), then prunes. A SIGKILL or a node crash at any moment leaves `latest` on a complete
checkpoint whose files are on disk. `--resume auto` follows `latest`, so after a rollback
(resuming an older checkpoint) the abandoned run's newer checkpoints are never picked; the next
save deletes them, and leftovers of crashed saves. Before a load every file is checked against
COMPLETE's records and opened with the weights-only unpickler
(`hipscale.training.components.checkpoint_integrity`); `--resume auto` passes over a damaged
checkpoint to the newest one that verifies.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from hipscale.training.components.checkpoint_integrity import (checkpoint_files, file_problems, load_weights_only,
                                                               record_files, writer_rank)
from hipscale.training.components.disk import writing
from hipscale.training.components.universal_zero3 import restore_zero3_optimizer_groups

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(_TAG.match(tag).group(1))


class CheckpointError(RuntimeError):
    """The checkpoint folder is not in a state a run can resume from."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint's files differ from what was written, or would run code when unpickled."""


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's (its entries') data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, and `folder` itself."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` durably: a synced temporary file, a rename, a synced folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) RNG states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves, prunes, finds and loads checkpoints of one DeepSpeed engine.

    Args:
        directory: the checkpoint folder (shared by all ranks).
        keep_last: complete checkpoints to keep.
        rank, world_size: this process's global rank and the world size.
        checksums: record every file's size and CRC-32 in COMPLETE at save time (loads verify what is recorded).
    """

    def __init__(self, directory: Path, keep_last: int, rank: int, world_size: int, checksums: bool = True):
        self.directory, self.keep_last, self.rank, self.world_size = Path(directory), keep_last, rank, world_size
        self.checksums = checksums

    def complete_tags(self) -> list[str]:
        """Tags of complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        tags = [p.name for p in self.directory.iterdir() if _TAG.match(p.name) and (p / COMPLETE).is_file()]
        return sorted(tags)

    def latest(self) -> Optional[str]:
        """The tag `latest` names (or, before any `latest` was written, the newest complete tag); None if none.

        Raises:
            CheckpointError: `latest` names a folder that is not a complete checkpoint.
        """
        path = self.directory / "latest"
        if not path.is_file():
            tags = self.complete_tags()
            return tags[-1] if tags else None
        tag = path.read_text().strip()
        if not (_TAG.match(tag) and (self.directory / tag / COMPLETE).is_file()):
            raise CheckpointError(f"{path} names {tag!r}, which is not a complete checkpoint in {self.directory}")
        return tag

    def check_shared(self, timeout_s: float = 10.0) -> list[str]:
        """Collective: prove every rank sees this folder as one shared folder.

        Rank 0 writes a probe file with a random token; every rank must read it back (waiting up to
        `timeout_s` for a network filesystem's caches).

        Returns:
            "rank R on HOST" for every rank that does not see rank 0's probe (empty: all do).
        """
        token = [uuid.uuid4().hex if self.rank == 0 else None]
        dist.broadcast_object_list(token, src=0)
        probe = self.directory / f".shared-probe-{token[0]}"
        if self.rank == 0:
            write_atomically(probe, token[0])
        dist.barrier()
        deadline = time.monotonic() + timeout_s
        while not (seen := _reads(probe, token[0])) and time.monotonic() < deadline:
            time.sleep(0.2)
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, (self.rank, socket.gethostname(), seen))
        if self.rank == 0:
            probe.unlink()
        return [f"rank {r} on {host}" for r, host, ok in everyone if not ok]

    def write(self, engine: Any, step: int, client_state: dict, rank_state: dict) -> Path:
        """Write this rank's part of the checkpoint of `step` (collective); not yet complete.

        Args:
            engine: the DeepSpeed engine.
            step: completed optimizer steps.
            client_state: stored once with DeepSpeed's model states (resolved config, step).
            rank_state: stored per rank (data position); RNG states are added here.
        """
        folder = self.directory / tag_for(step)
        if self.rank == 0 and folder.exists():  # a leftover of a crashed save of the same step
            shutil.rmtree(folder)
        dist.barrier()
        with writing(folder, f"the checkpoint of step {step}"):
            engine.save_checkpoint(str(self.directory), tag=folder.name, client_state=client_state,
                                   save_latest=False)
            state = dict(rank_state, rng=rng_state(), world_size=self.world_size)
            path = folder / f"rank_{self.rank:05d}.pt"
            torch.save(state, path.with_name(path.name + ".tmp"))
            os.replace(path.with_name(path.name + ".tmp"), path)
        return folder

    def commit(self, step: int, global_batch: int, after: Callable[[str], None] = lambda stage: None) -> list[str]:
        """Make `step` durable and current (collective): fsync and checksum, COMPLETE, `latest`, prune.

        Args:
            global_batch: samples per optimizer step (G), recorded in COMPLETE with the step and world size.
            after: called on rank 0 after "complete" and after "latest" were written (fault injection).

        Returns:
            On rank 0, the tags pruned with a step above `step`: checkpoints of an abandoned run.
        """
        folder = self.directory / tag_for(step)
        what = f"the checkpoint of step {step}"
        dist.barrier()  # every rank's files are in place
        with writing(folder, what):
            mine = [name for name in checkpoint_files(folder, COMPLETE) if writer_rank(name, self.world_size) == self.rank]
            with ThreadPoolExecutor(1) as pool:  # the CRC (GIL released) reads the page cache while fsync waits
                records = pool.submit(record_files, folder, mine if self.checksums else [])
                fsync_tree(folder)
                records = records.result()
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, records)  # ... and every rank's files are on stable storage
        abandoned = []
        if self.rank == 0:
            marker = {"step": step, "world_size": self.world_size, "global_batch_size": global_batch}
            if self.checksums:
                marker["files"] = dict(sorted((k, v) for part in everyone for k, v in part.items()))
            with writing(folder, what):
                write_atomically(folder / COMPLETE, json.dumps(marker))
            after("complete")
            with writing(self.directory, "the checkpoint folder's `latest`"):
                write_atomically(self.directory / "latest", folder.name)
            after("latest")
            abandoned = self._prune(step)
        dist.barrier()
        return abandoned

    def _prune(self, step: int) -> list[str]:
        """Keep the newest keep_last complete checkpoints up to `step`; delete every other step folder."""
        keep = {t for t in self.complete_tags() if step_of(t) <= step}
        keep = set(sorted(keep)[-self.keep_last:])
        doomed = [p for p in self.directory.iterdir() if _TAG.match(p.name) and p.name not in keep]
        for p in doomed:
            shutil.rmtree(p, ignore_errors=True)
        fsync_path(self.directory)
        return sorted(p.name for p in doomed if step_of(p.name) > step)

    def marker(self, tag: str) -> dict:
        """What COMPLETE of checkpoint `tag` records: "step", "world_size", "global_batch_size" (not in
        checkpoints written before the global batch rule) and "files" (not in those written before checksums)."""
        return json.loads((self.directory / tag / COMPLETE).read_text())

    def resume_candidates(self, latest: str) -> list[str]:
        """Complete checkpoints `--resume auto` may load, newest first: `latest`, then the older ones."""
        return sorted((t for t in self.complete_tags() if step_of(t) <= step_of(latest)), reverse=True)

    def verify(self, tag: str) -> list[str]:
        """Collective: "<file>: <problem>" for every file of checkpoint `tag` that differs from its record in
        COMPLETE or would run code when unpickled ([]: it verifies), the same list on every rank. The ranks
        check a share of the files each."""
        records = self.marker(tag).get("files")
        names = sorted(records) if records is not None else checkpoint_files(self.directory / tag, COMPLETE)
        mine = file_problems(self.directory / tag, records, names[self.rank::self.world_size])
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        return sorted(problem for part in everyone for problem in part)

    def load(self, engine: Any, tag: str, universal: bool) -> tuple[dict, dict, bool]:
        """Load checkpoint `tag` into `engine` and restore this rank's RNG states when the world size matches.

        Args:
            universal: load `<tag>/universal` (made by `convert_to_universal`) through DeepSpeed's
                universal path, which allows a different world size.

        Returns:
            (client_state, rank_state, same_world_size); with another world size rank_state is rank 0's
            (its data position; the loader re-splits the rest of the epoch) and RNG states are not restored.
        """
        load_dir, load_tag = (self.directory / tag, "universal") if universal else (self.directory, tag)
        path, client_state = engine.load_checkpoint(str(load_dir), tag=load_tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"checkpoint {load_dir / load_tag} could not be loaded")
        if universal and engine.zero_optimization_stage() == 3:
            restore_zero3_optimizer_groups(engine, load_dir / load_tag)
        same = self.marker(tag)["world_size"] == self.world_size
        rank_state = load_weights_only(self.directory / tag / f"rank_{self.rank if same else 0:05d}.pt")
        if same:
            set_rng_state(rank_state["rng"])
        return client_state, rank_state, same


def _reads(path: Path, text: str) -> bool:
    try:
        return path.read_text() == text
    except OSError:
        return False
