"""Timing helpers shared by the benchmarks: warm-up, device sync inside the timed call, median."""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


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


def machine_description(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        hw = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{hw}; torch {torch.__version__}; python {platform.python_version()}"
