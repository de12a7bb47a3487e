"""Command line of `python -m hipscale.train` (under deepspeed, torchrun or mpirun).

    deepspeed [--hostfile H] --module hipscale.train --config configs/debug.yaml [--set a.b=c ...] [--resume auto]
        [--init-from runs/PRETRAINING]
    torchrun --nproc-per-node 2 -m hipscale.train --config configs/debug.yaml
    mpirun -np 2 python -m hipscale.train --config configs/debug.yaml
Configuration and data problems end the run with one line and exit status 2 before any
process group starts. Exit statuses are listed in `hipscale.training.outcome`: a rank that fails
prints its error (rank, step, cause) and exits 1 at once, without waiting for the others, so the
launcher ends the job; a preempted run saves and exits 143.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from typing import NoReturn, Optional

from hipscale.config import ConfigError, load_config
from hipscale.training.distributed import launcher_rank
from hipscale.training.outcome import (EXIT_CONFIG, EXIT_DONE, EXIT_FAILED, EXIT_PREEMPTED, AgreedStop,
                                       report_failure)
from hipscale.training.preemption import PreemptionFlag


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hipscale.train", description="Train a HiP with DeepSpeed.")
    parser.add_argument("--config", required=True, help="YAML experiment config (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optimizer.lr=3e-4 zero.stage=3")
    parser.add_argument("--resume", default="none",
                        help="'none', 'auto' (the checkpoint `latest` names, if any) or a checkpoint tag")
    parser.add_argument("--init-from", default=None, metavar="RUN_OR_CHECKPOINT",
                        help="start from another run's weights (model.init_from): a run folder, checkpoint folder, "
                             "checkpoint or export; matching tensors are loaded, the rest initialised fresh")
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
    preemption = PreemptionFlag()
    preemption.install()  # before anything slow: a signal during start-up is honoured at the first step
    args = parse_args(argv)
    try:
        overrides = args.overrides + ([f"model.init_from={args.init_from}"] if args.init_from else [])
        config = load_config(args.config, overrides)
        from hipscale.training.preflight import preflight, run_dir

        info = preflight(config)
    except ConfigError as e:
        fail(str(e), EXIT_CONFIG)

    from hipscale.training.distributed import init_distributed, rank_hosts, shutdown
    from hipscale.training.heartbeat import start_heartbeat
    from hipscale.training.trainer import Trainer

    init_distributed(config.distributed.timeout_s, run_dir(config))
    hosts = rank_hosts()
    trainer = None
    heartbeat = start_heartbeat(config.distributed.heartbeat_timeout_s, hosts, on_lost=lambda what: leave_now(
        trainer, f"rank {launcher_rank()} stopped {where(trainer)}: {what}"))
    try:
        trainer = Trainer(config, info, resume=args.resume, universal=args.universal, preemption=preemption)
        status = EXIT_PREEMPTED if trainer.fit() == "preempted" else EXIT_DONE
    except AgreedStop as e:  # every rank stops at this step: leave together
        if launcher_rank() == 0:
            print(f"hipscale.train: error: {e}", file=sys.stderr, flush=True)
        status = e.exit_status
    except BaseException as e:  # this rank alone: report, and leave without waiting for the others
        report_failure(e, launcher_rank(), where(trainer), config.distributed.timeout_s, hosts)
        leave_now(trainer)
    if trainer is not None:
        trainer.close()
    if heartbeat is not None:
        heartbeat.stop()  # before the final barrier, after which rank 0's store may be gone
    shutdown()
    sys.exit(status)


def where(trainer) -> str:
    """Where a rank is, for its report: "during setup" or "in step N"."""
    return "during setup" if trainer is None else f"in step {trainer.step + 1}"


def leave_now(trainer, line: Optional[str] = None) -> NoReturn:
    """End this rank at once, without waiting for the others (the launcher then ends the job): print `line`,
    close the logs, kill the DataLoader workers (they ignore SIGTERM) and release DeepSpeed's shm segment.
    Also called from the heartbeat thread while the main thread may be blocked in a collective."""
    from hipscale.training.distributed import release_shm_segment

    if line:
        print(f"hipscale.train: error: {line}", file=sys.stderr, flush=True)
    if trainer is not None:
        trainer.logger.close()
    for worker in multiprocessing.active_children():
        worker.kill()
    release_shm_segment()
    sys.stdout.flush()
    os._exit(EXIT_FAILED)
