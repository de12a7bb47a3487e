"""What changed between the dataset a loader position was saved on and the one read now.

Listings come from :meth:`hipscale.data.loading.loader.StreamingLoader.dataset_listing`: per source its
location, weight and shards as ``[name, samples, sha256 prefix]``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence


def _names(shards: Sequence[Sequence[Any]], limit: int = 3) -> str:
    shown = ", ".join(str(s[0]) for s in shards[:limit])
    return shown + (f" and {len(shards) - limit} more" if len(shards) > limit else "")


def _source_change(before: dict, after: dict) -> Optional[str]:
    old = {s[0]: s for s in before["shards"]}
    new = {s[0]: s for s in after["shards"]}
    added = [new[n] for n in new if n not in old]
    removed = [old[n] for n in old if n not in new]
    rewritten = [new[n] for n in new if n in old and list(new[n][1:]) != list(old[n][1:])]
    parts = [f"{len(shards)} shard{'s' if len(shards) != 1 else ''} {verb} ({_names(shards)})"
             for shards, verb in ((added, "added"), (removed, "removed"), (rewritten, "rewritten"))
             if shards]
    if before.get("weight") != after.get("weight"):
        parts.append(f"weight {before.get('weight')} -> {after.get('weight')}")
    if not parts and [s[0] for s in before["shards"]] != [s[0] for s in after["shards"]]:
        parts.append("the same shards in another order")
    if not parts:
        return None
    samples = (sum(int(s[1]) for s in before["shards"]), sum(int(s[1]) for s in after["shards"]))
    return f"{after['location']}: {'; '.join(parts)}; {samples[0]} samples then, {samples[1]} now"


def describe_change(before: Optional[list[dict]], after: list[dict]) -> str:
    """One line saying what changed from listing `before` (None: the checkpoint recorded none) to `after`."""
    if before is None:
        return "the checkpoint does not list its shards (written before hipscale recorded them)"
    changes = [change for change in map(_source_change, before, after) if change]
    if len(before) != len(after):
        changes.insert(0, f"{len(before)} training sources then, {len(after)} now")
    return "; ".join(changes) or "the shard lists are the same, but the mix or its fingerprint differs"
