"""Reused host buffers for the large gradient the CPU path returns.

Why: a fresh N x D gradient is written once, and every 4 KiB page of a fresh allocation
faults when first touched. glibc maps allocations this large afresh each time (above its
mmap threshold, which ``engine.distributed`` pins at 1 MiB) and unmaps them on free, so
nothing is ever reused. On this project's 2-core CI VM that cost ~9.5 ms per call at
N = 32, D = 294,912 fp32 (37.7 MB), twice the 4.3 ms product that fills it (measured
2026-11-30: ``mix @ z`` 14.3 ms into a fresh tensor, 4.3 ms into a used one). Asking
for 2 MiB pages (madvise) was tried: faster in isolation, 1.5-3x slower whenever the
VM had to back new huge pages, so not used.

What this keeps: up to ``SLOTS`` buffers per byte size, ``POOL_BYTES`` in all. A buffer
is handed out again only when nothing else holds its storage (the count of references
to the storage is exact: every tensor on it, view or not, holds one), so a gradient the
caller still keeps is never overwritten. It is the CPU counterpart of the CUDA caching
allocator, for one kind of tensor. Idle buffers stay allocated between calls (at most
2 x 37.7 MB at the XL size); ``clear()`` gives them back. The forward borrows the buffer
its gradient will use as scratch for its slabs (``kernels.gram._gram``): warm memory that
backward needs anyway, so the peak is not raised.
"""
from __future__ import annotations

import math
import threading

import torch

MIN_BYTES = 1 << 20        # below this faults cost little; not worth holding memory for
SLOTS = 2                  # a gradient kept by the caller (z.grad) plus the one being made
POOL_BYTES = 1 << 30       # all buffers together, idle or in use

_lock = threading.Lock()
_buffers: dict[int, list[torch.Tensor]] = {}      # nbytes -> flat uint8 buffers
# Private but long-standing; without it nothing is pooled (plain torch.empty).
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _idle(buf: torch.Tensor) -> bool:
    # References to the storage: ``buf`` itself and the temporary Python storage object.
    return _use_count(buf.untyped_storage()._cdata) == 2


def _pooled_bytes() -> int:
    return sum(n * len(bufs) for n, bufs in _buffers.items())


def _drop_idle() -> None:
    for n in list(_buffers):
        _buffers[n] = [b for b in _buffers[n] if not _idle(b)]
        if not _buffers[n]:
            del _buffers[n]


def _take(nbytes: int) -> torch.Tensor | None:
    """An idle buffer of ``nbytes``, a new pooled one, or None (slots in use, pool full)."""
    bufs = _buffers.get(nbytes, [])
    # A storage someone resized (``storage().resize_``, as sharded training does to free memory)
    # is not this buffer any more: forget it.
    bufs[:] = [b for b in bufs if b.untyped_storage().nbytes() == nbytes]
    for buf in bufs:
        if _idle(buf):
            return buf
    if len(bufs) >= SLOTS:
        return None
    if _pooled_bytes() + nbytes > POOL_BYTES:
        _drop_idle()
        if _pooled_bytes() + nbytes > POOL_BYTES:
            return None
    buf = torch.empty(nbytes, dtype=torch.uint8)
    _buffers.setdefault(nbytes, []).append(buf)
    return buf


def pooled(nbytes: int) -> torch.Tensor | None:
    """A flat uint8 CPU tensor of ``nbytes`` on pooled memory, or None where it is not pooled
    (small, every slot in use, pool full). The caller views it as it needs."""
    if nbytes < MIN_BYTES or _use_count is None:
        return None
    with _lock:  # the tensor is made before the lock is let go: it marks the buffer as in use
        buf = _take(nbytes)
        return None if buf is None else torch.empty(0, dtype=torch.uint8).set_(buf.untyped_storage(), 0, (nbytes,))


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Like ``torch.empty(shape)`` (contiguous, not a view); large CPU tensors reuse pooled memory."""
    device = torch.device(device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    flat = pooled(nbytes) if device.type == "cpu" else None
    if flat is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty(0, dtype=dtype).set_(flat.untyped_storage(), 0, tuple(shape))


def clear() -> None:
    """Frees the idle buffers (those in use stay alive with their tensors, outside the pool)."""
    with _lock:
        _drop_idle()


def pooled_bytes() -> int:
    """Bytes the pool holds, idle or in use."""
    with _lock:
        return _pooled_bytes()
