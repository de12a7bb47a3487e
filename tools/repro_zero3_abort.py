"""Loop a tiny 2-process ZeRO-3 CPU job and count abnormal exits (SIGABRT at interpreter exit hunt).

Background: docs/zero3_abort.md. Each run launches

    torchrun --nproc-per-node 2 tools/repro_zero3_abort.py --worker [--end MODE]

with DS_ACCELERATOR=cpu, gloo, OMP_NUM_THREADS=1, PYTHONFAULTHANDLER=1 and its own MASTER_PORT. The worker does
`deepspeed.init_distributed()` (through hipscale.training.distributed.init_distributed), a small MLP under
ZeRO-3 with torch AdamW passed in (fp32), a few train steps, then the shutdown under test. Any non-zero
exit status (or a signal, or a faulthandler / "terminate called" / "free():" line in stderr) counts as a
failure; the stderr of failing runs is kept under --keep.

    nice -n 10 .venv/bin/python tools/repro_zero3_abort.py --runs 150               # our shutdown()
    nice -n 10 .venv/bin/python tools/repro_zero3_abort.py --runs 150 --end plain  # barrier+destroy only
    nice -n 10 .venv/bin/python tools/repro_zero3_abort.py --runs 20 --real           # python -m hipscale.train

--real launches the real trainer (configs/debug.yaml, zero.stage=3, data.source=synthetic) instead.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SUSPICIOUS = re.compile(r"Fatal Python error|terminate called|free\(\)|double free|corrupted|Aborted|"
                        r"Segmentation fault|core dumped|SIGABRT|Signal 6|exitcode\s*:\s*-")


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import deepspeed
    from hipscale.training import distributed as hd

    hd.init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                                torch.nn.GELU(), torch.nn.Linear(256, 8))
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "gradient_clipping": 1.0}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    for _ in range(args.steps):
        x = torch.randn(4, 64)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
    if args.shutdown == "hipscale":
        hd.shutdown()
    elif args.shutdown == "plain":
        dist.barrier()
        dist.destroy_process_group()
    elif args.shutdown == "none":
        pass
    if args.skew and int(os.environ.get("RANK", "0")) == args.skew_rank:
        time.sleep(args.skew)  # let the peer finish interpreter teardown first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, out_dir: Path) -> list[str]:
    port = str(free_port())
    if args.real:
        return [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", port, "-m", "hipscale.train",
                "--config", str(REPO / "configs" / "debug.yaml"), "--set", "zero.stage=3",
                "data.source=synthetic", f"run.output_dir={out_dir}", "training.steps=2",
                "checkpoint.every_steps=100", "checkpoint.export_at_end=false", "eval.every_steps=100"]
    if args.launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port, str(Path(__file__).resolve()),
                "--worker", "--end", args.shutdown, "--steps", str(args.steps),
                "--skew", str(args.skew), "--skew-rank", str(args.skew_rank)]
    return [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", port, str(Path(__file__).resolve()),
            "--worker", "--end", args.shutdown, "--steps", str(args.steps),
                "--skew", str(args.skew), "--skew-rank", str(args.skew_rank)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--end", dest="shutdown", choices=("hipscale", "plain", "none"), default="hipscale",
                   help="hipscale: hipscale.training.distributed.shutdown(); plain: barrier + destroy; none")
    p.add_argument("--skew", type=float, default=0.0,
                   help="seconds rank --skew-rank sleeps after the shutdown, so its peer exits first")
    p.add_argument("--skew-rank", type=int, default=0)
    p.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    p.add_argument("--real", action="store_true", help="launch python -m hipscale.train (synthetic data)")
    p.add_argument("--keep", default=str(REPO / ".cache" / "repro_zero3_abort"), help="stderr of failing runs")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    keep = Path(args.keep)
    keep.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONFAULTHANDLER="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    env.pop("RANK", None)
    failures, suspicious, t0 = 0, 0, time.time()
    for i in range(args.runs):
        out_dir = keep / "runs" / f"r{i}"
        proc = subprocess.run(launch(args, out_dir), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
        text = proc.stdout + proc.stderr
        bad = proc.returncode != 0
        odd = bool(SUSPICIOUS.search(text))
        failures += bad
        suspicious += odd and not bad
        if bad or odd:
            log = keep / f"run{i:04d}_rc{proc.returncode}.log"
            log.write_text(f"$ {' '.join(launch(args, out_dir))}\nrc={proc.returncode}\n"
                           f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
            sig = f" ({signal.Signals(-proc.returncode).name})" if proc.returncode < 0 else ""
            print(f"run {i}: rc={proc.returncode}{sig} suspicious={odd} -> {log}", flush=True)
        if (i + 1) % 10 == 0:
            print(f"[{i + 1}/{args.runs}] failures={failures} suspicious_ok={suspicious} "
                  f"{(time.time() - t0) / (i + 1):.1f}s/run", flush=True)
    print(f"DONE runs={args.runs} failures={failures} suspicious_but_rc0={suspicious} "
          f"mode={'real' if args.real else args.shutdown}/{args.launcher}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
