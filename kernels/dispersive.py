"""Public API: ``dispersive_loss`` (validation and backend dispatch) and ``DispersiveLoss``.

Defaults reproduce the official release exactly: InfoNCE-L2, tau = 1, squared
distances divided by D, over the local batch.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Callable, Literal

import torch
from torch import nn

from .gram import gram_dispersive_loss
from .reference import DEFAULT_MARGIN, VARIANTS, Variant, reference_dispersive_loss

Backend = Literal["auto", "triton", "torch", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch", "reference")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Each backend takes the flattened (N, D) input and the resolved options.
_Impl = Callable[[torch.Tensor, str, float, float, bool], torch.Tensor]


def _reference_impl(z2, variant, tau, margin, normalize_by_dim):
    loss = reference_dispersive_loss(z2, variant, tau=tau, margin=margin,
                                     normalize_by_dim=normalize_by_dim)
    return loss if loss.dtype == torch.float64 else loss.float()


_BACKENDS: dict[str, _Impl] = {"torch": gram_dispersive_loss, "reference": _reference_impl}


def register_backend(name: str, impl: _Impl) -> None:
    """Makes ``backend=name`` available (the Triton module registers itself on import)."""
    _BACKENDS[name] = impl


def _load_triton() -> bool:
    """Imports the Triton kernels on first use; False when triton is unavailable."""
    if "triton" not in _BACKENDS:
        try:
            from . import triton_dispersive  # noqa: F401  (registers the backend)
        except ImportError:
            return False
    return "triton" in _BACKENDS


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def validate(z, variant: str, tau, margin, backend: str) -> tuple[float, float]:
    """Checks everything that can be checked without touching z's values (no host sync)."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor of shape (N, ...), got {type(z).__name__}")
    if z.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"z must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {z.dtype}")
    if z.dim() < 1 or z.shape[0] < 1:
        raise ValueError(f"z must hold at least 1 sample along dim 0, got shape {tuple(z.shape)}")
    if z[0].numel() < 1:
        raise ValueError(f"each sample of z must have at least 1 feature, got shape {tuple(z.shape)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown dispersive-loss variant {variant!r}; expected one of {VARIANTS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return _check_positive("tau", tau), _check_positive("margin", margin)


def resolve_backend(z: torch.Tensor, backend: str) -> str:
    if backend == "auto":
        return "triton" if z.is_cuda and _load_triton() else "torch"
    if backend == "triton" and not _load_triton():
        raise RuntimeError("backend='triton' needs the triton package (and a CUDA tensor, or "
                           "TRITON_INTERPRET=1 set before import for CPU tensors)")
    return backend


def dispersive_loss(z: torch.Tensor, *, variant: Variant = "infonce_l2", tau: float = 1.0,
                    margin: float = DEFAULT_MARGIN, normalize_by_dim: bool = True,
                    backend: Backend = "auto") -> torch.Tensor:
    """Dispersive Loss of the batch ``z`` of shape (N, ...), flattened per sample.

    Args:
        z: representations, (N, ...) of float16/bfloat16/float32/float64; any strides.
        variant: ``infonce_l2`` (default), ``infonce_cosine``, ``hinge`` or ``covariance``
            (definitions in ``kernels.reference``).
        tau: temperature of the InfoNCE variants (> 0).
        margin: hinge margin on the (normalised) squared distance (> 0).
        normalize_by_dim: divide squared distances by D, as the release does.
        backend: ``auto`` (Triton for CUDA tensors, else the Gram path), ``triton``,
            ``torch`` (Gram path with closed-form backward) or ``reference``.

    Returns a 0-dim float32 tensor (float64 for float64 input). NaN or Inf in ``z``
    propagate to the loss; nothing here synchronises with the device.
    """
    tau, margin = validate(z, variant, tau, margin, backend)
    z2 = z.reshape(z.shape[0], -1)
    if z2.stride(-1) != 1:  # only a strided last dimension forces a copy
        z2 = z2.contiguous()
    impl = _BACKENDS[resolve_backend(z, backend)]
    return impl(z2, variant, tau, margin, bool(normalize_by_dim))


class DispersiveLoss(nn.Module):
    """``nn.Module`` form of :func:`dispersive_loss` with the options fixed at construction."""

    def __init__(self, variant: Variant = "infonce_l2", tau: float = 1.0, margin: float = DEFAULT_MARGIN,
                 normalize_by_dim: bool = True, backend: Backend = "auto"):
        super().__init__()
        validate(torch.zeros(1), variant, tau, margin, backend)
        self.variant, self.tau, self.margin = variant, float(tau), float(margin)
        self.normalize_by_dim, self.backend = normalize_by_dim, backend

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return dispersive_loss(z, variant=self.variant, tau=self.tau, margin=self.margin,
                               normalize_by_dim=self.normalize_by_dim, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"variant={self.variant!r}, tau={self.tau}, margin={self.margin}, "
                f"normalize_by_dim={self.normalize_by_dim}, backend={self.backend!r}")
