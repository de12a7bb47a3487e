"""Training-step benchmark: samples/s, raw inputs/s, TFLOP/s, MFU, peak memory, time to first step.

Runs full training steps (forward, backward, AdamW) of a config's model on synthetic data that
already lives on the device, with the config's precision and activation-checkpointing policy,
in one process without DeepSpeed (the per-GPU compute a ZeRO job does between collectives).

    python -m hipscale.bench --config configs/hip256_imagenet224.yaml --batch 8 \
        --set data.source=synthetic "data.synthetic.modalities={image: [50176, 3]}" data.synthetic.num_classes=1000
    python -m hipscale.bench --config C --batch 8 --sweep      # doubles the batch until it no longer fits
    python -m hipscale.bench --config C --batch 8 --loader     # also: can the real loader keep up?

MFU is measured against `logging.peak_tflops`, else the detected GPU's dense bf16 peak (989 TFLOP/s
for an H100); on CPU it is left out.
"""
from __future__ import annotations

import argparse
import time
from typing import Optional

import torch

from hipscale.config import ConfigError, load_config
from hipscale.config.schema import JobConfig
from hipscale.model.flops import training_flops_per_sample
from hipscale.training.activation_checkpoint import apply_activation_checkpointing
from hipscale.training.components.metrics import peak_tflops, throughput
from hipscale.training.data_setup import build_loader, dataset_info
from hipscale.training.model_setup import build_model, model_spec
from hipscale.training.objective import Objective
from hipscale.training.optim import build_optimizer

_START = time.perf_counter()


def _synthetic_batch(spec: dict, info, objective: Objective, batch: int, device: torch.device):
    """Normalised inputs {name: [B, M, C]} at the model's shapes and labels, generated on the device."""
    inputs = {name: torch.rand(batch, m, c, device=device) * 2 - 1 for name, (m, c) in spec["inputs"].items()}
    if objective.multi_label:
        labels = (torch.rand(batch, info.num_classes, device=device) < 0.1).float()
    else:
        labels = torch.randint(info.num_classes, (batch,), device=device)
    return inputs, labels


def measure(config: JobConfig, batch: int, steps: int, warmup: int, compile_model: bool) -> dict[str, float]:
    """Times `steps` training steps after `warmup` ones; returns the figures (raises on OOM)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = dataset_info(config)
    torch.manual_seed(config.run.seed)
    spec = model_spec(config, info)
    model = build_model(spec).to(device)
    apply_activation_checkpointing(model, config.activation_checkpoint)
    flops = training_flops_per_sample(model)
    runner = torch.compile(model) if compile_model else model
    optimizer = build_optimizer(model, config.optimizer)
    objective = Objective(config.objectives, info.num_classes, info.multi_label)
    bf16 = device.type == "cuda" and config.precision.dtype != "fp32"
    inputs, labels = _synthetic_batch(spec, info, objective, batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = objective.losses(runner, model, inputs, labels, None)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    sync()
    first_step_s = time.perf_counter() - _START
    for _ in range(max(warmup - 1, 0)):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    inputs_per_sample = sum(m for m, _ in spec["inputs"].values())
    figures = throughput(batch * steps, seconds, flops, inputs_per_sample, 1, peak_tflops(config.logging.peak_tflops))
    figures.update(batch=batch, steps_per_s=steps / seconds, first_step_s=first_step_s,
                   peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"))
    return figures


def loader_rate(config: JobConfig, batches: int) -> tuple[float, float]:
    """Samples/s and MB/s of the real training loader (one rank, the config's batch and workers)."""
    loader = build_loader(config, "train", rank=0, world_size=1)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start, samples, nbytes = time.perf_counter(), 0, 0
    for _, item in zip(range(batches), iterator):
        tensors = [v for v in item.values() if isinstance(v, torch.Tensor)]
        samples += tensors[0].shape[0]
        nbytes += sum(t.numel() * t.element_size() for t in tensors)
    seconds = time.perf_counter() - start
    return samples / seconds, nbytes / seconds / 1e6


def _line(f: dict[str, float]) -> str:
    mfu = f" | MFU {100 * f['mfu']:.1f}%" if "mfu" in f else ""
    return (f"batch {f['batch']:>5} | {f['samples_per_s']:10.1f} samples/s | {f['steps_per_s']:8.2f} steps/s | "
            f"{f['inputs_per_s']:.3e} inputs/s | {f['tflops_per_device']:8.2f} TFLOP/s{mfu} | "
            f"peak mem {f['peak_mem_gib']:.1f} GiB | first step after {f['first_step_s']:.1f} s")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="hipscale.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batch", type=int, required=True, help="per-device batch size")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--sweep", action="store_true", help="double the batch until it does not fit")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--loader", action="store_true", help="also measure the real loader on the config's shards")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, [*args.overrides, f"data.micro_batch_size={args.batch}"])
    except ConfigError as error:
        parser.exit(2, f"hipscale.bench: error: {error}\n")
    if args.sweep and not torch.cuda.is_available():
        parser.exit(2, "hipscale.bench: error: --sweep searches the largest batch that fits in GPU memory; "
                       "no GPU is available\n")

    figures = measure(config, args.batch, args.steps, args.warmup, args.compile)
    print(_line(figures), flush=True)
    batch = args.batch
    while args.sweep:
        batch *= 2
        try:
            print(_line(measure(config, batch, args.steps, args.warmup, args.compile)), flush=True)
        except torch.cuda.OutOfMemoryError:
            print(f"batch {batch:>5} | out of memory: the largest batch that fits is {batch // 2}")
            break
    if args.loader:
        samples_per_s, mb_per_s = loader_rate(config, batches=max(args.steps, 10))
        verdict = "keeps up" if samples_per_s >= figures["samples_per_s"] else "is the bottleneck"
        print(f"loader: {samples_per_s:.1f} samples/s, {mb_per_s:.1f} MB/s with {config.data.num_workers} workers: "
              f"it {verdict} (training consumes {figures['samples_per_s']:.1f} samples/s)")


if __name__ == "__main__":
    main()
