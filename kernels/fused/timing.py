"""What the benchmarks take from triton, so that no module outside ``kernels.fused`` imports it.

    triton_version()   the installed triton's version, None without triton
    kernel_ms(fn)      median milliseconds of ``fn``'s GPU work (``triton.testing``)

Both import triton when called, not at import (``TRITON_INTERPRET`` must be chosen first).
"""
from __future__ import annotations

from typing import Callable

import torch


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def kernel_ms(fn: Callable[[], object], rep: int = 60) -> float:
    """Median time of ``fn`` in ms: replayed as a CUDA graph (``do_bench_cudagraph``: no launch
    gaps), or with CUDA events around eager launches when the capture fails (driver, allocator)."""
    import triton.testing

    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    except Exception:  # noqa: BLE001 - any capture failure: time it eagerly instead
        return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")
