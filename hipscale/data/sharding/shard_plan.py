"""A dataset's sharding plan: fixed once, then worked in units by any number of machines, then finished.

    plan    once: a sharder lists its input, rejects what it can early, and fixes every shard's items and
            fingerprint (``preprocess/shard_*.py ... --plan-units N``);
    work    any number of times, anywhere, also twice at once: builds the missing shards of some units
            (``python -m hipscale.data.shard_job work``);
    finish  once, after the work: checks every planned shard and writes report.json, then index.json.

A unit is a run of consecutive shards (unit ``u`` holds shards ``[u * k, (u + 1) * k)``), the grain an
engine hands out: a SLURM array task, a Ray task. The plan lives next to the shards, so every machine that
can write the output can read it: ``plan.json`` (the sharder, its settings, the dataset description, the
early rejections, every shard's name, fingerprint and item count) and ``plan/unit-NNNNNN.json`` (the items
of one unit's shards; a worker reads only its own).
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hipscale.data.errors import InputError
from hipscale.data.format.dataset_info import DatasetInfo
from hipscale.data.sharding.shard_writer import Rejection, ShardJob

PLAN_FILE = "plan.json"
UNITS_DIR = "plan"
PLAN_FORMAT = 1


@dataclass(frozen=True)
class DatasetPlan:
    """Every shard of a dataset and how to build it.

    Attributes:
        sharder: Which sharder's encoder builds the items (``"images"``, ``"av"``).
        config: That sharder's settings, as JSON values (see :func:`config_from_json`).
        info: The dataset description without its shards (known only once they are built).
        jobs: Every shard, in order. A plan loaded for some units holds the items of those units' shards
            only (the others' ``items`` are empty).
        item_counts: Items planned into each shard.
        early: Items rejected while listing (duplicate ids, unknown labels, ...).
        shards_per_unit: k, consecutive shards per unit.
    """

    sharder: str
    config: dict[str, Any]
    info: DatasetInfo
    jobs: tuple[ShardJob, ...]
    item_counts: tuple[int, ...]
    early: tuple[Rejection, ...]
    shards_per_unit: int

    @property
    def num_units(self) -> int:
        return math.ceil(len(self.jobs) / self.shards_per_unit)

    def unit_of(self, shard_index: int) -> int:
        return shard_index // self.shards_per_unit

    def unfinished_units(self, complete_shards: Sequence[int]) -> list[int]:
        """The units holding a shard not in `complete_shards` (indices), in order."""
        return sorted({self.unit_of(i) for i in set(range(len(self.jobs))) - set(complete_shards)})

    def unit_jobs(self, unit: int) -> tuple[ShardJob, ...]:
        """The shards of unit `unit`."""
        return self.jobs[unit * self.shards_per_unit:(unit + 1) * self.shards_per_unit]

    def header(self) -> dict[str, Any]:
        """The content of ``plan.json``."""
        return {"format": PLAN_FORMAT, "sharder": self.sharder, "config": self.config, "info": self.info.to_json(),
                "early": [dataclasses.asdict(r) for r in self.early], "shards_per_unit": self.shards_per_unit,
                "shards": [[job.name, job.fingerprint, count] for job, count in zip(self.jobs, self.item_counts)]}

    def unit_content(self, unit: int) -> dict[str, Any]:
        """The content of ``plan/unit-NNNNNN.json``: the items of each of the unit's shards."""
        return {"unit": unit, "shards": {job.name: [dataclasses.asdict(item) for item in job.items]
                                         for job in self.unit_jobs(unit)}}


def make_plan(sharder: str, config: Any, info: DatasetInfo, jobs: Sequence[ShardJob], early: Sequence[Rejection],
              units: Optional[int] = None) -> DatasetPlan:
    """The plan of `jobs`, cut into `units` units (None: one unit per shard)."""
    if units is not None and units < 1:
        raise InputError(f"--plan-units must be >= 1, got {units}")
    per_unit = max(1, math.ceil(len(jobs) / units)) if units else 1
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return DatasetPlan(sharder, json.loads(json.dumps(fields, default=str)), info, tuple(jobs),
                       tuple(len(job.items) for job in jobs), tuple(early), per_unit)


def unit_file(unit: int) -> str:
    return f"{UNITS_DIR}/unit-{unit:06d}.json"


def plan_from_json(header: dict[str, Any], units: dict[int, dict[str, Any]], item_type: type,
                   where: str) -> DatasetPlan:
    """A plan from ``plan.json`` and the unit files read so far (`units`: unit -> content).

    Raises:
        InputError: If ``plan.json`` is of another format.
    """
    if header.get("format") != PLAN_FORMAT:
        raise InputError(f"{where}: not a hipscale sharding plan of format {PLAN_FORMAT}")
    items = {name: tuple(_dataclass_from_json(item_type, item) for item in listed)
             for content in units.values() for name, listed in content["shards"].items()}
    jobs = tuple(ShardJob(name, items.get(name, ()), fingerprint) for name, fingerprint, _ in header["shards"])
    info = DatasetInfo.from_json(header["info"], where)
    return DatasetPlan(header["sharder"], header["config"], info, jobs,
                       tuple(count for _, _, count in header["shards"]),
                       tuple(Rejection(**r) for r in header["early"]), int(header["shards_per_unit"]))


def config_from_json(config_type: type, fields: dict[str, Any]) -> Any:
    """A sharder config from :attr:`DatasetPlan.config` (paths and tuples restored)."""
    return _dataclass_from_json(config_type, fields)


def parse_units(text: str, num_units: int) -> list[int]:
    """``"3"``, ``"0..7"`` (both ends included) or ``"1,4,9..11"`` -> the unit numbers.

    Raises:
        InputError: On bad syntax or a unit outside ``0..num_units - 1``.
    """
    units: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("..")
            units.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        raise InputError(f"--units {text!r}: expected N, I..J or a comma-separated list of those") from None
    outside = [u for u in units if not 0 <= u < num_units]
    if outside or not units:
        raise InputError(f"--units {text!r}: the plan has units 0..{num_units - 1}")
    return sorted(set(units))


def _dataclass_from_json(cls: type, fields: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)

    def restore(name: str, value: Any) -> Any:
        if isinstance(value, list):
            return tuple(value)
        if isinstance(value, str) and hints.get(name) in (Path, Optional[Path]):
            return Path(value)
        return value

    return cls(**{name: restore(name, value) for name, value in fields.items()})
