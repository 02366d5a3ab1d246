"""``torch.library`` registration: the loss as a custom-op pair, opaque to torch.compile.

    dispersive::forward(z, variant, tau, margin, normalize_by_dim, backend) -> (loss, mix, state)
    dispersive::backward(grad, z, mix, state, variant, backend) -> dz

z is one batch (N, D), or on the "triton" backend a stack of K batches (K, N, D) with one
loss per batch (``kernels.triton_dispersive.supports_groups``).

``backend`` is ``"torch"`` (``kernels.gram``, any device, fp64 too) or ``"triton"``
(``kernels.triton_dispersive``). ``mix`` (N x N) and ``state`` (rows x N) are what each
backend's backward needs; their meaning belongs to the backend, only their shapes are
fixed here (the fake implementations give them without running anything, so dynamo and
inductor trace through the op without a graph break and without a host sync).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import gram as gram_path


def _state_rows(variant: str, backend: str) -> int:
    return 3 if backend == "triton" and variant == "covariance" else 1


def _acc_dtype(z: Tensor, backend: str) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 and backend == "torch" else torch.float32


@torch.library.custom_op("dispersive::forward", mutates_args=())
def forward_op(z: Tensor, variant: str, tau: float, margin: float, normalize_by_dim: bool,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        from . import triton_dispersive

        return triton_dispersive.forward(z, variant, tau, margin, normalize_by_dim)
    return gram_path.gram_forward(z, variant, tau, margin, normalize_by_dim)


@forward_op.register_fake
def _forward_fake(z, variant, tau, margin, normalize_by_dim, backend):
    lead, n, acc = tuple(z.shape[:-2]), z.shape[-2], _acc_dtype(z, backend)  # lead: (K,) for a stack
    return (z.new_empty(lead, dtype=acc), z.new_empty((*lead, n, n), dtype=acc),
            z.new_empty((*lead, _state_rows(variant, backend), n), dtype=acc))


@torch.library.custom_op("dispersive::backward", mutates_args=())
def backward_op(grad: Tensor, z: Tensor, mix: Tensor, state: Tensor, variant: str, backend: str) -> Tensor:
    if backend == "triton":
        from . import triton_dispersive

        return triton_dispersive.backward(grad, z, mix, state, variant)
    return gram_path.gram_backward(grad, z, mix, state, variant)


@backward_op.register_fake
def _backward_fake(grad, z, mix, state, variant, backend):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    z, variant, _tau, _margin, _normalize_by_dim, backend = inputs
    _loss, mix, state = output
    ctx.save_for_backward(z, mix, state)
    ctx.variant, ctx.backend = variant, backend


def _backward(ctx, grad_loss, _grad_mix, _grad_state):
    z, mix, state = ctx.saved_tensors
    return backward_op(grad_loss, z, mix, state, ctx.variant, ctx.backend), None, None, None, None, None


forward_op.register_autograd(_backward, setup_context=_setup_context)


def dispersive_op(z2: Tensor, variant: str, tau: float, margin: float, normalize_by_dim: bool,
                  backend: str) -> Tensor:
    """The loss of the flattened z (N, D) through the custom op (fp32; fp64 for fp64 on "torch");
    the K losses (K,) of a stack (K, N, D) on the "triton" backend."""
    return forward_op(z2, variant, float(tau), float(margin), bool(normalize_by_dim), backend)[0]
