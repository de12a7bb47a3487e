"""From pretraining to predictions: MAE pretraining -> `--init-from` finetuning with a class bottleneck, and
`python -m hipscale.predict` on image and audio files made by ffmpeg (video files: tests/test_demo.py).

The debug model pretrains with the MAE loss alone (no label bottleneck) on 2 processes under the deepspeed
launcher; a torchrun job (ZeRO-3) finetunes it as a classifier from the pretraining run's folder. An
audio-only model trains on 1 s windows cut at random from 2 s clips (augment.clip_seconds), so predict
must cut the centre 1 s of each file.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import imageio_ffmpeg
import pytest
import torch

from hipscale.training.init_from import init_from
from hipscale.training.model_setup import build_model
from test_train_distributed import resumed_step
from train_helpers import CONFIG, PY, REPO, deepspeed, launcher_env, new_user_env, records, run, torchrun

STEPS = 4
NO_IMAGE_AUGMENTATION = ("augment.random_resized_crop=false", "augment.horizontal_flip=false", "augment.color_ops=0",
                         "augment.cutmix_alpha=0")


def settings(data: dict, out: Path, name: str, *extra: str) -> list[str]:
    return ["--set", f"data.train_dir={data['train']}", f"data.eval_dir={data['eval']}", f"run.output_dir={out}",
            f"run.name={name}", f"training.steps={STEPS}", "checkpoint.every_steps=4", "eval.max_batches=1", *extra]


@pytest.fixture(scope="module")
def pretrained(debug_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    run(deepspeed() + settings(debug_shards, out, "mae", "objectives.classification_weight=0"))
    return out / "mae"


@pytest.fixture(scope="module")
def finetuned(pretrained, debug_shards, tmp_path_factory) -> tuple[Path, str, list[str]]:
    out = tmp_path_factory.mktemp("finetune")
    args = ["--init-from", str(pretrained)] + settings(debug_shards, out, "finetune", "zero.stage=3")
    return out / "finetune", run(torchrun() + args).stdout, args


def test_finetuning_an_mae_run_loads_its_tensors_and_adds_the_class_bottleneck(pretrained, finetuned):
    run_dir, stdout, _ = finetuned
    pretrained_weights = torch.load(pretrained / "export" / "model.pt", weights_only=True)["state_dict"]
    report = json.loads((run_dir / "init_from.json").read_text())
    assert report["source"] == str(pretrained / "checkpoints" / "step_00000004")  # the run's `latest` checkpoint
    assert sorted(report["loaded"]) == sorted(pretrained_weights)
    assert report["dropped"] == {}
    assert report["new"] and all(name.startswith("label_") for name in report["new"]), report["new"]
    assert f"{len(pretrained_weights)} tensors loaded, {len(report['new'])} new" in stdout
    assert "new     label_embedder.embed.label.weight [16, 4]" in stdout
    assert sorted(records(run_dir)) == list(range(1, STEPS + 1))
    assert "top1" in records(run_dir, "eval")[STEPS]


def test_init_from_copies_matching_tensors_and_keeps_a_fresh_head_for_another_label_count(finetuned):
    run_dir, _, _ = finetuned
    export = torch.load(run_dir / "export" / "model.pt", weights_only=True)
    spec = dict(export["model_spec"], labels={"label": (1, 7)})       # 7 classes instead of 4
    torch.manual_seed(0)
    model = build_model(spec)
    torch.manual_seed(0)
    fresh = build_model(spec).state_dict()
    report = init_from(model, str(run_dir / "export" / "model.pt"))
    own = model.state_dict()
    assert report.new["label_embedder.embed.label.weight"] == "[16, 7] (source [16, 4])"
    assert all(name.startswith("label_") for name in report.new) and not report.dropped
    for name in report.loaded:
        assert torch.equal(own[name], export["state_dict"][name]), name
    for name in report.new:
        assert torch.equal(own[name], fresh[name]), name
    assert not torch.equal(own["embedder.embed.image.weight"], fresh["embedder.embed.image.weight"])


def test_a_resumed_finetune_continues_from_its_checkpoint_not_the_source(finetuned):
    run_dir, _, args = finetuned
    resumed = run(torchrun() + ["--resume", "auto"] + args + ["training.steps=6"])
    assert resumed_step(resumed.stdout) == STEPS
    assert f"model.init_from {args[1]} not used: resuming from" in resumed.stdout
    assert sorted(records(run_dir)) == list(range(1, 7))


def test_a_missing_init_source_is_refused_before_any_process_group(debug_shards, tmp_path):
    proc = subprocess.run([PY, "-m", "hipscale.train", "--config", CONFIG, "--init-from", str(tmp_path / "nope")]
                          + settings(debug_shards, tmp_path, "x"), cwd=REPO, env=launcher_env([PY]),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"model.init_from: {tmp_path / 'nope'} does not exist" in proc.stderr


def ffmpeg(*args: str) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-y", *args], check=True)


def predict(checkpoint: Path, files: list[Path], *flags: str) -> subprocess.CompletedProcess:
    """`python -m hipscale.predict` as a new user runs it: no DeepSpeed or hipscale variable set."""
    return subprocess.run([PY, "-m", "hipscale.predict", "--checkpoint", str(checkpoint), *flags, *map(str, files)],
                          cwd=REPO, env=new_user_env(), capture_output=True, text=True, timeout=300)


def check_answers(results: list[dict], files: list[Path], errors: dict[str, str], class_names: list[str],
                  top_k: int, multi_label: bool) -> None:
    """Every file answered in order, the bad ones with their error, the rest with top_k sorted scores."""
    assert [r["file"] for r in results] == list(map(str, files))
    for r in results:
        name = Path(r["file"]).name
        if name in errors:
            assert errors[name] in r["error"] and "top" not in r, r
            continue
        scores = [t["score"] for t in r["top"]]
        assert len(scores) == top_k and scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        assert [t["class"] for t in r["top"]] == [class_names[t["index"]] for t in r["top"]]
        assert multi_label or sum(scores) <= 1 + 1e-6


def test_predict_on_image_files_answers_the_good_ones_and_names_the_broken(finetuned, tmp_path):
    run_dir, _, _ = finetuned
    files = [tmp_path / "pattern.png", tmp_path / "photo.jpg", tmp_path / "broken.jpg", tmp_path / "tiny.bmp",
             tmp_path / "missing.png"]
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=40x30", "-frames:v", "1", str(files[0]))
    ffmpeg("-f", "lavfi", "-i", "mandelbrot=size=64x64", "-frames:v", "1", str(files[1]))
    files[2].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 20)
    ffmpeg("-f", "lavfi", "-i", "color=c=red:size=8x8", "-frames:v", "1", str(files[3]))
    # A run folder: its newest checkpoint is consolidated on the fly.
    text = predict(run_dir, files, "--top-k", "3", "--batch-size", "2")
    assert text.returncode == 1, text.stderr
    assert "2 of 5 files could not be decoded" in text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == str(files[0]) and len(lines) == 3 * 4 + 2
    assert f"{files[2]}: error: decode_error: not a readable image" in text.stdout
    assert f"{files[4]}: error: missing_file" in text.stdout
    as_json = predict(run_dir, files, "--top-k", "3", "--batch-size", "2", "--json")
    document = json.loads(as_json.stdout)  # only the document: DeepSpeed's notices went to stderr
    class_names = [f"class_{k}" for k in range(4)]
    check_answers(document["results"], files, {"broken.jpg": "decode_error", "missing.png": "missing_file"},
                  class_names, 3, multi_label=False)
    # Batching does not change an answer.
    one_by_one = json.loads(predict(run_dir / "export" / "model.pt", files, "--top-k", "3", "--json",
                                    "--batch-size", "1").stdout)
    for a, b in zip(document["results"], one_by_one["results"]):
        if "top" in a:
            assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]
            assert [t["score"] for t in a["top"]] == pytest.approx([t["score"] for t in b["top"]], abs=1e-5)


def test_predict_refuses_a_model_without_a_class_readout(pretrained, tmp_path):
    proc = predict(pretrained, [tmp_path / "any.png"])
    assert proc.returncode == 2 and "has no class readout" in proc.stderr


@pytest.fixture(scope="module")
def audio_model(av_media, run_sharder, tmp_path_factory) -> Path:
    """A 1-process audio classifier on 1 s windows of 2 s, 8 kHz clips (trained a few steps)."""
    root = tmp_path_factory.mktemp("audio_model")
    shards = root / "shards"
    done = run_sharder("shard_av.py", "--manifest", av_media.manifest, "--class-index", av_media.class_index,
                       "--videos", av_media.videos, "--out", shards, "--workers", 2, "--modalities", "audio",
                       "--sample-rate", "8000", "--window-seconds", "2.0", "--max-samples-per-shard", "2")
    assert done.returncode == 0, done.stderr
    run([PY, "-m", "hipscale.train", "--config", CONFIG] + settings(
        {"train": shards, "eval": shards}, root, "audio", "augment.clip_seconds=1.0", "data.micro_batch_size=2",
        "data.num_workers=1", *NO_IMAGE_AUGMENTATION))
    return root / "audio"


def test_predict_on_audio_files_and_the_audio_track_of_a_video(audio_model, av_media, tmp_path):
    spec = torch.load(audio_model / "export" / "model.pt", weights_only=True)["model_spec"]
    assert spec["inputs"] == {"audio": (8000, 1)}      # the 1 s window, not the stored 2 s
    tone = tmp_path / "tone_600hz.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=600:sample_rate=44100:duration=3", str(tone))
    flac = tmp_path / "tone_450hz.flac"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=450:sample_rate=16000:duration=1.5", str(flac))
    short = tmp_path / "short.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=450:sample_rate=8000:duration=0.4", str(short))
    video = next(p for p in sorted(av_media.videos.iterdir()) if p.name.startswith("clip"))
    silent = av_media.videos / "bad_no_audio_30.000.mp4"
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 10)
    files = [tone, flac, video, silent, broken, short]
    proc = predict(audio_model, files, "--json", "--top-k", "2")
    assert proc.returncode == 1, proc.stderr
    assert "the centre 1 s of each clip: 8000 audio samples at 8000 Hz" in proc.stderr
    results = json.loads(proc.stdout)["results"]
    names = [line.split(",", 2)[2].strip('"') for line in Path(av_media.class_index).read_text().splitlines()[1:]]
    check_answers(results, files, {silent.name: "no_audio", broken.name: "decode_error", short.name: "too_short"},
                  names, 2, multi_label=True)
