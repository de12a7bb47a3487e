"""A sharding plan's work on a Ray cluster: one task per unit, handed out as CPUs free up, then ``finish``.

    preprocess/shard_av.py ... --out OUT --plan-units 256           # plan (once, anywhere)
    python -m hipscale.data.shard_ray --plan OUT                    # RAY_ADDRESS, a local `ray start`, or local
    python -m hipscale.data.shard_ray --plan OUT --address HEAD:6379 --cpus-per-unit 4 --unit-timeout-s 1800

Each task runs ``python -m hipscale.data.shard_job work --plan OUT --units U`` in a process of its own on
whichever node Ray picks (every node needs hipscale installed and the output reachable: a shared folder or
an s3:// / gs:// URL). The driver keeps as many tasks in flight as the cluster has CPUs for (nodes that join
get work, lost nodes' units go elsewhere). A unit whose node is lost, whose Ray worker dies, whose ``work``
fails or which runs past ``--unit-timeout-s`` from its start (a straggler: its process is killed) is queued
again, up to ``--max-attempts`` in all. Retries are safe: ``work`` keeps what any
attempt completed and two attempts of one unit at once leave one shard (see :mod:`hipscale.data.sharding.shard_plan`).
Units already complete are not submitted, so running the command again resumes the dataset.

Exit status: 0 after ``finish`` wrote report.json and index.json; 1 when a unit failed every attempt or
``finish`` found a gap (both named, with the units to run again); 2 on bad input (no plan, Ray missing).
``python -m hipscale.data.status OUT`` shows the progress of all units while the job runs.
"""
from __future__ import annotations

import argparse
import logging
import socket
import subprocess
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Optional

from hipscale.data.errors import InputError
from hipscale.data.shard_job import (EXIT_BAD_INPUT, EXIT_DONE, EXIT_INCOMPLETE, explain_incomplete, finish, item_type)
from hipscale.data.sharding.run import IncompleteDataset, complete_shards, load_plan
from hipscale.data.sharding.shard_destination import open_destination
from hipscale.data.sharding.shard_plan import parse_units
from hipscale.processes import die_with_parent

DEFAULT_UNIT_TIMEOUT_S = 3600.0
ERROR_TAIL = 2000  # characters of a failed `work`'s stderr kept for the driver's message


def build_unit(out: str, unit: int, workers: int, staging: Optional[str], timeout_s: float) -> dict[str, Any]:
    """A Ray task: `work` for one unit, in a process that dies with this task's worker (a cancel kills both),
    killed when it runs past `timeout_s` (its shard workers die with it).

    Returns:
        ``host``, ``exit`` (the work command's exit status; None when it was killed for time), ``seconds``
        and ``error`` (its stderr's tail).
    """
    started = time.monotonic()
    command = [sys.executable, "-m", "hipscale.data.shard_job", "work", "--plan", out, "--units", str(unit),
               "--workers", str(workers), *(["--staging", staging] if staging else [])]
    try:
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=timeout_s, preexec_fn=die_with_parent)
        exit_status, error = done.returncode, done.stderr[-ERROR_TAIL:]
    except subprocess.TimeoutExpired as expired:
        exit_status, error = None, (expired.stderr or b"").decode(errors="replace")[-ERROR_TAIL:]
    return {"host": socket.gethostname(), "exit": exit_status, "seconds": time.monotonic() - started,
            "error": error}


@dataclass(frozen=True)
class RayOptions:
    """How the units run on the cluster (the command line's options)."""

    cpus_per_unit: int = 1
    unit_timeout_s: float = DEFAULT_UNIT_TIMEOUT_S
    max_attempts: int = 3
    staging: Optional[str] = None


def log(message: str) -> None:
    print(f"[shard_ray] {message}", file=sys.stderr, flush=True)


def run_units(out: str, units: list[int], options: RayOptions) -> list[int]:
    """Runs `work` for every unit as Ray tasks (Ray already initialised); returns the units that failed every
    attempt.

    Raises:
        InputError: A `work` rejected its input (exit 2); the other tasks are cancelled.
    """
    import ray

    build = ray.remote(build_unit).options(num_cpus=options.cpus_per_unit, max_retries=0)
    pending, attempts = deque(units), Counter()
    running: dict[Any, int] = {}  # task -> unit
    failed: list[int] = []

    def retry(unit: int, problem: str) -> None:
        if attempts[unit] < options.max_attempts:
            log(f"unit {unit}, attempt {attempts[unit]}: {problem}; queued again "
                f"(attempt {attempts[unit] + 1} of {options.max_attempts})")
            pending.append(unit)
        else:
            log(f"unit {unit} failed all {options.max_attempts} attempts; the last: {problem}")
            failed.append(unit)

    completed = 0
    try:
        while pending or running:
            capacity = max(1, int(ray.cluster_resources().get("CPU", 0) // options.cpus_per_unit))
            while pending and len(running) < capacity:
                unit = pending.popleft()
                attempts[unit] += 1
                task = build.remote(out, unit, options.cpus_per_unit, options.staging, options.unit_timeout_s)
                running[task] = unit
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0, fetch_local=False)
            for task in ready:
                unit = running.pop(task)
                try:
                    result = ray.get(task)
                except ray.exceptions.RayError as error:  # the node was lost, the worker died, ...
                    first_sentences = ". ".join(str(error).splitlines()[0].split(". ")[:2])
                    retry(unit, f"{type(error).__name__}: {first_sentences}")
                    continue
                if result["exit"] == EXIT_DONE:
                    completed += 1
                    log(f"unit {unit} complete on {result['host']} in {result['seconds']:.1f} s "
                        f"(attempt {attempts[unit]}); {completed} of {len(units)} units")
                elif result["exit"] is None:
                    retry(unit, f"still running after {options.unit_timeout_s:g} s on {result['host']} "
                                "(a straggler): killed")
                elif result["exit"] == EXIT_BAD_INPUT:
                    raise InputError(f"unit {unit} on {result['host']}: {result['error'].strip()}")
                else:
                    retry(unit, f"work exited {result['exit']} on {result['host']}: {result['error'].strip()}")
    finally:
        for task in running:
            ray.cancel(task, force=True)
    return sorted(failed)


def connect(address: Optional[str]) -> None:
    """Joins the cluster at `address`, else RAY_ADDRESS's or a `ray start` of this machine, else starts Ray here."""
    try:
        import ray
    except ImportError:
        raise InputError("shard_ray needs Ray: pip install 'hipscale[ray]' (on every node)") from None
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    nodes = [node for node in ray.nodes() if node["Alive"]]
    log(f"Ray cluster: {len(nodes)} node{'s' * (len(nodes) != 1)}, {ray.cluster_resources().get('CPU', 0):g} CPUs")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hipscale.data.shard_ray", description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, help="the sharder's --out holding plan.json (folder or URL)")
    parser.add_argument("--address", default=None,
                        help="the cluster's HEAD:PORT (default: RAY_ADDRESS, a `ray start` here, else a local Ray)")
    parser.add_argument("--units", default=None, help="only these units: N, I..J or a list (default: all)")
    parser.add_argument("--cpus-per-unit", type=int, default=1,
                        help="CPUs a task reserves and the worker processes its `work` runs (default: 1)")
    parser.add_argument("--unit-timeout-s", type=float, default=DEFAULT_UNIT_TIMEOUT_S,
                        help="wall time one unit may take before it is cancelled and retried (default: 3600)")
    parser.add_argument("--max-attempts", type=int, default=3, help="attempts per unit in all (default: 3)")
    parser.add_argument("--staging", default=None, help="local folder on each node for shards before upload")
    parser.add_argument("--no-hash", dest="verify_hashes", action="store_false",
                        help="finish checks tar sizes only, not their SHA-256")
    args = parser.parse_args(argv)
    if args.cpus_per_unit < 1 or args.max_attempts < 1 or args.unit_timeout_s <= 0:
        parser.error("--cpus-per-unit and --max-attempts must be at least 1, --unit-timeout-s above 0")
    options = RayOptions(args.cpus_per_unit, args.unit_timeout_s, args.max_attempts, args.staging)
    try:
        destination = open_destination(args.plan, argument="--plan")
        plan = load_plan(destination, item_type)
        wanted = parse_units(args.units or f"0..{plan.num_units - 1}", plan.num_units)
        todo = [unit for unit in plan.unfinished_units(complete_shards(destination, plan)) if unit in wanted]
        log(f"{args.plan}: {len(todo)} of {len(wanted)} units to build ({plan.num_units} in the plan)")
        failed = []
        if todo:
            connect(args.address)
            failed = run_units(args.plan, todo, options)
        if failed:
            log(f"error: units {','.join(map(str, failed))} failed every attempt; run again: "
                f"python -m hipscale.data.shard_ray --plan {args.plan} --units {','.join(map(str, failed))}")
            return EXIT_INCOMPLETE
        report = finish(args.plan, args.verify_hashes)
    except InputError as error:
        log(f"error: {error}")
        return EXIT_BAD_INPUT
    except IncompleteDataset as error:
        print(explain_incomplete(args.plan, error), file=sys.stderr)
        return EXIT_INCOMPLETE
    print(f"{args.plan}: every planned shard checks out; wrote {report['written']} samples, rejected "
          f"{report['rejected']} {report['by_reason']} (report.json, index.json)")
    return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
