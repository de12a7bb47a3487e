"""Command line of `python -m hipscale.train` (under deepspeed, torchrun or mpirun).

    deepspeed [--hostfile H] --module hipscale.train --config configs/debug.yaml [--set a.b=c ...] [--resume auto]
        [--init-from runs/PRETRAINING]
    torchrun --nproc-per-node 2 -m hipscale.train --config configs/debug.yaml
    mpirun -np 2 python -m hipscale.train --config configs/debug.yaml
    launchers/elastic.sh HEAD_NODE 1:4 2 --config configs/debug.yaml     # --elastic, on every node
Configuration and data problems end the run with one line and exit status 2 before any
process group starts. Exit statuses are listed in `hipscale.training.components.outcome`: a rank that fails
prints its error (rank, step, cause) and exits 1 at once, without waiting for the others, so the
launcher ends the job (also when its clean-up fails: a full disk, a closed socket); a failed evaluation
exits 5 after the training's checkpoint; a preempted run saves and exits 143. Under --elastic a rank that lost a node
exits 75 and torchrun restarts the job on the nodes left (`hipscale.training.elastic`).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import threading
from typing import Callable, NoReturn, Optional

from hipscale.config import ConfigError, load_config
from hipscale.training.components.disk import DiskFullError
from hipscale.training.components.outcome import (EXIT_CONFIG, EXIT_DONE, EXIT_EVAL, EXIT_FAILED, EXIT_PREEMPTED,
                                                  EXIT_RESTART, AgreedStop, exit_status_of, report_failure)
from hipscale.training.components.preemption import PreemptionFlag
from hipscale.training.distributed import launcher_rank
from hipscale.training.elastic import write_outcome

# A rank that leaves gets this long for its clean-up (closing logs, killing workers), then exits regardless.
LEAVE_DEADLINE_S = 10.0


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
                        help="resume through DeepSpeed's universal checkpoint even when the world size is the "
                             "one the checkpoint was saved with (it is used whenever the world size changed)")
    parser.add_argument("--elastic", action="store_true",
                        help="started by an elastic launcher (launchers/elastic.sh): resume from `latest` at every "
                             "start, on whatever world size the nodes left make; a lost node exits 75 (restart)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.elastic:
        if args.resume not in ("none", "auto"):
            parser.error(f"--elastic resumes from the checkpoint `latest` names at every start; it cannot be "
                         f"combined with --resume {args.resume}")
        args.resume = "auto"
    return args


def fail(message: str, status: int, elastic: bool) -> NoReturn:
    """One line on stderr (from rank 0 only), then exit with `status` (under an elastic launcher: hand it over
    and exit 0, so that the stop is not restarted)."""
    if launcher_rank() == 0:
        print(f"hipscale.train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_DONE if elastic and write_outcome(status, message) else status)


def main(argv: Optional[list[str]] = None) -> None:
    # A stop signal before the first step ends the rank at once (the default action: nothing trained, nothing to
    # save, and a rank blocked in start-up collectives with a lost peer cannot act on a flag); the trainer installs
    # the flag's handlers when training starts.
    preemption = PreemptionFlag()
    args = parse_args(argv)
    try:
        overrides = args.overrides + ([f"model.init_from={args.init_from}"] if args.init_from else [])
        config = load_config(args.config, overrides)
        from hipscale.training.preflight import preflight, run_dir

        info = preflight(config)
    except ConfigError as e:
        fail(str(e), EXIT_CONFIG, args.elastic)

    from hipscale.training.components.heartbeat import start_heartbeat
    from hipscale.training.distributed import init_distributed, rank_hosts, shutdown
    from hipscale.training.elastic import StartRecords, start_id
    from hipscale.training.trainer import Trainer

    init_distributed(config.distributed.timeout_s, run_dir(config))
    hosts, start, rank = rank_hosts(), start_id(), launcher_rank()
    records = StartRecords(run_dir(config), start, rank) if args.elastic else None
    lost_status = EXIT_RESTART if args.elastic else EXIT_FAILED
    trainer = None

    def on_lost(what: str, since: float) -> None:
        line = f"rank {rank} stopped {where(trainer)}: {what}"
        if records is not None:
            records.record_fault(line, since)
        leave_now(trainer, line, lost_status)

    heartbeat = start_heartbeat(config.distributed.heartbeat_timeout_s, hosts, start, on_lost)
    try:
        trainer = Trainer(config, info, resume=args.resume, universal=args.universal, preemption=preemption,
                          start=start, records=records, hosts=hosts)
        status = EXIT_PREEMPTED if trainer.fit() == "preempted" else EXIT_DONE
        if status == EXIT_PREEMPTED and records is not None:
            records.record_fault(f"signal {preemption.signal} (the launcher stopped the ranks: a node joined, or "
                                 f"the job was preempted)", preemption.time)
    except AgreedStop as e:  # every rank stops at this step: leave together
        if rank == 0:
            print(f"hipscale.train: error: {e}", file=sys.stderr, flush=True)
        status = EXIT_DONE if args.elastic and write_outcome(e.exit_status, str(e)) else e.exit_status
    except BaseException as e:  # this rank alone: report, and leave without waiting for the others
        line, own = report_failure(e, rank, where(trainer), config.distributed.timeout_s, hosts)
        if records is not None:
            records.record_fault(line)
        status = exit_status_of(e) if own else lost_status
        if own and trainer is not None and isinstance(e, DiskFullError):
            _try(lambda: print(f"hipscale.train: {trainer.resume_hint()}", file=sys.stderr, flush=True),
                 "print how to resume")
        if status == EXIT_EVAL and args.elastic and write_outcome(status, line):
            status = EXIT_DONE  # a restart would evaluate again: hand the stop to the launcher
        leave_now(trainer, status=status)
    try:
        if trainer is not None:
            trainer.close()
        if heartbeat is not None:
            heartbeat.stop()  # before the final barrier, after which rank 0's store may be gone
        shutdown()
    except BaseException as e:  # a full disk at the last flush, a peer gone at the final barrier
        line, own = report_failure(e, rank, where(trainer), config.distributed.timeout_s, hosts)
        leave_now(trainer, status=EXIT_FAILED if own or status == EXIT_DONE else status)
    # Everything this rank wrote is closed and flushed: skip the interpreter's teardown of torch, DeepSpeed and
    # the rest, module by module (1.1-1.4 s of every rank's exit on a CPU, so of every job's end).
    leave_now(None, status=status)


def where(trainer) -> str:
    """Where a rank is, for its report: "during setup", "in step N", "in the final evaluation, after step N"..."""
    return "during setup" if trainer is None else trainer.where


def leave_now(trainer, line: Optional[str] = None, status: int = EXIT_FAILED) -> NoReturn:
    """End this rank at once with `status`, without waiting for the others (the launcher then ends or restarts
    the job) and without the interpreter's teardown: print `line`, close the logs, kill the DataLoader workers
    (they ignore SIGTERM) and flush. Also called from the heartbeat thread while the main thread may be blocked
    in a collective, and at the end of a run once everything is closed. A clean-up step that raises (a full
    disk) is reported and passed over, and one that blocks (a hung filesystem) is cut short: the rank exits
    within LEAVE_DEADLINE_S whatever happens."""
    deadline = threading.Timer(LEAVE_DEADLINE_S, os._exit, args=(status,))
    deadline.daemon = True
    deadline.start()
    if line:
        _try(lambda: print(f"hipscale.train: error: {line}", file=sys.stderr, flush=True), "print its error")
    if trainer is not None:
        _try(trainer.logger.close, "close its logs")
    for worker in multiprocessing.active_children():
        _try(worker.kill, f"kill DataLoader worker {worker.pid}")
    _try(sys.stdout.flush, "flush stdout")
    _try(sys.stderr.flush, "flush stderr")
    os._exit(status)


def _try(action: Callable[[], object], what: str) -> None:
    """Run one clean-up step of a leaving rank; an error is reported (if stderr still works) and passed over."""
    try:
        action()
    except BaseException as e:  # noqa: BLE001 - nothing may keep a leaving rank alive
        try:
            print(f"hipscale.train: note: could not {what} while leaving: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
        except BaseException:  # noqa: BLE001
            pass
