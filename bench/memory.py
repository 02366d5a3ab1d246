"""Peak memory a callable allocates beyond what exists when it starts.

CUDA: the caching allocator's peak counter. CPU: the profiler's allocation
events, summed in order (every tensor allocation and free on the CPU allocator),
which measures exactly the tensors the callable creates, not the process RSS.
"""
from __future__ import annotations

from typing import Callable

import torch


def peak_extra_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Every allocation and free on the CPU allocator, in order (kineto keeps each one).
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak
