"""Training observability: metric records (JSONL + CSV), phase timers with NVTX ranges, MFU."""
from __future__ import annotations

import contextlib
import csv
import json
import time
from pathlib import Path
from typing import Any

import torch

# Dense peak TFLOP/s by (device-name fragment, precision), from the vendors' data sheets.
_PEAK_TFLOPS = {
    ("H200", "bf16"): 989.0, ("H200", "fp32"): 67.0,
    ("H100", "bf16"): 989.0, ("H100", "fp32"): 67.0,  # SXM; PCIe is lower, see below
    ("H100 PCIe", "bf16"): 756.0, ("H100 PCIe", "fp32"): 51.0,
    ("A100", "bf16"): 312.0, ("A100", "fp32"): 19.5,
    ("L40S", "bf16"): 362.0, ("L40S", "fp32"): 91.6,
    ("A10", "bf16"): 125.0, ("A10", "fp32"): 31.2,
}


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """Peak dense TFLOP/s of ``device`` for ``precision``; None when unknown (e.g. CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [(frag, v) for (frag, p), v in _PEAK_TFLOPS.items() if p == precision and frag in name]
    return max(matches, key=lambda m: len(m[0]))[1] if matches else None


class PhaseTimer:
    """Wall time per named phase (data / forward / backward / optimizer ...).

    Each phase is also an NVTX range on CUDA and a ``record_function`` range for
    torch.profiler traces. With ``sync=True`` the device is synchronised at phase
    boundaries so that GPU time lands in the right phase; that host sync costs
    throughput, so the trainer enables it only on the steps it logs.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}
        self.sync = False

    @contextlib.contextmanager
    def phase(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.nvtx.range_push(name)
        if self.sync and cuda:
            torch.cuda.synchronize(self.device)  # host sync: timing steps only
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(name):
                yield
        finally:
            if self.sync and cuda:
                torch.cuda.synchronize(self.device)  # host sync: timing steps only
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start
            if cuda:
                torch.cuda.nvtx.range_pop()

    def pop(self) -> dict[str, float]:
        totals, self.totals = self.totals, {}
        return totals


class MetricsWriter:
    """Appends one record per log step to ``metrics.jsonl`` and ``metrics.csv`` (rank 0)."""

    def __init__(self, folder: Path, enabled: bool):
        self.enabled = enabled
        self.jsonl = folder / "metrics.jsonl"
        self.csv = folder / "metrics.csv"
        self._columns: list[str] | None = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._columns is None:
            self._columns = list(record)
            new = not self.csv.exists()
            with open(self.csv, "a", newline="") as f:
                if new:
                    csv.writer(f).writerow(self._columns)
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerow([record.get(c, "") for c in self._columns])
