"""Frechet distance between Gaussians fitted to feature sets, with a careful matrix square root.

    FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

The only hard part is ``tr((S1 S2)^(1/2))``. ``S1 S2`` is not symmetric, so a general matrix
square root (``scipy.linalg.sqrtm``, the choice of ADM's evaluator and pytorch-fid) returns
complex numbers with small imaginary parts whenever rounding moves an eigenvalue of a nearly
singular product below zero; those tools then add ``eps * I`` to both covariances and retry,
raise if the diagonal's imaginary part exceeds 1e-3, and otherwise drop it.

``method="eigh"`` (the default) avoids complex arithmetic altogether. With
``R = S1^(1/2)`` (symmetric, from ``eigh(S1)``), ``S1 S2 = R (R S2 R) R^-1`` is similar to the
symmetric positive semi-definite ``M = R S2 R``, so both have the same eigenvalues
``lambda_i >= 0`` and ``tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i)``. Everything is float64 and
symmetric: eigenvalues that rounding pushes below zero are clipped to 0 and their size is
reported (``FrechetDetails.min_eigenvalue``), never silently turned into imaginary parts.
``method="sqrtm"`` reproduces the ADM/pytorch-fid computation (with their eps fallback and
imaginary-part check) for side-by-side comparison; its largest imaginary part is reported.

Statistics: ``FeatureStatistics.from_features`` (mean and unbiased covariance, like
``np.cov(rowvar=False)``) and ``StatsAccumulator`` for streaming in batches.
"""

from __future__ import annotations

import warnings
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

FDMethod = Literal["eigh", "sqrtm"]
FD_METHODS: tuple[str, ...] = ("eigh", "sqrtm")
ADM_EPS = 1e-6  # the diagonal offset ADM / pytorch-fid add when sqrtm fails
ADM_IMAG_ATOL = 1e-3  # their tolerance on the diagonal's imaginary part


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean (D,) and covariance (D, D) of a feature set, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None
    """Number of feature vectors they come from (None for precomputed statistics)."""

    def __post_init__(self) -> None:
        mu = np.atleast_1d(np.asarray(self.mu, dtype=np.float64))
        sigma = np.atleast_2d(np.asarray(self.sigma, dtype=np.float64))
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"statistics need mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_features(cls, features: np.ndarray) -> "FeatureStatistics":
        """Mean and unbiased covariance (1/(N-1)) of features (N, D)."""
        acc = StatsAccumulator()
        acc.update(features)
        return acc.finalize()


class StatsAccumulator:
    """Streaming mean and covariance in float64.

    Sums are taken around a shift (the first batch's mean) so that a large common offset
    does not cancel catastrophically in ``sum(x x^T) - n mu mu^T``.
    """

    def __init__(self) -> None:
        self.count = 0
        self.shift: np.ndarray | None = None
        self.sum: np.ndarray | None = None
        self.outer: np.ndarray | None = None

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {x.shape}")
        if x.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = x.mean(axis=0)
            d = x.shape[1]
            self.sum = np.zeros(d)
            self.outer = np.zeros((d, d))
        elif x.shape[1] != self.shift.shape[0]:
            raise ValueError(f"feature width changed from {self.shift.shape[0]} to {x.shape[1]}")
        xc = x - self.shift  # (N, D)
        self.sum += xc.sum(axis=0)
        self.outer += xc.T @ xc
        self.count += x.shape[0]

    def finalize(self) -> FeatureStatistics:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mean_c = self.sum / self.count
        cov = (self.outer - self.count * np.outer(mean_c, mean_c)) / (self.count - 1)
        cov = 0.5 * (cov + cov.T)  # exact symmetry (rounding in the update is not symmetric)
        return FeatureStatistics(self.shift + mean_c, cov, self.count)


@dataclass(frozen=True)
class FrechetDetails:
    """The distance and how its matrix square root behaved."""

    distance: float
    mean_term: float
    """||mu1 - mu2||^2."""
    trace_term: float
    """tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))."""
    trace_sqrt: float
    """tr((S1 S2)^(1/2))."""
    method: str
    min_eigenvalue: float
    """eigh: the most negative eigenvalue of R S2 R before clipping (0 if none), relative to the
    largest; nan for sqrtm."""
    max_imag: float
    """sqrtm: the largest |imaginary part| on the square root's diagonal that was dropped; 0 for eigh."""
    eps_used: float
    """sqrtm: the diagonal offset added after a non-finite first try (0 if none)."""


def _check_pair(mu1, sigma1, mu2, sigma2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape:
        raise ValueError(f"means have different shapes: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}) to match the means, got {s1.shape} and {s2.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} has non-finite entries")
    return mu1, s1, mu2, s2


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative rounding eigenvalues -> 0)."""
    s = 0.5 * (sigma + sigma.T)
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_eigh(s1: np.ndarray, s2: np.ndarray) -> tuple[float, float]:
    r = psd_sqrt(s1)
    m = r @ s2 @ r
    m = 0.5 * (m + m.T)
    ev = np.linalg.eigvalsh(m)
    top = max(float(ev.max(initial=0.0)), np.finfo(np.float64).tiny)
    lowest = float(ev.min(initial=0.0))
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum()), min(lowest, 0.0) / top


def _trace_sqrt_adm(s1: np.ndarray, s2: np.ndarray, eps: float) -> tuple[float, float, float]:
    from scipy import linalg  # lazy: scipy's import is slow and only the sqrtm method needs it

    # (ADM passes disp=False, which newer scipy deprecates; a failed root shows as non-finite.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1.dot(s2))
        eps_used = 0.0
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
            eps_used = eps
    max_imag = 0.0
    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=ADM_IMAG_ATOL):
            raise ValueError(f"matrix square root has an imaginary component of {max_imag:.3g} on its "
                             f"diagonal (> {ADM_IMAG_ATOL}); use method='eigh'")
        covmean = covmean.real
    return float(np.trace(covmean)), max_imag, eps_used


def frechet_details(mu1, sigma1, mu2, sigma2, *, method: FDMethod = "eigh",
                    eps: float = ADM_EPS) -> FrechetDetails:
    """The Frechet distance of N(mu1, sigma1) and N(mu2, sigma2) with diagnostics."""
    if method not in FD_METHODS:
        raise ValueError(f"unknown Frechet method {method!r}; valid: {', '.join(FD_METHODS)}")
    mu1, s1, mu2, s2 = _check_pair(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    mean_term = float(diff @ diff)
    if method == "eigh":
        tr_sqrt, min_eig = _trace_sqrt_eigh(s1, s2)
        max_imag, eps_used = 0.0, 0.0
    else:
        tr_sqrt, max_imag, eps_used = _trace_sqrt_adm(s1, s2, eps)
        min_eig = math.nan
    trace_term = float(np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    return FrechetDetails(mean_term + trace_term, mean_term, trace_term, tr_sqrt, method,
                          min_eig, max_imag, eps_used)


def frechet_distance(mu1, sigma1, mu2, sigma2, *, method: FDMethod = "eigh", eps: float = ADM_EPS) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)); see the module docstring for methods."""
    return frechet_details(mu1, sigma1, mu2, sigma2, method=method, eps=eps).distance


def frechet_distance_stats(a: FeatureStatistics, b: FeatureStatistics, *, method: FDMethod = "eigh",
                           eps: float = ADM_EPS) -> FrechetDetails:
    """``frechet_details`` of two ``FeatureStatistics`` (a clear error when widths differ)."""
    if a.dim != b.dim:
        raise ValueError(f"statistics have different feature widths: {a.dim} vs {b.dim}")
    return frechet_details(a.mu, a.sigma, b.mu, b.sigma, method=method, eps=eps)


__all__ = ["ADM_EPS", "FD_METHODS", "FeatureStatistics", "FrechetDetails", "StatsAccumulator",
           "frechet_details", "frechet_distance", "frechet_distance_stats", "psd_sqrt"]
