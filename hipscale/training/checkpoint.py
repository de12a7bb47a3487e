"""Sharded DeepSpeed checkpoints that are either complete or ignored.

Layout under the checkpoint folder:
    step_00000100/            DeepSpeed's files (model, ZeRO shards) of step 100
        rank_00000.pt         per-rank client state: RNG states, data-stream position
        COMPLETE              written by rank 0 after every rank finished writing
    latest                    tag of the newest complete checkpoint (written after COMPLETE)

A crash while saving leaves a folder without COMPLETE; `latest` still names the previous
complete checkpoint, and `--resume auto` skips folders without COMPLETE. The next save
deletes such leftovers along with complete checkpoints older than the newest `keep_last`.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a synced temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    """

    def __init__(self, directory: Path, keep_last: int, rank: int, world_size: int):
        self.directory, self.keep_last, self.rank, self.world_size = Path(directory), keep_last, rank, world_size

    def complete_tags(self) -> list[str]:
        """Tags of complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        tags = [p.name for p in self.directory.iterdir() if _TAG.match(p.name) and (p / COMPLETE).is_file()]
        return sorted(tags)

    def latest_complete(self) -> Optional[str]:
        tags = self.complete_tags()
        return tags[-1] if tags else None

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
        engine.save_checkpoint(str(self.directory), tag=folder.name, client_state=client_state, save_latest=False)
        state = dict(rank_state, rng=rng_state(), world_size=self.world_size)
        path = folder / f"rank_{self.rank:05d}.pt"
        torch.save(state, path.with_name(path.name + ".tmp"))
        os.replace(path.with_name(path.name + ".tmp"), path)
        return folder

    def commit(self, step: int) -> None:
        """Once every rank has written (barrier): mark `step` complete, point `latest` at it, prune (collective)."""
        folder = self.directory / tag_for(step)
        dist.barrier()
        if self.rank == 0:
            write_atomically(folder / COMPLETE, json.dumps({"step": step, "world_size": self.world_size}))
            write_atomically(self.directory / "latest", folder.name)
            self._prune(keep=set(self.complete_tags()[-self.keep_last:]))
        dist.barrier()

    def _prune(self, keep: set[str]) -> None:
        for p in self.directory.iterdir():
            if _TAG.match(p.name) and p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)

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
        marker = json.loads((self.directory / tag / COMPLETE).read_text())
        same = marker["world_size"] == self.world_size
        rank_state = torch.load(self.directory / tag / f"rank_{self.rank if same else 0:05d}.pt", weights_only=False)
        if same:
            set_rng_state(rank_state["rng"])
        return client_state, rank_state, same
