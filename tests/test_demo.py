"""`python -m hipscale.demo --quick`: every stage of `make demo` on a few clips and steps.

The full demo (mAP >= 0.9) is `make demo` itself; this checks the plumbing: ffmpeg clips, the sharder's
command line, the deepspeed launcher, the SIGTERM preemption and `--resume auto`, the final eval,
the export check and the closing report.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                               str(REPO / ".cache" / "torch_extensions")))
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "hipscale.demo", "--quick", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc, out


def test_every_stage_ran_in_order(demo):
    stdout = demo[0].stdout
    headers = re.findall(r"^=== (\d)/7 ", stdout, flags=re.M)
    assert headers == [str(i) for i in range(1, 8)], stdout
    assert stdout.count("rejected 0") == 2  # both splits sharded by preprocess/shard_av.py


def test_interrupted_once_and_resumed_at_the_saved_step(demo):
    stdout, out = demo[0].stdout, demo[1]
    saved = re.search(r"preemption signal received at step (\d+)", stdout)
    resumed = re.search(r"resumed from \S+ at step (\d+)", stdout)
    assert saved and resumed and saved.group(1) == resumed.group(1), stdout
    step = int(resumed.group(1))
    assert 2 <= step < 8
    train = [r for r in map(json.loads, (out / "runs" / "demo" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    # Every step is logged once: the preempted one before its save, the rest by the resumed run.
    assert [r["step"] for r in train] == list(range(1, 9))
    assert (out / "runs" / "demo" / "checkpoints" / "latest").read_text() == "step_00000008"


def test_final_metrics_export_check_and_places_are_printed(demo):
    stdout, out = demo[0].stdout, demo[1]
    assert re.search(r"eval at step 8: .*mAP \d\.\d{4}", stdout), stdout
    match = re.search(r"match the DeepSpeed engine's \((\w+)\) to (\S+) of their scale \(tolerance (\S+)\)", stdout)
    assert match and match.group(1) == "float32" and float(match.group(2)) <= float(match.group(3)) == 1e-4
    for name in ("launcher logs", "TensorBoard", "pictures", "checkpoints", "export"):
        assert re.search(rf"^ *{name}: ", stdout, flags=re.M), name
    assert list((out / "runs" / "demo" / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "runs" / "demo" / "export" / "model.pt").is_file()
    assert re.search(r"demo finished in \d+ s: 8 steps \(interrupted and resumed at step \d+\), eval mAP", stdout)


def test_predict_answers_the_eval_clips_and_the_pictures_are_written(demo):
    stdout, out = demo[0].stdout, demo[1]
    stage = stdout.split("=== 6/7 ")[1].split("=== 7/7 ")[0]
    answered = re.findall(r"^\S+/videos/(clip\d{3}_30\.000\.mp4|clip\d{3}_30\.000\.mkv)$", stage, flags=re.M)
    assert len(answered) == 3, stage
    assert len(re.findall(r"^  \d\.\d{4}  Tone \d, \d+ Hz$", stage, flags=re.M)) == 3 * 2, stage
    assert len(re.findall(r": true labels Tone", stage)) == 3
    pictures = out / "runs" / "demo" / "pictures" / "step_00000008"
    names = sorted(p.name for p in pictures.glob("*.png"))
    assert {"mae_video_0.png", "mae_audio_0.png", "position_embedding_video.png", "position_embedding_audio.png"} \
        <= set(names), names
    assert f"pictures: {pictures}" in stdout
