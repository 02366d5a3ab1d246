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

``dispersive_op`` is the entry point: the custom op while anything traces, and in
eager mode ``_Eager``, a plain ``autograd.Function`` over the same two implementations
(the op's dispatch is pure host overhead there).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import gram as gram_path


def _state_rows(variant: str, backend: str) -> int:
    return 3 if backend == "triton" and variant == "covariance" else 1


def _acc_dtype(z: Tensor, backend: str) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 and backend == "torch" else torch.float32


def _forward_impl(z: Tensor, variant: str, tau: float, margin: float, normalize_by_dim: bool,
                  backend: str, backward_follows: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        from . import triton_dispersive

        return triton_dispersive.forward(z, variant, tau, margin, normalize_by_dim)
    return gram_path.gram_forward(z, variant, tau, margin, normalize_by_dim, backward_follows)


def _backward_impl(grad: Tensor, z: Tensor, mix: Tensor, state: Tensor, variant: str, backend: str) -> Tensor:
    if backend == "triton":
        from . import triton_dispersive

        return triton_dispersive.backward(grad, z, mix, state, variant)
    return gram_path.gram_backward(grad, z, mix, state, variant)


@torch.library.custom_op("dispersive::forward", mutates_args=())
def forward_op(z: Tensor, variant: str, tau: float, margin: float, normalize_by_dim: bool,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _forward_impl(z, variant, tau, margin, normalize_by_dim, backend)


@forward_op.register_fake
def _forward_fake(z, variant, tau, margin, normalize_by_dim, backend):
    lead, n, acc = tuple(z.shape[:-2]), z.shape[-2], _acc_dtype(z, backend)  # lead: (K,) for a stack
    return (z.new_empty(lead, dtype=acc), z.new_empty((*lead, n, n), dtype=acc),
            z.new_empty((*lead, _state_rows(variant, backend), n), dtype=acc))


backward_op = torch.library.custom_op("dispersive::backward", mutates_args=())(_backward_impl)


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


class _Eager(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager calls.

    The custom op's dispatch (schema parsing, the generated autograd wrapper, redispatch
    below autograd) costs about 150 us per forward+backward on the 2-core CI VM, where
    the N = 8, D = 98,304 term itself is ~1 ms; only torch.compile needs the op (it keeps
    the loss opaque in the graph), so eager calls skip it.
    """

    @staticmethod
    def forward(ctx, z, variant, tau, margin, normalize_by_dim, backend, backward_follows):
        loss, mix, state = _forward_impl(z, variant, tau, margin, normalize_by_dim, backend, backward_follows)
        ctx.save_for_backward(z, mix, state)
        ctx.variant, ctx.backend = variant, backend
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable  # as the op: no double backward (mix is a constant here)
    def backward(ctx, grad_loss):
        z, mix, state = ctx.saved_tensors
        return _backward_impl(grad_loss, z, mix, state, ctx.variant, ctx.backend), None, None, None, None, None, None


def dispersive_op(z2: Tensor, variant: str, tau: float, margin: float, normalize_by_dim: bool,
                  backend: str) -> Tensor:
    """The loss of the flattened z (N, D) (fp32; fp64 for fp64 on "torch"); the K losses (K,)
    of a stack (K, N, D) on the "triton" backend. The custom op under torch.compile, else
    ``_Eager``: one implementation either way."""
    args = (variant, float(tau), float(margin), bool(normalize_by_dim), backend)
    # Any tracing (dynamo, make_fx, fake or functional tensors: a dispatch mode or a tensor
    # subclass) records the op; a plain eager call runs the implementation directly.
    if (torch.compiler.is_compiling() or type(z2) is not torch.Tensor
            or torch._C._len_torch_dispatch_stack() > 0):
        return forward_op(z2, *args)[0]
    return _Eager.apply(z2, *args, torch.is_grad_enabled() and z2.requires_grad)
