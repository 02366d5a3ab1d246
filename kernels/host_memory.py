"""Reused host buffers for the large gradient the CPU path returns.

Why: a fresh N x D gradient is written once, and every 4 KiB page of a fresh allocation
faults when first touched. glibc maps allocations this large afresh each time (above its
mmap threshold, which ``engine.distributed`` pins at 1 MiB) and unmaps them on free, so
nothing is ever reused. On this project's 2-core CI VM that cost ~9.5 ms per call at
N = 32, D = 294,912 fp32 (37.7 MB), twice the 4.3 ms product that fills it (measured
2026-11-30: ``mix @ z`` 14.3 ms into a fresh tensor, 4.3 ms into a used one). Asking
for 2 MiB pages (madvise) was tried: faster in isolation, 1.5-3x slower whenever the
VM had to back new huge pages, so not used.

What this keeps: up to ``SLOTS`` buffers per byte size, ``POOL_BYTES`` in all, and idle
ones only for the ``IDLE_SIZES`` sizes asked for most recently. A buffer is handed out
again only when nothing else holds its storage: no other tensor on it (view or not) and
no reference to its storage object (``_refs``), so a gradient the caller still keeps is
not overwritten. A storage that was resized or moved to shared memory leaves the pool.
It is the CPU counterpart of the CUDA caching allocator, for one kind of tensor. Idle
buffers stay allocated between calls (2 x 37.7 MB at the XL size); ``clear()`` gives them
back. A forward that will have a backward borrows the buffer its gradient will take as
scratch for its slabs (``kernels.gram._scratch``): warm memory that backward needs anyway,
so the peak is not raised.
"""
from __future__ import annotations

import math
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

MIN_BYTES = 1 << 20        # below this faults cost little; not worth holding memory for
SLOTS = 2                  # a gradient kept by the caller (z.grad) plus the one being made
IDLE_SIZES = 2             # sizes whose idle buffers stay (the most recently asked for)
POOL_BYTES = 1 << 30       # all buffers together, idle or in use

# Private but long-standing; without it nothing is pooled (plain torch.empty).
_use_count = getattr(torch._C, "_storage_Use_Count", None)


@dataclass
class _Buffer:
    tensor: torch.Tensor   # flat uint8: the pool's own reference to the storage
    ptr: int               # the storage's data pointer when allocated


def _refs(t: torch.Tensor) -> tuple[int, int]:
    """(C++ references to t's storage, Python references to its storage object).

    Both are needed: a tensor on the storage (view or not) holds a C++ reference; someone
    keeping only ``g.untyped_storage()`` holds the one Python object torch keeps per storage.
    """
    storage = t.untyped_storage()
    return _use_count(storage._cdata), sys.getrefcount(storage)


# The counts of a storage that only its own tensor holds, measured the same way.
_IDLE_REFS = _refs(torch.empty(1, dtype=torch.uint8)) if _use_count is not None else None

_lock = threading.Lock()
_buffers: OrderedDict[int, list[_Buffer]] = OrderedDict()   # nbytes -> buffers; last: latest size


def _moved(b: _Buffer) -> bool:
    # Resized (``storage().resize_``, as sharded training does to free memory) or moved to
    # shared memory (``share_memory_``): not this pool's memory any more.
    return b.tensor.untyped_storage().data_ptr() != b.ptr


def _idle(b: _Buffer) -> bool:
    return _refs(b.tensor) == _IDLE_REFS


def _pooled_bytes() -> int:
    return sum(n * len(bufs) for n, bufs in _buffers.items())


def _drop_idle(sizes) -> None:
    for n in list(sizes):
        _buffers[n] = [b for b in _buffers[n] if not _idle(b)]
        if not _buffers[n]:
            del _buffers[n]


def _take(nbytes: int) -> torch.Tensor | None:
    """An idle buffer of ``nbytes``, a new pooled one, or None (slots in use, pool full)."""
    bufs = [b for b in _buffers.pop(nbytes, []) if not _moved(b)]
    _buffers[nbytes] = bufs                       # now the most recently used size
    _drop_idle(list(_buffers)[:-IDLE_SIZES])      # sizes not asked for lately keep nothing idle
    buf = next((b for b in bufs if _idle(b)), None)
    if buf is None and len(bufs) < SLOTS:
        if _pooled_bytes() + nbytes > POOL_BYTES:
            _drop_idle([n for n in _buffers if n != nbytes])
        if _pooled_bytes() + nbytes <= POOL_BYTES:
            tensor = torch.empty(nbytes, dtype=torch.uint8)
            buf = _Buffer(tensor, tensor.data_ptr())
            bufs.append(buf)
    if not bufs:
        del _buffers[nbytes]
    return None if buf is None else buf.tensor


def pooled(nbytes: int) -> torch.Tensor | None:
    """A flat uint8 CPU tensor of ``nbytes`` on pooled memory, or None where it is not pooled
    (small, every slot in use, pool full). The caller views it as it needs."""
    if nbytes < MIN_BYTES or _use_count is None or torch._C._len_torch_dispatch_stack() > 0:
        return None  # small, no reference counts, or tracing (fake tensors have no memory)
    with _lock:  # the tensor is made before the lock is let go: it marks the buffer as in use
        buf = _take(nbytes)
        if buf is None:
            return None
        return torch.empty(0, dtype=torch.uint8).set_(buf.untyped_storage(), 0, (nbytes,))


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Like ``torch.empty(shape)`` (contiguous, not a view); large CPU tensors reuse pooled memory."""
    device = torch.device(device)
    nbytes = math.prod(shape) * dtype.itemsize
    flat = pooled(nbytes) if device.type == "cpu" else None
    if flat is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty(0, dtype=dtype).set_(flat.untyped_storage(), 0, tuple(shape))


def clear() -> None:
    """Frees the idle buffers (those in use stay alive with their tensors, outside the pool)."""
    with _lock:
        _drop_idle(list(_buffers))


def pooled_bytes() -> int:
    """Bytes the pool holds, idle or in use."""
    with _lock:
        return _pooled_bytes()
