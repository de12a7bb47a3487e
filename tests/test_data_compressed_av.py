"""Compressed AV shards (`preprocess/shard_av.py --encoding compressed`): the whole clip stored once, a window of
it decoded in the loader's workers, fresh every epoch, the same for every rank, worker and resume.

Made from the session's ffmpeg clips (3 s, 64x64, 25 fps) at 4 frames of 48x40 per 1.28 s window: 3.125 stored
frames per second, 6 windows per clip.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from isal.isal_zlib import crc32

from hipscale.config import ConfigError, load_config
from hipscale.data import StreamingLoader, load_dataset_info
from hipscale.data.format.clip_codec import WindowChoice, window_count
from hipscale.data.format.keys import key_to_id
from hipscale.data.sharding.av_decode import read_audio
from hipscale.data.sharding.clip_decode import ClipFormat, decode_clip
from hipscale.data.storage.shard_store import RemoteSettings
from hipscale.training.model_setup import build_augmentation
from train_helpers import REPO, records, run, torchrun

WINDOW_S, FRAMES, HEIGHT, WIDTH, RATE = 1.28, 4, 48, 40, 48_000
FRAME_RATE = FRAMES / WINDOW_S
CLIP_S = 3.0
WINDOWS = window_count(CLIP_S, WINDOW_S, FRAME_RATE)
DEMO = REPO / "configs" / "demo.yaml"
MIN_PSNR_DB = 34.0  # the decoded window against the raw sharder's: 35.9 dB and up at the default CRF 16 on these tiny
                    # 48x40 frames (43 dB at 224x224: docs/data.md); the neighbouring window scores below 25 dB


@pytest.fixture(scope="module")
def compressed(av_media, run_sharder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compressed_av")
    done = run_sharder("shard_av.py", "--manifest", av_media.manifest, "--class-index", av_media.class_index,
                       "--videos", av_media.videos, "--out", out, "--workers", 2, "--encoding", "compressed",
                       "--frames", FRAMES, "--height", HEIGHT, "--width", WIDTH, "--window-seconds", WINDOW_S,
                       "--max-samples-per-shard", 3)
    assert done.returncode == 0, done.stderr
    return out


def by_key(loader: StreamingLoader) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (video [T*H*W, 3], audio [S, 1]) of one pass over the loader (valid slots only)."""
    found = {}
    for batch in loader:
        valid = batch.get("valid", [True] * len(batch["key"]))
        for i, key in enumerate(batch["key"]):
            if valid[i]:
                found[key] = (batch["video"][i].numpy(), batch["audio"][i].numpy())
    return found


def direct_window(av_media, key: str, window: int) -> dict[str, np.ndarray]:
    """The window starting `window / FRAME_RATE` s into the clip, uncompressed: the raw sharder's frames for that
    window, and the window's samples of the clip's whole audio track decoded by ffmpeg (the raw sharder's
    per-window seek lands 8 samples late in Matroska files, whose timestamps are in milliseconds)."""
    clip_id = key_to_id(key)
    path = next(p for p in av_media.videos.iterdir() if p.stem == clip_id)
    start = window / FRAME_RATE
    frames, _ = decode_clip(path, start, start + WINDOW_S, ClipFormat(("video",), WINDOW_S, FRAMES, HEIGHT, WIDTH,
                                                                       RATE), "start", 0, clip_id)
    first = round(window * RATE / FRAME_RATE)
    return {"video": frames["video"], "audio": read_audio(path, 0.0, CLIP_S, RATE)[first:first + round(WINDOW_S * RATE)]}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def test_the_index_names_the_encoding_and_each_epoch_decodes_its_own_window_of_every_clip(av_media, compressed):
    info = load_dataset_info(compressed)
    assert {name: (spec.shape, spec.encoding) for name, spec in info.specs.items()} == {
        "video": ((FRAMES, HEIGHT, WIDTH, 3), "h264"), "audio": ((round(WINDOW_S * RATE),), "flac")}
    assert info.attributes["encoding"] == "compressed" and info.frame_rate == FRAME_RATE
    assert info.num_samples == len(av_media.labels) and WINDOWS == 6
    per_clip = sum(shard.bytes for shard in info.shards) / info.num_samples
    print(f"compressed: {per_clip / 1e3:.1f} kB per 3 s clip, tar overhead included (raw window: "
          f"{(FRAMES * HEIGHT * WIDTH * 3 + round(WINDOW_S * RATE) * 2) / 1e3:.1f} kB)")

    loader = StreamingLoader(compressed, batch_size=2, num_workers=2, seed=5, shuffle_buffer=4)
    epochs = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        epochs.append(by_key(loader))
    for epoch, seen in enumerate(epochs):
        for key, (video, audio) in seen.items():
            window = WindowChoice(5, epoch, random=True).index(key, WINDOWS)
            expected = direct_window(av_media, key, window)
            # The window's audio exactly (FLAC), its frames up to H.264's loss.
            np.testing.assert_array_equal(audio[:, 0], expected["audio"])
            assert psnr(video, expected["video"].reshape(-1, 3)) >= MIN_PSNR_DB, (key, epoch)
            neighbour = direct_window(av_media, key, window - 1 if window else window + 1)["video"]
            assert psnr(video, neighbour.reshape(-1, 3)) < 25, (key, epoch)
    # Windows change between epochs; every window of a clip comes up once in each run of 6 epochs, in a new order.
    for key in epochs[0]:
        assert len({epochs[e][key][0].tobytes() for e in range(3)}) == 3, key
        cycles = [[WindowChoice(5, e, random=True).index(key, WINDOWS) for e in range(c * WINDOWS, (c + 1) * WINDOWS)]
                  for c in range(3)]
        assert all(sorted(cycle) == list(range(WINDOWS)) for cycle in cycles) and len(set(map(tuple, cycles))) > 1


def test_a_resume_on_another_world_size_reads_the_same_windows_and_evaluation_takes_the_centre(compressed):
    uninterrupted = {}
    for rank in range(2):
        uninterrupted.update(by_key(StreamingLoader(compressed, batch_size=1, rank=rank, world_size=2, num_workers=2,
                                                    seed=3, shuffle_buffer=4)))
    early, state = {}, None
    for rank in range(2):  # 1 step on 2 ranks, then the rest of the epoch on 1
        loader = StreamingLoader(compressed, batch_size=1, rank=rank, world_size=2, num_workers=2, seed=3,
                                 shuffle_buffer=4)
        for _, batch in zip(range(1), loader):
            early[batch["key"][0]] = (batch["video"][0].numpy(), batch["audio"][0].numpy())
        state = loader.state_dict()
    resumed = StreamingLoader(compressed, batch_size=1, num_workers=2, seed=3, shuffle_buffer=4)
    resumed.load_state_dict(state)
    rest = by_key(resumed)
    assert not set(rest) & set(early) and len(early) + len(rest) == len(uninterrupted)
    for key, (video, audio) in {**early, **rest}.items():
        assert np.array_equal(video, uninterrupted[key][0]) and np.array_equal(audio, uninterrupted[key][1]), key

    evaluation = [by_key(StreamingLoader(compressed, batch_size=3, world_size=1, num_workers=n, drop_remainder=False))
                  for n in (0, 2)]
    assert evaluation[0].keys() == evaluation[1].keys() == uninterrupted.keys()
    for key, (video, audio) in evaluation[0].items():
        centre = WindowChoice().index(key, WINDOWS)
        assert centre == (WINDOWS - 1) // 2
        assert np.array_equal(video, evaluation[1][key][0]) and np.array_equal(audio, evaluation[1][key][1])


def test_compressed_shards_stream_from_s3_and_a_longer_window_than_they_hold_is_refused(compressed, s3, monkeypatch,
                                                                                       tmp_path):
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    s3.create_bucket("compressed")
    url = s3.upload_folder(compressed, "s3://compressed/av")
    remote = RemoteSettings(cache_dir=str(tmp_path / "cache"))
    for epoch in (0, 1):  # through the shard cache: the folder's windows, sample for sample
        loaders = [StreamingLoader(url, batch_size=2, num_workers=2, seed=7, remote=remote),
                   StreamingLoader(compressed, batch_size=2, num_workers=2, seed=7)]
        for loader in loaders:
            loader.set_epoch(epoch)
        from_s3, from_folder = map(by_key, loaders)
        assert from_s3.keys() == from_folder.keys() and len(from_s3) == 8
        assert all(np.array_equal(from_s3[k][0], from_folder[k][0]) and np.array_equal(from_s3[k][1], from_folder[k][1])
                   for k in from_s3)
    # augment.clip_seconds cuts its window out of the decoded one (1.28 s here), as from raw shards.
    info = load_dataset_info(compressed)
    with pytest.raises(ConfigError, match=r"^augment\.clip_seconds: 2\.56 s is longer than the 1\.28 s clips"):
        build_augmentation(load_config(DEMO, ["augment.clip_seconds=2.56"]), info)
    window = build_augmentation(load_config(DEMO, ["augment.clip_seconds=0.64"]), info).window
    assert (window.stored_frames, window.window_frames, window.window_samples) == (FRAMES, FRAMES // 2, RATE * 64 // 100)


def rewrite_member(shards: Path, extension: str, damage) -> str:
    """Damage the `extension` member of the first sample of the first shard (its CRC-32, and the shard's size and
    SHA-256 in index.json, made to match, as a sharder that wrote a broken file would); returns the sample's key."""
    index = json.loads((shards / "index.json").read_text())
    path = shards / index["shards"][0]["name"]
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    key = members[0][0].name.split(".")[0]
    payload = damage(dict((m.name, data) for m, data in members)[f"{key}.{extension}"])
    meta_name = f"{key}.meta.json"
    meta = json.loads(dict((m.name, data) for m, data in members)[meta_name])
    meta["crc32"][extension] = crc32(payload)
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            data = payload if member.name == f"{key}.{extension}" else (
                json.dumps(meta).encode() if member.name == meta_name else data)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    index["shards"][0].update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (shards / "index.json").write_text(json.dumps(index))
    return key


@pytest.mark.parametrize("extension", ["video.mp4", "audio.flac"])
def test_a_truncated_member_is_one_bad_sample_named_by_shard_and_key(compressed, extension, tmp_path, caplog):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(compressed, shards)
    key = rewrite_member(shards, extension, lambda data: data[:len(data) // 2])
    loader = StreamingLoader(shards, batch_size=3, drop_remainder=False)
    valid = sum(int(batch["valid"].sum()) for batch in loader)
    assert (valid, loader.bad_samples) == (load_dataset_info(shards).num_samples - 1, 1)
    assert any(key in record.message and f"{extension}: undecodable" in record.message for record in caplog.records)
    # verify decodes the first sample of every shard (at its centre window): the pristine folder checks out.
    checks = [subprocess.run([sys.executable, "-m", "hipscale.data.verify", str(folder)], capture_output=True,
                             text=True, cwd=REPO) for folder in (compressed, shards)]
    assert checks[0].returncode == 0 and checks[1].returncode == 1, checks
    first_shard = json.loads((shards / "index.json").read_text())["shards"][0]["name"]
    assert checks[1].stdout.splitlines()[0].startswith(
        f"{shards}/{first_shard}: first sample {key}: {extension}: undecodable"), checks[1].stdout


def test_the_av_config_trains_on_two_ranks_and_a_sigkill_resume_reads_the_same_windows(compressed, tmp_path):
    """configs/demo.yaml's AV model, 2 ranks x 2 samples: 2 steps an epoch of the 8 clips, so steps 1-2 read
    epoch 0's windows, 3-4 epoch 1's, 5 epoch 2's. One run goes through; another has rank 1 SIGKILLed after
    step 4 and resumes (`--resume auto`) from the step-3 checkpoint, in the middle of epoch 1: steps 4 and 5
    must repeat the first run's losses bitwise, which they cannot with any other window of any clip."""
    def train(out: Path, *extra: str, check: bool = True):
        return run(torchrun(config=str(DEMO)) + list(extra) + [
            "--set", f"data.train_dir={compressed}", f"data.eval_dir={compressed}", f"run.output_dir={out}",
            "training.steps=5", "schedule.warmup_steps=1", "data.micro_batch_size=2", "data.num_workers=2",
            "checkpoint.every_steps=3", "checkpoint.export_at_end=false", "logging.pictures=0",
            "logging.every_steps=1", *(["faults.kill_at_step=4", "faults.kill_rank=1"] if not check else [])],
            check=check)

    through = train(tmp_path / "through")
    assert "[hipscale] train step 5 " in through.stdout
    reference = records(tmp_path / "through" / "demo")
    evaluation = records(tmp_path / "through" / "demo", "eval")[5]
    assert evaluation["samples"] == 8 and 0 < evaluation["mAP"] <= 1
    crashed = train(tmp_path / "killed", check=False)
    assert crashed.returncode != 0 and "[hipscale] train step 4 " in crashed.stdout
    resumed = train(tmp_path / "killed", "--resume", "auto")
    assert re.findall(r"resumed from \S+ at step (\d+)", resumed.stdout) == ["3"], resumed.stdout[-3000:]
    after = records(tmp_path / "killed" / "demo")
    assert sorted(after) == [1, 2, 3, 4, 5] and reference[4]["loss"] != reference[3]["loss"]
    for step in (4, 5):
        for key in ("loss", "mae", "cls", "grad_norm"):
            assert after[step][key] == reference[step][key], (step, key)
    assert records(tmp_path / "killed" / "demo", "eval")[5] == evaluation  # evaluation: the centre windows
