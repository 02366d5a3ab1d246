"""The ``@triton.jit`` kernels of the fused Dispersive Loss (launchers: ``kernels.fused.launch``).

Forward, every variant:
    ``gram_partial_kernel``  split-K Gram tiles: program (tile pair, split) reads one slab of
                             columns of two row tiles of z once and accumulates ``tl.dot`` in fp32
    ``gram_reduce_kernel``   sums the per-split partial Grams in a fixed order (deterministic)
                             and mirrors the upper tile triangle into the full N x N Gram
    ``epilogue_kernel``      N <= 64, InfoNCE-L2 / cosine / hinge: distances, temperature,
                             logsumexp (or the hinge mean) and the backward mixing matrix,
                             in one program (larger N: the same math as torch ops, ``kernels.gram``)
Covariance needs a second pass (``cov_column_stats_kernel``, ``cov_row_stats_kernel``): its
diagonal term ``sum_m C_mm^2`` needs column statistics of the *row-normalised* z, and the
row norms are only known once the first pass (the Gram diagonal) is complete.

Groups. Every kernel of the InfoNCE / hinge path takes a stack of K independent batches
(z of shape (K, N, D), one loss per group) on its last grid axis: the term on all 28 blocks
of a SiT-XL/2 is one launch per kernel instead of 28, which matters because at the paper's
sizes a call costs far more host time than GPU time (bench/results).

Backward, one more read of z and one write of dz:
    ``mix_backward_kernel``  dz = g * rowscale * (M_hat @ x), x = z (cosine) or z - z_0 (distances)
    ``cov_backward_kernel``  dz = g * (M_hat @ zc * rowscale - t zn - c q (.) zc), zc the
                             normalised, batch-centred z (column statistics recomputed per slab)

Precision. Accumulation is fp32 everywhere. fp32 inputs use ``input_precision="ieee"`` (exact
fp32 FMA, no tf32). bf16/fp16 inputs go to the tensor cores as they are: their products are
exact in fp32. A value that is *not* a 16-bit number (z - z_0, the normalised z, the fp32
mixing matrix) is split as ``hi + lo`` with both halves in the input's 16-bit type and fed as
three products (hi.hi + hi.lo + lo.hi), which keeps about 16 significant bits: rounding the
shifted rows to bf16 once would cost 2^-9 relative error in every distance. The split uses
round-toward-zero, so fp16 differences up to 2 * 65504 do not overflow to inf.

Interpreter. ``TRITON_INTERPRET=1`` computes bf16 ``tl.dot`` (and bf16 arithmetic) on raw
bits; with ``UPCAST`` (set by the launcher only there, only for bf16) every bf16 operand is
widened to fp32 right before ``tl.dot``. The values are the same bf16 numbers, so the
products are still exact and the result matches the tensor-core path.

NaN and Inf: clamps are written as ``where(x < 0, 0, x)``, never ``maximum``, because the
GPU's ``max`` returns the non-NaN operand and would turn a NaN into 0.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Variant codes of ``epilogue_kernel`` (covariance never uses it). A jit kernel may read a
# module global only when it is a tl.constexpr.
L2, COSINE, HINGE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
COSINE_EPS = tl.constexpr(1e-12)  # kernels.reference.COSINE_EPS (checked equal in the tests)


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b: exact fp32 FMA for fp32 operands, tensor cores for 16-bit ones."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _split(y, DT: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 y -> (hi, lo) in DT with hi + lo == y to about 16 bits (see the module docstring)."""
    hi = y.to(DT, fp_downcast_rounding="rtz")
    lo = (y - hi.to(tl.float32)).to(DT, fp_downcast_rounding="rtz")
    if UPCAST:
        hi = hi.to(tl.float32)
        lo = lo.to(tl.float32)
    return hi, lo


@triton.jit
def _mma_split(acc, a, b, DT: tl.constexpr, SPLIT_A: tl.constexpr, SPLIT_B: tl.constexpr,
               UPCAST: tl.constexpr):
    """acc + a @ b. DT is z's type; an operand flagged SPLIT_* is fp32 and goes in as hi + lo
    in DT, an unflagged one is already in DT (fp32 input: nothing is split, exact FMA)."""
    IEEE: tl.constexpr = DT == tl.float32 or UPCAST
    if SPLIT_A:
        a_hi, a_lo = _split(a, DT, UPCAST)
    else:
        a_hi = a
        if UPCAST:
            a_hi = a_hi.to(tl.float32)
    if SPLIT_B:
        b_hi, b_lo = _split(b, DT, UPCAST)
    else:
        b_hi = b
        if UPCAST:
            b_hi = b_hi.to(tl.float32)
    acc = _mma(a_hi, b_hi, acc, IEEE)
    if SPLIT_B:
        acc = _mma(a_hi, b_lo, acc, IEEE)
    if SPLIT_A:
        acc = _mma(a_lo, b_hi, acc, IEEE)
    return acc


# ----------------------------------------------------------------------------- forward: Gram


@triton.jit
def gram_partial_kernel(
    z_ptr,              # (K, N, D) rows of z, unit column stride
    ws_ptr,             # (K, SPLIT, NP, NP) fp32 partial Grams, NP = nt * BLOCK_N; tiles ti <= tj written
    n,                  # rows N
    d,                  # columns D
    stride_z,           # elements between rows of z
    stride_zg,          # elements between groups of z (grid axis 2)
    nt,                 # row tiles; the grid's axis 0 enumerates nt * nt tile pairs
    blocks_per_split,   # BLOCK_K-wide column blocks per split (grid axis 1)
    BLOCK_N: tl.constexpr,     # rows per tile (>= 16, the smallest tl.dot)
    BLOCK_K: tl.constexpr,     # columns per step
    SAME_TILE: tl.constexpr,   # nt == 1: both operands are the same tile, load it once
    SHIFT: tl.constexpr,       # subtract row 0 first (distance variants, against cancellation)
    UPCAST: tl.constexpr,      # interpreter + bf16 only (module docstring)
):
    DT: tl.constexpr = z_ptr.dtype.element_ty
    LOW: tl.constexpr = DT != tl.float32
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_g = tl.program_id(2).to(tl.int64)
    z_ptr += pid_g * stride_zg
    ti = pid_t // nt
    tj = pid_t % nt
    if ti <= tj:  # the Gram is symmetric: only the upper tile triangle is computed
        rows_i = ti * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_j = tj * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask_i = rows_i < n
        rmask_j = rows_j < n
        ptr_i = z_ptr + rows_i.to(tl.int64)[:, None] * stride_z
        ptr_j = z_ptr + rows_j.to(tl.int64)[:, None] * stride_z
        k_start = pid_s * blocks_per_split * BLOCK_K
        k_stop = tl.minimum(d, k_start + blocks_per_split * BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
        for k in range(k_start, k_stop, BLOCK_K):
            cols = k + tl.arange(0, BLOCK_K)
            cmask = cols < d
            a = tl.load(ptr_i + cols[None, :], mask=rmask_i[:, None] & cmask[None, :], other=0.0)
            if SAME_TILE:
                b = a
            else:
                b = tl.load(ptr_j + cols[None, :], mask=rmask_j[:, None] & cmask[None, :], other=0.0)
            if SHIFT:
                z0 = tl.load(z_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
                # padding rows must stay 0, not become -z_0
                a = tl.where(rmask_i[:, None], a.to(tl.float32) - z0, 0.0)
                if SAME_TILE:
                    b = a
                else:
                    b = tl.where(rmask_j[:, None], b.to(tl.float32) - z0, 0.0)
            acc = _mma_split(acc, a, tl.trans(b), DT, SHIFT and LOW, SHIFT and LOW, UPCAST)
        # The partial's offset is formed only here: a pointer live across the loop costs registers.
        np_ = nt * BLOCK_N
        out = ws_ptr + (pid_g * tl.num_programs(1) + pid_s) * np_ * np_ + rows_i[:, None] * np_ + rows_j[None, :]
        tl.store(out, acc)


@triton.jit
def gram_reduce_kernel(
    ws_ptr,             # (K, split, np_, np_) fp32 partial Grams (upper tiles of size `tile`)
    g_ptr,              # (K, N, N) fp32 Grams, out (group: grid axis 1)
    n,                  # rows N
    np_,                # padded side of a partial Gram
    split,              # number of partials
    tile,               # tile side used by gram_partial_kernel
    BLOCK_E: tl.constexpr,     # outputs per program (flat index i * N + j)
    BLOCK_S: tl.constexpr,     # partials summed per step
):
    # Few outputs per program and many partials per step: at N = 32 the whole Gram is
    # 1,024 numbers but there are ~2 partials per SM to sum, and one program walking them
    # a few at a time was latency-bound (~0.8 us a step, 66 steps on an H200).
    pid_g = tl.program_id(1).to(tl.int64)
    ws_ptr += pid_g * split * np_ * np_
    g_ptr += pid_g * n * n
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask = e < n * n
    i = e // n
    j = e % n
    upper = (i // tile) <= (j // tile)
    src = tl.where(upper, i * np_ + j, j * np_ + i).to(tl.int64)
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for s0 in range(0, split, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        v = tl.load(ws_ptr + s.to(tl.int64)[:, None] * np_ * np_ + src[None, :],
                    mask=(s < split)[:, None] & mask[None, :], other=0.0)
        acc += tl.sum(v, axis=0)  # fixed order: same bits on every run
    tl.store(g_ptr + e, acc, mask=mask)


# ----------------------------------------------------------------------------- forward: N x N epilogue


@triton.jit(do_not_specialize=["n"])  # n == 1 would become a constexpr int without .to()
def epilogue_kernel(
    g_ptr,              # (K, N, N) fp32 Grams (of z - z_0 for the distance variants)
    loss_ptr,           # (K,) fp32 losses, out
    mix_ptr,            # (K, N, N) fp32 row-normalised mixing matrices M_hat, out
    rowscale_ptr,       # (K, N) fp32 row scales: dL/dz = g * rowscale * (M_hat @ x), out
    n,                  # rows N
    dist_scale,         # 1/D (normalize_by_dim) or 1
    inv_tau,            # 1/tau
    margin,             # hinge margin
    VARIANT: tl.constexpr,     # L2, COSINE or HINGE
    BLOCK: tl.constexpr,       # next power of two >= N (>= 16)
):
    pid_g = tl.program_id(0).to(tl.int64)  # one program per group
    g_ptr += pid_g * n * n
    mix_ptr += pid_g * n * n
    rowscale_ptr += pid_g * n
    loss_ptr += pid_g
    i = tl.arange(0, BLOCK)
    rmask = i < n
    valid = rmask[:, None] & rmask[None, :]
    eye = i[:, None] == i[None, :]
    gram = tl.load(g_ptr + i[:, None] * n + i[None, :], mask=valid, other=0.0)
    s = tl.load(g_ptr + i * (n + 1), mask=rmask, other=0.0)           # squared norms
    nn = (n * n).to(tl.float32)
    if VARIANT == COSINE:
        norm = tl.sqrt(s)
        inv = 1.0 / tl.where(norm < COSINE_EPS, COSINE_EPS, norm)
        cos = gram * inv[:, None] * inv[None, :]
        logits = tl.where(valid, cos * inv_tau, float("-inf"))
    else:
        dist = (s[:, None] + s[None, :] - 2.0 * gram) * dist_scale
        dist = tl.where(dist < 0.0, 0.0, dist)
        dist = tl.where(eye, 0.0, dist)
        logits = tl.where(valid, -dist * inv_tau, float("-inf"))
    if VARIANT == HINGE:
        h = margin - dist
        h = tl.where(h < 0.0, 0.0, h)
        h = tl.where(valid, h, 0.0)
        loss = tl.sum(tl.sum(h * h, axis=1), axis=0) / nn
        weight = -2.0 * h / nn                                          # dL/dd
    else:
        top = tl.max(tl.max(logits, axis=1), axis=0)
        e = tl.exp(logits - top)
        total = tl.sum(tl.sum(e, axis=1), axis=0)
        loss = top + tl.log(total) - tl.log(nn)
        p = e / total                                                   # softmax over all N^2 pairs
    if VARIANT == COSINE:
        # dL/dG = P / (tau n_i n_j); dL/ds_k = -sum_j P_kj C_kj / (tau s_k), 0 for a clamped norm
        b = -tl.sum(p * cos, axis=1) * inv * inv * inv_tau
        b = tl.where(norm > COSINE_EPS, b, 0.0)
        mix = 2.0 * (p * inv[:, None] * inv[None, :] * inv_tau + tl.where(eye, b[:, None], 0.0))
    else:
        if VARIANT == L2:
            weight = -p * inv_tau                                       # dL/dd
        # dL/dZ = 4 * dist_scale * (diag(W 1) - W) Z
        r = tl.sum(weight, axis=1)
        mix = 4.0 * dist_scale * (tl.where(eye, r[:, None], 0.0) - weight)
    mix = tl.where(valid, mix, 0.0)
    # Row scaling keeps M_hat near 1: the raw entries (~ 1 / (D N^2)) underflow fp16.
    rowscale = tl.max(tl.abs(mix), axis=1)
    rowscale = tl.where(rowscale == 0.0, 1.0, rowscale)
    tl.store(mix_ptr + i[:, None] * n + i[None, :], mix / rowscale[:, None], mask=valid)
    tl.store(rowscale_ptr + i, rowscale, mask=rmask)
    tl.store(loss_ptr, loss)


# ----------------------------------------------------------------------------- forward: covariance pass 2


@triton.jit
def _normalised_tile(z_ptr, inv_ptr, rows, cols, n, d, stride_z):
    """(rows, cols) of z / ||z_row|| in fp32, 0 outside the matrix; and the tile's mask."""
    rmask = rows < n
    mask = rmask[:, None] & (cols < d)[None, :]
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :], mask=mask, other=0.0)
    inv = tl.load(inv_ptr + rows, mask=rmask, other=0.0)
    return z.to(tl.float32) * inv[:, None], mask


@triton.jit
def cov_column_stats_kernel(
    z_ptr,              # (N, D) rows of z
    inv_ptr,            # (N,) fp32 1 / clamped row norm
    mean_ptr,           # (D,) fp32 column means of the normalised z, out
    q_ptr,              # (D,) fp32 q_m = sum_i (zn_im - mean_m)^2 = N C_mm, out
    q2_ptr,             # (cdiv(D, BLOCK_D),) fp32 per-program sum_m q_m^2, out
    n, d, stride_z,     # rows, columns, elements between rows
    BLOCK_N: tl.constexpr,     # rows per step
    BLOCK_D: tl.constexpr,     # columns per program
):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    total = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(0, n, BLOCK_N):
        zn, _ = _normalised_tile(z_ptr, inv_ptr, r0 + tl.arange(0, BLOCK_N), cols, n, d, stride_z)
        total += tl.sum(zn, axis=0)
    mean = total / n
    q = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(0, n, BLOCK_N):  # second sweep: a centred sum of squares does not cancel
        zn, mask = _normalised_tile(z_ptr, inv_ptr, r0 + tl.arange(0, BLOCK_N), cols, n, d, stride_z)
        zc = tl.where(mask, zn - mean[None, :], 0.0)
        q += tl.sum(zc * zc, axis=0)
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(q_ptr + cols, q, mask=cmask)
    tl.store(q2_ptr + tl.program_id(0), tl.sum(q * q, axis=0))


@triton.jit
def cov_row_stats_kernel(
    z_ptr,              # (N, D) rows of z
    inv_ptr,            # (N,) fp32 1 / clamped row norm
    mean_ptr,           # (D,) fp32 column means of the normalised z
    q_ptr,              # (D,) fp32 column sums of squares of the centred z
    r_ptr,              # (SPLIT, N) fp32 partial r_i = sum_m zn_im q_m zc_im, out
    n, d, stride_z,     # rows, columns, elements between rows
    blocks_per_split,   # BLOCK_D-wide column blocks per split (grid axis 1)
    BLOCK_N: tl.constexpr,     # rows per program (grid axis 0)
    BLOCK_D: tl.constexpr,     # columns per step
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(1) * blocks_per_split * BLOCK_D
    k_stop = tl.minimum(d, k_start + blocks_per_split * BLOCK_D)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(k_start, k_stop, BLOCK_D):
        cols = k + tl.arange(0, BLOCK_D)
        zn, mask = _normalised_tile(z_ptr, inv_ptr, rows, cols, n, d, stride_z)
        mean = tl.load(mean_ptr + cols, mask=cols < d, other=0.0)
        q = tl.load(q_ptr + cols, mask=cols < d, other=0.0)
        zc = tl.where(mask, zn - mean[None, :], 0.0)
        acc += tl.sum(zn * q[None, :] * zc, axis=1)
    tl.store(r_ptr + tl.program_id(1).to(tl.int64) * n + rows, acc, mask=rows < n)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _output_block(n, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """(rows, cols) of this program's block of dz. One grid axis (no 65,535 limit on D's
    blocks), row tiles fastest: the programs reading the same columns of z run together,
    so a column slab is fetched from DRAM once and re-read from L2 by the other row tiles."""
    row_tiles = tl.cdiv(n, BLOCK_M)
    pid = tl.program_id(0)
    rows = (pid % row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid // row_tiles) * BLOCK_D + tl.arange(0, BLOCK_D)
    return rows, cols


@triton.jit
def mix_backward_kernel(
    z_ptr,              # (K, N, D) rows of z
    dz_ptr,             # (K, N, D) gradient, out
    mix_ptr,            # (K, N, N) fp32 M_hat
    rowscale_ptr,       # (K, N) fp32 row scales
    gout_ptr,           # (K,) upstream gradients g (read on the device: no host sync)
    n, d,               # rows, columns
    stride_z,           # elements between rows of z
    stride_dz,          # elements between rows of dz
    stride_zg,          # elements between groups of z (grid axis 1)
    stride_dzg,         # elements between groups of dz
    SHIFT: tl.constexpr,       # x = z - z_0 (distance variants; M_hat's rows sum to 0)
    UPCAST: tl.constexpr,      # interpreter + bf16 only
    BLOCK_M: tl.constexpr,     # output rows per program
    BLOCK_N: tl.constexpr,     # rows of z per step (the dot's inner size)
    BLOCK_D: tl.constexpr,     # columns per program
):
    DT: tl.constexpr = z_ptr.dtype.element_ty
    LOW: tl.constexpr = DT != tl.float32
    pid_g = tl.program_id(1).to(tl.int64)
    z_ptr += pid_g * stride_zg
    dz_ptr += pid_g * stride_dzg
    mix_ptr += pid_g * n * n
    rowscale_ptr += pid_g * n
    gout_ptr += pid_g
    rows, cols = _output_block(n, BLOCK_M, BLOCK_D)
    rmask = rows < n
    cmask = cols < d
    if SHIFT:
        z0 = tl.load(z_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, n, BLOCK_N):
        rj = j0 + tl.arange(0, BLOCK_N)
        jmask = rj < n
        x = tl.load(z_ptr + rj.to(tl.int64)[:, None] * stride_z + cols[None, :],
                    mask=jmask[:, None] & cmask[None, :], other=0.0)
        if SHIFT:
            x = tl.where(jmask[:, None], x.to(tl.float32) - z0, 0.0)
        m = tl.load(mix_ptr + rows[:, None] * n + rj[None, :], mask=rmask[:, None] & jmask[None, :], other=0.0)
        acc = _mma_split(acc, m, x, DT, LOW, SHIFT and LOW, UPCAST)
    coef = tl.load(rowscale_ptr + rows, mask=rmask, other=0.0) * tl.load(gout_ptr).to(tl.float32)
    out = acc * coef[:, None]
    tl.store(dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :], out.to(dz_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def cov_backward_kernel(
    z_ptr,              # (N, D) rows of z
    dz_ptr,             # (N, D) gradient, out
    mix_ptr,            # (N, N) fp32 M_hat, rowscale_i * M_hat_ij = c inv_i K_ij
    vec_ptr,            # (3, N) fp32: rowscale, inv = 1 / clamped norm, t_i * inv_i
    gout_ptr,           # () upstream gradient g
    n, d,               # rows, columns
    stride_z,           # elements between rows of z
    stride_dz,          # elements between rows of dz
    c,                  # 4 / N^2
    UPCAST: tl.constexpr,      # interpreter + bf16 only
    BLOCK_M: tl.constexpr,     # output rows per program
    BLOCK_N: tl.constexpr,     # rows of z per step
    BLOCK_D: tl.constexpr,     # columns per program
):
    DT: tl.constexpr = z_ptr.dtype.element_ty
    LOW: tl.constexpr = DT != tl.float32
    rows, cols = _output_block(n, BLOCK_M, BLOCK_D)
    rmask = rows < n
    # Column statistics of this slab (as in the forward's second pass): recomputed, not saved,
    # so nothing of size D is kept between forward and backward.
    total = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j0 in range(0, n, BLOCK_N):
        zn, _ = _normalised_tile(z_ptr, vec_ptr + n, j0 + tl.arange(0, BLOCK_N), cols, n, d, stride_z)
        total += tl.sum(zn, axis=0)
    mean = total / n
    q = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, n, BLOCK_N):
        rj = j0 + tl.arange(0, BLOCK_N)
        zn, mask = _normalised_tile(z_ptr, vec_ptr + n, rj, cols, n, d, stride_z)
        zc = tl.where(mask, zn - mean[None, :], 0.0)
        q += tl.sum(zc * zc, axis=0)
        m = tl.load(mix_ptr + rows[:, None] * n + rj[None, :], mask=rmask[:, None] & (rj < n)[None, :], other=0.0)
        acc = _mma_split(acc, m, zc, DT, LOW, LOW, UPCAST)
    zn, mask = _normalised_tile(z_ptr, vec_ptr + n, rows, cols, n, d, stride_z)
    zc = tl.where(mask, zn - mean[None, :], 0.0)
    rowscale = tl.load(vec_ptr + rows, mask=rmask, other=0.0)
    inv = tl.load(vec_ptr + n + rows, mask=rmask, other=0.0)
    tinv = tl.load(vec_ptr + 2 * n + rows, mask=rmask, other=0.0)
    # dz_i = c inv_i (K zc)_i - t_i inv_i zn_i - c inv_i q (.) zc_i
    out = acc * rowscale[:, None] - tinv[:, None] * zn - (c * inv)[:, None] * zc * q[None, :]
    out = out * tl.load(gout_ptr).to(tl.float32)
    tl.store(dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :], out.to(dz_ptr.dtype.element_ty),
             mask=mask)
