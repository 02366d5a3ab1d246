"""Fidelity of the gradients the fast paths give: the shifted backward of the Gram path under
a large common offset, and exact second derivatives (double backward) on every path that
goes through ``kernels.ops``."""
from __future__ import annotations

import math

import pytest
import torch

from kernels import VARIANTS, dispersive_loss, dispersive_loss_groups, gram, reference_dispersive_loss
from kernels.ops import forward_op

DISTANCE_VARIANTS = ("infonce_l2", "hinge")
TAU, MARGIN = 0.6, 1.0


# --------------------------------------------------------------------- common offset (Gram path)


def _offset_case(n, d, offset, dtype, variant, rng):
    """(z of ``dtype`` = offset-free rows + a common ``offset``, the same rows exactly without it, in fp64).

    The offset-free rows are ``z - z_0`` computed in fp64 from z's own values (exact): the
    reference sees the data z holds, whatever z's rounding did to the random rows."""
    x = torch.randn(n, d, generator=rng, dtype=torch.float64) * (0.4 if variant == "hinge" else 1.0)
    z = (x + offset).to(dtype)
    z64 = z.double()
    return z, z64 - z64[:1]


@pytest.mark.parametrize("slab_bytes", [None, 4096], ids=["slabs", "narrow-slabs"])
@pytest.mark.parametrize("n,d", [(7, 1001), (33, 4099)])
@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize("variant", DISTANCE_VARIANTS)
def test_gram_backward_keeps_the_shift_under_a_common_offset(variant, offset, n, d, slab_bytes, rng, monkeypatch):
    """fp32 rows sharing an offset of 1e4 / 1e6: the gradient is offset invariant, so it must match
    the fp64 reference of the offset-free rows. The unshifted product ``mix @ z`` was 1e-3 / 1e-1
    off (relative to the largest entry); shifted it is ~1e-6. Narrow slabs: many slabs and a
    remainder (4096 bytes: 256 columns)."""
    if slab_bytes is not None:
        monkeypatch.setattr(gram, "BACKWARD_SLAB_BYTES", slab_bytes)
    z, x64 = _offset_case(n, d, offset, torch.float32, variant, rng)
    grad_out = 1.7
    x64.requires_grad_()
    (reference_dispersive_loss(x64, variant, tau=TAU, margin=MARGIN, upcast=True) * grad_out).backward()
    zq = z.requires_grad_()
    (dispersive_loss(zq, variant=variant, tau=TAU, margin=MARGIN, backend="torch") * grad_out).backward()
    scale = x64.grad.abs().max().item()
    err = (zq.grad.double() - x64.grad).abs().max().item()
    assert err <= 2e-5 * scale, (err / scale, scale)


@pytest.mark.parametrize("variant", DISTANCE_VARIANTS)
def test_gram_backward_keeps_the_shift_in_float64(variant, rng):
    """The same in fp64 (the Gram path's own accumulation dtype there): an offset of 1e12 put the
    unshifted product 1e-4 off."""
    z, x64 = _offset_case(9, 257, 1e12, torch.float64, variant, rng)
    x64.requires_grad_()
    (reference_dispersive_loss(x64, variant, tau=TAU, margin=MARGIN, upcast=True) * 0.8).backward()
    z.requires_grad_()
    (dispersive_loss(z, variant=variant, tau=TAU, margin=MARGIN, backend="torch") * 0.8).backward()
    torch.testing.assert_close(z.grad, x64.grad, rtol=1e-9, atol=1e-9 * x64.grad.abs().max().item())


# --------------------------------------------------------------------- double backward


def _oracle(z: torch.Tensor, variant: str) -> torch.Tensor:
    """The loss in float64 from explicit pairwise differences (N x N x D: small inputs only), twice
    differentiable and independent of the Gram formulas; cosine and covariance are the reference's
    own functions (normalise and matrix products: twice differentiable as they are)."""
    n, d = z.shape
    if variant in DISTANCE_VARIANTS:
        dist = (z[:, None, :] - z[None, :, :]).square().sum(dim=-1) / d
        if variant == "infonce_l2":
            return torch.logsumexp((-dist / TAU).flatten(), dim=0) - math.log(n * n)
        return (MARGIN - dist).clamp_min(0).square().mean()
    return reference_dispersive_loss(z, variant, tau=TAU, margin=MARGIN, upcast=True)


def _input(n, d, variant, rng, dtype=torch.float64):
    """Hinge: two clusters, pairs within a cluster inside the margin, across far beyond it (both
    branches of the hinge, none near its kink, where finite differences would straddle it)."""
    z = torch.randn(n, d, generator=rng, dtype=torch.float64)
    if variant == "hinge":
        z = 0.25 * z + torch.where(torch.arange(n)[:, None] < n // 2, 2.0, -2.0)
    return z.to(dtype).requires_grad_()


def _loss(path: str, backend: str, variant: str):
    if path == "eager":
        return lambda z: dispersive_loss(z, variant=variant, tau=TAU, margin=MARGIN, backend=backend)
    return lambda z: forward_op(z, variant, TAU, MARGIN, True, backend)[0]   # the custom op (tracing)


def test_oracle_is_the_reference(rng):
    for variant in DISTANCE_VARIANTS:
        z = _input(6, 10, variant, rng)
        ref = reference_dispersive_loss(z, variant, tau=TAU, margin=MARGIN, upcast=True)
        ours = _oracle(z, variant)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-14)
        torch.testing.assert_close(torch.autograd.grad(ours, z)[0], torch.autograd.grad(ref, z)[0])


@pytest.mark.parametrize("n,d", [(5, 7), (3, 11)])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("path", ["eager", "op"])
def test_double_backward_gradgradcheck(path, variant, n, d, rng):
    """Second derivatives (and the derivative in the upstream gradient) against finite differences.
    Before: the eager path raised (once_differentiable), the op path raised (no autograd of
    dispersive::backward)."""
    z = _input(n, d, variant, rng)
    assert torch.autograd.gradgradcheck(_loss(path, "torch", variant), (z,))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("path", ["eager", "op"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_curvature_of_a_two_term_loss(backend, path, variant, rng):
    """The term plus an ordinary one, differentiated twice (create_graph=True, then a
    Hessian-vector product): the term's curvature must be there. It was silently missing on
    the eager path (only 6 z, the cubic term's). Triton: fp32 under the interpreter, the
    forward from the kernels and the curvature from plain torch ops."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    z = _input(6, 10, variant, rng, dtype)
    v = torch.randn(z.shape, generator=rng, dtype=torch.float64)
    loss = _loss(path, backend, variant)
    g, = torch.autograd.grad(1.7 * loss(z) + z.pow(3).sum(), z, create_graph=True)
    hv, = torch.autograd.grad((g * v.to(dtype)).sum(), z)

    z64 = z.detach().double()
    ref_g = 1.7 * torch.autograd.functional.jacobian(lambda x: _oracle(x, variant), z64) + 3 * z64**2
    hessian = torch.autograd.functional.hessian(lambda x: _oracle(x, variant), z64)         # (N, D, N, D)
    ref_hv = 1.7 * torch.einsum("ijkl,kl->ij", hessian, v) + 6 * z64 * v
    term_hv = 1.7 * torch.einsum("ijkl,kl->ij", hessian, v)
    assert term_hv.abs().max() > 1e-3 * ref_hv.abs().max()          # the term's curvature matters here
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(g.double(), ref_g, rtol=tol, atol=tol * ref_g.abs().max().item())
    torch.testing.assert_close(hv.double(), ref_hv, rtol=tol, atol=tol * ref_hv.abs().max().item())


def test_double_backward_of_stacked_groups(rng):
    """dispersive_loss_groups on the Triton backend: K batches in one fused call (a stack), each
    with its own curvature."""
    zs = [_input(5, 8, "infonce_l2", rng, torch.float32) for _ in range(2)]
    out = dispersive_loss_groups(zs, tau=TAU, backend="triton")
    weights = torch.tensor([0.7, 1.3])
    grads = torch.autograd.grad((out * weights).sum(), zs, create_graph=True)
    vs = [torch.randn(z.shape, generator=rng, dtype=torch.float64) for z in zs]
    hvs = torch.autograd.grad(sum((g * v.float()).sum() for g, v in zip(grads, vs)), zs)
    for z, w, v, hv in zip(zs, weights.tolist(), vs, hvs):
        hessian = torch.autograd.functional.hessian(lambda x: _oracle(x, "infonce_l2"), z.detach().double())
        ref = w * torch.einsum("ijkl,kl->ij", hessian, v)
        torch.testing.assert_close(hv.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_first_derivative_is_the_same_with_and_without_create_graph(rng):
    """create_graph=True takes the differentiable formula, a plain backward the closed form: the
    same gradient (fp32; the distance variants under a common offset too: both shift the rows)."""
    x = torch.randn(7, 1001, generator=rng)
    for variant in VARIANTS:
        z = (x + 1e4 if variant in DISTANCE_VARIANTS else x).requires_grad_()
        loss = lambda: dispersive_loss(z, variant=variant, tau=TAU, margin=MARGIN, backend="torch")  # noqa: E731
        fast, = torch.autograd.grad(loss(), z)
        formula, = torch.autograd.grad(loss(), z, create_graph=True)
        assert formula.requires_grad and not fast.requires_grad
        torch.testing.assert_close(formula, fast, rtol=1e-4, atol=1e-5 * fast.abs().max().item())


@pytest.mark.parametrize("variant", DISTANCE_VARIANTS)
def test_reference_double_backward_raises(variant, rng):
    """The reference's distance variants use cdist, which has no double backward in torch: an
    error, not a wrong answer (the reference stays the cdist oracle; the curvature tests use
    ``_oracle`` above)."""
    z = _input(4, 6, variant, rng)
    g, = torch.autograd.grad(dispersive_loss(z, variant=variant, backend="reference"), z, create_graph=True)
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.autograd.grad(g.square().sum(), z)
