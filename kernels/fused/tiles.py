"""Tile table and limits of the fused kernels, without importing triton.

Shared by the launchers (``kernels.fused.launch``), the AOT gate (``kernels.fused.aot``)
and the roofline (``kernels.roofline``), so all three describe the same launches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_N = 1024            # fused path limit (rows of z); larger N falls back to the Gram path
EPILOGUE_MAX_N = 64     # one-program Triton epilogue up to this N; torch ops on N x N beyond
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DISTANCE_VARIANTS = ("infonce_l2", "hinge")
REDUCE_BLOCK_E, REDUCE_BLOCK_S = 64, 64   # gram_reduce_kernel: 64 outputs x 64 partials a step
# Options of every launch. FMA contraction is stated, not left to TRITON_DEFAULT_FP_FUSION
# (Triton 3.9 warns when it is unset; its default flips in 3.10).
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


@dataclass(frozen=True)
class Tiles:
    """Block sizes and launch options of one (row tile, dtype class) pair.

    One table instead of an autotuner: the choice depends only on N and the dtype, so
    ``kernels.check`` compiles exactly the set the launchers can pick. The values compile
    on sm_80 and sm_90 with at most ``kernels.fused.aot.SPILL_TOLERANCE`` bytes of spills. The
    16-bit Gram entries use the 4-warp tiles that ``bench.tile_sweep`` timed fastest on an
    H200 (2026-11-30, bench/results); the fp32 entries and the backward were not re-timed.
    """
    block_n: int     # rows per Gram tile; output rows per backward program
    block_k: int     # columns per Gram step (split-K granularity)
    block_d: int     # columns per backward / covariance program
    block_j: int     # rows of z per backward step (the backward dot's inner size)
    warps: int       # num_warps of the Gram and covariance-statistics kernels
    bwd_warps: int   # num_warps of the backward kernels
    stages: int      # num_stages (software pipelining depth of the column loops)
    epilogue_warps: int = 8   # the one-program N x N epilogue


# (block_n, 16-bit input) -> tiles. fp32 tiles are narrower: an exact-fp32 tl.dot is an
# FMA loop that holds whole rows/columns of the inner dimension in registers.
TILES: dict[tuple[int, bool], Tiles] = {
    (32, True): Tiles(32, 128, 128, 32, 4, 4, 3),
    (64, True): Tiles(64, 64, 64, 32, 4, 8, 3),
    (16, False): Tiles(16, 64, 64, 16, 4, 4, 3),
    (32, False): Tiles(32, 64, 64, 16, 4, 4, 3),
    (64, False): Tiles(64, 32, 32, 16, 8, 8, 3),
}


def block_rows(n: int, dtype: torch.dtype) -> int:
    """Row tile for N rows: 32 up to N = 32 (the release's local batch), else 64.

    fp32 also has 16 for N <= 16 (the paper's JAX local batch): its exact FMA dot would
    otherwise spend 4x the FLOPs on padding and turn compute-bound; bf16/fp16 tensor
    cores stay memory-bound at 32. tl.dot needs at least 16.
    """
    if n <= 16 and dtype == torch.float32:
        return 16
    return 32 if n <= 32 else 64


def tiles_for(n: int, dtype: torch.dtype) -> Tiles:
    return TILES[(block_rows(n, dtype), dtype != torch.float32)]
