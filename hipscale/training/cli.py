"""Command line of `python -m hipscale.train` (under deepspeed, torchrun or mpirun).

    deepspeed [--hostfile H] --module hipscale.train --config configs/debug.yaml [--set a.b=c ...] [--resume auto]
    torchrun --nproc-per-node 2 -m hipscale.train --config configs/debug.yaml
    mpirun -np 2 python -m hipscale.train --config configs/debug.yaml
Configuration and data problems end the run with one line and exit status 2 before any
process group starts; a run stopped by the NaN guard exits with status 3.
"""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Optional

from hipscale.config import ConfigError, load_config
from hipscale.training.distributed import launcher_rank

EXIT_CONFIG, EXIT_NONFINITE = 2, 3


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hipscale.train", description="Train a HiP with DeepSpeed.")
    parser.add_argument("--config", required=True, help="YAML experiment config (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optimizer.lr=3e-4 zero.stage=3")
    parser.add_argument("--resume", default="none",
                        help="'none', 'auto' (newest complete checkpoint, if any) or a checkpoint tag")
    parser.add_argument("--universal", action="store_true",
                        help="resume through DeepSpeed's universal checkpoint (a different world size)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def fail(message: str, status: int) -> NoReturn:
    """One line on stderr (from rank 0 only), then exit with `status`."""
    if launcher_rank() == 0:
        print(f"hipscale.train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        from hipscale.training.preflight import preflight

        info = preflight(config)
    except ConfigError as e:
        fail(str(e), EXIT_CONFIG)

    from hipscale.training.distributed import init_distributed, shutdown
    from hipscale.training.trainer import NonFiniteError, Trainer

    init_distributed()
    trainer = None
    try:
        trainer = Trainer(config, info, resume=args.resume, universal=args.universal)
        trainer.fit()
    except NonFiniteError as e:
        fail(str(e), EXIT_NONFINITE)
    finally:
        if trainer is not None:
            trainer.close()
        shutdown()
