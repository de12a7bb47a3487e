"""End-to-end training of configs/debug.yaml with real DeepSpeed engines in 2 CPU processes.

Dropout is on, so every step draws from the torch RNG (RNG restore is tested), MAE masks and the debug
config's augmentation (crops, flips, colour, MixUp/CutMix) are drawn every step, and DataLoader workers are on. Each launched job checks several things at once:
- deepspeed launcher, ZeRO-2: the loss falls, a NaN on rank 1 alone skips the step on every rank,
  checkpoints are pruned, TensorBoard events exist, exported weights give the engine's outputs.
- torchrun, ZeRO-3 with every block activation-checkpointed: same losses and gradient norms as ZeRO-2
  without checkpointing.
- SIGKILL at each stage of the step-8 (or step-4) save leaves `latest` on a complete checkpoint;
  `--resume auto` starts from the step `latest` names and reproduces the following steps bitwise
  (one of them reading its train and eval data from an S3 server: a remote run equals the local one).
- torchrun, ZeRO-1, 2 and 3: a `--universal` resume on the same world size repeats the uninterrupted run
  bitwise (the optimizer's moments, step counts and param groups carried over, not only the weights).
- World-size changes 2 -> 1 (launchers/mpirun.sh, --universal) and 1 -> 2 (--resume auto alone), ZeRO-2 and
  ZeRO-3, through the universal checkpoint, each training several steps after loading with the same global
  batch (accumulation 2 on one process).
"""
from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from train_helpers import CONFIG, deepspeed, mpirun_sh, records, run, torchrun

STEPS = 8
NAN_STEP = 2          # 0-based optimizer step whose loss is made NaN on rank 1 only (skipped by the guard)
LOSS_RTOL = 1e-4      # ZeRO-2 vs ZeRO-3 + activation checkpointing (reduction order differs)
BITWISE_KEYS = ("loss", "mae", "cls", "grad_norm", "lr", "skipped")


def overrides(data: dict, out: Path, *extra: str) -> list[str]:
    return ["--set", f"data.train_dir={data['train']}", f"data.eval_dir={data['eval']}", f"run.output_dir={out}",
            f"training.steps={STEPS}", f"faults.nonfinite_steps=[{NAN_STEP}]", "faults.nonfinite_ranks=[1]",
            "eval.every_steps=4", "eval.max_batches=null", "eval.micro_batch_size=3", "model.dropout_prob=0.02",
            *extra]


def resumed_step(output: str) -> int:
    """The step a run says it resumed from."""
    found = re.findall(r"resumed from \S+ at step (\d+)", output)
    assert len(found) == 1, output[-3000:]
    return int(found[0])


# The settings of each stage's uninterrupted 8-step run (a fixture below), which its resumes repeat.
STAGE_SETTINGS = {
    1: ["zero.stage=1", "activation_checkpoint.policy=none"],
    2: ["zero.stage=2", "activation_checkpoint.policy=none"],
    3: ["zero.stage=3", "activation_checkpoint.policy=all"],
}


@pytest.fixture(scope="module")
def zero1(debug_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero1")
    run(torchrun() + overrides(debug_shards, out, *STAGE_SETTINGS[1], "checkpoint.export_at_end=false"))
    return out / "debug"


@pytest.fixture(scope="module")
def zero2(debug_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero2")
    run(deepspeed() + overrides(debug_shards, out, *STAGE_SETTINGS[2], "checkpoint.every_steps=2",
                                "checkpoint.keep_last=3"))
    return out / "debug"


@pytest.fixture(scope="module")
def zero3(debug_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero3")
    run(torchrun() + overrides(debug_shards, out, *STAGE_SETTINGS[3]))
    return out / "debug"


def test_zero2_deepspeed_launcher_trains_skips_nan_and_exports(zero2):
    train = records(zero2)
    assert sorted(train) == list(range(1, STEPS + 1))
    # It learns: both eval losses fall (the train losses are those of augmented, mixed batches: noisy).
    evals = records(zero2, "eval")
    assert evals[8]["cls_loss"] < evals[4]["cls_loss"] and evals[8]["mae_loss"] < evals[4]["mae_loss"], evals
    # The NaN on rank 1 alone skips the update on every rank, is counted, and does not advance the lr.
    assert train[NAN_STEP]["skipped"] == 0 and train[NAN_STEP + 1]["skipped"] == 1
    assert train[NAN_STEP + 1]["lr"] == train[NAN_STEP + 2]["lr"]
    # Checkpoint pruning (every 2 steps, keep_last=3), `latest`, TensorBoard, resolved config.
    ckpts = zero2 / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000006", "step_00000008"]
    assert (ckpts / "latest").read_text() == "step_00000008"
    assert list((zero2 / "tensorboard").glob("events.out.tfevents.*"))
    # Pictures at both evaluations: MAE reconstructions of the 3 samples of rank 0's first eval batch and the
    # position embeddings' principal components, in the event files and as PNG files.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(zero2 / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    pictures = ["mae/image/0", "mae/image/1", "mae/image/2", "position_embedding/image"]
    assert sorted(events.Tags()["images"]) == pictures
    assert [e.step for e in events.Images("mae/image/0")] == [4, 8]
    for step in ("step_00000004", "step_00000008"):
        assert sorted(p.name for p in (zero2 / "pictures" / step).glob("*.png")) == [
            f"{tag.replace('/', '_')}.png" for tag in pictures]
    assert "stage: 2" in (zero2 / "config.yaml").read_text()
    # Exported weights in a plain model give the engine's eval outputs.
    from hipscale.training.export import load_exported

    model = load_exported(zero2 / "export" / "model.pt")
    probe = torch.load(zero2 / "export" / "probe.pt", weights_only=True)
    with torch.no_grad():
        out = model(probe["inputs"])["reconstruction"]
    for name, expected in probe["outputs"].items():
        torch.testing.assert_close(out[name], expected, rtol=0, atol=1e-5)


def test_zero3_with_activation_checkpointing_matches_zero2(zero2, zero3):
    a, b = records(zero2), records(zero3)
    for step in range(1, STEPS + 1):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=LOSS_RTOL, nan_ok=True), step
        if step != NAN_STEP + 1:
            assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=LOSS_RTOL), step
    assert records(zero3, "eval")[STEPS]["top1"] == pytest.approx(records(zero2, "eval")[STEPS]["top1"])


@pytest.mark.parametrize("kill", [
    # (step, rank, stage): the disk state each stage of the save protocol can be left in
    (8, 1, "write"),     # rank 1 dies with DeepSpeed's files written, nothing synced or marked
    (8, 0, "complete"),  # step_8 is COMPLETE but `latest` still names step_4: resume must follow `latest`
    (4, 0, "latest"),    # `latest` names step_4, the first checkpoint; killed before pruning
], ids=lambda k: f"step{k[0]}-rank{k[1]}-{k[2]}")
def test_zero3_sigkill_during_save_then_resume_auto_is_bitwise(kill, debug_shards, zero3, s3, debug_shards_s3,
                                                              tmp_path):
    step, rank, stage = kill
    args = overrides(debug_shards, tmp_path, "zero.stage=3", "activation_checkpoint.policy=all")
    crashed = run(torchrun() + args + [f"faults.kill_at_step={step}", f"faults.kill_rank={rank}",
                                       f"faults.kill_point={stage}"], check=False)
    # The third case resumes with its data from the S3 server (through the shard cache): step for step the
    # local run's losses, gradient norms and eval metrics.
    remote = stage == "latest"
    if remote:
        args = overrides(debug_shards_s3, tmp_path, "zero.stage=3", "activation_checkpoint.policy=all",
                         f"data.cache_dir={tmp_path / 'cache'}")
    assert crashed.returncode != 0
    ckpts = tmp_path / "debug" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert (ckpts / "step_00000008" / "COMPLETE").exists() == (stage == "complete")
    resumed = run(torchrun() + ["--resume", "auto"] + args, extra_env=s3.env if remote else None)
    assert resumed_step(resumed.stdout) == 4
    assert ("s3://debug/train" in resumed.stdout) == remote  # the resolved config names the data
    after, reference = records(tmp_path / "debug"), records(zero3)
    assert sorted(after) == list(range(1, STEPS + 1))
    for s in range(5, STEPS + 1):  # the last record of each step is the resumed run's
        for key in BITWISE_KEYS:
            assert after[s][key] == reference[s][key], (s, key)
    assert (ckpts / "latest").read_text() == "step_00000008"
    assert records(tmp_path / "debug", "eval")[STEPS] == records(zero3, "eval")[STEPS]


@pytest.mark.parametrize("stage", sorted(STAGE_SETTINGS))
def test_a_universal_resume_on_the_same_world_size_continues_the_optimizer_exactly(stage, request, debug_shards,
                                                                                   tmp_path):
    """Step 4's checkpoint through `--universal` on the same 2 processes: steps 5-8 repeat the uninterrupted run
    bitwise. Step 5's loss depends on the weights alone; from step 6 on the Adam moments, step counts and each
    param group's hyperparameters count (a ZeRO-3 universal load in DeepSpeed 0.19.8 changes the last two:
    hipscale.training.components.universal_zero3)."""
    reference = request.getfixturevalue(f"zero{stage}")
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints" / "step_00000004", ckpts / "step_00000004",
                    ignore=shutil.ignore_patterns("universal*"))
    resumed = run(torchrun() + ["--resume", "step_00000004", "--universal"] + overrides(
        debug_shards, tmp_path, *STAGE_SETTINGS[stage], f"checkpoint.dir={ckpts}", "checkpoint.export_at_end=false"))
    assert resumed_step(resumed.stdout) == 4 and "(universal)" in resumed.stdout
    after, before = records(tmp_path / "debug"), records(reference)
    assert sorted(after) == list(range(5, STEPS + 1))
    for s in after:
        for key in BITWISE_KEYS:
            assert after[s][key] == before[s][key], (stage, s, key, after[s][key], before[s][key])


def mpirun_sh_run(args: list[str]) -> str:
    """One process through launchers/mpirun.sh; returns its stdout."""
    return run(mpirun_sh(1) + args).stdout


def test_mpirun_universal_resume_on_one_process_evaluates_the_whole_eval_set_identically(debug_shards, zero3, tmp_path):
    out = mpirun_sh_run(["--resume", "step_00000004", "--universal",
                         *overrides(debug_shards, tmp_path, "zero.stage=3", "training.steps=4",
                                    f"checkpoint.dir={zero3 / 'checkpoints'}", "checkpoint.export_at_end=false")])
    assert resumed_step(out) == 4 and "(universal)" in out
    # 32 eval samples in batches of 3: 1 rank pads 1 slot of 11 batches, 2 ranks 2 slots of 6 batches each.
    one, two = records(tmp_path / "debug", "eval")[4], records(zero3, "eval")[4]
    assert one["samples"] == two["samples"] == 32
    for metric in ("cls_loss", "mae_loss"):
        assert one[metric] == pytest.approx(two[metric], rel=1e-5), metric
    assert one["top1"] == two["top1"]


@pytest.mark.parametrize("stage", [2, 3])
def test_world_size_change_both_ways_trains_after_loading(stage, request, debug_shards, tmp_path):
    """2 -> 1 -> 2 processes (the elastic resizes of tests/test_elastic.py: their first losses equal a
    `--universal` resume)."""
    from hipscale.config import load_config
    from hipscale.training.schedule import lr_factor

    config = load_config(CONFIG)
    start = 4
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(request.getfixturevalue(f"zero{stage}") / "checkpoints" / f"step_{start:08d}",
                    ckpts / f"step_{start:08d}", ignore=shutil.ignore_patterns("universal*"))
    common = [*STAGE_SETTINGS[stage], f"checkpoint.dir={ckpts}", "checkpoint.export_at_end=false",
              "checkpoint.keep_last=5", "eval.every_steps=0"]

    def expected_lr(step: int, total: int) -> float:  # the update of `step` follows step-1 updates, one skipped
        return config.optimizer.lr * lr_factor(step - 2, total, config.schedule)

    # 2 -> 1 through launchers/mpirun.sh: load the 2-process checkpoint, train 4 more steps.
    out = mpirun_sh_run(["--resume", f"step_{start:08d}", "--universal",
                         *overrides(debug_shards, tmp_path / "one", f"training.steps={start + 4}", *common)])
    assert resumed_step(out) == start
    trained = records(tmp_path / "one" / "debug")
    assert sorted(trained) == list(range(start + 1, start + 5))
    for s, r in trained.items():  # finite losses, the skipped count and the lr schedule carried over
        assert math.isfinite(r["loss"]) and r["skipped"] == 1, r
        assert r["lr"] == pytest.approx(expected_lr(s, start + 4), rel=1e-9), s
        assert (r["world_size"], r["grad_accumulation"]) == (1, 2), r  # the global batch of 8 kept on 1 process
    # 1 -> 2: load the 1-process checkpoint of step start+4, train 4 more steps on 2 processes; without
    # --universal: the world size changed, so the universal checkpoint is used by itself.
    two = run(torchrun() + ["--resume", "auto",
                          *overrides(debug_shards, tmp_path / "two", f"training.steps={start + 8}", *common)])
    assert resumed_step(two.stdout) == start + 4 and "(universal)" in two.stdout
    again = records(tmp_path / "two" / "debug")
    assert sorted(again) == list(range(start + 5, start + 9))
    for s, r in again.items():
        assert math.isfinite(r["loss"]) and r["skipped"] == 1, r
        assert r["lr"] == pytest.approx(expected_lr(s, start + 8), rel=1e-9), s
        assert (r["world_size"], r["grad_accumulation"]) == (2, 1), r


def test_debug_config_uses_loader_workers():
    from hipscale.config import load_config

    assert load_config(CONFIG).data.num_workers >= 2, "the fault tests rely on real DataLoader worker processes"
