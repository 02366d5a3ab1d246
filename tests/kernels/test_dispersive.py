"""The CPU fast path ("torch" backend) and the public API against the float64 reference."""
from __future__ import annotations

import math

import pytest
import torch

from bench.memory import peak_extra_bytes
from kernels import (VARIANTS, DispersiveLoss, dispersive_loss, host_memory, reference_dispersive_loss,
                     release_dispersive_loss)

SHAPES = [(1, 17), (2, 1), (3, 1000), (7, 17), (7, 98304), (5, 4099), (32, 1), (32, 1000), (32, 98304), (1, 98304)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Loss: the fast path accumulates in fp32 whatever the input dtype. Gradient: it is
# returned in the input dtype, so its error is that dtype's rounding.
LOSS_ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
GRAD_RTOL = {torch.float32: 2e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# Input scale per variant so that every term is active (hinge needs pairs closer than the margin).
SCALE = {"infonce_l2": 1.0, "infonce_cosine": 1.0, "hinge": 0.4, "covariance": 1.0}


def _random(shape, dtype, rng, scale=1.0, offset=0.0):
    z = torch.randn(shape, generator=rng, dtype=torch.float64) * scale + offset
    return z.to(dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SHAPES)
def test_fast_path_matches_float64_reference(variant, dtype, n, d, rng):
    z = _random((n, d), dtype, rng, SCALE[variant])
    grad_out = torch.rand((), generator=rng, dtype=torch.float64).item() * 3 + 0.5  # != 1

    z64 = z.double().requires_grad_()
    ref = reference_dispersive_loss(z64, variant, tau=0.7, upcast=True)
    (ref * grad_out).backward()

    zq = z.clone().requires_grad_()
    out = dispersive_loss(zq, variant=variant, tau=0.7, backend="torch")
    (out * grad_out).backward()

    assert out.dtype == torch.float32 and out.shape == ()
    assert abs(out.item() - ref.item()) <= LOSS_ATOL[dtype] + 1e-5 * abs(ref.item())
    assert zq.grad.dtype == dtype and zq.grad.shape == z.shape
    # Where the exact gradient vanishes (N = 1 for the scale-free variants) rounding
    # still leaves eps-sized terms of order grad_out / ||z_i||: that is the floor.
    # fp16 gradients of large-D inputs are subnormal: their spacing is 2^-24.
    floor = 1e-6 * grad_out / z64.detach().norm(dim=1).min().item()
    floor += 2.0**-24 if dtype == torch.float16 else 0.0
    scale = z64.grad.abs().max().item()
    err = (zq.grad.double() - z64.grad).abs().max().item()
    assert err <= GRAD_RTOL[dtype] * scale + floor, (err, scale)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float64_gradcheck(variant, rng):
    z = _random((5, 9), torch.float64, rng, SCALE[variant]).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: dispersive_loss(z, variant=variant, tau=0.6, backend="torch"), (z,))


@pytest.mark.parametrize("variant", ["infonce_l2", "hinge"])
def test_large_shared_offset_does_not_cancel(variant, rng):
    """Rows that share a large common component: the shift before the Gram keeps fp32 exact."""
    z = _random((16, 4096), torch.float64, rng, 0.05) + 30 * torch.randn(1, 4096, generator=rng, dtype=torch.float64)
    ref = reference_dispersive_loss(z, variant, tau=0.01, margin=0.01, upcast=True)
    out = dispersive_loss(z.float(), variant=variant, tau=0.01, margin=0.01, backend="torch")
    assert out.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_release_fixture(release_fixtures, backend):
    z = release_fixtures["sit_acts"][-1]
    expected = release_fixtures["disp_loss_last_block"]
    torch.testing.assert_close(dispersive_loss(z, backend=backend), expected.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(release_dispersive_loss(z), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n,d", [(1, 5), (3, 17), (32, 1000), (9, 4099)])
def test_release_baseline_equals_reference(n, d, rng):
    z64 = _random((n, d), torch.float64, rng).requires_grad_()
    release = release_dispersive_loss(z64)
    ref = reference_dispersive_loss(z64, upcast=True)
    assert release.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-12)
    if n > 1:
        g_release, = torch.autograd.grad(release, z64)
        g_ref, = torch.autograd.grad(ref, z64)
        torch.testing.assert_close(g_release, g_ref)


@pytest.mark.parametrize("backend", ["torch", "reference"])
class TestHandValues:
    def test_equal_rows_give_zero(self, backend):
        z = torch.ones(6, 40) * 3.0
        assert dispersive_loss(z, backend=backend).item() == pytest.approx(0.0, abs=1e-7)

    def test_far_apart_rows_give_minus_log_n(self, backend):
        n = 5
        z = torch.eye(n) * 1e3  # squared distance / D = 2e6 / 5: exp underflows to 0 off the diagonal
        assert dispersive_loss(z, backend=backend).item() == pytest.approx(-math.log(n), abs=1e-6)

    def test_single_sample_gives_zero(self, backend):
        assert dispersive_loss(torch.randn(1, 33), backend=backend).item() == 0.0

    def test_cosine_of_equal_rows_is_one_over_tau(self, backend):
        z = torch.ones(4, 10)
        out = dispersive_loss(z, variant="infonce_cosine", tau=0.5, backend=backend)
        assert out.item() == pytest.approx(2.0, abs=1e-6)

    def test_hinge_of_equal_rows_is_margin_squared(self, backend):
        out = dispersive_loss(torch.ones(4, 10), variant="hinge", margin=0.3, backend=backend)
        assert out.item() == pytest.approx(0.09, abs=1e-7)

    def test_covariance_of_orthonormal_rows(self, backend):
        # Rows e_1..e_n: centred columns give C = (I - 11^T/n) / n, off-diagonal entries -1/n^2.
        n = 4
        out = dispersive_loss(torch.eye(n) * 7.0, variant="covariance", backend=backend)
        assert out.item() == pytest.approx(n * (n - 1) / n**4, abs=1e-7)


def test_covariance_gram_identity_against_explicit_matrix(rng):
    """The reference's ||C||_F^2 = ||Zc Zc^T||_F^2 / N^2 shortcut against the D x D matrix."""
    z = _random((6, 11), torch.float64, rng)
    zn = torch.nn.functional.normalize(z, dim=1)
    zc = zn - zn.mean(0)
    cov = zc.T @ zc / z.shape[0]
    explicit = cov.square().sum() - cov.diagonal().square().sum()
    assert reference_dispersive_loss(z, "covariance", upcast=True).item() == pytest.approx(explicit.item(), rel=1e-12)


def test_normalize_by_dim_flag(rng):
    z = _random((4, 8), torch.float64, rng) * 0.1
    a = dispersive_loss(z, normalize_by_dim=False, backend="torch")
    b = dispersive_loss(z * math.sqrt(8), normalize_by_dim=True, backend="torch")
    assert a.item() == pytest.approx(b.item(), rel=1e-10)


def test_any_shape_and_non_contiguous_input(rng):
    base = _random((8, 16, 12), torch.float32, rng)
    z = base.transpose(1, 2)  # (8, 12, 16), not contiguous
    assert not z.is_contiguous()
    zt = z.clone().requires_grad_()
    out = dispersive_loss(zt, backend="torch")
    ref = reference_dispersive_loss(z.contiguous().double(), upcast=True)
    assert out.item() == pytest.approx(ref.item(), abs=1e-5)
    out.backward()
    assert zt.grad.shape == z.shape
    strided = _random((6, 40), torch.float32, rng)[:, ::2]  # last dimension strided
    assert dispersive_loss(strided).item() == pytest.approx(
        reference_dispersive_loss(strided.contiguous(), upcast=True).item(), abs=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_propagates(variant, bad, rng):
    z = _random((4, 10), torch.float32, rng)
    z[2, 3] = bad
    z.requires_grad_()
    out = dispersive_loss(z, variant=variant, backend="torch")
    assert not torch.isfinite(out), f"{variant} turned {bad} into {out.item()}"


class TestValidation:
    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="torch.Tensor"):
            dispersive_loss([[1.0, 2.0]])

    def test_integer_dtype(self):
        with pytest.raises(TypeError, match="floating-point"):
            dispersive_loss(torch.ones(3, 4, dtype=torch.int64))

    def test_no_samples(self):
        with pytest.raises(ValueError, match="at least 1 sample"):
            dispersive_loss(torch.ones(0, 4))

    def test_no_features(self):
        with pytest.raises(ValueError, match="at least 1 feature"):
            dispersive_loss(torch.ones(3, 0))

    @pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
    def test_bad_tau(self, tau):
        with pytest.raises(ValueError, match="tau"):
            dispersive_loss(torch.ones(3, 4), tau=tau)

    def test_tau_wrong_type(self):
        with pytest.raises(TypeError, match="tau"):
            dispersive_loss(torch.ones(3, 4), tau="1")

    def test_bad_margin(self):
        with pytest.raises(ValueError, match="margin"):
            dispersive_loss(torch.ones(3, 4), variant="hinge", margin=0)

    def test_unknown_variant_lists_valid_ones(self):
        with pytest.raises(ValueError, match="infonce_cosine"):
            dispersive_loss(torch.ones(3, 4), variant="infonce")

    def test_unknown_backend(self):
        with pytest.raises(ValueError, match="backend"):
            dispersive_loss(torch.ones(3, 4), backend="cuda")

    def test_module_validates_at_construction(self):
        with pytest.raises(ValueError, match="tau"):
            DispersiveLoss(tau=-2)


def test_module_wrapper(rng):
    z = _random((5, 3, 7), torch.float32, rng)
    module = DispersiveLoss(variant="infonce_l2", tau=0.5)
    assert "tau=0.5" in repr(module)
    assert module(z).item() == pytest.approx(dispersive_loss(z, tau=0.5).item())


def test_auto_backend_uses_fast_path_on_cpu(rng, monkeypatch):
    import kernels.dispersive as api
    calls = []
    monkeypatch.setitem(api._BACKENDS, "torch", lambda *a: calls.append(a) or torch.zeros(()))
    dispersive_loss(_random((3, 4), torch.float32, rng))
    assert len(calls) == 1


def test_fast_path_extra_memory_under_ten_percent():
    """Peak memory of forward+backward beyond z's gradient, at the SiT-XL/2 size."""
    host_memory.clear()  # a pooled gradient buffer left by an earlier test would not be counted
    z = torch.randn(32, 294_912, requires_grad=True)
    z_bytes = z.numel() * z.element_size()
    peak = peak_extra_bytes(lambda: torch.autograd.grad(dispersive_loss(z, backend="torch"), z))
    assert peak - z_bytes < 0.10 * z_bytes, f"extra {(peak - z_bytes) / z_bytes:.1%} of z"


def test_bf16_fast_path_extra_memory_is_bounded():
    """bf16 input is accumulated slab by slab, never as a full fp32 copy of z (2x its size)."""
    from kernels.gram import SLAB_BYTES
    z = torch.randn(32, 4 * 294_912, dtype=torch.bfloat16, requires_grad=True)
    z_bytes = z.numel() * z.element_size()
    assert 2 * z_bytes > 3 * SLAB_BYTES  # a full fp32 copy would break the bound below
    host_memory.clear()
    peak = peak_extra_bytes(lambda: torch.autograd.grad(dispersive_loss(z, backend="torch"), z))
    assert peak - z_bytes <= 3 * SLAB_BYTES, f"extra {(peak - z_bytes) / z_bytes:.1%} of z"


def test_groups_equal_one_call_per_batch(rng):
    """dispersive_loss_groups is the stack of per-batch losses (here the CPU loop), gradients too;
    batches of different shapes are fine."""
    from kernels import dispersive_loss_groups

    zs = [torch.randn(6, 4, 5, generator=rng, dtype=torch.float64).requires_grad_() for _ in range(2)]
    zs.append(torch.randn(3, 7, generator=rng, dtype=torch.float64).requires_grad_())
    out = dispersive_loss_groups(zs, tau=0.5)
    assert out.shape == (3,)
    (out * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()
    for k, z in enumerate(zs):
        z2 = z.detach().clone().requires_grad_()
        ref = dispersive_loss(z2, tau=0.5)
        ((k + 1) * ref).backward()
        assert out[k].item() == pytest.approx(ref.item(), rel=1e-12)
        torch.testing.assert_close(z.grad, z2.grad)
    with pytest.raises(ValueError, match="at least one batch"):
        dispersive_loss_groups([])
    with pytest.raises(ValueError, match="tau"):
        dispersive_loss_groups(zs, tau=-1.0)


@pytest.mark.parametrize("shape", [(8, 4096), (8, 16, 256)])
def test_gradient_comes_back_in_z_shape_and_is_summed_in_place(shape, rng):
    """The hidden state of a block gets two gradients (next block, this term). Returned in
    z's own shape and not as a view, the term's gradient is the buffer autograd adds the
    other one into (no third N x D tensor); through a view it would allocate the sum.
    (Sizes below the pool's: a pooled gradient shares its storage with the pool.)"""
    from kernels import gram

    made = {}
    backward = gram.gram_backward

    def recording(*args):
        dz = backward(*args)
        made["ptr"] = dz.data_ptr()  # not the tensor: a reference kept here would forbid the in-place sum
        return dz

    x = torch.randn(shape, generator=rng, requires_grad=True)
    h = x * 2
    seen = {}

    def keep(grad):
        seen["grad"] = grad

    h.register_hook(keep)
    try:
        gram.gram_backward = recording
        ((h * 3).sum() + dispersive_loss(h, backend="torch")).backward()
    finally:
        gram.gram_backward = backward
    assert seen["grad"].shape == shape
    assert seen["grad"].data_ptr() == made["ptr"]
