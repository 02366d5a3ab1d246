"""Process-group set-up shared by ``deepspeed``, ``torchrun`` and plain ``python`` launches."""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: float = 30.0) -> tuple[int, int, torch.device]:
    """Initialises torch.distributed through DeepSpeed; returns (rank, world size, device).

    A plain ``python engine/train.py`` run becomes a world of one. The collective
    timeout makes the surviving ranks fail with an error after ``timeout_minutes``
    when one rank dies, instead of waiting forever.
    """
    import deepspeed

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size(), device


def any_true(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise OR of a small flag vector over all ranks (one tiny all-reduce)."""
    flags = flags.to(torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.bool()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
