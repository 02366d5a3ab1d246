"""Roofline of the fused Dispersive Loss: bytes, FLOPs and the time they bound, per pass.

    from kernels.roofline import dispersive_roofline
    r = dispersive_roofline(32, 294_912, "bfloat16", "infonce_l2", "forward")
    r.bytes, r.flops, r.seconds, r.bound

The counts follow the kernels as launched (``kernels.fused.tiles``, the launchers' tile table):

* bytes: DRAM traffic that cannot be avoided by the kernels' design: every read of z
  counted once (re-reads of a row tile by other tile pairs, and the covariance backward's
  re-reads of its own slab, are assumed to hit L2/L1), every write of dz once, plus the
  small fp32 side buffers (split-K partial Grams, the N x N epilogue, covariance column
  statistics).
* flops: multiply-adds issued by ``tl.dot`` (2 per MAC) on the padded tiles, with the
  hi + lo split counted: a bf16/fp16 operand that is not a 16-bit number (z - z_0, the
  normalised z, the fp32 mixing matrix) costs 3 products (2 when only one side is
  split). fp32 inputs are exact FMA on CUDA cores (no tf32), bf16/fp16 tensor cores.
* seconds: ``max(bytes / bandwidth, flops / peak)``; launch latency (a few microseconds
  per launch, ``launches`` of them) is reported apart, it is not a roofline term.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .fused.tiles import DISTANCE_VARIANTS, EPILOGUE_MAX_N, MAX_N, tiles_for


@dataclass(frozen=True)
class Hardware:
    name: str
    bandwidth: float          # bytes/s, measured device-to-device copy
    tensor_flops: float       # FLOP/s, bf16/fp16 dense tensor cores
    fp32_flops: float         # FLOP/s, fp32 FMA on CUDA cores (no tf32)
    sms: int                  # streaming multiprocessors (sets the split-K count)


H100 = Hardware("H100 SXM", bandwidth=3.0e12, tensor_flops=790e12, fp32_flops=67e12, sms=132)


@dataclass(frozen=True)
class Roofline:
    bytes: float
    flops: float
    seconds: float            # max of the two terms below
    memory_seconds: float
    compute_seconds: float
    launches: int             # kernel (or torch op) launches of the pass, not in seconds

    @property
    def bound(self) -> str:
        return "memory" if self.memory_seconds >= self.compute_seconds else "compute"


_SIZES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _dtype(dtype) -> torch.dtype:
    dtype = _NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in _SIZES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return dtype


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _forward(n: int, d: int, dtype: torch.dtype, variant: str, hw: Hardware):
    e, t = _SIZES[dtype], tiles_for(n, dtype)
    low = dtype != torch.float32
    nt = _cdiv(n, t.block_n)
    pairs = nt * (nt + 1) // 2
    k_blocks = _cdiv(d, t.block_k)
    split = _cdiv(k_blocks, _cdiv(k_blocks, min(k_blocks, max(1, _cdiv(2 * hw.sms, pairs)))))
    side = 4 * (2 * split * pairs * t.block_n**2 + n * n)             # partial Grams out and in, G out
    shift = variant in DISTANCE_VARIANTS
    flops = 2.0 * pairs * t.block_n**2 * _cdiv(d, t.block_k) * t.block_k * (3 if shift and low else 1)
    nbytes = n * d * e + side
    launches = 2                                                        # Gram, reduce
    if variant == "covariance":
        nbytes += 2 * n * d * e + 4 * (4 * d + n * _cdiv(d, t.block_d))  # two more reads of z; mean, q
        launches += 2 + 12                                               # stats kernels; torch N x N epilogue
    elif n <= EPILOGUE_MAX_N:
        nbytes += 4 * (2 * n * n + n)                                    # G in, M_hat and row scales out
        launches += 1
    else:
        nbytes += 4 * 6 * n * n                                          # torch ops on N x N matrices
        launches += 15
    return nbytes, flops, launches


def _backward(n: int, d: int, dtype: torch.dtype, variant: str, hw: Hardware):
    e, t = _SIZES[dtype], tiles_for(n, dtype)
    low = dtype != torch.float32
    rows = _cdiv(n, t.block_n) * t.block_n
    inner = _cdiv(n, t.block_j) * t.block_j
    cols = _cdiv(d, t.block_d) * t.block_d
    split_x = variant in DISTANCE_VARIANTS or variant == "covariance"   # x is fp32 (shifted / normalised)
    mult = (3 if split_x else 2) if low else 1
    flops = 2.0 * rows * inner * cols * mult
    nbytes = 2 * n * d * e + 4 * (n * n + 3 * n)                       # z in, dz out; M_hat, row vectors
    return nbytes, flops, 1


def dispersive_roofline(n: int, d: int, dtype="bfloat16", variant: str = "infonce_l2",
                        pass_: str = "forward", hardware: Hardware = H100) -> Roofline:
    """Bytes, FLOPs and roofline seconds of one pass of the fused kernels for z of shape (N, D).

    pass_: ``forward``, ``backward`` or ``both``. N must be in the fused range (1..MAX_N).
    """
    dtype = _dtype(dtype)
    if not 1 <= n <= MAX_N or d < 1:
        raise ValueError(f"the fused path covers 1 <= N <= {MAX_N} and D >= 1, got N={n}, D={d}")
    if pass_ not in ("forward", "backward", "both"):
        raise ValueError(f"pass_ must be 'forward', 'backward' or 'both', got {pass_!r}")
    parts = []
    if pass_ in ("forward", "both"):
        parts.append(_forward(n, d, dtype, variant, hardware))
    if pass_ in ("backward", "both"):
        parts.append(_backward(n, d, dtype, variant, hardware))
    nbytes = float(sum(p[0] for p in parts))
    flops = float(sum(p[1] for p in parts))
    peak = hardware.fp32_flops if dtype == torch.float32 else hardware.tensor_flops
    mem, comp = nbytes / hardware.bandwidth, flops / peak
    return Roofline(nbytes, flops, max(mem, comp), mem, comp, sum(p[2] for p in parts))


def floor_seconds(n: int, d: int, dtype="bfloat16", pass_: str = "forward",
                  hardware: Hardware = H100) -> float:
    """The design floor: forward reads z once; backward reads z once and writes dz once."""
    e = _SIZES[_dtype(dtype)]
    passes = {"forward": 1, "backward": 2, "both": 3}[pass_]
    return passes * n * d * e / hardware.bandwidth


def compute_crossover_n(dtype="bfloat16", variant: str = "infonce_l2", pass_: str = "forward",
                        d: int = 294_912, hardware: Hardware = H100) -> int:
    """Smallest N from which on the pass stays compute-bound up to MAX_N (MAX_N + 1: never).

    (Very small N can also come out compute-bound: a few rows still fill a 32-row tile.)
    """
    n = MAX_N
    while n >= 1 and dispersive_roofline(n, d, dtype, variant, pass_, hardware).bound == "compute":
        n -= 1
    return n + 1


__all__ = ["H100", "Hardware", "Roofline", "compute_crossover_n", "dispersive_roofline", "floor_seconds"]
