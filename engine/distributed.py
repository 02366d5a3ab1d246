"""Process groups, the one owner of their set-up: the trainer's (through DeepSpeed, a world of
one for a plain ``python`` run) and the env:// group of the other commands (``torchrun ...
-m engine.sample``), plus the small collectives and CPU-rank housekeeping both need."""
from __future__ import annotations

import atexit
import ctypes
import datetime
import os
import socket
from pathlib import Path

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
    import deepspeed  # lazy: a heavy import (seconds); the torchrun commands never need it

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
        timeout = datetime.timedelta(minutes=timeout_minutes)
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        groups_inherit_timeout(timeout)
        if device.type == "cpu":
            atexit.register(release_shared_memory)
            return_freed_memory(first_call=True)
    return dist.get_rank(), dist.get_world_size(), device


def groups_inherit_timeout(timeout: datetime.timedelta) -> None:
    """Makes every process group created from now on (``new_group`` without a timeout) use
    ``timeout`` instead of torch's 30-minute default.

    DeepSpeed builds its data-parallel and ZeRO groups with ``new_group(ranks)``, which
    takes no timeout argument through DeepSpeed, so ZeRO's gradient all-reduce waited 30
    minutes for a stopped rank whatever the run's ``--timeout-minutes``. torch reads the
    default from these two module globals each time a group is made (``_get_default_timeout``).
    """
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def group_timeouts() -> list[datetime.timedelta]:
    """The collective timeout of every live process group (the default one first); empty when
    this torch does not expose them (private attributes: read for the start-up line only)."""
    import torch.distributed.distributed_c10d as c10d

    out = []
    try:
        for group in c10d._world.pg_map:
            for device in group._device_types:
                out.append(group._get_backend(device).options._timeout)
    except (AttributeError, RuntimeError):
        return []
    return out


class EnvGroup:
    """torch.distributed from the launcher's environment (``torchrun``: RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_*) when WORLD_SIZE > 1, else one process; ``close()`` ends what it began."""

    def __init__(self, timeout_minutes: float = 30.0) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.started = False
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            timeout = datetime.timedelta(minutes=timeout_minutes)
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
            groups_inherit_timeout(timeout)
            self.started = True

    def device(self) -> torch.device:
        """This rank's CUDA device when there is one, else the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def barrier(self) -> None:
        barrier()

    def close(self) -> None:
        if self.started:
            dist.destroy_process_group()


def return_freed_memory(first_call: bool = False) -> None:
    """Makes glibc give freed memory back to the OS (CPU ranks).

    glibc raises its mmap threshold up to 32 MB as large blocks are freed, after which
    tensors up to that size come from the heap and stay in the process when freed: a rank
    of an XL ZeRO-3 run kept ~2.5 GB of dead start-up tensors that way (measured RSS per
    rank 8.5 GB -> 6.0 GB with this). A fixed 1 MB threshold plus a trim fixes it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    if first_call:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, no longer adjusted dynamically
    libc.malloc_trim(0)


def release_shared_memory() -> None:
    """Unlinks this rank's DeepSpeed CPU all-reduce buffer in /dev/shm.

    DeepSpeed's shared-memory collectives for CPU ranks create one 69 MB file per rank and
    never unlink it, so every CPU run would leave 138 MB of RAM behind. Called at exit; the
    memory itself goes when the last process that maps it does.
    """
    addr, port, rank = (os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "RANK"))
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        path.unlink(missing_ok=True)


def any_true(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise OR of a small flag vector over all ranks (one tiny all-reduce)."""
    flags = flags.to(torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.bool()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
