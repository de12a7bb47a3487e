"""The AV sharder end to end: ffmpeg-made clips, the command line, shards read back."""
import hashlib
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import decord
import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image

from hipscale.data import StreamingLoader, load_dataset_info
from hipscale.data.format.keys import id_to_key, key_to_id
from hipscale.data.format.samples import decode_sample
from hipscale.data.sharding.shard_av import AVShardConfig, shard_av
from hipscale.data.synthetic_media import class_frequency

WINDOW, RATE, SAMPLES, FRAMES, FPS, CLIP_SECONDS = 2.56, 48_000, 122_880, 4, 25, 3.0


def direct_audio(path: Path) -> np.ndarray:
    """The whole audio track as mono int16 at 48 kHz, decoded by the ffmpeg binary directly."""
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-vn", "-ac", "1", "-ar", str(RATE),
               "-f", "s16le", "-"]
    return np.frombuffer(subprocess.run(command, capture_output=True, check=True).stdout, dtype="<i2")


def expected_frames(path: Path, indices: list[int]) -> np.ndarray:
    """Frames decoded directly with decord, then the documented policy for 64x64 -> 48x40:
    bicubic to 48x48 (covers 48x40), crop 4 columns on each side."""
    frames = decord.VideoReader(str(path), num_threads=1).get_batch(indices).asnumpy()
    return np.stack([np.asarray(Image.fromarray(f).resize((48, 48), Image.Resampling.BICUBIC).crop((4, 0, 44, 48)))
                     for f in frames])


def test_frames_audio_and_labels_match_a_direct_decode(av_media, av_shards, read_shards):
    out, _ = av_shards
    info = load_dataset_info(out)
    samples = read_shards(out)
    assert set(samples) == {id_to_key(clip_id) for clip_id in av_media.labels}
    assert info.num_samples == 8 and info.num_classes == 4 and info.multi_label
    assert info.modalities == {"video": (4 * 48 * 40, 3, "uint8"), "audio": (SAMPLES, 1, "int16")}
    start = (CLIP_SECONDS - WINDOW) / 2  # centre placement in a 3 s clip
    indices = [math.floor((start + (i + 0.5) * WINDOW / FRAMES) * FPS) for i in range(FRAMES)]
    for key, files in samples.items():
        sample = decode_sample(key, files, info)
        clip_id = key_to_id(key)
        meta = json.loads(files["meta.json"])
        path = next(p for p in av_media.videos.iterdir() if p.stem == clip_id)
        assert sample.sample_id == clip_id and "." in clip_id and "." not in key
        assert sample.labels == tuple(sorted(av_media.labels[clip_id]))
        assert math.isclose(meta["window_start"], start) and meta["frame_indices"] == indices
        # Frames: exact, decoded the same way (decord at the documented indices + the documented resize).
        np.testing.assert_array_equal(sample.arrays["video"], expected_frames(path, indices))
        # Audio: exact against a direct decode of the same window, 122,880 samples, no padding needed.
        offset = round(start * RATE)
        np.testing.assert_array_equal(sample.arrays["audio"], direct_audio(path)[offset:offset + SAMPLES])
        assert meta["audio_padded"] == 0
        # The tones are the clip's classes: the strongest spectral peaks sit at their frequencies.
        spectrum = np.abs(np.fft.rfft(sample.arrays["audio"].astype(np.float64)))
        peaks = sorted(np.argsort(spectrum)[::-1][:len(sample.labels)] * RATE / SAMPLES)
        assert np.allclose(peaks, sorted(class_frequency(c) for c in sample.labels), atol=1.0)


def test_bad_media_are_rejected_with_their_reason_and_good_clips_kept(av_media, av_shards):
    out, stdout = av_shards  # the run exited 0 (checked by the fixture)
    report = json.loads((out / "report.json").read_text())
    assert {r["id"]: r["reason"] for r in report["rejections"]} == av_media.bad
    assert report["written"] == len(av_media.labels) and report["rejected"] == len(av_media.bad)
    assert all("manifest.csv:" in r["source"] and r["detail"] for r in report["rejections"])
    assert report["by_reason"] == {"decode_error": 2, "missing_file": 1, "no_audio": 1, "too_short": 1}
    assert "rejected 5" in stdout
    index = json.loads((out / "index.json").read_text())
    assert sum(shard["samples"] for shard in index["shards"]) == 8
    assert all((out / shard["name"]).stat().st_size == shard["bytes"] for shard in index["shards"])
    assert all(hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
               for shard in index["shards"])


def test_sigkill_then_rerun_gives_the_same_samples_without_partial_shards(av_media, av_shards, av_args, read_shards,
                                                                          sharder_command, tmp_path):
    out = tmp_path / "out"
    args = ["--manifest", av_media.manifest, "--class-index", av_media.class_index, "--videos", av_media.videos,
            "--out", out, "--workers", 1, *av_args, "--max-samples-per-shard", 1]
    command = sharder_command("shard_av.py", *args)
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("shard-*.tar"))) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the sharder and its pool workers
    process.wait()
    # Complete shards: a tar and its status (written after the tar is in place; a tar alone is rebuilt).
    before = {path.name: path.stat() for path in out.glob("shard-*.tar")
              if (out / "status" / f"{path.name}.json").exists()}
    assert not (out / "index.json").exists(), "the sharder finished before it could be killed"
    assert 2 <= len(before) < 13

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    for name, stat in before.items():  # complete shards were skipped, not rewritten
        assert (out / name).stat().st_ino == stat.st_ino and (out / name).stat().st_mtime_ns == stat.st_mtime_ns
    assert not list(out.glob(".*.tmp")) and not list((out / "status").glob(".*.tmp"))
    assert len(json.loads((out / "index.json").read_text())["shards"]) == 13
    assert read_shards(out) == read_shards(av_shards[0])  # same samples, byte for byte; no duplicates
    reasons = {r["id"]: r["reason"] for r in json.loads((out / "report.json").read_text())["rejections"]}
    assert reasons == av_media.bad


def test_audio_only_shards_give_audio_batches(av_media, tmp_path):
    config = AVShardConfig(av_media.manifest, av_media.class_index, av_media.videos, tmp_path, modalities=("audio",),
                           window_seconds=1.0, sample_rate=16_000, placement="random", seed=3, workers=2)
    report = shard_av(config)
    # Audio-only: the clip without an audio track is still rejected; a 1 s window fits the 1 s clip.
    assert report["by_reason"] == {"decode_error": 2, "missing_file": 1, "no_audio": 1}
    batch = next(iter(StreamingLoader(tmp_path, batch_size=3)))
    assert set(batch) == {"audio", "labels", "key"}
    assert batch["audio"].shape == (3, 16_000, 1) and batch["audio"].dtype == torch.int16
    assert batch["labels"].shape == (3, 4) and batch["labels"].sum(dim=1).min() >= 1


def test_command_line_reports_bad_input_with_exit_code_2(av_media, run_sharder, tmp_path):
    missing = tmp_path / "no_such_dir"
    done = run_sharder("shard_av.py", "--manifest", av_media.manifest, "--class-index", av_media.class_index,
                       "--videos", missing, "--out", tmp_path / "out")
    assert done.returncode == 2 and f"--videos {missing}: not a directory" in done.stderr
