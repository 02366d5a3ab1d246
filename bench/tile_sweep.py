"""Sweep the fused kernels' tile table on a GPU: kernel time per candidate, checked outputs.

    python -m bench.tile_sweep                       # the two bf16 sizes of the bars
    python -m bench.tile_sweep --out build/tile_sweep.json --budget-s 120

``kernels.fused.tiles.TILES`` was chosen without a GPU (no spills on sm_80/sm_90, see
``kernels.check``). This times alternatives of the entry each size uses: the forward's
column block, warps and pipeline depth, the number of split-K programs per SM, and the
backward's column block and warps. Each candidate's loss and gradient must match the
current table's (same function, other blocking) before its time counts.

Times are kernel time only: ``kernels.fused.timing.kernel_ms`` (triton's
``do_bench_cudagraph``) over a CUDA graph of the forward (or backward) on ``ROTATE``
copies of z, so launch gaps are gone and the copies together exceed the L2 cache. The memory floor printed beside them is z's bytes
over the copy bandwidth measured in the same run (forward reads z once; backward reads
z and writes dz).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from kernels.fused import tiles as cfg
from kernels.fused.timing import kernel_ms

from .hardware import copy_bandwidth

ROTATE = 4   # copies of z per timed call: 4 x 18.9 MB (N = 32, XL/2, bf16) > the H100/H200 L2
SIZES = ((32, 256 * 1152, torch.bfloat16), (256, 256 * 384, torch.bfloat16), (32, 256 * 1152, torch.float32))


def _candidates(base: cfg.Tiles) -> list[tuple[str, cfg.Tiles, int]]:
    """(what changed, tiles, programs per SM) to try; the current entry first."""
    out = [("current", base, 2)]
    for block_k in (64, 128, 256):
        for warps in (4, 8):
            for stages in (3, 4):
                t = dataclasses.replace(base, block_k=block_k, warps=warps, stages=stages)
                if t != base:
                    out.append((f"fwd k{block_k} w{warps} s{stages}", t, 2))
    out += [(f"fwd {p} programs/SM", base, p) for p in (1, 4, 8)]
    for block_d in (64, 128, 256):
        for warps in (4, 8):
            t = dataclasses.replace(base, block_d=block_d, bwd_warps=warps)
            if t != base:
                out.append((f"bwd d{block_d} w{warps}", t, 2))
    return out


def sweep(n: int, d: int, dtype: torch.dtype, bandwidth: float, deadline: float) -> list[dict]:
    from kernels.fused import launch as td

    key = (cfg.block_rows(n, dtype), dtype != torch.float32)
    base = cfg.TILES[key]
    gen = torch.Generator(device="cuda").manual_seed(n)
    zs = [torch.randn(n, d, generator=gen, device="cuda", dtype=dtype) for _ in range(ROTATE)]
    g = torch.ones((), device="cuda")
    programs = td._target_programs
    ref = None
    rows = []
    try:
        for label, tiles, per_sm in _candidates(base):
            if time.time() > deadline:
                print(f"  (budget spent: {label} and later candidates not timed)", flush=True)
                break
            cfg.TILES[key] = tiles
            td._target_programs = lambda device, p=per_sm: p * td._sm_count(torch.cuda.current_device())
            try:
                loss, mix, state = td.forward(zs[0], "infonce_l2")
                dz = td.backward(g, zs[0], mix, state, "infonce_l2")
                if ref is None:
                    ref = (loss.clone(), dz.float().clone())
                # Another split order or tile shape: the same function to the accumulation's rounding.
                same = (torch.allclose(loss, ref[0], rtol=1e-4, atol=1e-5)
                        and torch.allclose(dz.float(), ref[1], rtol=2e-2, atol=1e-3 * ref[1].abs().max().item()))
                saved = [td.forward(z, "infonce_l2") for z in zs]
                fwd = kernel_ms(lambda: [td.forward(z, "infonce_l2") for z in zs]) / ROTATE
                bwd = kernel_ms(lambda: [td.backward(g, z, s[1], s[2], "infonce_l2")
                                          for z, s in zip(zs, saved)]) / ROTATE
            except Exception as err:  # e.g. a tile needing more shared memory than the device has
                print(f"  {label:>22}: not run ({type(err).__name__}: {str(err).splitlines()[0][:120]})", flush=True)
                continue
            z_bytes = n * d * zs[0].element_size()
            row = {"n": n, "d": d, "dtype": str(dtype).removeprefix("torch."), "candidate": label,
                   "tiles": dataclasses.asdict(tiles), "programs_per_sm": per_sm, "matches": bool(same),
                   "forward_us": fwd * 1e3, "backward_us": bwd * 1e3,
                   "forward_floor_us": z_bytes / bandwidth * 1e6, "backward_floor_us": 2 * z_bytes / bandwidth * 1e6}
            rows.append(row)
            print(f"  {label:>22}: fwd {row['forward_us']:7.1f} us ({row['forward_floor_us']:.1f} floor)  "
                  f"bwd {row['backward_us']:7.1f} us ({row['backward_floor_us']:.1f} floor)"
                  f"{'' if same else '  OUTPUT DIFFERS'}", flush=True)
    finally:
        cfg.TILES[key] = base
        td._target_programs = programs
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build") / "tile_sweep.json")
    parser.add_argument("--budget-s", type=float, default=180.0, help="stop starting candidates after this")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the tile sweep times the Triton kernels on a CUDA GPU; none is available here")
    deadline = time.time() + args.budget_s
    bandwidth = copy_bandwidth("cuda")
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)", flush=True)
    rows = []
    for n, d, dtype in SIZES:
        print(f"N={n} D={d:,} {dtype}:", flush=True)
        rows += sweep(n, d, dtype, bandwidth, deadline)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_GBps": bandwidth / 1e9,
                                    "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
