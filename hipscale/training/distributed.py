"""Process-group setup for the deepspeed launcher, torchrun and mpirun (mpi4py discovery)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

# Rank variables of the launchers, read before any process group exists.
_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


def launcher_rank() -> int:
    """This process's global rank as its launcher announced it (0 when launched alone)."""
    for name in _RANK_VARIABLES:
        if name in os.environ:
            return int(os.environ[name])
    return 0


def init_distributed() -> None:
    """Start the default process group through DeepSpeed.

    Under mpirun (no RANK/MASTER_ADDR set) DeepSpeed discovers ranks with mpi4py; the port
    comes from MASTER_PORT (default 29500), which mpi discovery would otherwise ignore.
    """
    import deepspeed

    port = int(os.environ.get("MASTER_PORT", "29500"))
    deepspeed.init_distributed(auto_mpi_discovery=True, distributed_port=port, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum each value over all ranks (one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def shutdown() -> None:
    """Wait for every rank, then destroy the process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
