"""Checkpoint benchmark: what the checksums cost a save, and what verifying costs a load, at a config's size.

    python -m hipscale.training.save_bench --config configs/hip256_imagenet224.yaml --dir /scratch/bench \
        --set data.source=synthetic "data.synthetic.modalities={image: [50176, 3]}" data.synthetic.num_classes=1000

One process builds the config's model in a DeepSpeed engine (its ZeRO stage, fp32 on CPU, bf16 on a GPU
unless the config says otherwise) and takes one optimizer step on zero gradients (the Adam moments then
exist, at their full size, without a forward pass). Then it saves the checkpoint `--rounds` times with
checksums and as often without, alternating, through the trainer's own save protocol (write, fsync,
COMPLETE, `latest`, prune), and times each whole save and one verification of the result. It prints the
medians and the ratio of a save with checksums to one without, both measured in this run.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hipscale.training.save_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML experiment config whose model is saved")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config values, as hipscale.train's --set")
    parser.add_argument("--dir", type=Path, default=None,
                        help="folder for the checkpoints (default: a new temporary folder, removed after)")
    parser.add_argument("--rounds", type=int, default=6, help="saves with checksums, and as many without (default 6)")
    args = parser.parse_args(argv)

    import deepspeed

    from hipscale.config import load_config
    from hipscale.training.components.checkpoint import CheckpointManager, tag_for
    from hipscale.training.data_setup import dataset_info
    from hipscale.training.distributed import init_distributed
    from hipscale.training.ds_config import build_deepspeed_config
    from hipscale.training.model_setup import build_model, model_spec
    from hipscale.training.optim import build_optimizer
    from hipscale.training.trainer import use_bf16

    config = load_config(args.config, args.overrides)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="hipscale-save-bench-"))
    init_distributed(config.distributed.timeout_s, folder)
    model = build_model(model_spec(config, dataset_info(config)))
    config.training.global_batch_size = None
    ds_config, _ = build_deepspeed_config(config, use_bf16(config))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, config.optimizer),
                                           config=ds_config)
    engine.backward(sum((p * 0).sum() for p in engine.module.parameters()))
    engine.step()
    params = sum(p.numel() for p in model.parameters())

    times: dict[bool, list[float]] = {False: [], True: []}
    verify_s, size = [], 0
    for step in range(1, 2 * args.rounds + 1):
        checksums = step % 2 == 0
        manager = CheckpointManager(folder, 1, 0, 1, checksums=checksums)
        start = time.perf_counter()
        manager.write(engine, step, {"step": step}, {"data": {}})
        manager.commit(step, 1)
        times[checksums].append(time.perf_counter() - start)
        size = sum(p.stat().st_size for p in (folder / tag_for(step)).iterdir())
        if checksums:
            start = time.perf_counter()
            assert not manager.verify(tag_for(step)), "the checkpoint just saved does not verify"
            verify_s.append(time.perf_counter() - start)
    plain, checked = statistics.median(times[False]), statistics.median(times[True])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"model: {params:,} parameters, ZeRO-{config.zero.stage}, checkpoint {size / 1e9:.2f} GB in {folder} "
          f"({device})")
    print(f"save without checksums: median {plain:.2f} s of {[round(t, 2) for t in times[False]]}")
    print(f"save with checksums:    median {checked:.2f} s of {[round(t, 2) for t in times[True]]}")
    print(f"ratio with / without: {checked / plain:.3f}; verify before a load: median {statistics.median(verify_s):.2f}"
          f" s ({size / 1e9 / statistics.median(verify_s):.2f} GB/s)")
    if args.dir is None:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
