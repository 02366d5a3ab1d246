"""What the device can do, measured in the same run, and the roofline of a dispersive pass.

    figures = device_figures("cuda")            # copy bandwidth measured once per process
    line = pass_roofline(32, 294_912, torch.bfloat16, "infonce_l2", "forward_backward", figures)
    line.memory_s, line.seconds, line.floor_s   # bytes / bandwidth, max(memory, compute), floor

* Memory slope: the bandwidth of a large tensor copy (bytes read + bytes written over the
  time) on the device in question; on a CPU, the CPU's.
* Compute ceiling: the FLOP/s of a large square matmul in the dtype the kernels multiply
  in (GPU: bf16 tensor cores for 16-bit inputs, exact fp32 without TF32 for fp32; CPU:
  fp32, since the Gram path accumulates 16-bit inputs in fp32). Measured, not the data sheet.
* Counts: bytes and FLOPs of a pass from ``kernels.roofline.dispersive_roofline`` (the
  fused kernels' documented formulas) fed the measured figures, else the formulas of
  ``shared/design/dispersive-loss.md`` (``formula_counts``). Every provider is judged
  against the same counts, so "GB/s" is effective bandwidth, as in Triton's tutorials.
* Floor: the design's minimum, z read once per pass and dz written once, at copy speed
  (the GPU target "within 1.3x of the memory roofline" is judged against it).
"""
from __future__ import annotations

import functools
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch

from .timing import synchronize

PASSES: tuple[str, ...] = ("forward", "backward", "forward_backward")
COPY_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device | str, nbytes: int | None = None, repeats: int = 7) -> float:
    """Bytes per second of ``dst.copy_(src)``, counting the read and the write."""
    device = torch.device(device)
    nbytes = nbytes or COPY_BYTES.get(device.type, COPY_BYTES["cpu"])
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * src.element_size() / seconds


def matmul_throughput(device: torch.device | str, dtype: torch.dtype = torch.float32,
                      size: int | None = None, repeats: int = 3) -> float:
    """FLOP/s of a square matmul (2 size^3 FLOPs); fp32 without TF32 on CUDA."""
    device = torch.device(device)
    size = size or MATMUL_SIZE.get(device.type, MATMUL_SIZE["cpu"])
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the kernels keep fp32 exact
    try:
        seconds = _median_seconds(lambda: a @ b, device, repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    return 2 * size**3 / seconds


@dataclass
class DeviceFigures:
    """Measured ceilings of one device; matmul rates are measured on first use per dtype."""

    device: torch.device
    copy_bytes_per_s: float
    matmul_size: int | None = None     # side of the square matmul measured (None: per-device default)
    _matmul: dict[torch.dtype, float] = field(default_factory=dict)

    @property
    def parallelism(self) -> int:
        """SMs of a GPU (they set the fused kernels' split-K count), cores of a CPU."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).multi_processor_count
        return os.cpu_count() or 1

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if self.device.type == "cuda" else torch.float32

    def matmul_flops(self, dtype: torch.dtype) -> float:
        key = self.compute_dtype(dtype)
        if key not in self._matmul:
            self._matmul[key] = matmul_throughput(self.device, key, self.matmul_size)
        return self._matmul[key]

    def as_dict(self) -> dict[str, float]:
        out = {"copy_GBps": round(self.copy_bytes_per_s / 1e9, 1)}
        out.update({f"matmul_TFLOPs_{str(k).removeprefix('torch.')}": round(v / 1e12, 3)
                    for k, v in self._matmul.items()})
        return out


@functools.lru_cache(maxsize=None)
def device_figures(device: torch.device | str) -> DeviceFigures:
    device = torch.device(device)
    return DeviceFigures(device, copy_bandwidth(device))


def formula_counts(n: int, d: int, itemsize: int, variant: str, pass_: str) -> tuple[int, int]:
    """(bytes, FLOPs) a pass must move and do, from dispersive-loss.md's "Cost" section.

    The fallback when ``kernels.roofline`` is missing. forward: read Z once (covariance:
    three times); the Gram Z Z^T is 2 N^2 D FLOPs. backward: read Z, write dZ; (P Z) is
    2 N^2 D FLOPs. The O(N^2) work is left out: at D >= 98,304 it is < 0.1%.
    """
    if pass_ == "forward":
        reads = 3 if variant == "covariance" else 1
        return reads * n * d * itemsize, 2 * n * n * d
    if pass_ == "backward":
        return 2 * n * d * itemsize, 2 * n * n * d
    if pass_ == "forward_backward":
        fwd, bwd = (formula_counts(n, d, itemsize, variant, p) for p in ("forward", "backward"))
        return fwd[0] + bwd[0], fwd[1] + bwd[1]
    raise ValueError(f"unknown pass {pass_!r}; expected one of {PASSES}")


def floor_seconds(n: int, d: int, dtype: torch.dtype, pass_: str, copy_bytes_per_s: float) -> float:
    """The design's floor: forward reads z once, backward reads z and writes dz, at copy speed."""
    if pass_ not in PASSES:
        raise ValueError(f"unknown pass {pass_!r}; expected one of {PASSES}")
    passes = {"forward": 1, "backward": 2, "forward_backward": 3}[pass_]
    return passes * n * d * torch.empty((), dtype=dtype).element_size() / copy_bytes_per_s


@dataclass(frozen=True)
class Roofline:
    bytes: float
    flops: float
    memory_s: float          # bytes / measured copy bandwidth
    compute_s: float         # FLOPs / measured matmul rate
    floor_s: float           # the design floor (z read once, dz written once) at copy speed
    source: str              # "kernels.roofline" or "bench formula"

    @property
    def seconds(self) -> float:
        return max(self.memory_s, self.compute_s)

    def derived(self, seconds: float) -> dict[str, float]:
        """GB/s, TFLOP/s and % of the rooflines achieved by a pass that took ``seconds``."""
        return {"GBps": self.bytes / seconds / 1e9, "TFLOPs": self.flops / seconds / 1e12,
                "pct_memory_roofline": 100 * self.memory_s / seconds,
                "pct_roofline": 100 * self.seconds / seconds,
                "x_floor": seconds / self.floor_s}


_KERNEL_PASS = {"forward": "forward", "backward": "backward", "forward_backward": "both"}


def _kernel_roofline(n, d, dtype, variant, pass_, figures: DeviceFigures):
    from kernels import roofline as kr  # ImportError when the module is absent

    hardware = kr.Hardware(
        name=str(figures.device), bandwidth=figures.copy_bytes_per_s,
        # A CPU has no tensor cores: the Gram path multiplies in fp32 whatever the input.
        tensor_flops=figures.matmul_flops(torch.bfloat16), fp32_flops=figures.matmul_flops(torch.float32),
        sms=figures.parallelism)
    return kr.dispersive_roofline(n, d, dtype, variant, _KERNEL_PASS[pass_], hardware)


def pass_roofline(n: int, d: int, dtype: torch.dtype, variant: str, pass_: str,
                  figures: DeviceFigures) -> Roofline:
    """Bytes, FLOPs and floors of one pass on the measured device.

    From ``kernels.roofline.dispersive_roofline`` (the fused kernels' documented counts,
    fed the measured bandwidth and matmul rates) when it is importable and covers the case,
    else ``formula_counts``.
    """
    if pass_ not in PASSES:
        raise ValueError(f"unknown pass {pass_!r}; expected one of {PASSES}")
    floor = floor_seconds(n, d, dtype, pass_, figures.copy_bytes_per_s)
    try:
        r = _kernel_roofline(n, d, dtype, variant, pass_, figures)
        return Roofline(r.bytes, r.flops, r.memory_seconds, r.compute_seconds, floor, "kernels.roofline")
    except ImportError:
        pass
    except (TypeError, ValueError, AttributeError) as err:
        # An interface change must not sink the whole suite; say so loudly instead.
        warnings.warn(f"kernels.roofline.dispersive_roofline({n}, {d}, {dtype}, {variant!r}, "
                      f"{pass_!r}) failed: {err}; using bench.hardware.formula_counts", stacklevel=2)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes, flops = formula_counts(n, d, itemsize, variant, pass_)
    return Roofline(nbytes, flops, nbytes / figures.copy_bytes_per_s,
                    flops / figures.matmul_flops(dtype), floor, "bench formula")


def spec_peak_flops(device: torch.device | str, precision: str = "bf16") -> float | None:
    """The data sheet's dense peak FLOP/s (engine.training.metrics' table); None for CPUs and unknown GPUs."""
    from engine.training.metrics import peak_tflops

    peak = peak_tflops(torch.device(device), precision)
    return peak * 1e12 if peak else None
