"""End-to-end training of configs/debug.yaml with real DeepSpeed engines in 2 CPU processes.

Each launched job checks several things at once to keep the suite short:
- deepspeed launcher, ZeRO-2: the loss falls, a NaN step is skipped and counted, checkpoints are pruned,
  TensorBoard events exist, exported weights give the engine's outputs in a plain model.
- torchrun, ZeRO-3 with every block activation-checkpointed: same losses and gradient norms as ZeRO-2
  without checkpointing; SIGKILL while saving step 8 leaves `latest` at step 4, and `--resume auto`
  reproduces steps 5-8 of the uninterrupted run bitwise (fp32), data stream included.
- mpirun (mpi4py discovery), 1 process: the 2-process checkpoint resumes through the universal path and
  evaluates exactly as the 2-process engine did.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hipscale.training.distributed import free_port
from test_train_units import make_image_folder  # learnable in a few steps, unlike the sharder's test images

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent
CONFIG = str(REPO / "configs" / "debug.yaml")
STEPS = 8
NAN_STEP = 2          # 0-based optimizer step whose loss is made NaN (skipped by the guard)
LOSS_RTOL = 1e-4      # ZeRO-2 vs ZeRO-3 + activation checkpointing (reduction order differs)


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    e.pop("RANK", None)
    return e


def run(cmd: list[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:6])}... exited {proc.returncode}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def records(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["kind"] == kind}


def overrides(data: dict, out: Path, *extra: str) -> list[str]:
    return ["--set", f"data.train_dir={data['train']}", f"data.eval_dir={data['eval']}", f"run.output_dir={out}",
            f"training.steps={STEPS}", f"training.inject_nonfinite_steps=[{NAN_STEP}]", "eval.every_steps=4",
            "eval.max_batches=null",
            *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Train and eval shards of a small ImageFolder tree, made by our sharder."""
    root = tmp_path_factory.mktemp("data")
    dirs = {}
    for split, per_class, per_shard in (("train", 24, 16), ("eval", 8, 8)):
        images = make_image_folder(root / f"{split}_images", per_class=per_class, seed=len(split))
        dirs[split] = root / split
        run([PY, "preprocess/shard_images.py", "--images", str(images), "--out", str(dirs[split]), "--size", "16",
             "--workers", "1", "--max-samples-per-shard", str(per_shard)])
    return dirs


@pytest.fixture(scope="module")
def zero2(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero2")
    run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "hipscale.train",
         "--config", CONFIG, *overrides(data, out, "zero.stage=2", "activation_checkpoint.policy=none",
                                        "checkpoint.keep_last=1")])
    return out / "debug"


@pytest.fixture(scope="module")
def zero3(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero3")
    torchrun(overrides(data, out, "zero.stage=3", "activation_checkpoint.policy=all"))
    return out / "debug"


def torchrun(args: list[str], check: bool = True, extra: tuple = ()) -> subprocess.CompletedProcess:
    return run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
                "-m", "hipscale.train", "--config", CONFIG, *extra, *args], check=check)


def test_zero2_deepspeed_launcher_trains_skips_nan_and_exports(zero2):
    train = records(zero2)
    assert sorted(train) == list(range(1, STEPS + 1))
    losses = [train[s]["loss"] for s in range(1, STEPS + 1) if s != NAN_STEP + 1]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.02, losses
    # The NaN step is skipped, counted, and does not advance the lr schedule.
    assert train[NAN_STEP]["skipped"] == 0 and train[NAN_STEP + 1]["skipped"] == 1
    assert train[NAN_STEP + 1]["lr"] == train[NAN_STEP + 2]["lr"]
    # Checkpoint pruning (keep_last=1), `latest`, TensorBoard, resolved config.
    ckpts = zero2 / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000008"]
    assert (ckpts / "latest").read_text() == "step_00000008"
    assert list((zero2 / "tensorboard").glob("events.out.tfevents.*"))
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


def test_zero3_sigkill_during_save_then_resume_auto_is_bitwise(data, zero3, tmp_path):
    args = overrides(data, tmp_path, "zero.stage=3", "activation_checkpoint.policy=all")
    crashed = torchrun(args + ["training.inject_kill_at_step=8"], check=False)
    assert crashed.returncode != 0
    ckpts = tmp_path / "debug" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert not (ckpts / "step_00000008" / "COMPLETE").exists()
    torchrun(args, extra=("--resume", "auto"))
    resumed, reference = records(tmp_path / "debug"), records(zero3)
    for step in range(5, STEPS + 1):  # the last record of each step is the resumed run's
        for key in ("loss", "mae", "cls", "grad_norm", "lr", "skipped"):
            assert resumed[step][key] == reference[step][key], (step, key)
    assert (ckpts / "step_00000008" / "COMPLETE").exists()
    evals = records(tmp_path / "debug", "eval")[STEPS], records(zero3, "eval")[STEPS]
    assert [e[k] for e in evals for k in ("mae_loss", "cls_loss", "top1")][:3] == \
        [e[k] for e in evals for k in ("mae_loss", "cls_loss", "top1")][3:]


def test_mpirun_universal_resume_on_one_process(data, zero3, tmp_path):
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun (openmpi) is required: make system-deps"
    e = env()
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "1", "-x", "DS_ACCELERATOR", "-x",
           "TORCH_EXTENSIONS_DIR", "-x", f"MASTER_PORT={free_port()}", PY, "-m", "hipscale.train", "--config",
           CONFIG, "--resume", "step_00000004", "--universal",
           *overrides(data, tmp_path, "zero.stage=3", "training.steps=4",
                      f"checkpoint.dir={zero3 / 'checkpoints'}", "checkpoint.export_at_end=false")]
    proc = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "resumed from" in proc.stdout and "(universal)" in proc.stdout
    one, two = records(tmp_path / "debug", "eval")[4], records(zero3, "eval")[4]
    assert one["cls_loss"] == pytest.approx(two["cls_loss"], rel=1e-5)
    assert one["top1"] == two["top1"]
