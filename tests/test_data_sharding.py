"""Sharding in supervised workers: an item that hangs, kills its worker or raises is rejected, the run goes on."""
import json
import os
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass

import psutil

from hipscale.data.sharding.run import write_shards
from hipscale.data.sharding.shard_destination import LocalDestination
from hipscale.data.sharding.shard_writer import plan_shards


@dataclass(frozen=True)
class Item:
    id: str
    source: str
    action: str


def encode(item: Item):
    """Test media: "ok" encodes; "die" is killed as by the OOM killer; "hang" waits on a child process that
    never ends (a stuck ffmpeg); "raise" fails inside the decoder."""
    if item.action == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if item.action == "hang":
        subprocess.run(["sleep", "600"])
    if item.action == "raise":
        raise ValueError("broken decoder")
    return [(f"{item.id}.txt", item.id.encode())]


def test_a_hung_a_killed_and_a_raising_item_are_rejected_and_every_other_item_written(tmp_path):
    actions = ["ok", "die", "ok", "hang", "ok", "ok", "raise", "ok"]
    items = [Item(f"item{i}", f"list:{i + 1}", action) for i, action in enumerate(actions)]
    jobs = plan_shards(items, 3, {})
    children_before = set(psutil.Process().children(recursive=True))
    began = time.monotonic()
    results = write_shards(LocalDestination(tmp_path), jobs, encode, workers=2, unit="item", item_timeout_s=3)
    took = time.monotonic() - began
    rejected = {r.id: (r.reason, r.detail) for result in results for r in result.rejections}
    assert rejected == {
        "item1": ("worker_died", "its worker process was killed by SIGKILL while encoding it"),
        "item3": ("timeout", "encoding took more than 3 s (the per-item timeout); its worker was killed"),
        "item6": ("worker_died", "its worker process raised ValueError: broken decoder while encoding it"),
    }
    assert [r.entry.samples for r in results] == [2, 2, 1]
    for result in results:  # each shard holds exactly its good items, in order
        with tarfile.open(tmp_path / result.entry.name) as tar:
            names = [member.name for member in tar]
        job = next(job for job in jobs if job.name == result.entry.name)
        assert names == [f"{item.id}.txt" for item in job.items if item.action == "ok"]
        status = json.loads((tmp_path / "status" / f"{result.entry.name}.json").read_text())
        assert [r["id"] for r in status["rejections"]] == [r.id for r in result.rejections]
    assert 3 < took < 30
    # The hung item's worker went with its whole process group: no `sleep 600` is left (SIGKILL takes effect when
    # the process next runs: on a loaded machine a moment after the worker itself was reaped).
    deadline = time.monotonic() + 5
    while left := [p for p in psutil.process_iter(["cmdline", "status"])
                   if p.info["cmdline"] == ["sleep", "600"] and p.info["status"] != psutil.STATUS_ZOMBIE]:
        assert time.monotonic() < deadline, left
        time.sleep(0.05)
    assert set(psutil.Process().children(recursive=True)) <= children_before  # no worker left either
    # A re-run trusts the statuses: nothing is encoded again, the rejections are kept.
    again = write_shards(LocalDestination(tmp_path), jobs, encode, workers=2, unit="item", item_timeout_s=3)
    assert again == results
