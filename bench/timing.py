"""Timing helpers shared by the benchmarks: warm-up, device sync inside the timed call, median.

Two clocks:

* wall time with the device synchronised inside the timed call (``measure``, and what
  pytest-benchmark records): what a caller waits for, host overhead included;
* on CUDA, device time from CUDA events (``cuda_device_times``): the GPU work alone. A
  spin kernel is queued first, so the host enqueues the whole call while the GPU waits
  and the events see no launch gaps; and the L2 cache is flushed before each round
  (an H100's 50 MB L2 would otherwise hold the 19 MB input of the paper's size).
"""
from __future__ import annotations

import datetime
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from kernels.fused.timing import triton_version

_L2_FLUSH_BYTES = 256 << 20          # larger than any current GPU's L2 cache
_SPIN_CYCLES_PER_MS = 2_000_000      # torch.cuda._sleep cycles: >= 1 ms on clocks up to 2 GHz
_l2_buffers: dict[torch.device, torch.Tensor] = {}


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the measurement was."""
        return (self.max_s - self.min_s) / self.median_s if self.median_s else 0.0


def measure(fn: Callable[[], object], *, device: torch.device | str = "cpu", warmup: int = 1,
            repeats: int = 5) -> Timing:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), repeats)


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and IQR of a list of seconds (pytest-benchmark's statistics)."""
    if not times:
        raise ValueError("summarize() needs at least one time")
    data = sorted(times)
    if len(data) == 1:
        q1 = q3 = data[0]
    else:
        q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    return {"median": statistics.median(data), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": data[0], "max": data[-1], "rounds": len(data)}


def flush_l2(device: torch.device | str) -> None:
    """Evicts the GPU's L2 cache by writing a buffer larger than it (no-op on CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    if device not in _l2_buffers:
        _l2_buffers[device] = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    _l2_buffers[device].zero_()


def cuda_device_times(run: Callable[..., object], setup: Callable[[], tuple] | None = None, *,
                      rounds: int, device: torch.device | str, spin_ms: float = 1.0) -> list[float]:
    """GPU time of ``run(*setup()[0])`` per round from CUDA events (seconds).

    Per round: setup (untimed), L2 flush, a spin kernel of ``spin_ms`` so that the host has
    queued all of ``run`` before the GPU reaches it, then events around ``run``. If the host
    needs longer than the spin to queue ``run``, the result includes that gap: it can only
    err on the slow side.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"cuda_device_times needs a CUDA device, got {device}")
    times = []
    for _ in range(rounds):
        args, kwargs = setup() if setup is not None else ((), {})
        flush_l2(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(spin_ms * _SPIN_CYCLES_PER_MS))
        start.record()
        run(*args, **kwargs)
        end.record()
        end.synchronize()  # host sync: the event must have completed before reading it
        times.append(start.elapsed_time(end) / 1e3)
    return times


def versions() -> dict[str, str]:
    """Library versions recorded with every result."""
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "triton": triton_version() or "not installed"}
    if torch.version.cuda:
        info["cuda"] = torch.version.cuda
    return info


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        hw = f"{cpu_name()} CPU, {torch.get_num_threads()} threads"
    return f"{hw}; torch {torch.__version__}; python {platform.python_version()}"


def now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
