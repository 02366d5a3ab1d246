"""Readable PyTorch definitions of every Dispersive Loss variant: the oracle.

Wang and He (2025), "Diffuse and Disperse", arXiv 2506.09027, Table 1. Every fast
path in this package (the Gram-matrix autograd path in ``kernels.gram`` and the
Triton kernels) is tested against these functions in float64 (``upcast=True``).
They favour clarity over speed and memory: pairwise distances are formed
explicitly (``torch.cdist`` without the matrix-multiply shortcut), and gradients
come from autograd.

Conventions shared by every variant (``z`` has shape ``(N, ...)`` and is
flattened to ``(N, D)``):

* ``infonce_l2``: ``log( (1/N^2) sum_ij exp(-d_ij / tau) )`` with
  ``d_ij = ||z_i - z_j||^2 / D`` (``normalize_by_dim=False`` drops the ``/ D``).
  All N^2 ordered pairs count, the diagonal (``d_ii = 0``) included, exactly as
  the official release builds it; so the loss lies in ``[-log N, 0]``.
* ``infonce_cosine``: ``log( (1/N^2) sum_ij exp(cos(z_i, z_j) / tau) )``, the
  paper's dissimilarity ``D_ij = -cos``. Equal rows give ``1 / tau``.
  Row norms are clamped below at ``COSINE_EPS`` (as ``F.normalize`` does).
* ``hinge``: ``(1/N^2) sum_ij max(0, margin - d_ij)^2`` with the same ``d_ij``
  as ``infonce_l2`` (diagonal included: it adds the constant ``margin^2 / N``).
  The paper does not state the margin; ``DEFAULT_MARGIN = 1.0`` is ours.
* ``covariance``: rows are L2-normalised (norms clamped at ``COSINE_EPS``),
  centred over the batch, ``C = Zc^T Zc / N`` (population, 1/N convention), and
  the loss is the sum of squared off-diagonal entries ``sum_{m != n} C_mn^2``.
  ``||C||_F^2 = ||Zc Zc^T||_F^2 / N^2`` lets us avoid the D x D matrix;
  ``tests/test_reference.py`` checks that identity against the explicit C.

``scale_invariant=True`` (``infonce_l2`` and ``hinge`` only): every ``d_ij`` is divided by
the batch's mean off-diagonal squared distance ``m = sum_{i != j} d_ij / (N (N - 1))``
(differentiated through), so the loss of ``c z`` is that of ``z`` for every ``c > 0`` and
the ``/ D`` cancels. Degenerate batches (``m == 0``: N = 1, or all rows equal) keep the
unscaled distances (``m`` taken as 1): the loss is then 0 (infonce_l2) or ``margin^2``
(hinge), with a finite gradient. The other two variants refuse it (``check_scale_invariant``):
cosine similarities are already scale-invariant, and the covariance variant normalises
its rows.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Variant = Literal["infonce_l2", "infonce_cosine", "hinge", "covariance"]
VARIANTS: tuple[str, ...] = ("infonce_l2", "infonce_cosine", "hinge", "covariance")
DEFAULT_MARGIN = 1.0
COSINE_EPS = 1e-12
SCALE_INVARIANT_VARIANTS: tuple[str, ...] = ("infonce_l2", "hinge")
_NOT_SCALE_INVARIANT = {
    "infonce_cosine": "infonce_cosine is scale-invariant already (cosine similarities ignore the rows' norms)",
    "covariance": "covariance is scale-invariant already (it normalises the rows to unit norm first)",
}


def scale_invariant_refusal(variant: str) -> str | None:
    """Why ``scale_invariant=True`` does not apply to ``variant`` (None where it does): the
    rule a message names (``check_scale_invariant``, ``DispersiveConfig``)."""
    if variant in _NOT_SCALE_INVARIANT:
        return (f"False for variant {variant!r}: scale_invariant applies to "
                f"{' and '.join(SCALE_INVARIANT_VARIANTS)} only; {_NOT_SCALE_INVARIANT[variant]}")
    return None


def check_scale_invariant(variant: str, scale_invariant: bool) -> None:
    """ValueError when ``scale_invariant`` is asked of a variant it does not apply to."""
    why = scale_invariant_refusal(variant) if scale_invariant else None
    if why is not None:
        raise ValueError(f"scale_invariant must be {why}")


def dispersive_floor(variant: Variant, n: int, tau: float = 1.0, margin: float = DEFAULT_MARGIN,
                     scale_invariant: bool = False) -> float:
    """The smallest value the loss of a batch of ``n`` rows can take (its value once the rows
    are as far apart as the variant can tell; gradient ~0 from there).

    infonce_l2: every off-diagonal distance large, only the N diagonal terms left: -log N.
    infonce_cosine: the rows a regular simplex (every cos = -1/(N-1), reachable when
    D >= N - 1): log((N e^(1/tau) + N(N-1) e^(-1/((N-1) tau))) / N^2). hinge: only the
    diagonal's constant margin^2 / N. covariance: 0.

    ``scale_invariant``: the off-diagonal distances have mean 1, and both terms are convex
    functions of the distance, so by Jensen the floor is every off-diagonal distance equal
    to 1 (the rows a regular simplex, reachable when D >= N - 1). infonce_l2:
    log((1 + (N-1) e^(-1/tau)) / N). hinge: (margin^2 + (N-1) max(0, margin - 1)^2) / N,
    i.e. margin^2 / N for margin <= 1. N = 1: the diagonal alone (0 and margin^2).
    """
    check_scale_invariant(variant, scale_invariant)
    if scale_invariant and variant == "infonce_l2":
        return math.log((1.0 + (n - 1) * math.exp(-1.0 / tau)) / n)
    if scale_invariant and variant == "hinge":
        return (margin**2 + (n - 1) * max(0.0, margin - 1.0) ** 2) / n
    if variant == "infonce_l2":
        return -math.log(n)
    if variant == "infonce_cosine":
        if n == 1:
            return 1.0 / tau
        return math.log((n * math.exp(1.0 / tau) + n * (n - 1) * math.exp(-1.0 / ((n - 1) * tau))) / n**2)
    if variant == "hinge":
        return margin**2 / n
    if variant == "covariance":
        return 0.0
    raise ValueError(f"unknown dispersive-loss variant {variant!r}; expected one of {VARIANTS}")


def off_diagonal_share(variant: Variant, loss: torch.Tensor, n: int, tau: float = 1.0) -> torch.Tensor | None:
    """For the InfoNCE variants, the softmax weight the loss puts on pairs i != j (the share that
    carries gradient; 0 at the floor of infonce_l2), from the loss value alone: the diagonal's
    logits are known (0 for L2, 1/tau for cosine; zero rows aside) and the loss is the log-mean-exp.
    Holds for the scale-invariant infonce_l2 too (its diagonal distances stay 0).
    None for hinge and covariance."""
    if variant == "infonce_l2":
        diagonal_logit = 0.0
    elif variant == "infonce_cosine":
        diagonal_logit = 1.0 / tau
    else:
        return None
    # sum_i P_ii = N exp(diagonal_logit) / (N^2 exp(loss))
    return 1.0 - torch.exp(diagonal_logit - loss - math.log(n))


def _flatten(z: torch.Tensor, upcast: bool) -> torch.Tensor:
    z = z.reshape(z.shape[0], -1)
    if upcast:
        return z.double()
    # Half precision has no cdist kernel on CPU; float32 is the natural
    # "same-dtype" comparison point for fp16/bf16 inputs.
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def _sq_dists(z: torch.Tensor, normalize_by_dim: bool, scale_invariant: bool = False) -> torch.Tensor:
    """(N, N) squared Euclidean distances, from explicit differences; with ``scale_invariant``
    divided by their explicit off-diagonal mean (1 where that mean is 0)."""
    d = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist").square()
    d = d / z.shape[1] if normalize_by_dim else d
    if scale_invariant:
        n = d.shape[0]
        off = d[~torch.eye(n, dtype=torch.bool, device=d.device)]           # the N (N - 1) pairs i != j
        mean = off.sum() / max(off.numel(), 1)
        d = d / torch.where(mean > 0, mean, torch.ones_like(mean))
    return d


def _log_mean_exp(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.flatten(), dim=0) - math.log(logits.numel())


def infonce_l2(z: torch.Tensor, tau: float = 1.0, *, normalize_by_dim: bool = True,
               upcast: bool = False, scale_invariant: bool = False) -> torch.Tensor:
    z = _flatten(z, upcast)
    return _log_mean_exp(-_sq_dists(z, normalize_by_dim, scale_invariant) / tau)


def infonce_cosine(z: torch.Tensor, tau: float = 1.0, *, upcast: bool = False) -> torch.Tensor:
    z = F.normalize(_flatten(z, upcast), dim=1, eps=COSINE_EPS)
    return _log_mean_exp(z @ z.T / tau)


def hinge(z: torch.Tensor, margin: float = DEFAULT_MARGIN, *, normalize_by_dim: bool = True,
          upcast: bool = False, scale_invariant: bool = False) -> torch.Tensor:
    z = _flatten(z, upcast)
    return F.relu(margin - _sq_dists(z, normalize_by_dim, scale_invariant)).square().mean()


def covariance(z: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    z = F.normalize(_flatten(z, upcast), dim=1, eps=COSINE_EPS)
    n = z.shape[0]
    zc = z - z.mean(dim=0, keepdim=True)                      # (N, D)
    frobenius_sq = (zc @ zc.T).square().sum() / n**2          # ||C||_F^2
    diagonal_sq = (zc.square().sum(dim=0) / n).square().sum()  # sum_m C_mm^2
    return frobenius_sq - diagonal_sq


def reference_dispersive_loss(z: torch.Tensor, variant: Variant = "infonce_l2", *, tau: float = 1.0,
                              margin: float = DEFAULT_MARGIN, normalize_by_dim: bool = True,
                              upcast: bool = False, scale_invariant: bool = False) -> torch.Tensor:
    """The reference value of ``variant`` on ``z`` (N, ...); float64 when ``upcast``.
    ``scale_invariant`` (infonce_l2, hinge): distances over their off-diagonal mean (above)."""
    if variant in VARIANTS:
        check_scale_invariant(variant, scale_invariant)
    if variant == "infonce_l2":
        return infonce_l2(z, tau, normalize_by_dim=normalize_by_dim, upcast=upcast, scale_invariant=scale_invariant)
    if variant == "infonce_cosine":
        return infonce_cosine(z, tau, upcast=upcast)
    if variant == "hinge":
        return hinge(z, margin, normalize_by_dim=normalize_by_dim, upcast=upcast, scale_invariant=scale_invariant)
    if variant == "covariance":
        return covariance(z, upcast=upcast)
    raise ValueError(f"unknown dispersive-loss variant {variant!r}; expected one of {VARIANTS}")


def release_dispersive_loss(z: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """The official PyTorch release's formulation: the "unfused baseline".

    Restated from its description: ``pdist`` gives the N(N-1)/2 distances of the
    upper triangle; squared and divided by D they are concatenated twice, with N
    zeros for the diagonal, to stand for the full N x N matrix, and the loss is
    ``log(mean(exp(-d / tau)))`` (the release fixes tau = 1).
    """
    z = z.reshape(z.shape[0], -1)
    upper = F.pdist(z).square() / z.shape[1]
    pairs = torch.cat((upper, upper, torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)))
    return torch.log(torch.exp(-pairs / tau).mean())
