"""``torch.library`` registration: the loss as a custom-op pair, opaque to torch.compile.

    dispersive::forward(z, variant, tau, margin, normalize_by_dim, backend) -> (loss, mix, state)
    dispersive::backward(grad, z, mix, state, variant, backend) -> dz

z is one batch (N, D), or on the "triton" backend a stack of K batches (K, N, D) with one
loss per batch (``kernels.fused.launch.supports_groups``).

``backend`` is ``"torch"`` (``kernels.gram``, any device, fp64 too) or ``"triton"``
(the launchers of ``kernels.fused.launch``), as the public API (``kernels.dispersive``)
resolved it: nothing is validated or re-decided here, and nothing below imports back
(API -> op -> launcher -> jit). ``mix`` (N x N) and ``state`` (rows x N) are what each
backend's backward needs; their meaning belongs to the backend, only their shapes are
fixed here (the fake implementations give them without running anything, so dynamo and
inductor trace through the op without a graph break and without a host sync).

``dispersive_op`` is the entry point: the custom op while anything traces, and in
eager mode ``_Eager``, a plain ``autograd.Function`` over the same two implementations
(the op's dispatch is pure host overhead there).

Double backward: the closed-form backward holds ``mix`` constant, so a backward run with
create_graph=True (grad mode on inside it) differentiates ``gram.differentiable_loss``
instead, on both backends and both paths: exact second derivatives, at the cost of plain
torch ops and O(N D) saved tensors in that backward only. A plain backward, and compiled
graphs (AOTAutograd traces the backward without create_graph), keep ``dispersive::backward``;
torch.compile itself refuses a double backward (RuntimeError).
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
        from .fused import launch  # imports triton: not before the first fused call

        return launch.forward(z, variant, tau, margin, normalize_by_dim)
    return gram_path.gram_forward(z, variant, tau, margin, normalize_by_dim, backward_follows)


def _backward_impl(grad: Tensor, z: Tensor, mix: Tensor, state: Tensor, variant: str, backend: str) -> Tensor:
    if backend == "triton":
        from .fused import launch

        return launch.backward(grad, z, mix, state, variant)
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


def _differentiable_grad(grad_loss: Tensor, z: Tensor, z2: Tensor, options: tuple) -> Tensor:
    """dL/dz for a backward with create_graph=True: differentiable in z and grad_loss.

    The closed-form backward holds ``mix`` and ``state`` constant, so its gradient is right
    but the graph it would leave for a second derivative is not. Here autograd differentiates
    ``gram.differentiable_loss`` of ``z2`` (z flattened, in the graph of z) instead: second
    derivatives are exact. Plain torch ops, both backends; only this backward pays for it.
    """
    with torch.enable_grad():
        loss = gram_path.differentiable_loss(z2, *options)
        dz, = torch.autograd.grad(loss, z, grad_loss.to(loss.dtype), create_graph=True)
    return dz


def _setup_context(ctx, inputs, output):
    z, variant, tau, margin, normalize_by_dim, backend = inputs
    _loss, mix, state = output
    ctx.save_for_backward(z, mix, state)
    ctx.options, ctx.backend = (variant, tau, margin, normalize_by_dim), backend


def _backward(ctx, grad_loss, _grad_mix, _grad_state):
    z, mix, state = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a double backward may follow
        dz = _differentiable_grad(grad_loss, z, z, ctx.options)
    else:
        dz = backward_op(grad_loss, z, mix, state, ctx.options[0], ctx.backend)
    return dz, None, None, None, None, None


forward_op.register_autograd(_backward, setup_context=_setup_context)


def flatten_rows(z: Tensor) -> Tensor:
    """(N, ...) -> (N, D); a copy only when the last dimension is strided."""
    z2 = z.reshape(z.shape[0], -1)
    return z2 if z2.stride(-1) == 1 else z2.contiguous()


def _unviewed(t: Tensor, shape: torch.Size) -> Tensor:
    """The fresh, contiguous gradient ``t`` reshaped in place to ``shape``: not a view.

    Autograd adds a second gradient for the same tensor (the block's hidden state gets
    one from the next block and one from this term) in place when the first is a tensor
    of its own, and into a newly allocated sum when it is a view: returning
    ``dz.view(shape)`` would cost an N x D allocation per call.
    """
    if t.shape == shape:
        return t
    if not t.is_contiguous():  # no backend returns this; a view is still a right answer
        return t.reshape(shape)
    return t.resize_(shape)  # same number of elements: only the sizes change


class _Eager(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager calls.

    The custom op's dispatch (schema parsing, the generated autograd wrapper, redispatch
    below autograd) costs about 150 us per forward+backward on the 2-core CI VM, where
    the N = 8, D = 98,304 term itself is ~1 ms; only torch.compile needs the op (it keeps
    the loss opaque in the graph), so eager calls skip it. It also takes z unflattened and
    returns the gradient in z's own shape, not as a view (``_unviewed``).
    """

    @staticmethod
    def forward(ctx, z, variant, tau, margin, normalize_by_dim, backend, stacked, backward_follows):
        z2 = z if stacked else flatten_rows(z)
        loss, mix, state = _forward_impl(z2, variant, tau, margin, normalize_by_dim, backend, backward_follows)
        ctx.save_for_backward(z, z2, mix, state)   # z: in its graph, for a double backward
        ctx.options, ctx.backend, ctx.stacked = (variant, tau, margin, normalize_by_dim), backend, stacked
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        z, z2, mix, state = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: exact second derivatives, as the op
            dz = _differentiable_grad(grad_loss, z, z if ctx.stacked else flatten_rows(z), ctx.options)
        else:
            dz = _unviewed(_backward_impl(grad_loss, z2, mix, state, ctx.options[0], ctx.backend), z.shape)
        return dz, None, None, None, None, None, None, None


def dispersive_op(z: Tensor, variant: str, tau: float, margin: float, normalize_by_dim: bool,
                  backend: str, stacked: bool = False) -> Tensor:
    """The loss of one batch z (N, ...), flattened per sample (fp32; fp64 for fp64 on "torch");
    with ``stacked``, the K losses (K,) of a stack (K, N, D) on the "triton" backend. The
    custom op while anything traces, else ``_Eager``: one implementation either way.
    The options come validated from the API (tau and margin floats > 0, a bool)."""
    args = (variant, tau, margin, normalize_by_dim, backend)
    # Any tracing (dynamo, make_fx, fake or functional tensors: a dispatch mode or a tensor
    # subclass) records the op; a plain eager call runs the implementation directly.
    if (torch.compiler.is_compiling() or type(z) is not torch.Tensor
            or torch._C._len_torch_dispatch_stack() > 0):
        return forward_op(z if stacked else flatten_rows(z), *args)[0]
    return _Eager.apply(z, *args, stacked, torch.is_grad_enabled() and z.requires_grad)
