"""Public API: ``dispersive_loss`` (validation and backend dispatch) and ``DispersiveLoss``.

Defaults reproduce the official release exactly: InfoNCE-L2, tau = 1, squared
distances divided by D, over the local batch.

Dispatch is decided here, once: ``validate`` checks the input and the options,
``resolve_backend`` names the backend (``auto`` is Triton for CUDA tensors, the Gram path on
CPU), and the built-in Triton backend sends what the fused kernels do not take (N > 1024,
fp64) to the Gram path (``_fused_or_gram``). The call then goes one way: the
``torch.library`` custom op of ``kernels.ops`` (so a ``torch.compile``'d model keeps the loss
in one graph), the launchers of ``kernels.fused.launch``, the kernels of ``kernels.fused.jit``;
none of them imports back. ``backend="triton"`` on CPU tensors runs the kernels under
``TRITON_INTERPRET=1`` (set before ``kernels.fused`` first imports triton; for tests).
Importing this module never imports triton.

``scale_invariant=True`` is one step before that dispatch (``scale_invariant_rows``): the
batch (the gathered one for ``scope="global"``, each block's own in the grouped call) is
centred and scaled so that its mean off-diagonal squared distance is 1, and every backend
runs unchanged on the result, without the ``/ D``.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Callable, Literal, Sequence

import torch
from torch import nn

from .distributed import gather_rows
from .ops import dispersive_op, flatten_rows
from .reference import DEFAULT_MARGIN, VARIANTS, Variant, check_scale_invariant, reference_dispersive_loss

Backend = Literal["auto", "triton", "torch", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch", "reference")
Scope = Literal["local", "global"]
SCOPES: tuple[str, ...] = ("local", "global")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Each backend takes the flattened (N, D) input and the resolved options. The built-in
# "torch" and "triton" ones also take z unflattened (N, ...) and flatten inside their
# autograd function, so that z's gradient comes back in z's own shape (see ops._unviewed).
_Impl = Callable[[torch.Tensor, str, float, float, bool], torch.Tensor]


def _reference_impl(z2, variant, tau, margin, normalize_by_dim):
    loss = reference_dispersive_loss(z2, variant, tau=tau, margin=margin,
                                     normalize_by_dim=normalize_by_dim)
    return loss if loss.dtype == torch.float64 else loss.float()


def _gram_impl(z, variant, tau, margin, normalize_by_dim):
    return dispersive_op(z, variant, tau, margin, normalize_by_dim, "torch")


def _triton_impl(z, variant, tau, margin, normalize_by_dim):
    return dispersive_op(z, variant, tau, margin, normalize_by_dim, _fused_or_gram(z))


_BACKENDS: dict[str, _Impl] = {"torch": _gram_impl, "triton": _triton_impl, "reference": _reference_impl}
_BUILTIN_UNFLATTENED: dict[str, _Impl] = {"torch": _gram_impl, "triton": _triton_impl}


def register_backend(name: str, impl: _Impl) -> None:
    """Makes ``backend=name`` available, or replaces the implementation behind a name."""
    _BACKENDS[name] = impl


def _triton_available() -> bool:
    """Imports the Triton kernels on first use; False when triton is unavailable.

    Not at ``import kernels``: the Triton interpreter only works when triton itself is first
    imported with ``TRITON_INTERPRET=1`` set, so importing triton (or ``torch._dynamo``,
    which imports it) early would take that choice away from the tests. No registry
    lookup here: under torch.compile the import may first run while dynamo traces.
    """
    try:
        from .fused import launch  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_interpreting() -> bool:
    from .fused import launch

    return launch.INTERPRETED


def _fused_or_gram(z: torch.Tensor) -> str:
    """The op backend of the built-in "triton" one for the batch z (N, ...): "triton" where the
    fused kernels take its flattened shape and dtype, else "torch" (the Gram path, which runs on
    CUDA too). A shape/dtype test, no host sync; triton is known to be available."""
    from .fused import launch

    return "triton" if launch.supports(z.detach().reshape(z.shape[0], -1)) else "torch"


def scale_invariant_rows(z: torch.Tensor) -> torch.Tensor:
    """z (N, ...) centred and scaled so that its mean off-diagonal squared distance is 1.

    ``z' = (z - mean(z)) / sqrt(m)`` with ``m = sum_{i != j} ||z_i - z_j||^2 / (N (N - 1))``
    in closed form, ``2 sum_i ||z_i - mean(z)||^2 / (N - 1)`` (no pairwise work), in float32
    (float64 for float64 input), differentiated through; z's shape. The distance variants see
    only differences, so the centring changes nothing but the rounding (the rows stay O(1)
    whatever z's offset); their squared distances on z' (without the ``/ D``) are ``d_ij / m``,
    the same for every scale of z, and their gradient with respect to z is orthogonal to z.
    ``m == 0`` (N = 1, or all rows equal: the rows are shifted by row 0 first, so equal rows
    give exactly 0) takes the scale 1: no NaN, and a zero gradient through the scale. No host
    sync.

    fp16/bf16 input gives a float32 z' (not cast back, so the backends run their fp32 path):
    the gradient of a scale-invariant loss is the part of the backend's gradient orthogonal to
    z, at large D a small remainder of it (the radial part, which grows the spread, is most of
    it), so the backend's rounding weighs on it many times. bf16, N = 32, D = 65,536, against
    the float64 oracle: 40 % (infonce_l2) and 23 % (hinge) relative gradient error with a bf16
    z', 0.17 % (the final bf16 rounding, as without scale_invariant) with float32. For the same
    reason m is a summation, not a BLAS dot (whose 7e-6 relative error over 2M fp32 elements
    gave 1.3e-3 relative error in the fp32 gradient there, against 8e-5 now). Both stay alive
    until backward: x (float32, N x D) here and z' in the backend.
    """
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    x = z.to(acc)
    x = x - x[:1]                                   # equal rows: exactly 0
    x = x - x.mean(dim=0, keepdim=True)
    m = x.square().sum() * (2.0 / max(z.shape[0] - 1, 1))
    return x * torch.where(m > 0, m, torch.ones_like(m)).rsqrt()


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def validate(z, variant: str, tau, margin, backend: str, scope: str = "local",
             scale_invariant: bool = False) -> tuple[float, float]:
    """Checks everything that can be checked without touching z's values (no host sync);
    returns tau and margin as floats. The layers below check none of it again."""
    _check_input(z)
    if variant not in VARIANTS:
        raise ValueError(f"unknown dispersive-loss variant {variant!r}; expected one of {VARIANTS}")
    check_scale_invariant(variant, scale_invariant)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    return _check_positive("tau", tau), _check_positive("margin", margin)


def _check_input(z) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor of shape (N, ...), got {type(z).__name__}")
    if z.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"z must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {z.dtype}")
    if z.dim() < 1 or z.shape[0] < 1:
        raise ValueError(f"z must hold at least 1 sample along dim 0, got shape {tuple(z.shape)}")
    if z[0].numel() < 1:
        raise ValueError(f"each sample of z must have at least 1 feature, got shape {tuple(z.shape)}")


def resolve_backend(z: torch.Tensor, backend: str) -> str:
    """The registered backend that runs for z: ``auto`` resolved; "triton" refused where it cannot run."""
    if backend == "auto":
        return "triton" if z.is_cuda and _triton_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError("backend='triton' needs the triton package (and a CUDA tensor, or "
                               "TRITON_INTERPRET=1 set before import for CPU tensors)")
        if not (z.is_cuda or _triton_interpreting()):
            raise RuntimeError("backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set "
                               "before triton is imported (the interpreter); use a CUDA tensor "
                               "or backend='auto'")
    return backend


def dispersive_loss(z: torch.Tensor, *, variant: Variant = "infonce_l2", tau: float = 1.0,
                    margin: float = DEFAULT_MARGIN, normalize_by_dim: bool = True,
                    backend: Backend = "auto", scope: Scope = "local", group=None,
                    scale_invariant: bool = False) -> torch.Tensor:
    """Dispersive Loss of the batch ``z`` of shape (N, ...), flattened per sample.

    Args:
        z: representations, (N, ...) of float16/bfloat16/float32/float64; any strides.
        variant: ``infonce_l2`` (default), ``infonce_cosine``, ``hinge`` or ``covariance``
            (definitions in ``kernels.reference``).
        tau: temperature of the InfoNCE variants (> 0).
        margin: hinge margin on the (normalised) squared distance (> 0).
        normalize_by_dim: divide squared distances by D, as the release does (no effect
            with ``scale_invariant``: the D cancels in the ratio).
        backend: ``auto`` (Triton for CUDA tensors, else the Gram path), ``triton``
            (fused kernels; N <= 1024 and fp32/bf16/fp16, else it falls back to the Gram
            path), ``torch`` (Gram path with closed-form backward) or ``reference``.
        scope: ``local`` (the paper: this device's batch) or ``global``: under
            ``torch.distributed`` the rows of every rank are gathered (equal N per rank),
            and the local gradient is scaled by the world size so that data-parallel
            gradient averaging gives the gradient of the global-batch loss
            (``kernels.distributed``). Without a process group it equals ``local``.
        group: process group of ``scope="global"`` (default: the world).
        scale_invariant: ``infonce_l2`` and ``hinge`` only (ValueError otherwise): the squared
            distances are divided by the batch's mean off-diagonal squared distance
            ``m = sum_{i != j} d_ij / (N (N - 1))`` (of the gathered batch for
            ``scope="global"``), differentiated through, so the loss of ``c z`` equals that of
            ``z`` for every ``c > 0`` and its gradient is orthogonal to z; the margin is then
            in units of m. Where ``m == 0`` (N = 1, or all rows equal) the distances are
            left unscaled: the loss is 0 (infonce_l2) or ``margin^2`` (hinge), its gradient
            finite (zero). See ``scale_invariant_rows``.

    Returns a 0-dim float32 tensor (float64 for float64 input). NaN or Inf in ``z``
    propagate to the loss; nothing here synchronises with the device.
    """
    scale_invariant = bool(scale_invariant)
    tau, margin = validate(z, variant, tau, margin, backend, scope, scale_invariant)
    return _run(z, resolve_backend(z, backend), variant, tau, margin, bool(normalize_by_dim), scope, group,
                scale_invariant)


def _run(z: torch.Tensor, name: str, variant: str, tau: float, margin: float, normalize_by_dim: bool,
         scope: str, group, scale_invariant: bool = False) -> torch.Tensor:
    """The loss of a validated z on the resolved backend ``name``."""
    impl = _BACKENDS[name]
    if scope == "global":
        z = gather_rows(flatten_rows(z), group)                       # (world * N, D)
    if scale_invariant:  # after the gather: m is the global batch's
        z, normalize_by_dim = scale_invariant_rows(z), False
    if impl is _BUILTIN_UNFLATTENED.get(name):
        return impl(z, variant, tau, margin, normalize_by_dim)
    return impl(flatten_rows(z), variant, tau, margin, normalize_by_dim)


def dispersive_loss_groups(zs: Sequence[torch.Tensor], *, variant: Variant = "infonce_l2", tau: float = 1.0,
                           margin: float = DEFAULT_MARGIN, normalize_by_dim: bool = True,
                           backend: Backend = "auto", scope: Scope = "local", group=None,
                           scale_invariant: bool = False) -> torch.Tensor:
    """The loss of each batch in ``zs``, shape (K,): ``torch.stack([dispersive_loss(z, ...) for z in zs])``.

    For the term on many blocks (the same N and feature shape each). On the Triton backend
    the batches are stacked and the K losses come from one call of the fused kernels (one
    launch per kernel), which removes K - 1 times the per-call host cost (Python, autograd,
    launches: about 0.85 ms per call on an H200's host against 0.07 ms of GPU time at the
    paper's sizes) for one copy of the K batches on the device. Otherwise (CPU, N > 64,
    covariance, scope="global", mixed shapes) it is the loop above. Options as
    :func:`dispersive_loss`; with ``scale_invariant`` each batch is scaled by its own mean
    off-diagonal distance before the stacking.
    """
    zs = list(zs)
    if not zs:
        raise ValueError("zs must hold at least one batch")
    first = zs[0]
    scale_invariant = bool(scale_invariant)
    tau, margin = validate(first, variant, tau, margin, backend, scope, scale_invariant)
    normalize_by_dim = bool(normalize_by_dim)
    name = resolve_backend(first, backend)
    if (scope == "local" and len(zs) > 1 and name == "triton"
            and all(z.shape == first.shape and z.dtype == first.dtype and z.device == first.device for z in zs)):
        # Same shape, dtype and device as the validated first batch: nothing left to check.
        from .fused import launch

        flat = [z.reshape(z.shape[0], -1) for z in zs]
        if launch.supports_groups(flat[0], variant):
            if scale_invariant:  # each block its own m
                flat, normalize_by_dim = [scale_invariant_rows(z) for z in flat], False
            z3 = torch.stack(flat)                                                 # (K, N, D)
            return dispersive_op(z3, variant, tau, margin, normalize_by_dim, "triton", stacked=True)
    # One call per batch; each later batch is validated and resolved for itself.
    losses = [_run(first, name, variant, tau, margin, normalize_by_dim, scope, group, scale_invariant)]
    for z in zs[1:]:
        _check_input(z)                                               # the options are checked
        losses.append(_run(z, resolve_backend(z, backend), variant, tau, margin, normalize_by_dim, scope, group,
                           scale_invariant))
    return torch.stack(losses)


class DispersiveLoss(nn.Module):
    """``nn.Module`` form of :func:`dispersive_loss` with the options fixed at construction."""

    def __init__(self, variant: Variant = "infonce_l2", tau: float = 1.0, margin: float = DEFAULT_MARGIN,
                 normalize_by_dim: bool = True, backend: Backend = "auto", scope: Scope = "local",
                 group=None, scale_invariant: bool = False):
        super().__init__()
        validate(torch.zeros(1), variant, tau, margin, backend, scope, bool(scale_invariant))
        self.variant, self.tau, self.margin = variant, float(tau), float(margin)
        self.normalize_by_dim, self.backend = normalize_by_dim, backend
        self.scope, self.group = scope, group
        self.scale_invariant = bool(scale_invariant)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return dispersive_loss(z, variant=self.variant, tau=self.tau, margin=self.margin,
                               normalize_by_dim=self.normalize_by_dim, backend=self.backend,
                               scope=self.scope, group=self.group, scale_invariant=self.scale_invariant)

    def extra_repr(self) -> str:
        return (f"variant={self.variant!r}, tau={self.tau}, margin={self.margin}, "
                f"normalize_by_dim={self.normalize_by_dim}, backend={self.backend!r}, "
                f"scope={self.scope!r}, scale_invariant={self.scale_invariant}")
