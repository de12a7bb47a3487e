"""`make demo`: the whole job end to end on a small synthetic audio+video dataset.

    python -m hipscale.demo [--out demo_out] [--quick]

Stages (each prints a header and its wall time):
1. generate labelled clips with ffmpeg (``hipscale.data.synthetic_media``): the first label sets
   the picture's hue, every label adds a tone, so the labels are learnable by construction;
2. shard the train and eval splits with ``preprocess/shard_av.py`` (small frames, 8 kHz audio);
3. train ``configs/demo.yaml`` with the ``deepspeed`` launcher (every GPU, else 2 CPU
   processes), send SIGTERM to the job's whole process group once, as a scheduler preempting it
   does (the ranks save a checkpoint and exit), then relaunch with ``--resume auto`` to finish;
4. print the trainer's final eval metrics (mAP) from ``metrics.jsonl``;
5. load the exported weights with plain PyTorch and check them against the trainer's probe;
6. run ``python -m hipscale.predict`` on a few of the eval clips' video files;
7. print where the logs, TensorBoard files (scalars and pictures), checkpoints and export are.

Exits with 1 when the final mAP is below the threshold (0.9 for the full demo).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from hipscale.training.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
RUN_NAME = "demo"
NUM_CLASSES = 4
CLIP_SECONDS = 1.0
# Sharding: 4 frames of 32x32 (4,096 pixels) + 0.256 s of 8 kHz audio (2,048 samples) per clip.
SHARD_FLAGS = ("--frames", "4", "--height", "32", "--width", "32", "--sample-rate", "8000",
               "--window-seconds", "0.256", "--max-samples-per-shard", "64")
TRAIN_LINE = re.compile(r"\[hipscale\] train step (\d+) ")
PREEMPT_LINE = re.compile(r"preemption signal received at step (\d+)")
RESUME_LINE = re.compile(r"resumed from \S+ at step (\d+)")


@dataclass(frozen=True)
class Settings:
    """Sizes of one demo run.

    Attributes:
        train_clips: Clips of the train split.
        eval_clips: Clips of the eval split.
        steps: Optimizer steps in total.
        warmup: schedule.warmup_steps.
        interrupt_after: SIGTERM the workers once they logged this step.
        checkpoint_every: training.checkpoint.every_steps.
        log_every: logging.every_steps.
        min_map: The final eval mAP the run must reach (exit status 1 otherwise).
    """

    train_clips: int
    eval_clips: int
    steps: int
    warmup: int
    interrupt_after: int
    checkpoint_every: int
    log_every: int
    min_map: float


FULL = Settings(train_clips=256, eval_clips=64, steps=1000, warmup=20, interrupt_after=400, checkpoint_every=100,
                log_every=50, min_map=0.9)
QUICK = Settings(train_clips=24, eval_clips=16, steps=8, warmup=2, interrupt_after=2, checkpoint_every=4, log_every=1,
                 min_map=0.0)


class DemoError(RuntimeError):
    """A stage failed; the message says which and where its log is."""


def stage(title: str) -> Callable:
    """Decorator: print a header before the stage and its wall time after it."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            print(f"\n=== {title} ===", flush=True)
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            print(f"--- {title}: {time.perf_counter() - start:.1f} s", flush=True)
            return result
        return run
    return wrap


@stage("1/7 generate synthetic audio+video clips (ffmpeg)")
def generate(out: Path, settings: Settings) -> dict[str, Path]:
    """Write the train and eval clips, manifests and class index; returns {split: media folder}."""
    from hipscale.data.synthetic_media import make_av_dataset

    media = {}
    for seed, (split, clips) in enumerate((("train", settings.train_clips), ("eval", settings.eval_clips))):
        media[split] = out / "media" / split
        make_av_dataset(media[split], num_clips=clips, num_classes=NUM_CLASSES, duration=CLIP_SECONDS,
                        size=(32, 32), fps=8, bad=(), seed=seed)
        print(f"{split}: {clips} clips of {CLIP_SECONDS:.0f} s, {NUM_CLASSES} classes -> {media[split]}")
    return media


@stage("2/7 shard with preprocess/shard_av.py")
def shard(out: Path, media: dict[str, Path]) -> dict[str, Path]:
    """Run the sharder's command line on every split; returns {split: shard folder}."""
    shards = {}
    for split, folder in media.items():
        shards[split] = out / "shards" / split
        cmd = [sys.executable, str(REPO / "preprocess" / "shard_av.py"), "--manifest", str(folder / "manifest.csv"),
               "--class-index", str(folder / "class_index.csv"), "--videos", str(folder / "videos"),
               "--out", str(shards[split]), "--workers", str(min(2, os.cpu_count() or 1)), *SHARD_FLAGS]
        print(" ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DemoError(f"sharding {split} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        print(proc.stdout.strip())
    return shards


def launch_env() -> tuple[list[str], dict]:
    """The deepspeed launcher's process flags and environment: every GPU, else 2 CPU processes."""
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    gpus = torch.cuda.device_count()
    if gpus:
        return ["--num_gpus", str(gpus)], env
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
    return ["--num_gpus", "2"], env


def train_command(shards: dict[str, Path], out: Path, settings: Settings, resume: bool) -> list[str]:
    """`deepspeed ... --module hipscale.train` with the demo's data, output and schedule overrides."""
    flags, _ = launch_env()
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    return [deepspeed, *flags, "--master_port", str(free_port()), "--module", "hipscale.train",
            "--config", str(CONFIG), "--resume", "auto" if resume else "none",
            "--set", f"data.train_dir={shards['train']}", f"data.eval_dir={shards['eval']}",
            f"run.output_dir={out / 'runs'}", f"training.steps={settings.steps}",
            f"schedule.warmup_steps={settings.warmup}", f"checkpoint.every_steps={settings.checkpoint_every}",
            f"logging.every_steps={settings.log_every}"]


def run_launcher(cmd: list[str], log: Path, on_line: Optional[Callable[[str, subprocess.Popen], None]] = None,
                 check: bool = True) -> str:
    """Run a launcher in a session of its own (a scheduler's job), echo its `[hipscale]` lines, keep its whole
    output in `log`; returns that output once every process of the job closed it.

    Raises:
        DemoError: `check` and the launcher exited non-zero (with the end of its log).
    """
    _, env = launch_env()
    print("$ " + " ".join(Path(cmd[0]).name if i == 0 else a for i, a in enumerate(cmd)), flush=True)
    lines = []
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        for line in proc.stdout:
            sink.write(line)
            lines.append(line)
            if line.startswith("[hipscale]") and "resolved config" not in line:
                print("  " + line.rstrip(), flush=True)
            if on_line is not None:
                on_line(line, proc)
        status = proc.wait()
    if check and status != 0:
        raise DemoError(f"{Path(cmd[0]).name} exited with {status}; see {log}:\n{''.join(lines[-40:])}")
    return "".join(lines)


@stage("3/7 train with DeepSpeed, interrupt once, resume")
def train(shards: dict[str, Path], out: Path, settings: Settings) -> int:
    """Train, SIGTERM the job's process group after `interrupt_after` steps, resume to the end; returns the
    resume step."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    sent = []

    def interrupt(line: str, proc: subprocess.Popen) -> None:
        match = TRAIN_LINE.match(line)
        if match and int(match.group(1)) >= settings.interrupt_after and not sent:
            sent.append(proc.pid)
            print(f"  >>> demo: sending SIGTERM to the job's process group {proc.pid} (preemption)", flush=True)
            os.killpg(proc.pid, signal.SIGTERM)

    # The launcher itself dies of the signal; the ranks save and exit 143 (preempted).
    first = run_launcher(train_command(shards, out, settings, resume=False), logs / "train_1_interrupted.log",
                         interrupt, check=False)
    preempted = PREEMPT_LINE.search(first)
    if preempted is None:
        raise DemoError(f"the first launch was not preempted; see {logs / 'train_1_interrupted.log'}")
    print(f"  >>> demo: preempted, checkpoint saved at step {preempted.group(1)}; relaunching with --resume auto")
    second = run_launcher(train_command(shards, out, settings, resume=True), logs / "train_2_resumed.log")
    resumed = RESUME_LINE.search(second)
    if resumed is None or resumed.group(1) != preempted.group(1):
        raise DemoError(f"the second launch did not resume at step {preempted.group(1)}; "
                        f"see {logs / 'train_2_resumed.log'}")
    print(f"  >>> demo: resumed at step {resumed.group(1)} and trained to step {settings.steps}")
    return int(resumed.group(1))


@stage("4/7 evaluate")
def final_metrics(run_dir: Path, steps: int) -> dict[str, float]:
    """The trainer's eval record of the last step (from metrics.jsonl)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval" and r["step"] == steps]
    if not evals:
        raise DemoError(f"no eval record of step {steps} in {run_dir / 'metrics.jsonl'}")
    metrics = {k: v for k, v in evals[-1].items() if k not in ("kind", "step")}
    print(f"eval at step {steps}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics


@stage("5/7 check the exported weights")
def check_export(run_dir: Path) -> float:
    """Load export/model.pt with plain PyTorch (build_hip) and compare with the engine's probe outputs."""
    from hipscale.training.export import load_exported, probe_difference

    model = load_exported(run_dir / "export" / "model.pt")
    probe = torch.load(run_dir / "export" / "probe.pt", weights_only=True)
    diff, tolerance = probe_difference(model, probe)
    params = sum(p.numel() for p in model.parameters())
    print(f"{run_dir / 'export' / 'model.pt'}: HiP with {params:,} parameters; fp32 outputs on the probe batch "
          f"match the DeepSpeed engine's ({probe.get('dtype', 'float32')}) to {diff:.2e} of their scale "
          f"(tolerance {tolerance:g})")
    if diff > tolerance:
        raise DemoError(f"exported weights differ from the engine by {diff:.2e} of the output scale on the probe "
                        f"batch (tolerance {tolerance:g} for a {probe.get('dtype', 'float32')} engine)")
    return diff


PREDICT_CLIPS = 3


@stage("6/7 predict on video files (python -m hipscale.predict)")
def predict(out: Path, run_dir: Path) -> str:
    """Run the predict command on the first eval clips; returns its output."""
    media = out / "media" / "eval"
    videos = sorted((media / "videos").iterdir())[:PREDICT_CLIPS]
    cmd = [sys.executable, "-m", "hipscale.predict", "--checkpoint", str(run_dir / "export" / "model.pt"),
           "--top-k", "2", *map(str, videos)]
    print("python " + " ".join(cmd[1:3] + ["--checkpoint", "runs/demo/export/model.pt", "--top-k", "2"]
                               + [v.name for v in videos]), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DemoError(f"hipscale.predict exited with {proc.returncode}:\n{proc.stderr[-2000:]}")
    from hipscale.data.sharding.manifest import read_class_index, read_manifest

    classes = read_class_index(media / "class_index.csv")
    labels = {segment.id: segment.labels for segment in read_manifest(media / "manifest.csv", classes)[0]}
    print(proc.stdout.rstrip())
    for video in videos:
        print(f"  {video.name}: true labels {'; '.join(classes.names[k] for k in labels[video.stem])}")
    return proc.stdout


@stage("7/7 where everything is")
def report(out: Path, run_dir: Path) -> None:
    """Print the folders of the logs, TensorBoard files, pictures, checkpoints and export."""
    pictures = sorted((run_dir / "pictures").glob("step_*"))
    places = {
        "launcher logs": out / "logs",
        "metrics": run_dir / "metrics.jsonl",
        "TensorBoard": run_dir / "tensorboard",
        "pictures": pictures[-1] if pictures else run_dir / "pictures",
        "checkpoints": run_dir / "checkpoints",
        "export": run_dir / "export" / "model.pt",
        "shards": out / "shards",
    }
    for name, path in places.items():
        print(f"{name:>14}: {path}")
    print(f"{'':>14}  tensorboard --logdir {run_dir / 'tensorboard'}  (Images: MAE reconstructions of eval clips "
          f"beside their inputs, position embeddings' principal components)")
    if pictures:
        print(f"{'':>14}  " + ", ".join(p.name for p in sorted(pictures[-1].glob("*.png"))))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hipscale.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "demo_out", help="output folder (emptied first)")
    parser.add_argument("--quick", action="store_true", help="a few clips and steps (tests)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    try:
        shards = shard(out, generate(out, settings))
        resumed_at = train(shards, out, settings)
        run_dir = out / "runs" / RUN_NAME
        metrics = final_metrics(run_dir, settings.steps)
        check_export(run_dir)
        predict(out, run_dir)
        report(out, run_dir)
    except DemoError as e:
        print(f"\nhipscale.demo: error: {e}", file=sys.stderr)
        return 1
    mean_ap = metrics["mAP"]
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s: {settings.steps} steps "
          f"(interrupted and resumed at step {resumed_at}), eval mAP {mean_ap:.4f}")
    if mean_ap < settings.min_map:
        print(f"hipscale.demo: error: mAP {mean_ap:.4f} is below {settings.min_map}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
