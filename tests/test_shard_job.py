"""Sharding on many machines: plan once, `work` on slices of the units (also twice at once), `finish` checks.

Each step runs as its own process, as a SLURM array task or a Ray task would run it; the single-process
sharder's output is the reference the split, doubled, interrupted and paused runs must equal byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from hipscale.data.synthetic_media import make_image_folder
from node_helpers import emulated_cluster
from slurm_helpers import job_exit, job_state, wait_until
from train_helpers import BIN, REPO

IMAGE_ARGS = ("--size", "16", "--max-samples-per-shard", "2")  # 25 images (one unreadable) -> 13 shards


def shard_job(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hipscale.data.shard_job", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def start_work(out: object, units: str, env: dict | None = None, *extra: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hipscale.data.shard_job", "work", "--plan", str(out),
                             "--units", units, "--workers", "1", *map(str, extra)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finished(process: subprocess.Popen, timeout: float = 300) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return out


def tar_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("shard-*.tar"))}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("job_images"), num_classes=3, per_class=8, size=(24, 32)).root


@pytest.fixture(scope="module")
def single(images, run_sharder, tmp_path_factory) -> Path:
    """The one-process reference run."""
    out = tmp_path_factory.mktemp("single")
    done = run_sharder("shard_images.py", "--images", images, "--out", out, "--workers", 2, *IMAGE_ARGS)
    assert done.returncode == 0, done.stderr
    return out


def plan(images: Path, out: Path, units: int, run_sharder) -> None:
    done = run_sharder("shard_images.py", "--images", images, "--out", out, *IMAGE_ARGS, "--plan-units", units)
    assert done.returncode == 0, done.stderr
    assert f"in 13 shards, {units} units" in done.stdout


def test_halves_on_two_machines_then_finish_equal_one_process_and_finish_names_what_is_wrong(
        images, single, run_sharder, tmp_path):
    out = tmp_path / "split"
    plan(images, out, 4, run_sharder)
    assert shard_job("units", out).stdout.strip() == "4"
    early = shard_job("finish", "--plan", out)
    assert early.returncode == 1 and "Run these units again: 0,1,2,3" in early.stderr
    assert not (out / "index.json").exists()
    halves = [start_work(out, "0..1"), start_work(out, "2,3")]
    for process in halves:
        finished(process)
    status = json.loads(subprocess.run([sys.executable, "-m", "hipscale.data.status", str(out), "--json"],
                                       cwd=REPO, capture_output=True, text=True, timeout=60).stdout)
    assert (status["shards_complete"], status["units_complete"], status["items_done"]) == (13, 4, 25)
    assert status["running"] == [] and status["rejected"] == {"unreadable_image": 1}

    # A lost tar and a tar whose bytes differ from its status: finish names both, writes nothing.
    (out / "shard-000005.tar").unlink()
    altered = bytearray((out / "shard-000009.tar").read_bytes())
    altered[700] ^= 0xFF
    (out / "shard-000009.tar").write_bytes(bytes(altered))
    checked = shard_job("finish", "--plan", out)
    assert checked.returncode == 1, checked.stderr
    assert "shard-000005.tar: tar missing or of another size than its status records (unit 1)" in checked.stderr
    assert "shard-000009.tar: tar's SHA-256 differs from its status" in checked.stderr
    assert "Run these units again: 1,2" in checked.stderr and not (out / "index.json").exists()
    finished(start_work(out, "1..2"))
    # A unit killed between writing its status and renaming it into place leaves a temporary status (as a
    # straggler killed mid-write does): finish and status pass over it, and finish deletes it.
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = [out / folder / f".{name}.{socket.gethostname()}-{dead.pid}-0badc0de.tmp"
            for folder, name in (("status", "shard-000002.tar.json"), ("progress", "unit-0.json"))]
    for path in left:
        path.parent.mkdir(exist_ok=True)
        path.write_text('{"trunc')
    status = subprocess.run([sys.executable, "-m", "hipscale.data.status", str(out), "--json"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert json.loads(status.stdout)["shards_complete"] == 13, status.stderr
    done = shard_job("finish", "--plan", out)
    assert done.returncode == 0, done.stderr
    assert not [path for path in left if path.exists()]
    assert (out / "index.json").read_text() == (single / "index.json").read_text()
    assert tar_hashes(out) == tar_hashes(single)
    assert json.loads((out / "report.json").read_text()) == json.loads((single / "report.json").read_text())


ATTEMPT = textwrap.dedent("""
    import os, signal, sys, time
    from dataclasses import dataclass
    from pathlib import Path
    from hipscale.data.format.dataset_info import DatasetInfo
    from hipscale.data.sharding.run import finish_dataset, write_shards
    from hipscale.data.sharding.shard_destination import LocalDestination
    from hipscale.data.sharding.shard_plan import DatasetPlan
    from hipscale.data.sharding.shard_writer import plan_shards

    out, log, flag = map(Path, sys.argv[1:4])
    names, per_shard = sys.argv[4].split(","), int(sys.argv[5])

    @dataclass(frozen=True)
    class Item:
        id: str
        source: str

    def encode(item):
        with open(log, "a") as file:
            file.write(item.id + "\\n")
        if item.id == "die":
            os.kill(os.getpid(), signal.SIGKILL)   # as the OOM killer does
        while item.id == "wait" and flag.exists():
            time.sleep(0.05)
        return [(item.id + ".txt", item.id.encode())]

    jobs = plan_shards([Item(name, f"list:{i}") for i, name in enumerate(names)], per_shard, {})
    destination = LocalDestination(out)
    write_shards(destination, jobs, encode, workers=1, unit="item", item_timeout_s=600)
    plan = DatasetPlan("test", {}, DatasetInfo({}, (), False, ()), tuple(jobs), tuple(len(j.items) for j in jobs),
                       (), 1)
    print(finish_dataset(destination, plan)["by_reason"])
""")


def attempt(tmp_path: Path, names: str, per_shard: int) -> subprocess.Popen:
    """One attempt at a 'dataset' of test items (`die` SIGKILLs its worker, `wait` waits while the flag exists)."""
    command = [sys.executable, "-c", ATTEMPT, str(tmp_path / "out"), str(tmp_path / "calls.log"),
               str(tmp_path / "flag"), names, str(per_shard)]
    return subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_calls(tmp_path: Path, calls: list[str], processes: list[subprocess.Popen]) -> None:
    log, deadline = tmp_path / "calls.log", time.monotonic() + 60
    while not (log.exists() and log.read_text().split() == calls):
        assert all(p.poll() is None for p in processes) and time.monotonic() < deadline, \
            (log.read_text() if log.exists() else "", [p.communicate() for p in processes if p.poll() is not None])
        time.sleep(0.05)


def test_the_same_units_worked_twice_at_once_leave_each_shard_once(tmp_path):
    """Two attempts held at their first item until both are there, then both build all three shards at once."""
    (tmp_path / "flag").touch()
    both = [attempt(tmp_path, "wait,b,c,d,e,f", 2) for _ in range(2)]
    wait_for_calls(tmp_path, ["wait", "wait"], both)
    (tmp_path / "flag").unlink()
    for process in both:
        assert finished(process).strip() == "{}"
    out = tmp_path / "out"
    calls = (tmp_path / "calls.log").read_text().split()
    assert sorted(calls) == sorted(2 * ["wait", "b", "c", "d", "e", "f"])  # every shard built by both
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(p.name for p in (out / "status").iterdir()) == [f"shard-00000{i}.tar.json" for i in range(3)]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert json.loads((out / "report.json").read_text())["written"] == 6


def test_an_item_that_killed_its_worker_is_not_run_again_by_a_retry_elsewhere(tmp_path):
    """Attempt 1: `die` SIGKILLs its worker (recorded), then the whole attempt is killed while `wait` runs, as
    a preempted array task is. Attempt 2 (another process, as on another machine) rejects `die` from the
    record without running it and completes the shard."""
    (tmp_path / "flag").touch()
    first = attempt(tmp_path, "a,die,b,wait,c", 5)
    wait_for_calls(tmp_path, ["a", "die", "a", "b", "wait"], [first])
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    out = tmp_path / "out"
    assert [p.name for p in (out / "failed").iterdir()] == ["shard-000000.tar-000001.json"]
    (tmp_path / "flag").unlink()
    assert finished(attempt(tmp_path, "a,die,b,wait,c", 5)).strip() == "{'worker_died': 1}"
    assert (tmp_path / "calls.log").read_text().split() == ["a", "die", "a", "b", "wait", "a", "b", "wait", "c"]
    report = json.loads((out / "report.json").read_text())
    assert report["written"] == 4 and [(r["id"], r["reason"]) for r in report["rejections"]] == [("die", "worker_died")]


def test_work_into_s3_with_the_server_paused_mid_job_and_its_status_while_it_runs(
        s3, av_media, av_shards, av_args, sharder_command, tmp_path):
    s3.create_bucket("planned")
    env = {**os.environ, **s3.env}
    url = "s3://planned/av"
    planned = subprocess.run(sharder_command("shard_av.py", "--manifest", av_media.manifest, "--class-index",
                                             av_media.class_index, "--videos", av_media.videos, "--out", url,
                                             "--plan-units", 2, *av_args), env=env, capture_output=True, text=True,
                             timeout=120)
    assert planned.returncode == 0, planned.stderr
    work = start_work(url, "0..1", env, "--staging", tmp_path / "staging")
    client = s3.client()
    deadline = time.monotonic() + 120
    while not client.list_objects_v2(Bucket="planned", Prefix="av/status/").get("KeyCount"):
        assert work.poll() is None and time.monotonic() < deadline, work.communicate()
        time.sleep(0.02)
    os.killpg(work.pid, signal.SIGSTOP)  # held mid-job while another process reads the job's status
    status = subprocess.run([sys.executable, "-m", "hipscale.data.status", url, "--json"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    seen = json.loads(status.stdout)
    assert 1 <= seen["shards_complete"] < seen["shards"] == 5 and [a["units"] for a in seen["running"]] == [[0, 1]]
    assert 0 < seen["items_done"] < seen["items"] == 13 and (seen["eta_s"] is None or seen["eta_s"] > 0)
    s3.pause()  # the uploads still to come wait for the server
    os.killpg(work.pid, signal.SIGCONT)
    time.sleep(5)
    s3.resume()
    finished(work)
    done = shard_job("finish", "--plan", url, env=env)
    assert done.returncode == 0, done.stderr
    remote_index = json.loads(client.get_object(Bucket="planned", Key="av/index.json")["Body"].read())
    assert remote_index == json.loads((av_shards[0] / "index.json").read_text())
    remote_report = json.loads(client.get_object(Bucket="planned", Key="av/report.json")["Body"].read())
    local_report = json.loads((av_shards[0] / "report.json").read_text())
    assert remote_report == local_report
    assert not [p for p in (tmp_path / "staging").rglob("*") if p.is_file()]


def test_a_slurm_array_capped_at_two_with_a_cancelled_task_then_only_that_unit_resubmitted(
        slurm, images, single, run_sharder, tmp_path):
    out = tmp_path / "out"
    plan(images, out, 4, run_sharder)
    job_env = {**os.environ, **slurm, "PYTHON": sys.executable}
    log = tmp_path / "slurm-%j.out"

    def submit(units: str | None = None) -> tuple[str, str]:
        done = subprocess.run(["bash", str(REPO / "launchers" / "shard_slurm.sh"), str(out), "2",
                               "--cpus-per-task=1", f"--output={log}"], cwd=tmp_path,
                              env={**job_env, **({"UNITS": units} if units else {})}, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        ids = dict(line.split() for line in done.stdout.splitlines())
        return ids["array"], ids["finish"]

    def ended(job: str) -> bool:
        return job_state(job, job_env)[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")

    array, finish = submit()
    assert "ArrayTaskThrottle=2" in subprocess.run(["scontrol", "show", "job", array], env=job_env,
                                                   capture_output=True, text=True, timeout=30).stdout
    subprocess.run(["scancel", f"{array}_3"], env=job_env, check=True, timeout=30)  # throttled: not started yet
    wait_until(lambda: ended(finish), 180, "the finish job's end", tmp_path / f"slurm-{finish}.out")
    text = (tmp_path / f"slurm-{finish}.out").read_text()
    assert job_state(finish, job_env)[0] == "FAILED" and job_exit(finish, job_env) == "1:0", text
    assert "shard-000012.tar: missing (no status: its unit did not finish) (unit 3)" in text
    assert "Run these units again: 3" in text and not (out / "index.json").exists()

    _, finish = submit(units="3")
    wait_until(lambda: ended(finish), 180, "the second finish job's end", tmp_path / f"slurm-{finish}.out")
    assert job_state(finish, job_env)[0] == "COMPLETED", (tmp_path / f"slurm-{finish}.out").read_text()
    assert (out / "index.json").read_text() == (single / "index.json").read_text()
    assert tar_hashes(out) == tar_hashes(single)


@pytest.fixture(scope="module")
def ray_nodes(tmp_path_factory):
    yield from emulated_cluster(tmp_path_factory, "hsray")


def work_processes(cluster, node: str) -> dict[int, str]:
    """The `shard_job work` processes on `node`: pid -> its --units."""
    found = {}
    for pid in cluster.processes(node):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "hipscale.data.shard_job" in args and "work" in args:
            found[pid] = args[args.index("--units") + 1]
    return found


def wait_for_work(cluster, node: str, driver: subprocess.Popen, log: Path, skip: set[int] = frozenset()) -> tuple[int, str]:
    deadline = time.monotonic() + 60
    while not (found := {pid: units for pid, units in work_processes(cluster, node).items() if pid not in skip}):
        assert driver.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return next(iter(found.items()))


def test_ray_head_and_a_second_node_killed_mid_unit_and_a_straggler_give_the_single_run(
        ray_nodes, images, single, run_sharder, tmp_path):
    """Two `ray start` nodes (emulated: own network and host name); node2 is killed while it runs a unit, then a
    unit on node1 hangs (its `work` SIGSTOPped) past the wall-time limit: both are retried, the rest goes on."""
    out = tmp_path / "out"
    plan(images, out, 7, run_sharder)
    ray_tmp = tempfile.mkdtemp(prefix="hsr-")  # Ray's sockets live there: a short path
    # A private network: no auth token (Ray's default would pick up a ~/.ray/auth_token from a local Ray).
    ray_env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_health_check_period_ms": "500",
               "RAY_health_check_failure_threshold": "4", "RAY_health_check_initial_delay_ms": "0"}
    head = ray_nodes.address("node1")
    try:
        for node, role in (("node1", ["--head", "--port", "6379", "--include-dashboard=false"]),
                           ("node2", ["--address", f"{head}:6379"])):
            subprocess.run(ray_nodes.exec_prefix(node) + [str(BIN / "ray"), "start", *role, "--num-cpus", "1",
                                                          "--node-ip-address", ray_nodes.address(node),
                                                          "--temp-dir", f"{ray_tmp}/{node}"],
                           env=ray_env, check=True, stdout=subprocess.DEVNULL, timeout=120)
        log = tmp_path / "driver.log"
        with open(log, "w") as driver_log:
            driver = subprocess.Popen(ray_nodes.exec_prefix("node1") + [
                sys.executable, "-m", "hipscale.data.shard_ray", "--plan", str(out), "--unit-timeout-s", "10"],
                cwd=REPO, env={**ray_env, "RAY_ADDRESS": f"{head}:6379"}, stdout=driver_log, stderr=subprocess.STDOUT,
                start_new_session=True)
        _, lost_unit = wait_for_work(ray_nodes, "node2", driver, log)
        ray_nodes.kill("node2")
        seen = set(work_processes(ray_nodes, "node1"))
        straggler, straggling_unit = wait_for_work(ray_nodes, "node1", driver, log, skip=seen)
        os.kill(straggler, signal.SIGSTOP)
        assert driver.wait(timeout=120) == 0, log.read_text()
    finally:
        for node in ray_nodes.node_names():
            ray_nodes.kill(node)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    text = log.read_text()
    assert re.search(rf"unit {lost_unit}, attempt 1: \w+Error: .*; queued again \(attempt 2 of 3\)", text), text
    assert f"unit {straggling_unit}, attempt 1: still running after 10 s on node1 (a straggler): killed" in text
    for unit in (lost_unit, straggling_unit):
        assert re.search(rf"unit {unit} complete on node1 in [0-9.]+ s \(attempt 2\)", text), text
    assert len(re.findall(r"unit \d+ complete on", text)) == 7 and "failed all" not in text
    assert not psutil.pid_exists(straggler) or psutil.Process(straggler).status() == psutil.STATUS_ZOMBIE
    assert (out / "index.json").read_text() == (single / "index.json").read_text()
    assert tar_hashes(out) == tar_hashes(single)
    assert json.loads((out / "report.json").read_text()) == json.loads((single / "report.json").read_text())
