"""The streaming loader: rank splits, remainder, determinism, resume (same and other world size)."""
import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from hipscale.data import StreamingLoader, load_dataset_info
from hipscale.data.format.keys import id_to_key, key_to_id
from hipscale.data.loading.plan import EpochPlan, Phase, whole_shards

B = 4  # 60 samples: world 2 -> 7 batches per rank, 4 samples dropped per epoch


def epoch_keys(loader: StreamingLoader) -> list[list[str]]:
    """The keys of every batch the loader yields in one iteration."""
    return [batch["key"] for batch in loader]


def dataset_keys(data_dir) -> set[str]:
    """Every key of a dataset, read through an unshuffled single-rank loader."""
    return {key for batch in StreamingLoader(data_dir, batch_size=1, shuffle_buffer=0) for key in batch["key"]}


def test_two_ranks_two_workers_split_an_epoch_evenly_and_disjointly(loader_shards):
    everything = dataset_keys(loader_shards)
    assert len(everything) == 60
    seen_by_epoch = []
    for epoch in range(2):
        per_rank = []
        for rank in range(2):
            loader = StreamingLoader(loader_shards, batch_size=B, rank=rank, world_size=2, num_workers=2, seed=7)
            loader.set_epoch(epoch)
            assert loader.batches_per_epoch == len(loader) == 7
            batches = epoch_keys(loader)
            assert len(batches) == 7 and all(len(keys) == B for keys in batches)
            per_rank.append([key for keys in batches for key in keys])
        union = set(per_rank[0]) | set(per_rank[1])
        assert len(per_rank[0]) == len(set(per_rank[0])) == 28 and not set(per_rank[0]) & set(per_rank[1])
        assert union <= everything and len(everything - union) == 60 - 56  # the documented dropped remainder
        seen_by_epoch.append(per_rank[0] + per_rank[1])
    assert seen_by_epoch[0] != seen_by_epoch[1]  # shards and samples are reshuffled every epoch


def test_batches_do_not_depend_on_the_number_of_workers(loader_shards):
    runs = [epoch_keys(StreamingLoader(loader_shards, batch_size=B, rank=1, world_size=2, num_workers=workers))
            for workers in (0, 1, 2)]
    assert runs[0] == runs[1] == runs[2]


def test_fewer_shards_than_ranks_times_workers_and_empty_shards_are_fine(av_shards):
    shards = [shard.samples for shard in load_dataset_info(av_shards[0]).shards]
    assert shards == [3, 3, 2, 0, 0]  # 3 non-empty shards for 2 ranks x 2 workers
    per_rank = [[key for keys in epoch_keys(StreamingLoader(av_shards[0], batch_size=1, rank=rank, world_size=2,
                                                               num_workers=2)) for key in keys] for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 4 and len(set(per_rank[0] + per_rank[1])) == 8


def test_batches_are_model_ready_tensors(loader_shards):
    info = load_dataset_info(loader_shards)
    batch = next(iter(StreamingLoader(loader_shards, batch_size=B, num_workers=1)))
    assert set(batch) == {"image", "labels", "label", "key"}
    assert batch["image"].shape == (B, 64, 3) and batch["image"].dtype == torch.uint8
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (B, info.num_classes)
    assert batch["label"].dtype == torch.int64
    assert torch.equal(batch["labels"].argmax(dim=1), batch["label"]) and torch.all(batch["labels"].sum(dim=1) == 1)
    assert [key_to_id(key).split("/")[0] for key in batch["key"]] == [f"class_{c}" for c in batch["label"].tolist()]


def test_av_batches_have_the_documented_layout(av_shards, av_media):
    loader = StreamingLoader(av_shards[0], batch_size=2, num_workers=2, shuffle_buffer=3)
    batches = list(loader)
    assert len(batches) == loader.batches_per_epoch == 4
    for batch in batches:
        assert batch["video"].shape == (2, 4 * 48 * 40, 3) and batch["video"].dtype == torch.uint8
        assert batch["audio"].shape == (2, 122_880, 1) and batch["audio"].dtype == torch.int16
        assert "label" not in batch  # multi-label dataset
        for row, key in enumerate(batch["key"]):
            clip_id = next(i for i in av_media.labels if id_to_key(i) == key)
            assert torch.nonzero(batch["labels"][row]).flatten().tolist() == sorted(av_media.labels[clip_id])


RESUME_SCRIPT = """
import json, pickle, sys
from hipscale.data import StreamingLoader
data_dir, state_file = sys.argv[1], sys.argv[2]
loader = StreamingLoader(data_dir, batch_size={B}, rank=0, world_size=2, num_workers=2, seed=11)
loader.load_state_dict(pickle.load(open(state_file, "rb")))
batches = []
for epoch in range(loader.epoch, 2):
    loader.set_epoch(epoch)
    batches += [[batch["key"], int(batch["image"].sum())] for batch in loader]
print(json.dumps(batches))
"""


def test_resume_in_a_new_process_continues_with_the_next_batch(loader_shards, tmp_path):
    def make(rank: int) -> StreamingLoader:
        return StreamingLoader(loader_shards, batch_size=B, rank=rank, world_size=2, num_workers=2, seed=11)

    uninterrupted = []
    for epoch in range(2):
        loader = make(0)
        loader.set_epoch(epoch)
        uninterrupted += [[batch["key"], int(batch["image"].sum())] for batch in loader]
    interrupted = make(0)
    for step, batch in enumerate(interrupted, start=1):
        if step == 3:
            state = interrupted.state_dict()
            break
    assert pickle.loads(pickle.dumps(state)) == state and json.loads(json.dumps(state)) == state
    (tmp_path / "state.pkl").write_bytes(pickle.dumps(state))
    done = subprocess.run([sys.executable, "-c", RESUME_SCRIPT.format(B=B), str(loader_shards),
                           str(tmp_path / "state.pkl")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == uninterrupted[3:]  # batch 4 of epoch 0 onwards, through epoch 1

    other_rank = make(1)  # rank 0's saved state resumes rank 1 as well
    other_rank.load_state_dict(state)
    assert epoch_keys(other_rank) == epoch_keys(make(1))[3:]


@pytest.mark.parametrize("process_group", [False, True], ids=["forked", "fork-server"])
def test_a_script_without_a_main_guard_streams_with_workers_that_do_not_rerun_it(loader_shards, tmp_path,
                                                                                 process_group):
    """Workers are forked from a script without a process group and come from a fork server in one (a rank);
    either way they must not import the user's script again (a script without the `if __name__ ==
    "__main__":` guard would start workers from its workers) nor repeat its top-level work."""
    script = tmp_path / "quick_look.py"
    group = (f"torch.distributed.init_process_group('gloo', init_method='file://{tmp_path}/pg', rank=0, "
             "world_size=1)") if process_group else ""
    script.write_text(f"""import json
import torch.distributed
from hipscale.data import StreamingLoader
print("top-level code ran", flush=True)
{group}
loader = StreamingLoader({str(loader_shards)!r}, batch_size={B}, num_workers=2, seed=11)
print(json.dumps([batch["key"] for batch in loader]))
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "top-level code ran" and len(lines) == 2  # once, in the script's own process
    expected = [batch["key"] for batch in StreamingLoader(loader_shards, batch_size=B, num_workers=2, seed=11)]
    assert json.loads(lines[1]) == expected


def test_an_exception_in_a_worker_ends_the_script_instead_of_hanging_it(loader_shards, tmp_path):
    """Workers ignore SIGTERM, which the interpreter's exit sends its daemonic children before joining them: an
    error raised in a worker (injected here: the worker's decode fails on its second batch) must end the
    script with the error, its workers stopped, not leave it waiting for them."""
    script = tmp_path / "failing.py"
    script.write_text(f"""import hipscale.data.loading.loader as loader_module
from hipscale.data import StreamingLoader
real, calls = loader_module.decode_batch, []
def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise ValueError("injected worker failure")
    return real(*args, **kwargs)
loader_module.decode_batch = failing  # forked workers inherit it
for batch in StreamingLoader({str(loader_shards)!r}, batch_size={B}, num_workers=2):
    pass
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "ValueError: injected worker failure" in done.stderr, done.stderr


@pytest.mark.parametrize("process_group", [False, True], ids=["forked", "fork-server"])
def test_workers_started_while_stop_signals_hit_the_process_group_all_survive(loader_shards, tmp_path,
                                                                              process_group):
    """A scheduler's SIGTERM/SIGUSR1/SIGINT reach every process of the group, also workers in the middle of
    starting (a preemption as an evaluation begins). A worker must not die of one at any moment of its start:
    here the signals arrive every millisecond while 12 epochs start 2 workers each, and the script, which
    counts the signals it gets, must read every epoch whole."""
    script = tmp_path / "signalled.py"
    group = (f"torch.distributed.init_process_group('gloo', init_method='file://{tmp_path}/pg', rank=0, "
             "world_size=1)") if process_group else ""
    script.write_text(f"""import signal
import torch.distributed
from hipscale.data import StreamingLoader
{group}
received = []
for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: received.append(signum))
loader = StreamingLoader({str(loader_shards)!r}, batch_size={B}, num_workers=2, shuffle_buffer=0)
print("ready", flush=True)
batches = [len(list(loader)) for _ in range(12)]
print("batches", *batches, "signals", len(received), flush=True)
input()  # the test stops signalling first: an exiting interpreter restores the default handlers
""")
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline() == "ready\n"
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    signals = itertools.cycle([signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
    deadline = time.monotonic() + 90
    while reader.is_alive() and time.monotonic() < deadline:
        os.killpg(proc.pid, next(signals))
        time.sleep(0.001)
    out, err = proc.communicate("\n", timeout=10)
    words = "".join(result).split()
    assert proc.returncode == 0 and words[:13] == ["batches"] + ["15"] * 12, (result, err[-3000:])
    assert int(words[-1]) > 100, words  # the signals did arrive all along
    # The fork server's helper, multiprocessing's resource tracker, survived too (it is relaunched, with this
    # warning, when a new epoch's queues find it dead).
    assert "died unexpectedly" not in err, err[-3000:]


def test_resume_on_another_world_size_reads_only_unseen_samples(loader_shards):
    consumed = []
    for rank in range(2):
        loader = StreamingLoader(loader_shards, batch_size=B, rank=rank, world_size=2, num_workers=2, seed=5)
        for step, batch in enumerate(loader, start=1):
            consumed += batch["key"]
            if step == 2:
                break
    state = loader.state_dict()
    assert len(consumed) == len(set(consumed)) == 16
    resumed = []
    for rank in range(3):
        loader = StreamingLoader(loader_shards, batch_size=B, rank=rank, world_size=3, num_workers=2, seed=5)
        loader.load_state_dict(state)
        assert len(loader) == (60 - 16) // (3 * B) == 3  # the same count on every rank
        resumed.append([key for keys in epoch_keys(loader) for key in keys])
        assert loader.epoch == 1 and len(loader) == 60 // (3 * B)  # the next epoch is whole again
    flat = [key for keys in resumed for key in keys]
    assert len(flat) == len(set(flat)) == 36 and not set(flat) & set(consumed)


def test_a_resumed_epoch_can_be_resized_twice():
    plan = EpochPlan(whole_shards([7, 7, 7, 7, 7, 7, 7, 7, 4]), seed=1, epoch=3)
    phases = [Phase(2, 4, 8, steps=2), Phase(3, 2, 16, steps=1), Phase(1, 5, 0)]
    seen = [plan.schedule([Phase(2, 4, 8)], r)[:2].ravel() for r in range(2)]
    seen += [plan.schedule(phases[:1] + [Phase(3, 2, 16)], r)[:1].ravel() for r in range(3)]
    rest = plan.schedule(phases, 0).ravel()
    everything = np.concatenate(seen + [rest])
    assert len(everything) == len(set(everything.tolist())) == 16 + 6 + (60 - 22) // 5 * 5


def test_foreign_or_inconsistent_states_are_refused(loader_shards, av_shards):
    with pytest.raises(ValueError, match="dataset"):
        StreamingLoader(loader_shards, batch_size=B).load_state_dict(StreamingLoader(av_shards[0], 2).state_dict())
    loader = StreamingLoader(loader_shards, batch_size=B)
    state = loader.state_dict()
    state["phases"][-1]["steps"] = 16  # 60 // 4 = 15 batches
    with pytest.raises(ValueError, match="claims 16 steps but has 15 batches"):
        loader.load_state_dict(state)
    assert loader.state_dict()["phases"][-1]["steps"] == 0 and len(loader) == 15


def test_too_small_a_dataset_for_the_world_is_refused(loader_shards):
    with pytest.raises(ValueError, match="fewer than world_size"):
        StreamingLoader(loader_shards, batch_size=16, world_size=4)


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_evaluation_reads_every_sample_once_whatever_the_world_size(loader_shards, world_size):
    """drop_remainder=False: 60 samples on 1, 2, 3 and 7 ranks (7 x 4 = 28 a batch, so no world divides
    them evenly but 1, 2 and 3 are also not multiples of 8): every sample exactly once among the valid slots,
    the same batch count on every rank, padding slots invalid."""
    valid_keys, counts = [], []
    for rank in range(world_size):
        loader = StreamingLoader(loader_shards, batch_size=8, rank=rank, world_size=world_size, num_workers=2,
                                 shuffle_buffer=16, drop_remainder=False)
        batches = list(loader)
        counts.append(len(batches))
        assert len(batches) == loader.batches_per_epoch
        for batch in batches:
            assert batch["valid"].dtype == torch.bool and batch["valid"].shape == (8,)
            assert batch["image"].shape[0] == 8
            valid_keys += [key for key, ok in zip(batch["key"], batch["valid"].tolist()) if ok]
        with pytest.raises(ValueError, match="no position to restore"):
            loader.load_state_dict({})
    assert len(set(counts)) == 1
    assert sorted(valid_keys) == sorted(dataset_keys(loader_shards))  # each of the 60 once, none dropped


def test_evaluation_masks_unreadable_samples_and_counts_them_once(loader_shards, tmp_path):
    """A corrupt sample is invalid in its batch and counted once; the padding copies of it are not counted."""
    from test_faults import corrupt_first_sample_of_each_shard

    damaged = tmp_path / "damaged"
    corrupt_first_sample_of_each_shard(loader_shards, damaged)
    shards = len(load_dataset_info(damaged).shards)
    valid, bad = 0, 0
    for rank in range(2):
        loader = StreamingLoader(damaged, batch_size=8, rank=rank, world_size=2, drop_remainder=False)
        valid += sum(int(batch["valid"].sum()) for batch in loader)
        bad += loader.bad_samples
    assert bad == shards and valid == 60 - shards
