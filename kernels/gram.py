"""The CPU fast path ("torch" backend): every variant through the N x N Gram matrix.

Forward streams z (N, D) in column slabs, accumulating the N x N Gram matrix in
fp32 (fp64 for fp64 input); everything else happens on N x N matrices. Backward
uses the closed forms from ``shared/design/dispersive-loss.md``: for the distance
variants (InfoNCE-L2, hinge) with ``W = dL/dd`` (symmetric, N x N)

    dL/dZ = (4 / D) * (diag(W 1) - W) Z                       # one N x N by N x D product

(InfoNCE-L2: ``W = -P / tau``), applied to the rows shifted as in forward (``Z - 1 z_0^T``:
the same product, the matrix has zero row sums, but rounded at the rows' spread instead
of their common offset; ``_apply_left``). Nothing of size N x N x D is formed, and
besides z and its gradient only one slab (``SLAB_BYTES``; ``BACKWARD_SLAB_BYTES`` in a
CPU backward) is alive at a time. ``differentiable_loss`` is the same loss in plain torch
ops, for backward passes with create_graph=True (exact second derivatives, ``kernels.ops``).

Why slabs: bf16/fp16 inputs must be accumulated in fp32, and shifting the rows (which
the distance variants do to avoid cancellation in ``s_i + s_j - 2 G_ij``) needs a
shifted copy; doing both a slab at a time keeps the extra memory to a few MB
instead of a full fp32 copy of z. On the CPU the slab borrows the memory z's gradient
will take in backward (``kernels.host_memory``): no page faults, no extra peak.

``gram_forward`` / ``gram_backward`` are what ``kernels.ops`` runs for this backend
(eagerly, or as the ``dispersive::forward`` / ``backward`` custom ops under torch.compile).
The N x N epilogue functions (``gram_epilogue``, ``covariance_setup``,
``covariance_finish``) are shared with the Triton path, which applies them to its own
Gram matrix for N > 64 and for covariance.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from . import host_memory
from .reference import COSINE_EPS

# fp32 bytes per column slab. Large: every GEMM call is a barrier for the BLAS thread pool,
# and on a busy host many small ones were 3-6x slower than a few large ones (measured on 2
# cores: 2 MiB slabs 646 ms, 16 MiB 192 ms for N = 32, D = 294,912 forward+backward).
# The forward's slab is released before backward allocates dz (on the CPU it is the front of
# dz's pooled buffer, lent to the forward), so it does not raise the peak.
SLAB_BYTES = 16 << 20
_DISTANCE_VARIANTS = ("infonce_l2", "hinge")
# The backward's shifted slab (CPU): small enough to stay in cache between the shift and
# the product that reads it, see _apply_left.
BACKWARD_SLAB_BYTES = 2 << 20
SPLIT_K_BELOW_ROWS, SPLIT_K_CHUNK = 16, 2048     # see _accumulate_gram


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _slab_width(n: int, slab_bytes: int = SLAB_BYTES) -> int:
    """Columns per slab of an N-row matrix."""
    return max(256, slab_bytes // (4 * n))


def _slabs(z: torch.Tensor, slab_bytes: int = SLAB_BYTES) -> Iterator[slice]:
    """Column slices of ``z`` (N, D), ``_slab_width(N, slab_bytes)`` columns each."""
    n, d = z.shape
    width = _slab_width(n, slab_bytes)
    for start in range(0, d, width):
        yield slice(start, min(start + width, d))


def _gram(z: torch.Tensor, centred: bool, backward_follows: bool) -> torch.Tensor:
    """Z Z^T accumulated slab by slab in fp32/fp64.

    ``centred`` shifts every row by the first one before the product: distances
    are translation invariant, and removing the component the rows share keeps
    ``s_i + s_j - 2 G_ij`` from cancelling (any shift works; this one is cheaper
    than the batch mean and just as good at removing a large common offset).
    The shifted (or widened) slab is written into one buffer reused for every slab:
    a fresh allocation per slab cost more in page faults than the subtraction itself
    (N = 32, D = 294,912 fp32 on 2 cores: 14.2 ms with fresh slabs, 4.9 ms reused).
    """
    acc = accumulation_dtype(z.dtype)
    gram = torch.zeros(z.shape[0], z.shape[0], dtype=acc, device=z.device)
    if not centred and z.dtype == acc:  # nothing to shift or widen: the slabs are views
        for cols in _slabs(z):
            _accumulate_gram(gram, z[:, cols])
        return gram
    buf = _scratch(z, acc, backward_follows)
    z0 = z[0].to(acc) if centred else None
    for cols in _slabs(z):
        zs = buf[:, : cols.stop - cols.start]
        if centred:
            torch.sub(z[:, cols], z0[cols], out=zs)
        else:
            zs.copy_(z[:, cols])
        _accumulate_gram(gram, zs)
    return gram


def _accumulate_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """``gram += x x^T`` for a slab x (N, W) whose rows are contiguous.

    Fewer than 16 rows: split-K, a batch of products over ``SPLIT_K_CHUNK`` columns summed
    afterwards. MKL's sgemm runs such thin products far below its speed at 16 rows (2-core CI
    VM, W = 98,304: N = 8 415 us, N = 12 963 us, N = 16 421 us); split-K took 101 and 191 us
    for N = 8 and 12, and was slower from N = 16 on (561 us).
    """
    n, w = x.shape
    main = w - w % SPLIT_K_CHUNK if n < SPLIT_K_BELOW_ROWS else 0
    if main:
        chunks = x[:, :main].unflatten(1, (-1, SPLIT_K_CHUNK)).transpose(0, 1)   # (C, N, chunk)
        gram += torch.bmm(chunks, chunks.transpose(1, 2)).sum(dim=0)
    if main < w:
        gram.addmm_(x[:, main:], x[:, main:].T)


def _scratch(z: torch.Tensor, dtype: torch.dtype, backward_follows: bool) -> torch.Tensor:
    """The forward's slab buffer, (N, min(D, slab width)) of ``dtype``.

    On the CPU, when a backward will follow (the eager path says so; the custom op, under
    torch.compile, does not), the front of the pooled buffer z's gradient takes in backward
    (``host_memory``): memory backward needs anyway, already paged in, so the slab costs no
    page faults and no extra peak. Else a fresh one: a gradient-sized buffer would otherwise
    be held for a backward that never comes. (Slabs as wide as the whole borrowed buffer
    were tried: one product instead of three at N = 32, D = 294,912 fp32, but 16.0-16.5 ms
    against 13.8-14.1 ms forward+backward in interleaved runs.)
    """
    n, d = z.shape
    shape = (n, min(d, _slab_width(n)))
    nbytes = math.prod(shape) * dtype.itemsize
    grad_bytes = z.numel() * z.element_size()
    borrow = backward_follows and z.device.type == "cpu" and nbytes <= grad_bytes
    flat = host_memory.pooled(grad_bytes) if borrow else None
    if flat is None:
        return torch.empty(shape, dtype=dtype, device=z.device)
    return flat[:nbytes].view(dtype).view(shape)


def _apply_left(mix: torch.Tensor, z: torch.Tensor, shift: bool) -> torch.Tensor:
    """``mix @ (z - z_0)`` (``shift``) or ``mix @ z`` with fp32 accumulation, in z's dtype
    (on the CPU in pooled memory).

    The shift is the forward's (``_gram``): ``mix`` of the distance variants has zero row
    sums, so it changes nothing but the rounding. Without it the product rounds at the size
    of the component the rows share (fp32 rows with a common offset of 1e6: gradient 1e-1
    off, 3e-7 shifted), and no correction after the product can undo that.

    The shifted (or widened) slab goes to one pooled buffer reused for every slab, on the CPU
    small enough (``BACKWARD_SLAB_BYTES``) to be read back from cache by the product and to
    stay under 10 % of z at the SiT-XL size. Cost, N = 32, D = 294,912 fp32 forward+backward
    on the 2-core VM, interleaved with the unshifted product: +0.2 to +1.9 ms on ~18 ms when
    the VM is quiet, more when it is busy (each slab is two parallel regions where the
    unshifted product was one). Staging the shifted columns in the gradient itself (halving
    what is left, no buffer) took +2 to +4 ms; 16-bit inputs got faster (fewer fresh buffers).
    """
    out = host_memory.empty(z.shape, z.dtype, z.device)
    if not shift and z.dtype == mix.dtype:
        return torch.mm(mix, z, out=out)
    slab_bytes = BACKWARD_SLAB_BYTES if z.device.type == "cpu" else SLAB_BYTES
    shape = (z.shape[0], min(z.shape[1], _slab_width(z.shape[0], slab_bytes)))
    buf = host_memory.empty(shape, mix.dtype, z.device)
    product = None if z.dtype == mix.dtype else host_memory.empty(shape, mix.dtype, z.device)
    z0 = z[0].to(mix.dtype) if shift else None
    for cols in _slabs(z, slab_bytes):
        x = buf[:, : cols.stop - cols.start]
        if shift:
            torch.sub(z[:, cols], z0[cols], out=x)
        else:
            x.copy_(z[:, cols])
        if product is None:
            torch.mm(mix, x, out=out[:, cols])
        else:  # 16-bit: the fp32 product, then rounded into z's dtype
            out[:, cols].copy_(torch.mm(mix, x, out=product[:, : x.shape[1]]))
    return out


def sq_distances(gram: torch.Tensor, scale: float) -> torch.Tensor:
    """d_ij = (s_i + s_j - 2 G_ij) * scale, clamped at 0, with an exactly zero diagonal."""
    s = gram.diagonal()
    d = ((s[:, None] + s[None, :] - 2 * gram) * scale).clamp_min(0)
    return d.fill_diagonal_(0)


def infonce_from_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log mean exp over all N^2 entries, softmax P over all entries)."""
    lse = torch.logsumexp(logits.flatten(), dim=0)
    return lse - math.log(logits.numel()), torch.exp(logits - lse)


def differentiable_loss(z: torch.Tensor, variant: str, tau: float, margin: float,
                        normalize_by_dim: bool) -> torch.Tensor:
    """The loss of z (..., N, D) (one per leading index) in plain, twice-differentiable torch ops.

    What a double backward differentiates (``kernels.ops``: the backward with create_graph=True):
    autograd of these ops gives exact second derivatives, where the closed-form backward treats
    ``mix`` as a constant. Gram-based like the fast path (the distance variants on rows shifted
    by row 0, so a common offset does not cancel), nothing N x N x D and no ``cdist`` (torch has
    no double backward for it). Accumulates in fp32 (fp64 for fp64); costs a shifted or
    normalised copy of z plus what autograd saves, O(N D).
    """
    x = z.to(accumulation_dtype(z.dtype))
    n, d = x.shape[-2:]
    if variant in _DISTANCE_VARIANTS:
        x = x - x[..., :1, :]
        gram = x @ x.mT
        s = gram.diagonal(dim1=-2, dim2=-1)
        scale = 1.0 / d if normalize_by_dim else 1.0
        off_diagonal = 1 - torch.eye(n, dtype=x.dtype, device=x.device)     # d_ii = 0 exactly
        dist = ((s[..., :, None] + s[..., None, :] - 2 * gram) * scale).clamp_min(0) * off_diagonal
        if variant == "hinge":
            return (margin - dist).clamp_min(0).square().mean(dim=(-2, -1))
        return torch.logsumexp((-dist / tau).flatten(-2), dim=-1) - math.log(n * n)
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)           # F.normalize
    if variant == "infonce_cosine":
        return torch.logsumexp((xn @ xn.mT / tau).flatten(-2), dim=-1) - math.log(n * n)
    xc = xn - xn.mean(dim=-2, keepdim=True)                                # covariance
    return ((xc @ xc.mT).square().sum(dim=(-2, -1)) / n**2
            - (xc.square().sum(dim=-2) / n).square().sum(dim=-1))


def _distance_forward(gram: torch.Tensor, variant: str, tau: float, margin: float, scale: float):
    d = sq_distances(gram, scale)
    if variant == "infonce_l2":
        loss, p = infonce_from_logits(-d / tau)
        weight = -p / tau                                      # dL/dd
    else:  # hinge
        h = (margin - d).clamp_min(0)
        loss = h.square().mean()
        weight = -2 * h / h.numel()                            # dL/dd
    # dL/dZ = 4 * scale * (diag(W 1) - W) Z
    mix = 4 * scale * (torch.diag(weight.sum(dim=1)) - weight)
    return loss, mix


def _cosine_forward(gram: torch.Tensor, tau: float):
    norms = gram.diagonal().sqrt().clamp_min(COSINE_EPS)
    inv = 1.0 / norms
    cos = gram * inv[:, None] * inv[None, :]
    loss, p = infonce_from_logits(cos / tau)
    # L depends on Z through G = Z Z^T and through the norms s_k = G_kk:
    #   dL/dG = A = P / (tau n_i n_j),  dL/ds_k = b_k = -sum_j P_kj C_kj / (tau s_k)
    #   dL/dZ = 2 (A + diag(b)) Z;  a clamped norm is a constant, so its b_k = 0.
    a = p * inv[:, None] * inv[None, :] / tau
    b = -(p * cos).sum(dim=1) * inv.square() / tau
    b = torch.where(gram.diagonal().sqrt() > COSINE_EPS, b, torch.zeros_like(b))
    return loss, 2 * (a + torch.diag(b))


def gram_epilogue(gram: torch.Tensor, variant: str, tau: float, margin: float, scale: float):
    """(loss, mix) of InfoNCE-L2, hinge or cosine from the N x N Gram: ``dL/dZ = g * mix @ Z``.

    Shared by this path and the Triton path's large-N epilogue. The distance variants
    take the Gram of the shifted rows (any shift: distances are translation invariant).
    """
    if variant in _DISTANCE_VARIANTS:
        return _distance_forward(gram, variant, tau, margin, scale)
    return _cosine_forward(gram, tau)


def covariance_setup(gram: torch.Tensor):
    """(inv, Gn, K) from the unshifted Gram: inverse clamped row norms, ``Zn Zn^T``, ``Zc Zc^T``."""
    n = gram.shape[0]
    inv = 1.0 / gram.diagonal().sqrt().clamp_min(COSINE_EPS)
    centre = torch.eye(n, dtype=gram.dtype, device=gram.device) - 1.0 / n
    gram_n = gram * inv[:, None] * inv[None, :]                 # Zn Zn^T
    return inv, gram_n, centre @ gram_n @ centre                # K = Zc Zc^T = H Gn H


def covariance_finish(gram: torch.Tensor, gram_n: torch.Tensor, k: torch.Tensor,
                      diag_sq: torch.Tensor, r_diag: torch.Tensor):
    """(loss, t) once the second pass has given ``sum_m q_m^2`` and ``r_i = sum_m zn_im q_m zc_im``.

    ``||C||_F^2 = ||K||_F^2 / N^2``; the diagonal ``C_mm = q_m / N``. For backward,
    ``dL/dZc = (4/N^2)(K Zc - Zc diag(q))`` is already column-centred, so it is ``dL/dZn``;
    through ``z_i / n_i``: ``dL/dz_i = (dL/dzn_i - zn_i t_i) / n_i`` with
    ``t = (4/N^2) diag(Gn K - R)``, 0 where the norm is clamped (a constant there).
    """
    n = gram.shape[0]
    loss = (k.square().sum() - diag_sq) / n**2
    t = 4.0 / n**2 * ((gram_n * k.T).sum(dim=1) - r_diag)       # diag(Gn K) without the product
    t = torch.where(gram.diagonal().sqrt() > COSINE_EPS, t, torch.zeros_like(t))
    return loss, t


def _covariance_forward(z: torch.Tensor, gram: torch.Tensor):
    """Sum of squared off-diagonal covariances of the row-normalised, batch-centred z.

    ``||C||_F^2`` comes from the Gram matrix; the diagonal ``C_mm = q_m / N`` with
    ``q_m = sum_i Zc_im^2`` needs a second pass over z (the norms must be complete
    before a column can be normalised), which also accumulates ``r_i = sum_m zn_im q_m zc_im``
    (the diagonal of ``Zn diag(q) Zc^T``) for backward.
    """
    inv, gram_n, k = covariance_setup(gram)
    diag_sq = torch.zeros((), dtype=gram.dtype, device=gram.device)
    r_diag = torch.zeros_like(inv)
    for cols in _slabs(z):
        zn = z[:, cols].to(gram.dtype) * inv[:, None]
        zc = zn - zn.mean(dim=0, keepdim=True)
        q = zc.square().sum(dim=0)
        diag_sq += q.square().sum()
        r_diag += (zn * q * zc).sum(dim=1)
    loss, t = covariance_finish(gram, gram_n, k, diag_sq, r_diag)
    c = 4.0 / z.shape[0] ** 2
    left = c * inv[:, None] * k * inv[None, :] - torch.diag(t * inv.square())   # A
    return loss, left, inv


def _covariance_backward(z: torch.Tensor, left, inv, grad_out) -> torch.Tensor:
    """dz_s = g (A z_s - (B z_s) diag(q_s)) per slab, q_s recomputed from the slab.

    ``B = (4/N^2) diag(inv) (I - 1/N) diag(inv)``, so ``B z_s = (4/N^2) inv * zc_s``.
    """
    c = 4.0 / z.shape[0] ** 2
    left = left * grad_out
    out = host_memory.empty(z.shape, z.dtype, z.device)
    for cols in _slabs(z):
        zs = z[:, cols].to(left.dtype)
        zc = zs * inv[:, None]
        zc = zc - zc.mean(dim=0, keepdim=True)
        q = zc.square().sum(dim=0)
        out[:, cols] = (left @ zs - (c * grad_out) * inv[:, None] * zc * q).to(z.dtype)
    return out


def gram_forward(z: torch.Tensor, variant: str, tau: float, margin: float, normalize_by_dim: bool,
                 backward_follows: bool = False):
    """(loss, mix, state) of the flattened ``z`` (N, D); what backward needs is (z, mix, state).

    mix is N x N (covariance: the matrix A); state is (1, N): the inverse norms for
    covariance, zeros otherwise. Accumulation dtype fp32 (fp64 for fp64 input).
    ``backward_follows``: lend the forward the pooled buffer of the coming gradient (``_scratch``).
    """
    scale = 1.0 / z.shape[1] if normalize_by_dim else 1.0
    if variant == "covariance":
        loss, mix, inv = _covariance_forward(z, _gram(z, False, backward_follows))
        return loss, mix, inv[None, :]
    gram = _gram(z, variant in _DISTANCE_VARIANTS, backward_follows)
    loss, mix = gram_epilogue(gram, variant, tau, margin, scale)
    return loss, mix, gram.new_zeros((1, z.shape[0]))


def gram_backward(grad_out: torch.Tensor, z: torch.Tensor, mix: torch.Tensor, state: torch.Tensor,
                  variant: str) -> torch.Tensor:
    """dL/dz in z's dtype from ``gram_forward``'s saved (mix, state) and the upstream gradient."""
    grad_out = grad_out.to(mix.dtype)
    if variant == "covariance":
        return _covariance_backward(z, mix, state[0], grad_out)
    return _apply_left(mix * grad_out, z, variant in _DISTANCE_VARIANTS)
