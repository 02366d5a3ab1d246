"""Forward+backward of the dispersive term: the release's pdist baseline vs this project.

    python -m bench.dispersive_compare            # the two sizes of the foundation bar
    python -m bench.dispersive_compare --sizes 16x98304 32x294912 --dtype bfloat16

Prints one Markdown table: median time (and spread) of each implementation, the
speed-up, and the peak memory each allocates beyond z and its gradient.
"""
from __future__ import annotations

import argparse
import datetime
from dataclasses import dataclass

import torch

from kernels import dispersive_loss, release_dispersive_loss

from .memory import peak_extra_bytes
from .timing import Timing, machine_description, measure

# (N, D): the release's local batch on SiT-XL/2 (256 tokens x 1152), and a large
# local batch on SiT-S/2 (256 tokens x 384).
DEFAULT_SIZES = ((32, 294_912), (256, 98_304))


@dataclass
class Row:
    n: int
    d: int
    dtype: str
    release: Timing
    fast: Timing
    release_extra: int
    fast_extra: int

    @property
    def speedup(self) -> float:
        return self.release.median_s / self.fast.median_s


def _fwd_bwd(loss_fn, z: torch.Tensor):
    return lambda: torch.autograd.grad(loss_fn(z), z)


def compare(n: int, d: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
            repeats: int = 5, seed: int = 0) -> Row:
    gen = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(n, d, generator=gen, device=device, dtype=dtype).requires_grad_()
    grad_bytes = z.numel() * z.element_size()
    release = _fwd_bwd(release_dispersive_loss, z)
    fast = _fwd_bwd(lambda x: dispersive_loss(x, backend="auto"), z)
    # Few repeats for the slow baseline at large N: it takes seconds per call on a CPU.
    slow_repeats = max(2, repeats // 2) if n * n * d > 2e9 else repeats
    return Row(
        n, d, str(dtype).removeprefix("torch."),
        release=measure(release, device=device, repeats=slow_repeats),
        fast=measure(fast, device=device, repeats=repeats),
        release_extra=max(0, peak_extra_bytes(release, device) - grad_bytes),
        fast_extra=max(0, peak_extra_bytes(fast, device) - grad_bytes),
    )


def table(rows: list[Row], device: str) -> str:
    lines = [
        f"Dispersive term, forward+backward. {machine_description(device)}; "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}",
        "",
        "| N | D | dtype | release ms (spread) | this project ms (spread) | speed-up | "
        "release extra MiB | this project extra MiB (% of z) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        z_bytes = r.n * r.d * torch.finfo(getattr(torch, r.dtype)).bits // 8
        lines.append(
            f"| {r.n} | {r.d:,} | {r.dtype} | {r.release.median_s * 1e3:.1f} ({r.release.spread:.0%}) | "
            f"{r.fast.median_s * 1e3:.1f} ({r.fast.spread:.0%}) | {r.speedup:.1f}x | "
            f"{r.release_extra / 2**20:.1f} | {r.fast_extra / 2**20:.1f} ({r.fast_extra / z_bytes:.1%}) |")
    return "\n".join(lines)


def _size(text: str) -> tuple[int, int]:
    try:
        n, d = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 32x294912, got {text!r}") from None
    return n, d


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=_size, default=list(DEFAULT_SIZES), help="NxD pairs")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    rows = []
    for n, d in args.sizes:
        print(f"timing N={n}, D={d:,} ...", flush=True)
        rows.append(compare(n, d, getattr(torch, args.dtype), args.device, args.repeats))
    print()
    print(table(rows, args.device))


if __name__ == "__main__":
    main()
