"""``scale_invariant=True`` (infonce_l2, hinge): every backend against the float64 oracle,
invariance under c z, the degenerate batches, the floor, and the refusals.

The fast paths scale the batch once (``kernels.dispersive.scale_invariant_rows``) and run
their unchanged kernels; the oracle (``reference_dispersive_loss(..., scale_invariant=True)``)
divides the explicit ``cdist`` matrix by its explicit off-diagonal mean. The Triton kernels
run under the interpreter without a GPU (``tests/kernels/test_fused.py`` sets it up).
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.kernels.test_fused import DEVICE  # first: it makes triton interpreted without a GPU

import kernels
from kernels import (DispersiveLoss, dispersive_floor, dispersive_loss, dispersive_loss_groups, off_diagonal_share,
                     reference_dispersive_loss)
from kernels.dispersive import scale_invariant_rows
from kernels.fused import launch as td
from kernels.reference import SCALE_INVARIANT_VARIANTS

TAU, MARGIN = 0.7, 1.3  # margin > 1: both sides of the clamp at mean distance 1
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The loss is computed in float32 for every input dtype (16-bit z is scaled into a float32
# z'), hence one bound; the gradient comes back in z's dtype (its rounding, as test_fused).
LOSS_ATOL, LOSS_RTOL = 2e-6, 1e-5
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}
# Single-batch ways in: the oracle itself, the API's three backends, scope="global" without a
# process group (tests/kernels/test_global_scope.py runs it on two gloo ranks).
WAYS = ["oracle", "reference", "torch", "triton", "global"]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(td, "POISON_BUFFERS", True)


def _random(shape, dtype, rng, scale=1.0):
    return (torch.randn(shape, generator=rng, dtype=torch.float64) * scale).to(dtype)


def _loss(way: str, z: torch.Tensor, variant: str, **kw) -> torch.Tensor:
    options = dict(tau=TAU, margin=MARGIN, scale_invariant=True, **kw)
    if way == "oracle":
        return reference_dispersive_loss(z, variant, **options)
    if way == "global":
        return dispersive_loss(z, variant=variant, backend="torch", scope="global", **options)
    if way == "triton":
        return dispersive_loss(z.to(DEVICE), variant=variant, backend="triton", **options).cpu()
    return dispersive_loss(z, variant=variant, backend=way, **options)


def _value_and_grad(way, z, variant, grad_out=1.0, **kw):
    zq = z.detach().clone().requires_grad_()
    out = _loss(way, zq, variant, **kw)
    (out * grad_out).backward()
    return out.detach(), zq.grad


def _oracle(z, variant, grad_out=1.0):
    z64 = z.detach().double().clone().requires_grad_()
    out = reference_dispersive_loss(z64, variant, tau=TAU, margin=MARGIN, upcast=True, scale_invariant=True)
    (out * grad_out).backward()
    return out.item(), z64.grad


def _cosine(grad: torch.Tensor, z: torch.Tensor) -> float:
    """|grad . z| / (|grad| |z|), in float64."""
    g, x = grad.double().flatten(), z.double().flatten()
    return abs(float(g @ x)) / (float(g.norm()) * float(x.norm()))


def _mean_distance(z: torch.Tensor) -> float:
    """The mean off-diagonal squared distance (no /D), explicitly."""
    z = z.double().reshape(z.shape[0], -1)
    n = z.shape[0]
    return float(torch.cdist(z, z).square().sum()) / (n * (n - 1))


# ---- invariance under c z ----------------------------------------------------------------


@pytest.mark.parametrize("c", [1e-3, 0.1, 10.0, 1e3])
@pytest.mark.parametrize("variant", SCALE_INVARIANT_VARIANTS)
@pytest.mark.parametrize("way", WAYS)
def test_loss_of_a_scaled_batch_is_the_same_and_its_gradient_orthogonal(way, variant, c, rng):
    z = _random((9, 37), torch.float32, rng)
    base, _ = _value_and_grad(way, z, variant)
    value, grad = _value_and_grad(way, z * c, variant)
    assert value.item() == pytest.approx(base.item(), rel=1e-6)
    assert _cosine(grad, z * c) < 1e-5
    # and the gradient scales as 1 / c (L(c z) = L(z))
    _, grad_1 = _value_and_grad(way, z, variant)
    torch.testing.assert_close(grad.double() * c, grad_1.double(), rtol=1e-4, atol=2e-5 * float(grad_1.abs().max()))


@pytest.mark.parametrize("c", [1e-3, 10.0, 1e3])
@pytest.mark.parametrize("variant", SCALE_INVARIANT_VARIANTS)
def test_groups_scale_each_block_by_its_own_mean(variant, c, rng, monkeypatch):
    """The grouped call on the Triton backend (one stacked launch, checked): each block's value
    is that block alone, scaled by its own m, unchanged when every block is scaled by c, and
    each block's gradient is orthogonal to that block."""
    launched = []
    real = td.forward
    monkeypatch.setattr(td, "forward", lambda z, *a, **k: launched.append(tuple(z.shape)) or real(z, *a, **k))
    blocks = [_random((9, 4, 5), torch.float32, rng, s) for s in (1.0, 30.0, 0.02)]   # (N, tokens, hidden)

    def run(zs):
        zs = [z.detach().to(DEVICE).requires_grad_() for z in zs]
        out = dispersive_loss_groups(zs, variant=variant, backend="triton", tau=TAU, margin=MARGIN,
                                     scale_invariant=True)
        out.sum().backward()
        return out.detach().cpu(), [z.grad.cpu() for z in zs]

    values, _ = run(blocks)
    scaled, grads = run([z * c for z in blocks])
    assert launched == [(3, 9, 20), (3, 9, 20)]
    torch.testing.assert_close(scaled, values, rtol=1e-6, atol=0.0)
    for z, value, grad in zip(blocks, values, grads):
        ref, _ = _oracle(z, variant)
        assert abs(value.item() - ref) <= LOSS_ATOL + LOSS_RTOL * abs(ref)
        assert _cosine(grad, z * c) < 1e-5


def test_the_scaling_itself(rng):
    """z' has mean off-diagonal squared distance 1 and zero column means; float32 for 16-bit z."""
    z = _random((7, 3, 5), torch.float32, rng, 40.0) + 1e3
    out = scale_invariant_rows(z)
    assert out.shape == z.shape and out.dtype == torch.float32
    assert _mean_distance(out) == pytest.approx(1.0, rel=1e-6)
    assert out.double().mean(0).abs().max().item() < 1e-6
    assert scale_invariant_rows(z.bfloat16()).dtype == torch.float32
    assert scale_invariant_rows(z.double()).dtype == torch.float64


# ---- against the float64 oracle ----------------------------------------------------------


@pytest.mark.parametrize("n,d", [(2, 301), (3, 1), (17, 15), (33, 1001)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", SCALE_INVARIANT_VARIANTS)
@pytest.mark.parametrize("way", ["torch", "triton", "reference"])
def test_matches_float64_oracle(way, variant, dtype, n, d, rng):
    z = _random((n, d), dtype, rng, 3.0) - 1.5
    grad_out = torch.rand((), generator=rng, dtype=torch.float64).item() * 3 + 0.5  # != 1
    ref, ref_grad = _oracle(z, variant, grad_out)
    value, grad = _value_and_grad(way, z, variant, grad_out)
    assert value.dtype == torch.float32 and value.shape == ()
    assert abs(value.item() - ref) <= LOSS_ATOL + LOSS_RTOL * abs(ref), (value.item(), ref)
    assert grad.dtype == dtype and grad.shape == z.shape and torch.isfinite(grad).all()
    # Where the exact gradient vanishes (N = 2: one pair, d / m = 1 whatever z) what is left is
    # the float32 rounding of the cancelled radial part, of size grad_out / sqrt(m).
    floor = 1e-6 * grad_out / math.sqrt(_mean_distance(z))
    floor += 2.0**-24 if dtype == torch.float16 else 0.0  # subnormal fp16 gradients
    err = (grad.double() - ref_grad).abs().max().item()
    assert err <= GRAD_RTOL[dtype] * ref_grad.abs().max().item() + floor, err


@pytest.mark.parametrize("variant", SCALE_INVARIANT_VARIANTS)
@pytest.mark.parametrize("way", ["torch", "triton"])
def test_float64_input(way, variant, rng):
    """fp64 stays fp64 through the scaling (the Triton backend's Gram-path fallback)."""
    z = _random((6, 11), torch.float64, rng)
    ref, ref_grad = _oracle(z, variant)
    value, grad = _value_and_grad(way, z, variant)
    assert value.dtype == torch.float64 and value.item() == pytest.approx(ref, rel=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variant", SCALE_INVARIANT_VARIANTS)
@pytest.mark.parametrize("way", ["oracle", "reference", "torch"])
def test_float64_gradcheck(way, variant, rng):
    z = _random((5, 7), torch.float64, rng).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: _loss(way, z, variant), (z,))


@pytest.mark.parametrize("variant", SCALE_INVARIANT_VARIANTS)
def test_double_backward_is_exact(variant, rng):
    """The scaling is plain torch ops: second derivatives stay exact (the closed-form backward
    below it switches to the differentiable loss under create_graph)."""
    z = _random((5, 7), torch.float64, rng).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda z: _loss("torch", z, variant), (z,))


def test_normalize_by_dim_has_no_effect(rng):
    z = _random((6, 40), torch.float32, rng)
    for variant in SCALE_INVARIANT_VARIANTS:
        a = _loss("torch", z, variant, normalize_by_dim=True)
        b = _loss("torch", z, variant, normalize_by_dim=False)
        c = _loss("oracle", z.double(), variant, normalize_by_dim=False)
        assert a.item() == b.item() and a.item() == pytest.approx(c.item(), rel=1e-6)


def test_large_shared_offset(rng):
    """Rows sharing a large common component: the scaling centres first, so the fp32 z' keeps
    the spread (bf16 z, whose rows are 30 +- 0.05, too)."""
    common = 30 * torch.randn(1, 512, generator=rng, dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        z = (common + 0.05 * torch.randn(16, 512, generator=rng, dtype=torch.float64)).to(dtype)
        for variant in SCALE_INVARIANT_VARIANTS:
            ref, _ = _oracle(z, variant)
            for way in ("torch", "triton"):
                assert _loss(way, z, variant).item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_propagates(bad, rng):
    z = _random((5, 10), torch.float32, rng)
    z[2, 3] = bad
    for variant in SCALE_INVARIANT_VARIANTS:
        for way in ("oracle", "torch"):
            assert not torch.isfinite(_loss(way, z, variant)), (variant, way)


# ---- degenerate batches: m == 0 ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["one row", "equal rows"])
@pytest.mark.parametrize("variant", SCALE_INVARIANT_VARIANTS)
@pytest.mark.parametrize("way", WAYS + ["groups"])
def test_degenerate_batch_gives_the_unscaled_value_and_a_zero_gradient(way, variant, case, dtype, rng):
    row = _random((1, 13), torch.float32, rng) * 0.3 + 0.1
    z = (row if case == "one row" else row.expand(5, 13).clone()).to(dtype)
    if way == "oracle":
        z = z.float()
    expected = 0.0 if variant == "infonce_l2" else MARGIN**2
    if way == "groups":
        zs = [z.to(DEVICE).requires_grad_() for _ in range(2)]
        out = dispersive_loss_groups(zs, variant=variant, backend="triton", tau=TAU, margin=MARGIN,
                                     scale_invariant=True)
        out.sum().backward()
        values, grads = out.detach().cpu().tolist(), [zq.grad.cpu() for zq in zs]
    else:
        value, grad = _value_and_grad(way, z, variant)
        values, grads = [value.item()], [grad]
    assert values == pytest.approx([expected] * len(values), abs=1e-6)
    for grad in grads:
        assert torch.isfinite(grad).all() and grad.abs().max().item() == 0.0
    assert dispersive_floor(variant, z.shape[0], TAU, MARGIN, scale_invariant=True) <= expected


# ---- the floor ---------------------------------------------------------------------------


@pytest.mark.parametrize("margin", [0.6, 1.0, 1.7])
@pytest.mark.parametrize("n", [1, 2, 7, 32])
def test_simplex_reaches_the_floor_and_random_batches_stay_above(n, margin, rng):
    simplex = torch.nn.functional.pad(torch.eye(n, dtype=torch.float64) * 4.2, (0, 3))  # every pair at equal distance
    for variant in SCALE_INVARIANT_VARIANTS:
        floor = dispersive_floor(variant, n, TAU, margin, scale_invariant=True)
        options = dict(tau=TAU, margin=margin, scale_invariant=True)
        assert float(reference_dispersive_loss(simplex, variant, **options)) == pytest.approx(floor, abs=1e-12)
        assert float(dispersive_loss(simplex.float(), variant=variant, backend="torch", **options)) == \
            pytest.approx(floor, abs=1e-6)
        for d in (3, 40):
            loose = torch.randn(n, d, generator=rng, dtype=torch.float64)
            assert float(reference_dispersive_loss(loose, variant, **options)) >= floor - 1e-12
    if n > 1:  # the closed forms (Jensen: off-diagonal distances at their mean, 1)
        assert dispersive_floor("infonce_l2", n, TAU, scale_invariant=True) == pytest.approx(
            math.log((1 + (n - 1) * math.exp(-1 / TAU)) / n))
        hinge = dispersive_floor("hinge", n, margin=margin, scale_invariant=True)
        assert hinge == pytest.approx(margin**2 / n + (n - 1) / n * max(0.0, margin - 1) ** 2)
    else:  # the diagonal alone
        assert dispersive_floor("infonce_l2", 1, TAU, scale_invariant=True) == 0.0
        assert dispersive_floor("hinge", 1, margin=margin, scale_invariant=True) == pytest.approx(margin**2)


def test_hinge_floor_is_the_minimum_over_mean_one_distances(rng):
    """margin > 1: a spread of off-diagonal distances (mean 1) costs more than all at 1."""
    n, margin = 6, 1.7
    floor = dispersive_floor("hinge", n, margin=margin, scale_invariant=True)
    for spread in (0.05, 0.3):
        z = torch.nn.functional.pad(torch.eye(n, dtype=torch.float64), (0, 2))
        z = z + spread * torch.randn(z.shape, generator=rng, dtype=torch.float64)
        assert float(reference_dispersive_loss(z, "hinge", margin=margin, scale_invariant=True)) > floor


def test_off_diagonal_share_holds_for_the_scaled_infonce_l2(rng):
    n = 9
    z = torch.randn(n, 21, generator=rng, dtype=torch.float64)
    d = torch.cdist(z, z).square()
    logits = -d / (d.sum() / (n * (n - 1))) / TAU          # the diagonal logit is still 0
    p = torch.softmax(logits.flatten(), 0).reshape(n, n)
    loss = reference_dispersive_loss(z, tau=TAU, scale_invariant=True)
    share = off_diagonal_share("infonce_l2", loss, n, TAU)
    assert float(share) == pytest.approx(1.0 - float(p.diagonal().sum()), rel=1e-10)


# ---- refusals and the module -------------------------------------------------------------


@pytest.mark.parametrize("variant", ["infonce_cosine", "covariance"])
def test_variants_it_does_not_apply_to_are_refused(variant):
    z = torch.randn(4, 6)
    match = rf"scale_invariant must be False for variant '{variant}'.*scale-invariant already"
    calls = [lambda: dispersive_loss(z, variant=variant, scale_invariant=True),
             lambda: dispersive_loss_groups([z, z], variant=variant, scale_invariant=True),
             lambda: DispersiveLoss(variant=variant, scale_invariant=True),
             lambda: reference_dispersive_loss(z, variant, scale_invariant=True),
             lambda: dispersive_floor(variant, 4, scale_invariant=True)]
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()
    dispersive_loss(z, variant=variant, scale_invariant=False)  # the default stays available


def test_module_form(rng):
    z = _random((5, 3, 7), torch.float32, rng)
    module = DispersiveLoss(variant="hinge", margin=MARGIN, scale_invariant=True)
    assert "scale_invariant=True" in repr(module)
    assert module(z * 100).item() == pytest.approx(_loss("torch", z, "hinge").item(), rel=1e-6)


def test_default_is_unchanged(rng):
    z = _random((6, 10), torch.float32, rng)
    assert torch.equal(dispersive_loss(z, backend="torch"), dispersive_loss(z, backend="torch", scale_invariant=False))
    assert dispersive_loss(z * 10, backend="torch").item() != pytest.approx(dispersive_loss(z, backend="torch").item())


def test_compiled_fullgraph(rng):
    """No host sync in the scaling: one graph under torch.compile(fullgraph=True), eager's numbers."""
    torch._dynamo.reset()
    z = _random((7, 40), torch.float32, rng)

    def fn(z):
        return kernels.dispersive_loss(z, backend="torch", tau=0.5, scale_invariant=True) + z.square().mean()

    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    eager = fn(za)
    eager.backward()
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(zb)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(zb.grad, za.grad)
