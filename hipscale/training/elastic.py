"""The trainer's side of elastic training (`python -m hipscale.train --elastic`, started by
`python -m hipscale.launch.elastic` through torchrun): starts, faults, resizes and agreed stops.

Every start of the ranks has a *start id*, rank 0's random token: it prefixes the heartbeat's keys in
the rendezvous store (which torchrun's agent keeps across restarts), names the sample-key logs, and
ties faults to the start they ended. Under `<run dir>/elastic/`:

    start.json              the last start that trained a step: id, world size, hosts, accumulation
    faults/<id>-<rank>.json the moment a rank of start <id> saw the world break, and why

The next start's rank 0 reads both before its first step and, after it, prints one line: old and new
world size, the nodes, accumulation, the step resumed from, and the seconds from the fault (the
earliest of its start's fault records) to that first step.

An agreed stop (NaN guard, too many bad samples, a configuration error) must end the job for good, but
torchrun restarts every worker that exits non-zero. So under the launcher each rank writes the stop's
exit status to the node's outcome file (HIPSCALE_ELASTIC_OUTCOME, a node-local path) and exits 0; the
launcher ends with that status.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Optional

import torch.distributed as dist

OUTCOME_VARIABLE = "HIPSCALE_ELASTIC_OUTCOME"
WORLD_SIZES_VARIABLE = "HIPSCALE_ELASTIC_WORLD_SIZES"  # the launcher's node counts x ranks per node, e.g. "2,4"


def start_id() -> str:
    """Collective: rank 0's random token for this start of the ranks."""
    token = [uuid.uuid4().hex[:12] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    return token[0]


def launcher_world_sizes() -> list[int]:
    """The world sizes the elastic launcher may start (its node counts x ranks per node), if it said."""
    return [int(w) for w in os.environ.get(WORLD_SIZES_VARIABLE, "").split(",") if w]


def write_outcome(status: int, reason: str) -> bool:
    """Record an agreed stop for the launcher (every rank writes the same record); False without a launcher."""
    path = os.environ.get(OUTCOME_VARIABLE)
    if not path:
        return False
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"status": status, "reason": reason}))
    os.replace(tmp, path)
    return True


def read_outcome(path: Path) -> Optional[dict]:
    """The agreed stop recorded by the ranks ({"status", "reason"}), or None."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class StartRecords:
    """Faults and starts of one run, kept in `<run dir>/elastic/` (a folder every rank sees).

    Args:
        run_dir: the run folder.
        start: this start's id (`start_id()`).
        rank: this rank.
    """

    def __init__(self, run_dir: Path, start: str, rank: int):
        self.folder, self.start, self.rank = Path(run_dir) / "elastic", start, rank
        self.previous: Optional[dict] = None
        self.fault: Optional[dict] = None

    def record_fault(self, cause: str, at: Optional[float] = None) -> None:
        """Note that this rank saw the world of this start break at wall time `at` (default: now)."""
        faults = self.folder / "faults"
        try:
            faults.mkdir(parents=True, exist_ok=True)
            path = faults / f"{self.start}-{self.rank}.json"
            path.write_text(json.dumps({"time": time.time() if at is None else at, "rank": self.rank,
                                        "cause": cause}))
        except OSError:
            pass  # the record only feeds the next start's resize line

    def read_previous(self) -> None:
        """Rank 0, before the first step: the start that trained last and the earliest fault that ended it."""
        try:
            self.previous = json.loads((self.folder / "start.json").read_text())
        except (OSError, ValueError):
            return
        faults = []
        for path in (self.folder / "faults").glob(f"{self.previous['id']}-*.json"):
            try:
                faults.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        self.fault = min(faults, key=lambda f: f["time"]) if faults else None

    def first_step_done(self, world_size: int, hosts: list[str], accumulation: int, global_batch: int,
                        resumed_from: Optional[int]) -> Optional[dict]:
        """Rank 0, after the first step of this start: record it, drop older fault records, and describe the
        restart (None for the run's first start)."""
        nodes = sorted({host.split(" ")[0] for host in hosts})
        record = {"id": self.start, "world_size": world_size, "nodes": nodes, "accumulation": accumulation,
                  "time": time.time()}
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "start.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.folder / "start.json")
        for path in (self.folder / "faults").glob("*.json"):
            if not path.name.startswith(f"{self.start}-"):
                path.unlink(missing_ok=True)
        if self.previous is None:
            return None
        before = self.previous
        event = {"world_size_before": before["world_size"], "world_size": world_size,
                 "accumulation_before": before["accumulation"], "accumulation": accumulation,
                 "global_batch_size": global_batch, "resumed_from": resumed_from, "nodes": nodes,
                 "nodes_gone": sorted(set(before["nodes"]) - set(nodes)),
                 "nodes_new": sorted(set(nodes) - set(before["nodes"]))}
        if self.fault is not None:
            event["recovery_s"] = round(record["time"] - self.fault["time"], 1)
            event["fault"] = self.fault["cause"]
        return event


def describe_restart(event: dict) -> str:
    """The one line a restart prints (a resize when the world size changed)."""
    kind = "resize" if event["world_size"] != event["world_size_before"] else "restart"
    nodes = ", ".join(event["nodes"])
    changes = "".join(f"; {what}: {', '.join(event[key])}" for what, key in (("gone", "nodes_gone"),
                                                                            ("new", "nodes_new")) if event[key])
    line = (f"elastic {kind}: world size {event['world_size_before']} -> {event['world_size']} (nodes {nodes}"
            f"{changes}), gradient accumulation {event['accumulation_before']} -> {event['accumulation']} "
            f"(global batch {event['global_batch_size']}), resumed from step {event['resumed_from']}")
    if "recovery_s" in event:
        line += f", first step {event['recovery_s']} s after the fault ({event['fault']})"
    return line
