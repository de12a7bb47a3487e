"""A job that fails ends, names why, and loses nothing: full and read-only disks, failing evaluations, damaged or
unsafe checkpoints, a stuck loader worker, a changed dataset.

configs/debug.yaml (AV: configs/demo.yaml) on 2 CPU processes under the deepspeed launcher, with DataLoader
workers. Each failure test bounds the time from the fault to the last process of the job gone, checks the
message and the exit status, and resumes with `--resume auto` from the step it should (under torchrun, which
starts 2-3 s sooner).
"""
from __future__ import annotations

import builtins
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from test_train_distributed import resumed_step
from train_helpers import PY, REPO, Job, deepspeed, env, only, records, run, torchrun, wait_steps
from hipscale.training.components.checkpoint_integrity import file_record

FAIL_BOUND_S = 60           # a rank's fault -> every process of the job gone (as in test_faults.py)
WORKER_TIMEOUT_S = 5        # data.worker_timeout_s of the stuck-worker test
WORKER_NOTICE_S = 5 + 20    # PyTorch's worker liveness check (every 5 s), then the fail-fast exit


def job_args(data: dict, out: Path, *extra: str, evaluate: bool = False) -> list[str]:
    """The --set of a job on `data`; without `evaluate` no evaluation and no export (seconds of every start)."""
    finish = [f"data.eval_dir={data['eval']}"] if evaluate else ["data.eval_dir=null", "checkpoint.export_at_end=false"]
    return ["--set", f"data.train_dir={data['train']}", f"run.output_dir={out}", "logging.every_steps=1", *finish,
            *extra]


def trained_steps(output: str) -> list[int]:
    """The steps a run logged, in order."""
    return [int(n) for n in re.findall(r"\[hipscale\] train step (\d+) ", output)]


def failure_line(text: str, needle: str) -> str:
    line = only(text.splitlines(), needle)
    assert line, text[-4000:]
    return line


@pytest.fixture(scope="module")
def ten_steps(debug_shards, tmp_path_factory) -> Path:
    """A finished 10-step run with complete checkpoints at steps 5 and 10 (its output folder)."""
    out = tmp_path_factory.mktemp("ten_steps")
    run(torchrun() + job_args(debug_shards, out, "training.steps=10", "checkpoint.every_steps=5"))
    return out


def copy_of(ten_steps: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(output folder, run folder) of a copy of the 10-step run."""
    out = tmp_path / "out"
    shutil.copytree(ten_steps, out)
    return out, out / "debug"


def verify(path: Path) -> tuple[int, dict]:
    proc = subprocess.run([PY, "-m", "hipscale.training.verify", str(path), "--json"], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, json.loads(proc.stdout)


@contextlib.contextmanager
def small_disk(path: Path, megabytes: int = 64) -> Iterator[Path]:
    """A tmpfs of `megabytes` mounted at `path` (root only), unmounted after."""
    if os.geteuid() != 0:
        pytest.fail("the full-disk tests mount a tmpfs: run the suite as root (as CI does)")
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(disk: Path, leave: int) -> float:
    """Fill the disk up to `leave` bytes, as another writer would; returns when it was full."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * max(free - leave, 0))
    return time.monotonic()


# ---- disk full and read-only -------------------------------------------------------------------------------

def test_a_full_disk_ends_the_job_naming_the_file_and_resume_auto_continues(debug_shards, tmp_path):
    """Another writer fills the run folder's disk: completely after the step-10 checkpoint (the next metrics or
    TensorBoard write fails); then, in the run resumed from it, all but 400 kB (the logs still fit, the
    step-15 save does not). Each time the job ends naming the file and `latest` stays on step 10."""
    with small_disk(tmp_path / "disk") as disk:
        args = job_args(debug_shards, disk, "training.steps=1000", "checkpoint.every_steps=5",
                        "faults.step_delay_s=0.2")
        run_dir, latest = disk / "debug", disk / "debug" / "checkpoints" / "latest"
        for what, resume, leave in (("metrics", [], 0), ("checkpoint", ["--resume", "auto"], 400_000)):
            job = Job(deepspeed() + resume + args, tmp_path / f"{what}.log")
            try:
                if resume:
                    job.wait_for(lambda: "train step 11 " in job.text(), 180, "the resumed step 11")
                else:
                    job.wait_for(lambda: latest.is_file() and latest.read_text() == "step_00000010", 180,
                                 "the step-10 save")
                filled = fill(disk, leave)
                seconds = job.wait_gone(filled, FAIL_BOUND_S)
            finally:
                job.kill()
            text = job.text()
            print(f"disk full ({what}) -> last process gone in {seconds:.1f} s")
            assert job.proc.returncode != 0
            if what == "metrics":
                line = failure_line(text, "hipscale.train: error: rank 0 failed in step")
                assert re.search(rf"disk full: no space left on the device of {run_dir}/(metrics.jsonl|tensorboard) "
                                 r"\((metrics|TensorBoard events); 0.0 MiB free of 64.0 MiB\)", line), line
            else:
                assert resumed_step(text) == 10
                line = failure_line(text, "failed while saving the checkpoint of step 15: disk full")
                assert f"no space left on the device of {run_dir / 'checkpoints' / 'step_00000015'}" in line
                assert not (run_dir / "checkpoints" / "step_00000015" / "COMPLETE").exists()
            assert f"the newest complete checkpoint is {run_dir / 'checkpoints' / 'step_00000010'}" in text
            assert latest.read_text() == "step_00000010" and verify(run_dir)[0] == 0
            (disk / "filler").unlink()  # space freed
        resumed = run(torchrun() + ["--resume", "auto"] + args + ["training.steps=12", "faults.step_delay_s=0"])
        assert resumed_step(resumed.stdout) == 10
        assert trained_steps(resumed.stdout) == [11, 12]


def test_every_writer_of_the_run_folder_names_the_file_when_the_disk_is_full(tmp_path):
    """Metrics, TensorBoard, pictures, the export (in this process): each write on a full disk is a DiskFullError
    naming its path and what it wrote, and closing the logs after one still closes both."""
    import numpy as np

    from hipscale.training.components.disk import DiskFullError, writing
    from hipscale.training.components.logger import MetricLogger

    with small_disk(tmp_path / "disk", megabytes=1) as disk:
        logger = MetricLogger(0, disk / "tensorboard", disk / "metrics.jsonl")
        fill(disk, 0)
        with pytest.raises(DiskFullError, match=rf"^disk full: no space left on the device of {disk}/"
                                                r"(metrics.jsonl \(metrics|tensorboard \(TensorBoard events); "
                                                r"0.0 MiB free of 1.0 MiB\)$"):
            for step in range(1000):  # the first writes may still fit in a partly used block
                logger.log(step, "train", {"loss": 1.0})
        picture = np.zeros((64, 64, 3), dtype=np.uint8)
        with pytest.raises(DiskFullError, match=rf"of {disk / 'pictures'} \(pictures;"):
            MetricLogger(0, None, None).pictures(1, {"a": picture}, disk / "pictures")  # PNG files alone
        with pytest.raises(DiskFullError, match=rf"of {disk / 'model.pt'} \(the export;"):
            with writing(disk / "model.pt", "the export"):
                torch.save({"w": torch.zeros(1 << 18)}, disk / "model.pt")
        with contextlib.suppress(DiskFullError):
            logger.close()
        assert logger.jsonl is None and logger.writer is None


def test_a_read_only_run_folder_is_refused_before_the_first_step(debug_shards, tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        started = time.monotonic()
        proc = run(deepspeed() + job_args(debug_shards, disk, "training.steps=2"), check=False)
        seconds = time.monotonic() - started
    print(f"read-only run folder refused in {seconds:.1f} s")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = failure_line(proc.stderr, "hipscale.train: error:")
    assert line.endswith(f"run.output_dir: directory {disk / 'debug'} is not writable (Read-only file system)"), line
    assert "train step" not in proc.stdout and seconds < FAIL_BOUND_S


# ---- evaluation ---------------------------------------------------------------------------------------------

def test_a_failing_final_evaluation_keeps_the_checkpoint_and_export_and_exits_5(debug_shards, tmp_path):
    """The eval folder's index disappears during training (an unmounted filesystem): the final evaluation
    fails on every rank, after the last checkpoint and the export."""
    data = dict(debug_shards, eval=tmp_path / "eval")
    shutil.copytree(debug_shards["eval"], data["eval"])
    args = job_args(data, tmp_path, "training.steps=6", "checkpoint.every_steps=0", "faults.step_delay_s=0.3",
                    evaluate=True)
    job = Job(deepspeed() + args, tmp_path / "job.log")
    run_dir = tmp_path / "debug"
    try:
        wait_steps(job, run_dir, 1)
        (data["eval"] / "index.json").rename(tmp_path / "index.json")
        job.wait_for(lambda: "evaluating at step 6" in job.text(), 120, "the final evaluation")
        seconds = job.wait_gone(time.monotonic(), FAIL_BOUND_S)
    finally:
        job.kill()
    text = job.text()
    print(f"final evaluation failed -> last process gone in {seconds:.1f} s")
    assert job.proc.returncode == 5, text[-3000:]
    line = failure_line(text, "hipscale.train: error: rank 0 failed in the final evaluation, after step 6:")
    assert (f"the evaluation at step 6 failed; the training up to step 6 is saved in "
            f"{run_dir / 'checkpoints' / 'step_00000006'} and exported (FileNotFoundError: ") in line, line
    assert "failed in step 7" not in text
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"
    assert (run_dir / "export" / "model.pt").is_file()
    # The eval set back, but empty (all its shards filtered out): --resume auto continues from step 6, and the
    # evaluation at its end reports its metrics as undefined, with the reason, and the run succeeds.
    index = json.loads((tmp_path / "index.json").read_text())
    (data["eval"] / "index.json").write_text(json.dumps(dict(index, shards=[], num_samples=0)))
    resumed = run(torchrun() + ["--resume", "auto"] + args + ["training.steps=8", "faults.step_delay_s=0"])
    assert resumed_step(resumed.stdout) == 6
    assert trained_steps(resumed.stdout) == [7, 8]
    assert f"warning: data.eval_dir {data['eval']} holds no samples" in resumed.stderr
    assert "eval step 8: no eval sample counted (the eval set is empty" in resumed.stdout
    evaluation = records(run_dir, "eval")[8]
    assert evaluation["samples"] == 0 and math.isnan(evaluation["cls_loss"]), evaluation


def test_map_of_an_eval_set_with_one_class_is_that_class_ap(av_media, tmp_path):
    """Multi-label AV shards (configs/demo.yaml's model), eval clips that all carry one class. (An empty eval set:
    the final-evaluation test above.)"""
    from hipscale.demo import SHARD_FLAGS

    one_class = next(labels for labels in av_media.labels.values() if len(labels) == 1)
    lines = av_media.manifest.read_text().splitlines()
    subset = tmp_path / "one_class.csv"
    subset.write_text("\n".join(line for line in lines if line.startswith("#")
                                or line.split(",")[0] in [c for c, labels in av_media.labels.items()
                                                          if labels == one_class]) + "\n")
    shards = {}
    for split, manifest in (("train", av_media.manifest), ("eval", subset)):
        shards[split] = tmp_path / split
        run([PY, "preprocess/shard_av.py", "--manifest", str(manifest), "--class-index", str(av_media.class_index),
             "--videos", str(av_media.videos), "--out", str(shards[split]), "--workers", "1", *SHARD_FLAGS])
    args = torchrun(config=str(REPO / "configs" / "demo.yaml")) + job_args(
        shards, tmp_path, "training.steps=2", "schedule.warmup_steps=1", "data.micro_batch_size=2",
        "data.num_workers=2", "checkpoint.every_steps=0", "checkpoint.export_at_end=false", "logging.pictures=0",
        evaluate=True)
    run(args)
    evaluation = records(tmp_path / "demo", "eval")[2]
    assert evaluation["mAP_classes"] == 1 and 0 < evaluation["mAP"] <= 1, evaluation


# ---- damaged and unsafe checkpoints -------------------------------------------------------------------------

def test_a_damaged_checkpoint_is_named_and_resume_auto_falls_back_to_one_that_verifies(ten_steps, debug_shards,
                                                                                      tmp_path):
    out, run_dir = copy_of(ten_steps, tmp_path)
    step10 = run_dir / "checkpoints" / "step_00000010"
    damaged = step10 / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = damaged.stat().st_size
    os.truncate(damaged, size // 2)  # a partial copy
    status, report = verify(run_dir)
    assert status == 1
    folder = report["folders"][0]
    assert folder["latest"] == "step_00000010" and folder["resume_auto"] == "step_00000005"
    problems = {c["tag"]: c["problems"] for c in folder["checkpoints"]}
    expected = f"zero_pp_rank_0_mp_rank_00_optim_states.pt: {size // 2} bytes, {size} when it was written"
    assert problems == {"step_00000005": [], "step_00000010": [expected]}

    args = job_args(debug_shards, out, "training.steps=8", "checkpoint.every_steps=5")
    started = time.monotonic()
    named = run(deepspeed() + ["--resume", "step_00000010"] + args, check=False)
    assert named.returncode == 2 and time.monotonic() - started < FAIL_BOUND_S
    line = failure_line(named.stderr, "hipscale.train: error: --resume step_00000010: the checkpoint is damaged:")
    assert f"{step10}: {expected}" in line and "train step" not in named.stdout

    resumed = run(torchrun() + ["--resume", "auto"] + args)
    assert f"checkpoint step_00000010 is damaged, not loaded: {expected}" in resumed.stdout
    assert resumed_step(resumed.stdout) == 5
    assert trained_steps(resumed.stdout) == [6, 7, 8]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000008"

    # The model states truncated instead: named as well.
    model_states = tmp_path / "model_states"
    shutil.copytree(ten_steps / "debug" / "checkpoints", model_states)
    os.truncate(model_states / "step_00000010" / "mp_rank_00_model_states.pt", 1000)
    status, report = verify(model_states / "step_00000010")
    assert status == 1 and report["folders"][0]["checkpoints"][0]["problems"][0].startswith(
        "mp_rank_00_model_states.pt: 1000 bytes,")


class _CreatesAFile:
    """Unpickled, it opens (creates) a file: what a checkpoint that runs code does."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def test_predict_and_export_refuse_a_checkpoint_that_would_run_code(ten_steps, debug_shards, tmp_path):
    out, run_dir = copy_of(ten_steps, tmp_path)
    step10 = run_dir / "checkpoints" / "step_00000010"
    states_file = step10 / "mp_rank_00_model_states.pt"
    marker = tmp_path / "created_by_the_checkpoint"
    states = torch.load(states_file, weights_only=True)
    torch.save(dict(states, extra=_CreatesAFile(marker)), states_file)
    complete = json.loads((step10 / "COMPLETE").read_text())  # records that match: a crafted run folder
    complete["files"][states_file.name] = file_record(states_file)
    (step10 / "COMPLETE").write_text(json.dumps(complete))
    refusal = f"refusing to load {step10}: {states_file.name}: holds a pickled object that would run code"

    image = next((debug_shards["train"].parent / "train_images").rglob("*.png"))
    predict = subprocess.run([PY, "-m", "hipscale.predict", "--checkpoint", str(run_dir), str(image)], cwd=REPO,
                             env=env(), capture_output=True, text=True, timeout=120)
    assert predict.returncode == 2 and refusal in predict.stderr, predict.stderr[-3000:]
    export = subprocess.run([PY, "-m", "hipscale.training.export", "--checkpoint-dir", str(run_dir / "checkpoints"),
                             "--out", str(tmp_path / "model.pt")], cwd=REPO, env=env(), capture_output=True,
                            text=True, timeout=120)
    assert export.returncode == 2 and refusal in export.stderr, export.stderr[-3000:]
    status, report = verify(run_dir)
    assert status == 1 and "Unsupported global: GLOBAL io.open" in report["folders"][0]["checkpoints"][1]["problems"][0]
    assert not marker.exists() and not (tmp_path / "model.pt").exists()


# ---- a stuck loader worker ----------------------------------------------------------------------------------

def shard_of(train: Path, key: str) -> str:
    for shard in sorted(train.glob("*.tar")):
        with tarfile.open(shard) as tar:
            if any(name.startswith(f"{key}.") for name in tar.getnames()):
                return shard.name
    raise AssertionError(f"no shard of {train} holds {key}")


def test_a_worker_stuck_on_a_sample_is_named_and_ends_the_job(debug_shards, tmp_path):
    """A worker of rank 0 blocks forever in native code, holding the GIL, when it decodes the first sample of rank
    0's 8th batch (the debug config's loader: seed 0, 2 ranks, batches of 4, shuffle buffer 16)."""
    from hipscale.data import StreamingLoader

    batches = iter(StreamingLoader(debug_shards["train"], batch_size=4, rank=0, world_size=2, seed=0,
                                   shuffle_buffer=16))
    key = [next(batches) for _ in range(8)][-1]["key"][0]
    args = job_args(debug_shards, tmp_path, "training.steps=1000", "checkpoint.every_steps=2")
    job = Job(deepspeed() + args + [f"faults.stall_sample={key}", f"data.worker_timeout_s={WORKER_TIMEOUT_S}"],
              tmp_path / "job.log")
    try:
        job.wait_for(lambda: f"blocks forever on sample {key}" in job.text(), 180, "the stuck worker")
        seconds = job.wait_gone(time.monotonic(), WORKER_TIMEOUT_S + WORKER_NOTICE_S)
    finally:
        job.kill()
    text = job.text()
    print(f"worker stuck -> last process gone in {seconds:.1f} s")
    assert job.proc.returncode != 0 and seconds >= WORKER_TIMEOUT_S - 1
    line = failure_line(text, "hipscale.train: error: rank 0 failed in step")
    assert re.search(rf"DataLoader worker \d \(pid \d+\) of rank 0 made no progress for \d+ s "
                     rf"\(data.worker_timeout_s={WORKER_TIMEOUT_S}\) while decoding sample "
                     rf"{re.escape(shard_of(debug_shards['train'], key))}/{re.escape(key)} \(shard/key\) of "
                     rf"{re.escape(str(debug_shards['train']))}; it was killed", line), line
    saved = int((tmp_path / "debug" / "checkpoints" / "latest").read_text().split("_")[1])
    assert saved >= 2
    resumed = run(torchrun() + ["--resume", "auto"] + args + [f"training.steps={saved + 2}"])
    assert resumed_step(resumed.stdout) == saved
    assert trained_steps(resumed.stdout) == [saved + 1, saved + 2]


# ---- a changed dataset --------------------------------------------------------------------------------------

def test_a_changed_dataset_is_described_and_restart_keeps_model_and_step(ten_steps, debug_shards, tmp_path):
    out, run_dir = copy_of(ten_steps, tmp_path)
    changed = tmp_path / "train_changed"
    shutil.copytree(debug_shards["train"], changed)
    index = json.loads((changed / "index.json").read_text())
    gone = index["shards"].pop()
    (changed / gone["name"]).unlink()
    (changed / "index.json").write_text(json.dumps(dict(index, num_samples=index["num_samples"] - gone["samples"])))
    args = job_args(dict(debug_shards, train=changed), out, "training.steps=12", "checkpoint.every_steps=5")
    started = time.monotonic()
    refused = run(deepspeed() + ["--resume", "auto"] + args, check=False)
    assert refused.returncode == 2 and time.monotonic() - started < FAIL_BOUND_S
    line = failure_line(refused.stderr, "hipscale.train: error: --resume: the training shards changed since")
    assert (f"{changed}: 1 shard removed ({gone['name']}); 96 samples then, {96 - gone['samples']} now" in line
            and line.endswith("add --set data.on_dataset_change=restart")), line
    assert "train step" not in refused.stdout

    resumed = run(torchrun() + ["--resume", "auto"] + args + ["data.on_dataset_change=restart"])
    assert resumed_step(resumed.stdout) == 10
    assert "the data stream starts afresh at epoch 1" in resumed.stdout
    assert trained_steps(resumed.stdout) == [11, 12]
