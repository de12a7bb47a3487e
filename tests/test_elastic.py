"""Elastic training: two emulated nodes x 2 ranks, `launchers/elastic.sh` on each (torchrun's c10d rendezvous
on node1 under `hipscale.launch.elastic`), real shards, DataLoader workers on, micro-batch 1 and a global batch
of 4 (accumulation 1 on 4 ranks, 2 on 2), a checkpoint every 4 steps.

- ZeRO-3: node2's cable is pulled (node1 trains on 2 ranks within the heartbeat timeout + 60 s; nothing but
  the waiting launcher is left on node2), plugged back in (node2 rejoins by itself: 4 ranks within 60 s, no
  step lost: the ranks save at the step the agent's SIGTERM came), then node2 flaps (killed 3 times in a row,
  each time rebooted and relaunched at once) and the job trains on, on both nodes; killing node1, the head,
  ends the job on node2, naming it. Every sample key a committed step used is logged: within an epoch no key
  twice, and none missing but the epoch's dropped remainder. The lr follows the schedule, G stays 4 at every
  world size, and the first loss after the shrink and after the grow equals a plain `--universal` resume of the
  same checkpoint.
- ZeRO-2: every process of node2 is killed (node1 trains on 2 ranks within 60 s, at most 4 steps lost), then the
  job is preempted (SIGTERM to node1's launcher: it exits 143 after one save, restarting nothing); the first
  loss after the shrink equals a plain `--universal` resume.
- Agreed stops through the launcher (no namespaces needed): a world size that does not divide the global batch
  exits 2 before step 1, naming the sizes that do; the NaN guard exits 3; neither loops through restarts.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

from hipscale.config import load_config
from hipscale.training.distributed import free_port
from hipscale.training.schedule import lr_factor
from node_helpers import STOPPED_AT, NodeJob, emulated_cluster
from train_helpers import CONFIG, REPO, Job, deepspeed, env, launcher_env, records, wait_steps

HEARTBEAT_S = 20          # distributed.heartbeat_timeout_s
RECOVERY_S = 60           # a node lost (or back) -> the first step on the new world
FLAPPING_S = 3 * RECOVERY_S  # node2's first of 3 kills in a row -> the job trains on both nodes again
HEAD_LOSS_S = 15          # the head node killed -> node2's launcher exits 1 (docs/multinode.md: 2-4 s measured)
GLOBAL_BATCH = 4
CHECKPOINT_EVERY = 4
STEP_DELAY_S = 0.4        # a slower model: the shrink and the grow fall inside the first epoch
SAMPLES = 3 * 30          # 90 training samples: an epoch of 22 steps, and a remainder of 2 on 4 ranks
LAUNCHER_ARGS = "--cutoff-s 20 --rejoin-s 90 --join-s 90 --last-call-s 3 --keep-alive-s 2 --max-restarts 10"
LOSS_RTOL = 1e-6
# A checkpoint the ZeRO-3 job converted to the universal format, for the converters' race below.
CONVERTED: dict[str, Path] = {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from emulated_cluster(tmp_path_factory, "hsel")


@pytest.fixture(scope="module")
def elastic_shards(tmp_path_factory) -> dict[str, Path]:
    from test_train_units import make_image_folder
    from train_helpers import shard_debug_data

    return shard_debug_data(tmp_path_factory.mktemp("elastic_data"), make_image_folder, classes=3,
                            train_per_class=SAMPLES // 3)


def overrides(data: dict, out: Path, *extra: str) -> list[str]:
    return ["--set", f"data.train_dir={data['train']}", f"data.eval_dir={data['eval']}", f"run.output_dir={out}",
            "training.steps=5000", "data.micro_batch_size=1", f"training.global_batch_size={GLOBAL_BATCH}",
            f"checkpoint.every_steps={CHECKPOINT_EVERY}", "checkpoint.keep_last=1000",
            "checkpoint.export_at_end=false", "eval.every_steps=0", "model.dropout_prob=0.02",
            f"distributed.heartbeat_timeout_s={HEARTBEAT_S}", *extra]


def report(capsys, line: str) -> None:
    with capsys.disabled():
        print(f"\n[elastic] {line}")


class ElasticJob(NodeJob):
    """launchers/elastic.sh on node1 and node2; `lines()` reads metrics.jsonl in order."""

    def __init__(self, cluster, data: dict, out: Path, *extra: str):
        self.run_dir = out / "debug"
        self.command = ["bash", "launchers/elastic.sh", "node1", "1:2", "2", CONFIG,
                        *overrides(data, out, "logging.sample_keys=true", f"faults.step_delay_s={STEP_DELAY_S}",
                                   *extra)]
        super().__init__(cluster, {}, out / "logs", HIPSCALE_RUN_ID=f"job{free_port()}", RDZV_PORT=str(free_port()),
                         HIPSCALE_ELASTIC_ARGS=LAUNCHER_ARGS)

    def launch(self, node: str) -> None:
        self.start(node, self.command)

    def lines(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def latest(self) -> int:
        """The step of the checkpoint `latest` names (0 before the first)."""
        path = self.run_dir / "checkpoints" / "latest"
        return int(path.read_text().removeprefix("step_")) if path.exists() else 0

    def trained(self) -> int:
        return max((r["step"] for r in self.lines() if r["kind"] == "train"), default=0)

    def wait_until(self, predicate, bound: float, what: str) -> float:
        """Seconds until `predicate()` holds; fails (killing the job) past `bound`."""
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > bound:
                self.kill()
                raise AssertionError(f"no {what} within {bound} s:\n{self.text()[-8000:]}")
            time.sleep(0.2)
        return time.monotonic() - start

    def next_start(self, after: int, bound: float, what: str) -> tuple[dict, float, int]:
        """The restart record of the first start whose first step comes after line `after`, the seconds it
        took, and the last step trained before it."""
        found: list = []

        def restarted() -> bool:
            lines = self.lines()
            found[:] = [(i, r) for i, r in enumerate(lines) if i >= after and r["kind"] == "elastic"]
            return bool(found)

        seconds = self.wait_until(restarted, bound, what)
        index, event = found[0]
        before = max(r["step"] for r in self.lines()[:index] if r["kind"] == "train")
        return event, seconds, before


def check_restart(event: dict, world: int, before: int, lost_at_most: int) -> int:
    """A restart record: the world size, G and accumulation, and the steps lost (returned)."""
    assert event["world_size"] == world and event["global_batch_size"] == GLOBAL_BATCH, event
    assert event["accumulation"] == GLOBAL_BATCH // world, event
    lost = before - event["resumed_from"]
    assert 0 <= lost <= lost_at_most, (event, before)
    return lost


def processes_on(cluster, node: str) -> list[str]:
    names = []
    for pid in cluster.processes(node):
        try:
            names.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
        except OSError:
            pass
    return names


def reference_first_losses(job: ElasticJob, data: dict, events: list[dict], tmp_path: Path, *extra: str) -> list:
    """The first loss of a plain `deepspeed --universal` resume of each event's checkpoint on its world size,
    all at once (each on a copy of the checkpoint: the rollback of `latest` must not touch the elastic run's)."""
    runs = []
    for event in events:
        step, world = event["resumed_from"], event["world_size"]
        out, tag = tmp_path / f"reference_{step}_{world}", f"step_{step:08d}"
        shutil.copytree(job.run_dir / "checkpoints" / tag, out / "checkpoints" / tag)
        cmd = deepspeed(world) + ["--resume", tag, "--universal",  # batches do not depend on the loader's workers
                                  *overrides(data, out, f"checkpoint.dir={out / 'checkpoints'}", "data.num_workers=0",
                                             *extra)]
        runs.append((Job(cmd, out / "log.txt"), out, tag, step))
    losses = []
    for run, out, tag, step in runs:
        try:
            wait_steps(run, out / "debug", 1, timeout=180)
            run.wait_gone(run.signal_group(signal.SIGTERM), 60)
        finally:
            run.kill()
        assert f"resumed from {out / 'checkpoints' / tag} at step {step} (universal)" in run.text()
        losses.append(records(out / "debug")[step + 1]["loss"])
    return losses


def first_loss_after(job: ElasticJob, event: dict) -> float:
    """The loss of the first step the start of `event` trained."""
    lines = job.lines()
    index = next(i for i, r in enumerate(lines) if r == event)
    return next(r for r in lines[index:] if r["kind"] == "train")["loss"]


def committed_keys(run_dir: Path, last_step: int) -> list[tuple[int, str, list[str]]]:
    """(world size, start id, keys) of every start's share of the committed steps (<= last_step), in start
    order, each list of keys tagged by epoch: [(world, start, [(epoch, key), ...])].

    A step trained by several starts (a start died after it, before a checkpoint) belongs to the last one."""
    lines: dict[str, list[dict]] = defaultdict(list)
    ranks: dict[str, set] = defaultdict(set)
    for path in (run_dir / "sample_keys").glob("*_rank*.jsonl"):
        start = path.name.split("_rank")[0]
        for line in path.read_text().splitlines():
            lines[start].append(json.loads(line))
        ranks[start].add(path.name)
    order = sorted(lines, key=lambda s: min(line["time"] for line in lines[s]))
    owner = {line["step"]: start for start in order for line in lines[start]}
    shares = []
    for start in order:
        keys = [(line["epoch"], key) for line in lines[start] if line["step"] <= last_step
                and owner[line["step"]] == start for key in line["keys"]]
        if keys:
            shares.append((len(ranks[start]), start, keys))
    return shares


def check_accounting(run_dir: Path, last_step: int) -> dict:
    """Within every epoch no key twice; in every finished epoch no key missing but the remainder that the
    epoch's last phase (its last run of starts on one world size) drops: (its pool) mod (world x micro-batch)."""
    shares = committed_keys(run_dir, last_step)
    by_epoch: dict[int, list[str]] = defaultdict(list)
    phases: dict[int, list[tuple[int, int]]] = defaultdict(list)  # epoch -> [(world, keys)] merged by world
    for world, _, keys in shares:
        for epoch in sorted({e for e, _ in keys}):
            mine = [k for e, k in keys if e == epoch]
            by_epoch[epoch] += mine
            if phases[epoch] and phases[epoch][-1][0] == world:
                phases[epoch][-1] = (world, phases[epoch][-1][1] + len(mine))
            else:
                phases[epoch].append((world, len(mine)))
    for epoch, keys in by_epoch.items():
        assert len(keys) == len(set(keys)), f"epoch {epoch}: a key used twice"
    finished = sorted(by_epoch)[:-1]
    assert finished, "the run did not finish an epoch"
    for epoch in finished:
        last_world = phases[epoch][-1][0]
        before_last = sum(count for _, count in phases[epoch][:-1])
        missing = SAMPLES - len(by_epoch[epoch])
        assert missing == (SAMPLES - before_last) % last_world, (epoch, phases[epoch], missing)
    return {"epochs": finished, "phases": {e: phases[e] for e in finished}}


def check_lr_and_batch(job: ElasticJob) -> set:
    """Every logged step: the lr of the schedule, G = micro x accumulation x world; returns the world sizes."""
    config = load_config(CONFIG, ["training.steps=5000"])
    worlds = set()
    for r in job.lines():
        if r["kind"] != "train":
            continue
        expected = config.optimizer.lr * lr_factor(r["step"] - 1, 5000, config.schedule)
        assert r["lr"] == pytest.approx(expected, rel=1e-12), r
        assert r["world_size"] * r["grad_accumulation"] == GLOBAL_BATCH, r
        worlds.add(r["world_size"])
    return worlds


def test_zero3_cable_pulled_and_back_flapping_node_head_lost_exact_accounting(cluster, elastic_shards, tmp_path,
                                                                            capsys):
    job = ElasticJob(cluster, elastic_shards, tmp_path, "zero.stage=3")
    job.launch("node1")
    job.launch("node2")
    first = job.wait_until(lambda: job.trained() >= 6, 180, "step 6")
    report(capsys, f"ZeRO-3 job on 2 nodes: step 6 {first:.1f} s after launch")

    # node2's cable is pulled: node1's rank 0 misses its heartbeats; node1 trains on alone.
    n = len(job.lines())
    cluster.link("node2", up=False)
    pulled = time.monotonic()
    shrink, seconds, before = job.next_start(n, HEARTBEAT_S + RECOVERY_S, "start on node1 alone")
    lost = check_restart(shrink, 2, before, CHECKPOINT_EVERY)
    assert shrink["nodes"] == ["node1"] and shrink["nodes_gone"] == ["node2"] and shrink["accumulation_before"] == 1
    assert re.search(rf"rank 0 stopped {STOPPED_AT}: lost node2 \(198\.18\.0\.2\): ranks 2, 3: no heartbeat for "
                     rf"{HEARTBEAT_S} s", job.text()), job.text()[-6000:]
    assert "elastic resize: world size 4 -> 2 (nodes node1; gone: node2)" in job.text()
    # node2 keeps only its launcher, which waits for the head: no agent, no rank, no DataLoader worker.
    job.wait_until(lambda: all("hipscale.launch.elastic" in p for p in processes_on(cluster, "node2")),
                   max(1.0, pulled + HEARTBEAT_S + RECOVERY_S - time.monotonic()), "node2 emptied but its launcher")
    left = processes_on(cluster, "node2")
    assert len(left) == 1, left
    report(capsys, f"cable pulled at step {before}: node1 trained on 2 ranks {seconds:.1f} s later (restart line: "
                   f"{shrink.get('recovery_s')} s after the fault), {lost} steps lost; node2 left with its launcher "
                   f"{time.monotonic() - pulled:.1f} s after the pull")

    # The cable is plugged back in: node2's launcher rejoins by itself; node1's ranks save at the signal's step.
    n = len(job.lines())
    cluster.link("node2", up=True)
    grow, seconds, before = job.next_start(n, RECOVERY_S, "start on both nodes")
    check_restart(grow, 4, before, 0)
    assert grow["nodes_new"] == ["node2"] and grow["accumulation_before"] == 2
    # (a step that was a periodic checkpoint's is not saved twice)
    assert re.search(rf"preemption signal received at step {before}; (saving|its checkpoint is saved already)",
                     job.text()), job.text()[-6000:]
    report(capsys, f"cable plugged in: 4 ranks trained {seconds:.1f} s later, 0 steps lost (saved at step {before})")

    # node2 flaps: killed three times in a row, the second and third time as soon as its ranks were started again
    # (each time rebooted and relaunched at once); then it stays, and the job trains on both nodes.
    # One deadline for the whole of it: the flaps, and the starts until the job trains on both nodes again.
    flapped = time.monotonic()
    settled_by = flapped + FLAPPING_S

    def left(what: str) -> float:
        remaining = settled_by - time.monotonic()
        assert remaining > 0, f"{FLAPPING_S} s after node2 began to flap, no {what}:\n{job.text()[-8000:]}"
        return remaining

    for flap in range(3):
        if flap:
            job.wait_until(lambda: any("hipscale.train" in p for p in processes_on(cluster, "node2")),
                           left(f"node2's ranks after flap {flap}"), f"node2's ranks after flap {flap}")
        n = len(job.lines())
        cluster.kill("node2")
        cluster.boot("node2")
        job.launch("node2")
    event, seconds, before = job.next_start(n, min(RECOVERY_S, left("start after the flaps")),
                                            "a start after the flaps")
    while event["world_size"] != 4:
        event, seconds, before = job.next_start(job.lines().index(event) + 1, left("start on both nodes"),
                                                "node2 back")
    lost = check_restart(event, 4, before, CHECKPOINT_EVERY)
    report(capsys, f"node2 killed 3 times in {time.monotonic() - flapped - seconds:.1f} s: 4 ranks trained "
                   f"{seconds:.1f} s after the last kill, {lost} steps lost")
    # Train on into the next epochs: the first one, which saw the shrink and the grow, is then committed whole.
    job.wait_until(lambda: job.latest() >= 24, RECOVERY_S, "a checkpoint past the first epoch (22.5 steps)")

    # The head node is killed: nothing can continue; node2's launcher ends naming it.
    cluster.kill("node1")
    killed = time.monotonic()
    status = job.procs["node2"].wait(timeout=HEAD_LOSS_S)
    ended = time.monotonic() - killed
    assert status == 1
    assert re.search(r"lost the rendezvous host node1:\d+", job.text()), job.text()[-4000:]
    job.wait_until(lambda: not processes_on(cluster, "node2"), 30, "node2 empty")
    report(capsys, f"head node killed: node2's launcher ended {ended:.1f} s later with exit {status}")

    last = job.latest()
    accounting = check_accounting(job.run_dir, last)
    assert check_lr_and_batch(job) == {2, 4}
    report(capsys, f"accounting over {last} committed steps: epochs {accounting['epochs']} complete, phases "
                   f"(world, keys) {accounting['phases']}")

    # The first loss after the shrink and after the grow equals a plain universal resume of the same checkpoint.
    references = reference_first_losses(job, elastic_shards, [shrink, grow], tmp_path, "zero.stage=3")
    for event, reference in zip((shrink, grow), references):
        assert first_loss_after(job, event) == pytest.approx(reference, rel=LOSS_RTOL), event
    CONVERTED["zero3"] = job.run_dir / "checkpoints" / f"step_{shrink['resumed_from']:08d}"


def test_zero2_node_killed_then_the_job_preempted(cluster, elastic_shards, tmp_path, capsys):
    cluster.up(2)  # fresh nodes: the previous test killed both
    job = ElasticJob(cluster, elastic_shards, tmp_path, "zero.stage=2")
    job.launch("node1")
    job.launch("node2")
    job.wait_until(lambda: job.trained() >= 6, 180, "step 6")

    n = len(job.lines())
    cluster.kill("node2")
    shrink, seconds, before = job.next_start(n, RECOVERY_S, "start on node1 alone")
    lost = check_restart(shrink, 2, before, CHECKPOINT_EVERY)
    assert shrink["nodes_gone"] == ["node2"] and shrink["accumulation_before"] == 1
    assert re.search(rf"rank [01] stopped {STOPPED_AT}: lost the connection to node2 \(198\.18\.0\.2\): ranks 2, 3",
                     job.text()), job.text()[-6000:]
    report(capsys, f"node2 killed at step {before}: node1 trained on 2 ranks {seconds:.1f} s later, {lost} lost")

    # The scheduler preempts the job: the launcher ends 143 after one save, without restarting anything.
    job.wait_until(lambda: job.trained() >= shrink["resumed_from"] + 3, RECOVERY_S, "steps on 2 ranks")
    job.procs["node1"].send_signal(signal.SIGTERM)
    assert job.procs["node1"].wait(timeout=90) == 143, job.text()[-6000:]
    latest = job.latest()
    assert latest == job.trained() and job.text().count("preemption signal received") == 1, job.text()[-6000:]
    assert not processes_on(cluster, "node1"), processes_on(cluster, "node1")

    reference, = reference_first_losses(job, elastic_shards, [shrink], tmp_path, "zero.stage=2")
    assert first_loss_after(job, shrink) == pytest.approx(reference, rel=LOSS_RTOL)
    assert check_lr_and_batch(job) == {2, 4}


def test_two_universal_conversions_at_once_leave_one_complete_folder(tmp_path):
    """Two processes convert the same checkpoint at once (ranks 0 of two starts, or two jobs): both get the same
    complete folder, and neither deleted the other's work."""
    if "zero3" not in CONVERTED:
        pytest.fail("needs the checkpoints of the ZeRO-3 elastic test")
    tag_dir = tmp_path / CONVERTED["zero3"].name
    shutil.copytree(CONVERTED["zero3"], tag_dir, ignore=shutil.ignore_patterns("universal*"))
    code = ("import sys; from pathlib import Path; "
            "from hipscale.training.components.universal import convert_to_universal; "
            "print(convert_to_universal(Path(sys.argv[1])))")
    converters = [subprocess.Popen([str(REPO / ".venv" / "bin" / "python"), "-c", code, str(tag_dir)], cwd=REPO,
                                   env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in converters]
    assert [p.returncode for p in converters] == [0, 0], outs
    assert {out.strip().splitlines()[-1] for out, _ in outs} == {str(tag_dir / "universal")}
    assert (tag_dir / "universal" / "COMPLETE").is_file() and (tag_dir / "universal" / "zero").is_dir()
    assert not list(tag_dir.glob("universal.tmp-*"))  # the slower one discarded its own copy


@pytest.mark.parametrize("ranks, extra, status, line", [
    (2, ["training.global_batch_size=6", "data.micro_batch_size=2"], 2,
     "training.global_batch_size=6 with data.micro_batch_size=2 cannot be split over 2 ranks (world sizes this "
     "elastic job may have: HIPSCALE_ELASTIC_WORLD_SIZES); world sizes that divide it: 1, 3"),
    (1, ["faults.nonfinite_steps=[0,1,2]", "training.max_consecutive_nonfinite=2"], 3,
     "2 consecutive steps had a non-finite loss or gradient"),
], ids=["world-size-does-not-divide", "nan-guard"])
def test_an_agreed_stop_ends_the_elastic_job_for_good(elastic_shards, tmp_path, ranks, extra, status, line):
    cmd = ["bash", "launchers/elastic.sh", "127.0.0.1", "1:1", str(ranks), CONFIG,
           *overrides(elastic_shards, tmp_path, *extra)]
    proc = subprocess.run(cmd, cwd=REPO, env={**launcher_env(cmd), "HIPSCALE_RUN_ID": "stop",
                                              "RDZV_PORT": str(free_port())},
                          capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == status, text[-6000:]
    reported = [row for row in text.splitlines() if row.startswith("hipscale.train: error:") and line in row]
    assert len(reported) == 1 and f"stopped the job for good (exit status {status})" in text, text[-6000:]
    assert text.count("starting fresh") == 1, text[-6000:]  # one start: torchrun restarted nothing
    if status == 2:
        assert not (tmp_path / "debug" / "metrics.jsonl").exists() or not records(tmp_path / "debug")
