"""The CPU fast path ("torch" backend): every variant through the N x N Gram matrix.

Forward streams z (N, D) in column slabs, accumulating the N x N Gram matrix in
fp32 (fp64 for fp64 input); everything else happens on N x N matrices. Backward
uses the closed forms from ``shared/design/dispersive-loss.md``: for the distance
variants (InfoNCE-L2, hinge) with ``W = dL/dd`` (symmetric, N x N)

    dL/dZ = (4 / D) * (diag(W 1) - W) Z                       # one N x N by N x D product

(InfoNCE-L2: ``W = -P / tau``). Nothing of size N x N x D is formed, and besides z
and its gradient only one slab (``SLAB_BYTES``) is alive at a time.

Why slabs: bf16/fp16 inputs must be accumulated in fp32, and shifting the rows (which
the distance variants do to avoid cancellation in ``s_i + s_j - 2 G_ij``) needs a
shifted copy; doing both a slab at a time keeps the extra memory to a few MB
instead of a full fp32 copy of z.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from .reference import COSINE_EPS

SLAB_BYTES = 2 << 20  # fp32 bytes per column slab: large enough for GEMM efficiency, small next to z
_DISTANCE_VARIANTS = ("infonce_l2", "hinge")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _slabs(n: int, d: int) -> Iterator[slice]:
    width = max(256, SLAB_BYTES // (4 * n))
    for start in range(0, d, width):
        yield slice(start, min(start + width, d))


def _gram(z: torch.Tensor, centred: bool) -> torch.Tensor:
    """Z Z^T accumulated slab by slab in fp32/fp64.

    ``centred`` shifts every row by the first one before the product: distances
    are translation invariant, and removing the component the rows share keeps
    ``s_i + s_j - 2 G_ij`` from cancelling (any shift works; this one is cheaper
    than the batch mean and just as good at removing a large common offset).
    """
    acc = accumulation_dtype(z.dtype)
    gram = torch.zeros(z.shape[0], z.shape[0], dtype=acc, device=z.device)
    for cols in _slabs(*z.shape):
        zs = z[:, cols]
        if centred:
            zs = zs.to(acc) - zs[:1].to(acc)
        else:
            zs = zs.to(acc)
        gram.addmm_(zs, zs.T)
    return gram


def _apply_left(mix: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``mix @ z`` with fp32 accumulation, returned in z's dtype."""
    if z.dtype == mix.dtype:
        return mix @ z
    out = torch.empty_like(z)
    for cols in _slabs(*z.shape):
        out[:, cols] = (mix @ z[:, cols].to(mix.dtype)).to(z.dtype)
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


def _covariance_forward(z: torch.Tensor, gram: torch.Tensor):
    """Sum of squared off-diagonal covariances of the row-normalised, batch-centred z.

    ``||C||_F^2 = ||K||_F^2 / N^2`` with ``K = Zc Zc^T = H Gn H`` comes from the Gram
    matrix; the diagonal ``C_mm = q_m / N`` with ``q_m = sum_i Zc_im^2`` needs a
    second pass over z (the norms must be complete before a column can be
    normalised), which also accumulates ``R = Zn diag(q) Zc^T`` for backward.
    """
    n = z.shape[0]
    norms = gram.diagonal().sqrt().clamp_min(COSINE_EPS)
    inv = 1.0 / norms
    centre = torch.eye(n, dtype=gram.dtype, device=gram.device) - 1.0 / n
    gram_n = gram * inv[:, None] * inv[None, :]                 # Zn Zn^T
    k = centre @ gram_n @ centre                                # Zc Zc^T
    diag_sq = torch.zeros((), dtype=gram.dtype, device=gram.device)
    r = torch.zeros_like(gram)
    for cols in _slabs(*z.shape):
        zn = z[:, cols].to(gram.dtype) * inv[:, None]
        zc = zn - zn.mean(dim=0, keepdim=True)
        q = zc.square().sum(dim=0)
        diag_sq += q.square().sum()
        r.addmm_(zn * q, zc.T)
    loss = (k.square().sum() - diag_sq) / n**2
    # dL/dZc = (4/N^2)(K Zc - Zc diag(q)) is already column-centred, so it is dL/dZn;
    # through z_i / n_i: dL/dz_i = (dL/dzn_i - zn_i t_i) / n_i, t = diag((4/N^2)(Gn K - R)).
    c = 4.0 / n**2
    t = c * ((gram_n @ k).diagonal() - r.diagonal())
    t = torch.where(gram.diagonal().sqrt() > COSINE_EPS, t, torch.zeros_like(t))
    left = c * inv[:, None] * k * inv[None, :] - torch.diag(t * inv.square())   # A
    right = c * inv[:, None] * centre * inv[None, :]                              # B
    return loss, (left, right, inv)


def _covariance_backward(z: torch.Tensor, left, right, inv) -> torch.Tensor:
    """dz_s = A z_s - (B z_s) diag(q_s) per slab, q_s recomputed from the slab."""
    out = torch.empty_like(z)
    for cols in _slabs(*z.shape):
        zs = z[:, cols].to(left.dtype)
        zc = zs * inv[:, None]
        zc = zc - zc.mean(dim=0, keepdim=True)
        q = zc.square().sum(dim=0)
        out[:, cols] = (left @ zs - (right @ zs) * q).to(z.dtype)
    return out


class GramDispersive(torch.autograd.Function):
    """Autograd function over flattened ``z`` (N, D); returns the loss in fp32/fp64."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, variant: str, tau: float, margin: float, normalize_by_dim: bool):
        scale = 1.0 / z.shape[1] if normalize_by_dim else 1.0
        gram = _gram(z, centred=variant in _DISTANCE_VARIANTS)
        if variant in _DISTANCE_VARIANTS:
            loss, mix = _distance_forward(gram, variant, tau, margin, scale)
        elif variant == "infonce_cosine":
            loss, mix = _cosine_forward(gram, tau)
        else:
            loss, mix = _covariance_forward(z, gram)
        ctx.variant = variant
        ctx.save_for_backward(z, *(mix if isinstance(mix, tuple) else (mix,)))
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        z, *saved = ctx.saved_tensors
        if ctx.variant == "covariance":
            left, right, inv = saved
            grad = _covariance_backward(z, left * grad_out, right * grad_out, inv)
        else:
            grad = _apply_left(saved[0] * grad_out, z)
        return grad, None, None, None, None


def gram_dispersive_loss(z2: torch.Tensor, variant: str, tau: float, margin: float,
                         normalize_by_dim: bool) -> torch.Tensor:
    return GramDispersive.apply(z2, variant, tau, margin, normalize_by_dim)
