"""In-process checks of the training pieces, and single-process runs of `python -m hipscale.train`."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hipscale.config import load_config
from hipscale.config.schema import ActivationCheckpointConfig, ScheduleConfig
from hipscale.config.schema import SyntheticDataConfig
from hipscale.data.loading.synthetic_loader import SyntheticLoader
from hipscale.training.activation_checkpoint import apply_activation_checkpointing, select_blocks
from hipscale.training.batches import EpochStream
from hipscale.training.compile import compile_blocks
from hipscale.training.components.metrics import mean_average_precision, top1_accuracy
from hipscale.training.evaluate import undefined_metrics
from hipscale.training.distributed import free_port
from hipscale.training.model_setup import build_model
from hipscale.training.schedule import lr_factor
from train_helpers import env

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "debug.yaml")
AC_ATOL = 1e-6  # activation checkpointing on vs off, fp32, same process: recomputation is deterministic
COMPILE_ATOL = 1e-5  # torch.compile'd blocks vs eager, fp32 on CPU: inductor fuses and reorders (measured ~1e-6)
COMPILE_RTOL = 1e-4  # losses of 4 training steps, compiled vs eager


def make_image_folder(root: Path, per_class: int, seed: int, classes: int = 4, size: int = 16) -> Path:
    """An ImageFolder tree of PNGs whose colour and stripes depend on the class (learnable)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(classes):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.zeros((size, size, 3))
        base[..., k % 3] = 200
        base[:, (k * size // classes):((k + 1) * size // classes)] = 255
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def tiny_model(labels: bool = True) -> torch.nn.Module:
    config = load_config(CONFIG, ["data.source=synthetic"])
    spec = {"variant": config.model.variant, "inputs": {"image": (256, 3)},
            "labels": {"label": (1, 4)} if labels else None}
    return build_model(spec)


@pytest.mark.parametrize("compiled, checkpointed, atol", [
    (False, True, AC_ATOL),
    (True, False, COMPILE_ATOL),
    (True, True, COMPILE_ATOL),  # the trainer's order: compile the blocks, then checkpoint them
])
def test_compiled_and_checkpointed_blocks_give_eager_loss_and_gradients(compiled, checkpointed, atol):
    torch.manual_seed(0)
    plain = tiny_model()
    changed = tiny_model()
    changed.load_state_dict(plain.state_dict())
    keys = list(changed.state_dict())
    assert compile_blocks(changed, "blocks" if compiled else "none") == ([0, 1, 2] if compiled else [])
    policy = ActivationCheckpointConfig(policy="all" if checkpointed else "none")
    assert apply_activation_checkpointing(changed, policy) == ([0, 1, 2] if checkpointed else [])
    assert list(changed.state_dict()) == keys  # state_dict keys unchanged
    x = {"image": torch.randn(3, 256, 3), "label": torch.zeros(3, 1, 4)}
    losses = []
    for model in (plain, changed):
        out = model(x)
        loss = out["reconstruction"]["image"].square().mean() + out["reconstruction"]["label"].square().mean()
        loss = loss + out["latents"].square().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=atol)
    for (name, p), q in zip(plain.named_parameters(), changed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=atol, msg=name)


def test_checkpoint_policies_select_blocks():
    n = 7
    variant = {"num_groups": (16, 4, 1, 1, 1, 4, 16), "num_self_attends_per_block": (1,) * n,
               "z_index_dim": (4,) * n, "num_z_channels": (8,) * n, "num_cross_attend_heads": (1,) * n,
               "num_self_attend_heads": (1,) * n, "cross_attend_widening_factor": (1,) * n,
               "self_attend_widening_factor": (1,) * n, "num_embedding_channels": 4}
    model = build_model({"variant": variant, "inputs": {"image": (256, 3)}, "labels": None})
    assert select_blocks(model.blocks, ActivationCheckpointConfig(policy="none")) == []
    assert select_blocks(model.blocks, ActivationCheckpointConfig(policy="all")) == list(range(n))
    assert select_blocks(model.blocks, ActivationCheckpointConfig(policy="every_k", every_k=3)) == [0, 3, 6]
    assert select_blocks(model.blocks, ActivationCheckpointConfig(policy="outer", min_groups=16)) == [0, 6]
    assert select_blocks(model.blocks, ActivationCheckpointConfig(policy="outer", min_groups=4)) == [0, 1, 5, 6]


def test_warmup_then_cosine():
    c = ScheduleConfig(warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, 110, c) for s in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10]))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[60] == pytest.approx(0.55) and factors[110] == pytest.approx(0.1)


def test_mean_average_precision_matches_scikit_learn():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    targets = (rng.random((200, 7)) < 0.2).astype(np.float32)
    targets[:, 6] = 0  # a class without positives is left out
    scores = np.round(rng.random((200, 7)) + targets * 0.5, 1)  # rounding makes ties
    expected = np.mean([average_precision_score(targets[:, k], scores[:, k]) for k in range(6)])
    # torchmetrics sums in float32: 2e-8 from scikit-learn here (the hand-written float64 code it replaced: 1e-12).
    value, classes = mean_average_precision(torch.tensor(scores), torch.tensor(targets))
    assert value == pytest.approx(expected, abs=1e-6) and classes == 6
    # One class with a positive (a tiny or filtered eval set): that class's AP, not torchmetrics' error.
    one = np.zeros_like(targets)
    one[:, 2] = targets[:, 2]
    value, classes = mean_average_precision(torch.tensor(scores), torch.tensor(one))
    assert value == pytest.approx(average_precision_score(one[:, 2], scores[:, 2]), abs=1e-6) and classes == 1
    # None: undefined, and said so by the evaluation's report.
    value, classes = mean_average_precision(torch.tensor(scores), torch.zeros_like(torch.tensor(targets)))
    assert math.isnan(value) and classes == 0
    assert undefined_metrics({"samples": 200.0, "mAP": value, "mAP_classes": 0}) == [
        "mAP is undefined: no class has a positive among the eval samples"]
    assert "no eval sample counted" in undefined_metrics({"samples": 0.0, "mAP": value, "mAP_classes": 0})[0]
    assert undefined_metrics({"samples": 200.0, "mAP": 0.5, "mAP_classes": 6}) == []


def test_top1_accuracy_is_the_argmax_hit_rate():
    logits = torch.randn(300, 9, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 9, (300,), generator=torch.Generator().manual_seed(1))
    labels[:40] = logits[:40].argmax(dim=1)
    expected = (logits.argmax(dim=1) == labels).double().mean().item()  # the hand-written metric it replaced
    assert top1_accuracy(logits, labels) == pytest.approx(expected, abs=1e-7) and expected > 0.13


def test_epoch_stream_resumes_at_the_next_batch():
    def stream():
        return EpochStream(SyntheticLoader(SyntheticDataConfig(modalities={"image": [8, 3]}, num_samples=24),
                                           batch_size=4, rank=1, world_size=2, seed=3))

    a = stream()
    for _ in range(4):  # crosses the epoch boundary (3 batches per epoch)
        next(a)
    state = a.state_dict()
    expected = [next(a)["key"] for _ in range(3)]
    b = stream()
    b.load_state_dict(state)
    assert [next(b)["key"] for _ in range(3)] == expected


def _train(args: list[str], tmp_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "hipscale.train", "--config", CONFIG, "--set", "data.source=synthetic",
           f"run.output_dir={tmp_path}", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env(MASTER_PORT=str(free_port())), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("args, key", [
    (["optimizer.lrr=1"], "'optimizer.lrr'"),
    (["data.source=shards", "data.train_dir=/nonexistent/shards"], "data.train_dir"),
    (["checkpoint.dir=/proc/version/checkpoints"], "checkpoint.dir"),
    (["model.variant.num_groups=[3, 1, 3]"], "model: variant key 'num_groups': block 2 regroups"),
])
def test_bad_setup_fails_with_one_line_before_training(args, key, tmp_path):
    proc = _train(args, tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hipscale.train: error: ") and key in lines[0], err
    assert "train step" not in out


def test_nan_guard_stops_after_consecutive_skips(tmp_path):
    proc = _train(["faults.nonfinite_steps=[1, 2, 3]", "training.max_consecutive_nonfinite=3",
                   "checkpoint.every_steps=0"], tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, out[-3000:] + err[-3000:]
    assert "3 consecutive steps had a non-finite loss or gradient" in err.strip().splitlines()[-1]
    steps = [json.loads(line) for line in (tmp_path / "debug" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in steps] == [0, 1, 2]  # step 4 (the third skip) stops before logging


def test_trainer_with_compiled_blocks_matches_eager(tmp_path):
    """`compile.policy: blocks` through `python -m hipscale.train` (one process, no dropout): the same losses
    as the eager run to COMPILE_RTOL."""
    common = ["training.steps=4", "checkpoint.every_steps=0", "checkpoint.export_at_end=false"]
    runs = {policy: _train([*common, f"compile.policy={policy}"], tmp_path / policy) for policy in ("none", "blocks")}
    outputs = {policy: proc.communicate(timeout=300) for policy, proc in runs.items()}
    for policy, proc in runs.items():
        assert proc.returncode == 0, outputs[policy][0][-3000:] + outputs[policy][1][-3000:]
    assert "torch.compile (blocks): blocks [0, 1, 2]" in outputs["blocks"][0]
    losses = {policy: [json.loads(line)["loss"] for line in (tmp_path / policy / "debug" / "metrics.jsonl")
                       .read_text().splitlines() if '"kind": "train"' in line] for policy in runs}
    assert len(losses["blocks"]) == 4
    assert losses["blocks"] == pytest.approx(losses["none"], rel=COMPILE_RTOL)


def test_export_check_tolerates_a_bf16_engine_and_catches_a_wrong_export():
    """The demo's export check on a GPU compares the fp32 export with a bf16 engine's probe outputs: bf16
    rounding passes its tolerance (and would fail fp32's); a wrong tensor fails in either precision."""
    import copy

    from hipscale.training.export import PROBE_TOLERANCE, probe_difference

    torch.manual_seed(0)
    model = tiny_model().eval()
    for parameter in model.parameters():  # trained-like weights (the unembedding starts at zero)
        parameter.data.normal_(0.0, 0.3)
    inputs = {"image": torch.randn(4, 256, 3), "label": torch.zeros(4, 1, 4)}
    with torch.no_grad():
        engine = copy.deepcopy(model).to(torch.bfloat16)
        bf16_inputs = {k: v.to(torch.bfloat16) for k, v in inputs.items()}
        outputs = {k: v.float() for k, v in engine(bf16_inputs)["reconstruction"].items()}
    probe = {"inputs": {k: v.float() for k, v in bf16_inputs.items()}, "outputs": outputs, "dtype": "bfloat16"}
    difference, tolerance = probe_difference(model, probe)
    assert tolerance == PROBE_TOLERANCE["bfloat16"] and PROBE_TOLERANCE["float32"] < difference < tolerance
    with torch.no_grad():
        exact = {k: v for k, v in model(probe["inputs"])["reconstruction"].items()}
    assert probe_difference(model, {**probe, "outputs": exact, "dtype": "float32"})[0] < PROBE_TOLERANCE["float32"]
    stale = copy.deepcopy(model)
    with torch.no_grad():
        dict(stale.named_parameters())["embedder.unembed.image.weight"].zero_()  # left at its initial value
    assert probe_difference(stale, probe)[0] > tolerance
