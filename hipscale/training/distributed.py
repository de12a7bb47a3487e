"""Process-group setup for the deepspeed launcher, torchrun and mpirun (mpi4py discovery)."""
from __future__ import annotations

import datetime
import os
import socket
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist

# Rank variables of the launchers, read before any process group exists.
_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


def free_port() -> int:
    """A TCP port nobody listens on now, for a job's master (every launcher defaults to 29500)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_rank() -> int:
    """This process's global rank as its launcher announced it (0 when launched alone)."""
    for name in _RANK_VARIABLES:
        if name in os.environ:
            return int(os.environ[name])
    return 0


def init_distributed(timeout_s: int, trace_dir: Path) -> None:
    """Start the default process group through DeepSpeed.

    Under mpirun (no RANK/MASTER_ADDR set) DeepSpeed discovers ranks with mpi4py; the port
    comes from MASTER_PORT (default 29500), which mpi discovery would otherwise ignore.

    Args:
        timeout_s: how long a collective waits for the other ranks before it raises (gloo) or
            the NCCL watchdog aborts the process group.
        trace_dir: where NCCL's flight recorder dumps each rank's recent collectives on a timeout
            (unless TORCH_NCCL_* / TORCH_FR_* variables say otherwise).
    """
    import deepspeed

    _stand_in_for_deepspeed_muon()
    if torch.cuda.is_available():
        for name, value in (("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000"), ("TORCH_NCCL_DUMP_ON_TIMEOUT", "1"),
                            ("TORCH_FR_DUMP_TEMP_FILE", str(trace_dir / "nccl_trace_rank_")),
                            ("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str(trace_dir / "nccl_trace_rank_"))):
            os.environ.setdefault(name, value)
    timeout = datetime.timedelta(seconds=timeout_s)
    # torch.distributed.new_group(), which DeepSpeed uses for its data-parallel and ZeRO groups, takes
    # its timeout from these module defaults (30 min gloo, 10 min NCCL), not from the default group's.
    c10d = torch.distributed.distributed_c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    port = int(os.environ.get("MASTER_PORT", "29500"))
    deepspeed.init_distributed(auto_mpi_discovery=True, distributed_port=port, verbose=False, timeout=timeout)
    # Every rank has mapped every peer's shm segment by name inside init: the names can go now, and a rank that
    # dies at any later moment (SIGKILL included) leaves nothing behind in /dev/shm.
    dist.barrier()
    _deepspeed_shm_segment().unlink(missing_ok=True)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _stand_in_for_deepspeed_muon() -> None:
    """Give DeepSpeed stand-ins for its two Muon optimizer modules.

    DeepSpeed 0.19 imports `deepspeed.runtime.zero.muon` wherever it asks whether the optimizer is Muon (ZeRO's
    optimizer check, the ZeRO and bf16 optimizers, every ZeRO-1/2 gradient partition), and that import sets up
    Muon's compiled kernels (torch.compile, inductor): about 3 s of every rank's start on this CPU, measured (a
    one-process debug run took 6.5 s with the stand-ins, 9.2-9.6 s without). hipscale passes its own optimizer (AdamW or LAMB,
    `training.optim`), never Muon: the stand-in class is one no optimizer is an instance of, and DeepSpeed calls
    the update functions only for Muon's parameters.
    """
    def never(*args, **kwargs):
        raise NotImplementedError("hipscale never builds DeepSpeed's Muon optimizer (training.distributed)")

    stand_ins = {"muon_optimizer": {"MuonWithAuxAdam": type("MuonWithAuxAdam", (), {})},
                 "original_muon": {"muon_update": never, "adam_update": never}}
    for module_name, names in stand_ins.items():
        name = f"deepspeed.runtime.zero.muon.{module_name}"
        if name not in sys.modules:
            module = types.ModuleType(name, "hipscale's stand-in: no optimizer here is DeepSpeed's Muon")
            module.__dict__.update(names)
            sys.modules[name] = module


def rank_hosts() -> list[str]:
    """Every rank's "hostname (address)", indexed by rank: names the node in reports of a lost peer."""
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        address = "address unknown"
    hosts: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(hosts, f"{name} ({address})")
    return hosts


def all_reduce_sum(values: torch.Tensor) -> list[float]:
    """Sum a 1-D tensor over all ranks (one collective) and return it on the host."""
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.tolist()


def all_reduce_max(value: float, device: torch.device) -> float:
    """The maximum of a number over all ranks (one collective)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _deepspeed_shm_segment() -> Path:
    """This rank's /dev/shm segment of DeepSpeed's CPU shm all-reduce (deepspeed_shm_comm).

    DeepSpeed's TorchBackend creates it in init_distributed when LOCAL_SIZE equals the world size (the
    deepspeed launcher sets LOCAL_SIZE; torchrun and mpirun do not), named as in its shm.cpp
    (shm_initialize): deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, about 66 MiB.
    DeepSpeed never unlinks it (each job would leave one per rank behind until reboot): `init_distributed` does.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"


def shutdown() -> None:
    """Wait for every rank, then destroy the process group (see docs/zero3_abort.md for the exit-time SIGABRT
    investigation this belongs to), and finalize MPI when mpi4py started it (ranks under mpirun): the rank then
    exits without the interpreter's teardown, whose atexit hook would have, and mpirun counts a rank that
    exits without MPI_Finalize as an abnormal termination."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
