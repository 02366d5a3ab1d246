"""Host time of one forward+backward of the dispersive term against its device time.

    python -m bench.launch_overhead                  # N = 32, D = 294,912 (SiT-XL/2), bf16 on CUDA
    python -m bench.launch_overhead --n 8 --d 64     # tiny: the fixed per-call cost alone

At the paper's sizes the fused kernels take tens of microseconds of GPU time, so a call
can cost more on the host (Python, the custom op, autograd, the launches) than on the
device; in a training step that is host-bound it is the host time that adds up. This
times the wall clock of many back-to-back calls (device drained before and after) per
backend, in interleaved rounds, and on CUDA the GPU time of one call from CUDA events
with the host queued ahead.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from kernels import dispersive_loss

from .timing import machine_description, synchronize


def _seconds_per_call(z: torch.Tensor, backend: str, calls: int) -> float:
    synchronize(z.device)
    start = time.perf_counter()
    for _ in range(calls):
        torch.autograd.grad(dispersive_loss(z, backend=backend), z)
    synchronize(z.device)
    return (time.perf_counter() - start) / calls


def _gpu_seconds(z: torch.Tensor, backend: str) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(50_000_000)  # the GPU spins while the host queues the call
    start.record()
    torch.autograd.grad(dispersive_loss(z, backend=backend), z)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--d", type=int, default=256 * 1152)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    z = torch.randn(args.n, args.d, device=device, dtype=dtype, requires_grad=True)
    backends = ("triton", "torch") if device.type == "cuda" else ("torch",)
    for b in backends:  # warm-up: compiles, allocator
        _seconds_per_call(z, b, 5)
    wall: dict[str, list[float]] = {b: [] for b in backends}
    for r in range(args.rounds):
        for b in (backends if r % 2 == 0 else backends[::-1]):
            wall[b].append(_seconds_per_call(z, b, args.calls))
    print(f"forward+backward, N={args.n} D={args.d:,} {str(dtype).removeprefix('torch.')}; "
          f"{machine_description(device)}; median of {args.rounds} rounds x {args.calls} calls")
    out = {}
    for b in backends:
        out[b] = {"wall_us": statistics.median(wall[b]) * 1e6}
        line = f"  {b:>6}: {out[b]['wall_us']:9.1f} us wall per call"
        if device.type == "cuda":
            out[b]["gpu_us"] = _gpu_seconds(z, b) * 1e6
            line += f", {out[b]['gpu_us']:8.1f} us GPU"
        print(line)
    return out


if __name__ == "__main__":
    main()
