"""Process-group setup for the deepspeed launcher, torchrun and mpirun (mpi4py discovery)."""
from __future__ import annotations

import contextlib
import os
import socket
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


def all_reduce_sum(values: torch.Tensor) -> list[float]:
    """Sum a 1-D tensor over all ranks (one collective) and return it on the host."""
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.tolist()


def _deepspeed_shm_segment() -> Path:
    """This rank's /dev/shm segment of DeepSpeed's CPU shm all-reduce (deepspeed_shm_comm).

    DeepSpeed's TorchBackend creates it in init_distributed when LOCAL_SIZE equals the world size (the
    deepspeed launcher sets LOCAL_SIZE; torchrun and mpirun do not), named as in its shm.cpp
    (shm_initialize): deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, about 66 MiB.
    DeepSpeed never unlinks it, so each job leaves one per rank behind until reboot.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"


def shutdown() -> None:
    """Wait for every rank, then release DeepSpeed's shm segment and destroy the process group.

    After the barrier every rank has long finished DeepSpeed's init (the only place peers open the
    segment by name), so unlinking the name is safe; the mapping itself stays valid until exit.
    See docs/zero3_abort.md for the exit-time SIGABRT investigation this belongs to.
    """
    if dist.is_initialized():
        dist.barrier()
        with contextlib.suppress(OSError):
            _deepspeed_shm_segment().unlink(missing_ok=True)
        dist.destroy_process_group()
