"""The pieces of elastic training, in process: the global batch rule, the synthetic loader's resume on
another world size, the start and fault records behind the restart line, and the launcher's view of the head
node. The jobs themselves: tests/test_elastic.py."""
from __future__ import annotations

import json
import socket
import time

import pytest

from hipscale.config import load_config
from hipscale.config.schema import SyntheticDataConfig
from hipscale.data.loading.synthetic_loader import SyntheticLoader
from hipscale.launch.elastic import is_local, parse_args, probe
from hipscale.training.components.outcome import EXIT_CONFIG, SetupError
from hipscale.training.elastic import StartRecords, describe_restart
from hipscale.training.global_batch import accumulation_for, dividing_world_sizes, resolve_global_batch
from train_helpers import CONFIG


def test_accumulation_keeps_the_global_batch_and_names_the_world_sizes_that_divide_it():
    assert [accumulation_for(16, 2, world) for world in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert dividing_world_sizes(24, 2) == [1, 2, 3, 4, 6, 12]
    with pytest.raises(SetupError) as stop:
        accumulation_for(16, 2, 3)
    assert stop.value.exit_status == EXIT_CONFIG
    assert str(stop.value) == ("training.global_batch_size=16 with data.micro_batch_size=2 cannot be split over 3 "
                               "ranks; world sizes that divide it: 1, 2, 4, 8")


def test_the_global_batch_comes_from_the_checkpoint_then_the_config_then_the_first_world():
    config = load_config(CONFIG, ["data.micro_batch_size=2", "training.gradient_accumulation_steps=3"])
    assert resolve_global_batch(config, world_size=4, saved=None) == 24     # 2 x 3 x 4 at a fresh start
    assert resolve_global_batch(config, world_size=2, saved=24) == 24       # a resumed run keeps its G
    config = load_config(CONFIG, ["data.micro_batch_size=2", "training.global_batch_size=16"])
    assert resolve_global_batch(config, world_size=2, saved=None) == 16
    with pytest.raises(SetupError, match="trained with 24: the global batch is fixed for a run"):
        resolve_global_batch(config, world_size=2, saved=24)


@pytest.mark.parametrize("overrides, message", [
    (["training.global_batch_size=10", "data.micro_batch_size=4"], "must be a positive multiple of"),
    (["training.global_batch_size=16", "training.gradient_accumulation_steps=2"], "set only one of them"),
])
def test_inconsistent_batch_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(Exception, match=message):
        load_config(CONFIG, overrides)


def test_synthetic_loader_resumes_exactly_on_another_world_size():
    """Two ranks read 3 global batches; then 4 ranks, then 1 rank, continue the epoch: every index of the epoch
    is read once, in order, but the dropped remainder of its last global batch."""
    config = SyntheticDataConfig(modalities={"image": [4, 3]}, num_samples=50)

    def loaders(world: int, state=None) -> list[SyntheticLoader]:
        out = [SyntheticLoader(config, batch_size=2, rank=r, world_size=world, seed=5) for r in range(world)]
        for loader in out:
            if state is not None:
                loader.load_state_dict(state)
        return out

    def global_batches(ranks: list[SyntheticLoader], count: int) -> list[str]:
        its = [iter(r) for r in ranks]
        keys = []
        for _ in range(count):
            keys += [k for it in its for k in next(it)["key"]]
        return keys

    two = loaders(2)
    seen = global_batches(two, 3)
    four = loaders(4, two[0].state_dict())
    assert len(four[0]) == (50 - 12) // 8 == 4
    seen += global_batches(four, 2)
    one = loaders(1, four[3].state_dict())
    seen += global_batches(one, len(one[0]))
    indices = sorted(int(k.rsplit("-", 1)[1]) for k in seen)
    assert indices == list(range(50)) and len(seen) == 50  # 12 + 16 + 22: nothing twice, nothing dropped here
    assert all(k.startswith("synthetic-0-") for k in seen)
    assert len(one[0]) == 0 and list(one[0]) == []  # the epoch is over: the next pass is epoch 1's
    assert one[0].state_dict() == {"epoch": 1, "consumed": 0}


def test_restart_line_reports_the_resize_and_the_earliest_fault_of_the_start_that_ended(tmp_path):
    first = StartRecords(tmp_path, "aaaa", rank=0)
    first.read_previous()
    assert first.first_step_done(4, ["node1 (198.18.0.1)"] * 2 + ["node2 (198.18.0.2)"] * 2, 1, 8, None) is None
    t = time.time()
    StartRecords(tmp_path, "aaaa", rank=2).record_fault("rank 2 stopped: lost the store", t - 30)
    StartRecords(tmp_path, "aaaa", rank=0).record_fault("rank 0 stopped: lost node2", t - 31)
    StartRecords(tmp_path, "zzzz", rank=0).record_fault("a start that never trained", t - 99)  # not the one ended
    second = StartRecords(tmp_path, "bbbb", rank=0)
    second.read_previous()
    event = second.first_step_done(2, ["node1 (198.18.0.1)"] * 2, 2, 8, 12)
    assert event["recovery_s"] == pytest.approx(31, abs=1.0) and event["fault"] == "rank 0 stopped: lost node2"
    assert event["nodes_gone"] == ["node2"] and event["nodes_new"] == []
    line = describe_restart(event)
    assert line.startswith("elastic resize: world size 4 -> 2 (nodes node1; gone: node2), gradient accumulation "
                           "1 -> 2 (global batch 8), resumed from step 12, first step 3")
    assert [p.name for p in (tmp_path / "elastic" / "faults").iterdir()] == []  # older starts' records dropped
    assert json.loads((tmp_path / "elastic" / "start.json").read_text())["id"] == "bbbb"


def test_launcher_tells_a_refused_head_from_an_answering_one_and_knows_its_own_address():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert probe("127.0.0.1", port) == "up"
    assert probe("127.0.0.1", port) == "refused"
    assert is_local("127.0.0.1") and not is_local("198.18.255.254")  # binding sends nothing
    # A silent head (no answer at all) is told apart in tests/test_elastic.py, behind a pulled cable.


def test_launcher_refuses_a_command_line_it_cannot_run(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--head", "node1", "--nnodes", "3:1", "--nproc-per-node", "2", "--run-id", "j", "--",
                    "--config", CONFIG])
    assert "1 <= MIN <= MAX" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--head", "node1", "--nnodes", "1:2", "--nproc-per-node", "2", "--run-id", "j"])
    assert "at least --config CONFIG" in capsys.readouterr().err
    options = parse_args(["--head", "node1:29433", "--nnodes", "2", "--nproc-per-node", "8", "--run-id", "j", "--",
                          "--config", CONFIG, "--set", "zero.stage=3"])
    assert (options.head, options.port, options.min_nodes, options.max_nodes) == ("node1", 29433, 2, 2)
    assert options.train_args == ["--config", CONFIG, "--set", "zero.stage=3"]
