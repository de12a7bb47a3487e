"""Two emulated nodes x 2 processes (hipscale.tools.local_cluster: network namespaces, sshd, pdsh).

Every launcher path trains configs/debug.yaml on 4 ranks across node1 and node2 and must reproduce the
losses of a 1-node, 4-process run of the same global batch:
- deepspeed --hostfile through pdsh and ssh (launchers/deepspeed_hostfile.sh), from scratch;
- torchrun with c10d rendezvous on node1, resuming the pdsh run's checkpoint, preempted on both nodes
  (SIGTERM to every process of the job, as SLURM does): one consistent checkpoint;
- launchers/mpirun.sh across both hosts, resuming that preempted checkpoint;
- deepspeed --no_ssh --node_rank on each node (clusters without ssh), resuming the pdsh run's checkpoint.
Then the faults, each in a 2-node job that resumes the final checkpoint of the --no_ssh or the mpirun run
(so every launcher's checkpoint is resumed): node2 loses every process, or its cable; the job on node1
ends within the bound with a line naming node2, and no process is left on either node. Training on
without node2, and with it again, by itself: tests/test_elastic.py.

Needs root and network namespaces: as root (CI) a machine that cannot make them fails these tests with the
reason; without root they are skipped with it, and fail under `make test-multinode` (HIPSCALE_REQUIRE_MULTINODE=1).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hipscale.tools.local_cluster import Cluster
from hipscale.training.distributed import free_port
from node_helpers import STOPPED_AT, NodeJob, emulated_cluster
from train_helpers import BIN, CONFIG, PY, REPO, records

STEPS = 12                   # two epochs of the debug shards (96 samples) at 4 ranks x 4 samples
# The final checkpoints folder of each launcher's run, resumed by a later test (every run's checkpoint resumes).
FINAL_CHECKPOINTS: dict[str, Path] = {}
HEARTBEAT_S = 20             # distributed.heartbeat_timeout_s of the fault tests (default 60)
NODE_LOSS_BOUND_S = 60       # node loss -> every process of the job gone, on both nodes


def overrides(data: dict, out: Path, *extra: str) -> list[str]:
    return ["--set", f"data.train_dir={data['train']}", f"data.eval_dir={data['eval']}", f"run.output_dir={out}",
            f"training.steps={STEPS}", "checkpoint.every_steps=2", "checkpoint.keep_last=20",
            "checkpoint.export_at_end=false", "eval.every_steps=0", "model.dropout_prob=0.02", *extra]


def report(capsys, line: str) -> None:
    with capsys.disabled():
        print(f"\n[multinode] {line}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from emulated_cluster(tmp_path_factory, "hstest")


def run_job(cluster, commands, log_dir, capsys, what: str, run_dir: Path, first_step: int, **extra_env) -> str:
    """Run a job to its end (every launcher exits 0, nothing left behind); report its time to `first_step`."""
    job = NodeJob(cluster, commands, log_dir, **extra_env)
    first = job.wait_for_step(run_dir, first_step)
    status = job.wait()
    assert set(status.values()) == {0}, f"{what}: exit {status}\n{job.text()[-6000:]}"
    report(capsys, f"{what}: first step {first:.1f} s after launch, job {time.monotonic() - job.started:.1f} s")
    job.assert_nothing_left(time.monotonic(), 30)
    return job.text()


def losses(run_dir: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in records(run_dir).items()}


def assert_losses_match(run_dir: Path, reference: dict[int, float], steps: range) -> float:
    """Every loss bitwise equal to the 1-node run's (4 ranks on 1 node: DeepSpeed's shm all-reduce; 2 nodes: gloo
    over TCP; the same sums in the same order). Returns the largest relative difference (0) for the report."""
    got = losses(run_dir)
    assert sorted(got) == list(steps), sorted(got)
    for step in steps:
        assert got[step] == reference[step], (step, got[step], reference[step])
    return max(abs(got[s] - reference[s]) / abs(reference[s]) for s in steps)


def resumed_step(output: str) -> int:
    found = re.findall(r"resumed from \S+ at step (\d+)", output)
    assert len(found) == 1, output[-3000:]
    return int(found[0])


def hostfile_launch(cluster: Cluster, *args: str) -> dict[str, list[str]]:
    """launchers/deepspeed_hostfile.sh on node1 (pdsh starts the ranks on both nodes)."""
    return {"node1": ["bash", "launchers/deepspeed_hostfile.sh", str(cluster.hostfile), CONFIG, *args]}


def single_node_launch(nprocs: int, *args: str) -> dict[str, list[str]]:
    return {"node1": [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(free_port()),
                      "--module", "hipscale.train", "--config", CONFIG, *args]}


@pytest.fixture(scope="module")
def reference(cluster, debug_shards, tmp_path_factory) -> dict[int, float]:
    """Losses of a 1-node, 4-process run (node1)."""
    out = tmp_path_factory.mktemp("one_node")
    job = NodeJob(cluster, single_node_launch(4, *overrides(debug_shards, out)), out / "logs")
    assert set(job.wait().values()) == {0}, job.text()[-6000:]
    return losses(out / "debug")


@pytest.fixture(scope="module")
def pdsh_run(cluster, debug_shards, tmp_path_factory) -> Path:
    """The run folder that the 2-node runs share (its checkpoints are resumed by the other launchers)."""
    return tmp_path_factory.mktemp("two_nodes")


def test_deepspeed_hostfile_through_pdsh_matches_one_node(cluster, debug_shards, reference, pdsh_run, capsys):
    job = NodeJob(cluster, hostfile_launch(cluster, *overrides(debug_shards, pdsh_run)), pdsh_run / "logs_pdsh",
                  MASTER_PORT=str(free_port()))
    first = job.wait_for_step(pdsh_run / "debug", 1)
    status = job.wait()
    assert status == {"node1": 0}, job.text()[-6000:]
    text = job.text()
    assert "node1: [hipscale] train step 1 " in text and "node2: " in text  # ranks on both hosts, through pdsh
    worst = assert_losses_match(pdsh_run / "debug", reference, range(1, STEPS + 1))
    job.assert_nothing_left(time.monotonic(), 30)
    report(capsys, f"deepspeed --hostfile (pdsh): first step {first:.1f} s after launch, job "
                   f"{time.monotonic() - job.started:.1f} s, losses vs 1 node max rel diff {worst:.1e}")


def test_torchrun_c10d_preempted_on_both_nodes_then_mpirun_resumes(cluster, debug_shards, reference, pdsh_run,
                                                                   capsys, tmp_path):
    if not (pdsh_run / "debug" / "checkpoints" / "step_00000004").is_dir():
        pytest.fail("needs the checkpoints of test_deepspeed_hostfile_through_pdsh_matches_one_node")
    run_dir, checkpoints = tmp_path / "debug", tmp_path / "checkpoints"
    # A copy of the pdsh run's checkpoints: the rollback to step 4 must not touch the folder other tests resume.
    subprocess.run(["cp", "-a", str(pdsh_run / "debug" / "checkpoints"), str(checkpoints)], check=True)
    torchrun = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"node1:{free_port()}", "--rdzv-id", f"hipscale{os.getpid()}",
                "-m", "hipscale.train", "--config", CONFIG, "--resume", "step_00000004",
                *overrides(debug_shards, tmp_path, "checkpoint.every_steps=100", f"checkpoint.dir={checkpoints}")]
    job = NodeJob(cluster, {"node1": torchrun, "node2": torchrun}, tmp_path / "logs_torchrun")
    first = job.wait_for_step(run_dir, 5)
    signalled = time.monotonic()
    for node in cluster.node_names():  # SLURM: SIGTERM to every process of the job step on every node
        cluster.kill(node, signal.SIGTERM)
    job.wait()
    gone = job.assert_nothing_left(signalled, 60)
    text = job.text()
    assert resumed_step(text) == 4
    latest = (checkpoints / "latest").read_text().strip()
    step = int(latest.removeprefix("step_"))
    assert 5 <= step < STEPS and (checkpoints / latest / "COMPLETE").exists(), latest  # saved for the signal
    assert max(records(run_dir)) == step  # the checkpoint is the last step trained: nothing lost, nothing extra
    assert f"preemption signal received at step {step}; saving" in text, text[-3000:]
    report(capsys, f"torchrun c10d: first step {first:.1f} s after launch; SIGTERM to both nodes -> checkpoint "
                   f"{latest}, every process gone {gone:.1f} s after the signal")

    # launchers/mpirun.sh across both hosts resumes it (2 nodes again) and matches the 1-node losses.
    mpirun_args = (f"--allow-run-as-root --hostfile {cluster.hostfile} --map-by ppr:2:node "
                   "--mca btl_tcp_if_include eth0 --mca oob_tcp_if_include eth0")
    resumed = tmp_path / "resumed"
    text = run_job(cluster, {"node1": ["bash", "launchers/mpirun.sh", "4", CONFIG, "--resume", "auto",
                                       *overrides(debug_shards, resumed, f"checkpoint.dir={checkpoints}")]},
                   tmp_path / "logs_mpirun", capsys, "launchers/mpirun.sh across 2 hosts", resumed / "debug",
                   step + 1, MASTER_PORT=str(free_port()), MPIRUN_ARGS=mpirun_args)
    assert resumed_step(text) == step
    worst = assert_losses_match(resumed / "debug", reference, range(step + 1, STEPS + 1))
    report(capsys, f"launchers/mpirun.sh: resumed step {step}, losses vs 1 node max rel diff {worst:.1e}")
    FINAL_CHECKPOINTS["mpirun"] = checkpoints


def test_deepspeed_no_ssh_node_rank_resumes_and_matches(cluster, debug_shards, reference, pdsh_run, capsys,
                                                        tmp_path):
    subprocess.run(["cp", "-a", str(pdsh_run / "debug" / "checkpoints"), str(tmp_path / "checkpoints")], check=True)
    port = free_port()
    commands = {node: [str(BIN / "deepspeed"), "--hostfile", str(cluster.hostfile), "--no_ssh", "--node_rank",
                       str(rank), "--master_addr", "node1", "--master_port", str(port), "--module", "hipscale.train",
                       "--config", CONFIG, "--resume", "step_00000002",
                       *overrides(debug_shards, tmp_path, f"checkpoint.dir={tmp_path / 'checkpoints'}")]
                for rank, node in enumerate(cluster.node_names())}
    text = run_job(cluster, commands, tmp_path / "logs", capsys, "deepspeed --no_ssh --node_rank",
                   tmp_path / "debug", 3)
    assert resumed_step(text) == 2
    worst = assert_losses_match(tmp_path / "debug", reference, range(3, STEPS + 1))
    report(capsys, f"deepspeed --no_ssh: losses vs 1 node max rel diff {worst:.1e}")
    FINAL_CHECKPOINTS["no_ssh"] = tmp_path / "checkpoints"


def lose_node2(cluster, debug_shards, tmp_path, capsys, how: str, start: str) -> str:
    """Resume the final checkpoint of the `start` launcher's run across both nodes and train on; after a
    checkpoint, lose node2 (`how`: "kill" or "link"). Returns the job's output. (Training on without node2, by
    itself: tests/test_elastic.py.)"""
    if start not in FINAL_CHECKPOINTS:
        pytest.fail(f"needs the checkpoints of the {start} test")
    subprocess.run(["cp", "-a", str(FINAL_CHECKPOINTS[start]), str(tmp_path / "checkpoints")], check=True)
    cluster.up(2)  # a fresh node2 (an earlier test may have lost it)
    job = NodeJob(cluster, hostfile_launch(cluster, "--resume", "auto", *overrides(
        debug_shards, tmp_path, "training.steps=400", f"checkpoint.dir={tmp_path / 'checkpoints'}",
        f"distributed.heartbeat_timeout_s={HEARTBEAT_S}")), tmp_path / "logs", MASTER_PORT=str(free_port()))
    job.wait_for_step(tmp_path / "debug", STEPS + 3)
    assert resumed_step(job.text()) == STEPS  # the `start` run's checkpoint resumes
    lost = time.monotonic()
    if how == "kill":
        cluster.kill("node2")
    else:
        cluster.link("node2", up=False)
    status = job.wait(timeout=time.monotonic() - job.started + NODE_LOSS_BOUND_S)
    ended = time.monotonic() - lost
    gone = job.assert_nothing_left(lost, NODE_LOSS_BOUND_S)
    assert status["node1"] != 0, status
    report(capsys, f"node2 lost ({how}): the job on node1 ended {ended:.1f} s later with exit {status['node1']}, "
                   f"every process on both nodes gone after {gone:.1f} s")
    return job.text()


def test_node_killed_ends_the_job_naming_it(cluster, debug_shards, tmp_path, capsys):
    text = lose_node2(cluster, debug_shards, tmp_path, capsys, "kill", start="no_ssh")
    assert re.search(rf"rank [01] stopped {STOPPED_AT}: lost the connection to node2 \(198\.18\.0\.2\): ranks 2, 3",
                     text), text[-4000:]


def test_link_down_ends_the_job_within_the_heartbeat_timeout(cluster, debug_shards, tmp_path, capsys):
    text = lose_node2(cluster, debug_shards, tmp_path, capsys, "link", start="mpirun")
    assert re.search(rf"rank 0 stopped {STOPPED_AT}: lost node2 \(198\.18\.0\.2\): ranks 2, 3: no heartbeat for "
                     rf"{HEARTBEAT_S} s", text), text[-4000:]


def test_unreachable_host_is_reported_before_launch(cluster, debug_shards, tmp_path):
    cluster.up(2)
    cluster.link("node2", up=False)
    job = NodeJob(cluster, hostfile_launch(cluster, *overrides(debug_shards, tmp_path)), tmp_path / "logs")
    assert job.wait(timeout=60) == {"node1": 2}
    assert "not every host of" in job.text() and "node2" in job.text()
    assert not (tmp_path / "debug").exists()


def test_local_cluster_command_line(cluster, tmp_path):
    """`up`, `exec`, `link`, `down` as a user types them, on a cluster of its own next to the module's."""
    tool = [PY, "-m", "hipscale.tools.local_cluster", "--name", f"hscli{os.getpid()}", "--state", str(tmp_path / "c")]

    def call(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(tool + list(args), capture_output=True, text=True, timeout=60, cwd=REPO)

    try:
        up = call("up", "3", "--slots", "4")
        assert up.returncode == 0 and "node3 198.18.0.3" in up.stdout, up.stderr
        assert (tmp_path / "c" / "hostfile").read_text() == "node1 slots=4\nnode2 slots=4\nnode3 slots=4\n"
        hop = call("exec", "node3", "--", "ssh", "node2", "hostname; hostname -I")
        assert hop.stdout.split() == ["node2", "198.18.0.2"], hop.stderr
        assert call("link", "node2", "down").returncode == 0
        # (the link drops packets: ssh gives up at its connect timeout, 10 s in the cluster's ssh_config)
        assert call("exec", "node3", "--", "ssh", "-o", "ConnectTimeout=2", "node2", "true").returncode != 0
        assert call("exec", "node9", "--", "true").returncode == 2
    finally:
        call("down")
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"hscli{os.getpid()}-" not in namespaces and not (tmp_path / "c").exists()
    assert not list(Path("/etc/netns").glob(f"hscli{os.getpid()}-*"))
