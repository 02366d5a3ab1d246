"""The fused Triton kernels against the float64 reference.

Without a GPU they run under the Triton interpreter (``TRITON_INTERPRET=1``, set below
before anything defines a ``@triton.jit`` function); on a machine with CUDA they run on the
GPU. Every buffer a kernel is expected to write starts as NaN (``POISON_BUFFERS``), so an
element a kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import importlib
import os
import sys

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _use_the_interpreter() -> None:
    """Makes triton (and the kernels) interpreted in this process.

    The interpreter only works when triton's own library is *imported* with the variable
    set: its standard functions (tl.sum, tl.zeros, ...) are @jit-decorated at import. If an
    earlier test module imported triton (``torch._dynamo`` does), drop it and import again.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        import triton

        if not isinstance(triton.language.standard.zeros, triton.runtime.interpreter.InterpretedFunction):
            for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
                del sys.modules[name]
    for name in ("kernels.fused.jit", "kernels.fused.launch"):
        if name in sys.modules:
            importlib.reload(sys.modules[name])


if not ON_GPU:
    _use_the_interpreter()

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels import VARIANTS, dispersive_loss, reference_dispersive_loss  # noqa: E402
from kernels.fused import jit  # noqa: E402
from kernels.fused import launch as td  # noqa: E402
from tests.conftest import REPO  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Every N in {1, 2, 3, 17, 32, 65} and every D in {1, 15, 1000, 4099} appears for each
# variant and dtype. N = 65 takes two row tiles and the torch N x N epilogue; N <= 32 the
# one-program Triton epilogue; D = 4099 and 1000 are not multiples of any block.
SHAPES = [(1, 1000), (2, 4099), (3, 1), (17, 15), (32, 1000), (65, 15)]
# Loss: fp32 accumulation. The distance variants feed z - z_0 to bf16 tensor cores as
# hi + lo halves (about 16 significant bits), hence bf16's looser bound.
LOSS_ATOL = {torch.float32: 2e-6, torch.bfloat16: 6e-5, torch.float16: 2e-6}
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 5e-5, torch.float16: 1e-5}
# Gradient: returned in z's dtype, so its error is that dtype's rounding (the interpreter
# converts fp32 -> bf16 by truncation, twice the GPU's round-to-nearest error).
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}
# Where the exact gradient cancels to (near) 0 (N = 1, or cosine with D = 1) what is left
# is rounding of the cancelling terms, of size grad_out / (tau ||z_i||): fp32 in the
# torch path, about 16 bits (bf16) / 22 bits (fp16) for the hi + lo mixing matrix here.
CANCEL_EPS = {torch.float32: 1e-6, torch.bfloat16: 2.0**-14, torch.float16: 2.0**-20}
SCALE = {"infonce_l2": 1.0, "infonce_cosine": 1.0, "hinge": 0.4, "covariance": 1.0}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(td, "POISON_BUFFERS", True)


def _random(shape, dtype, rng, scale=1.0):
    return (torch.randn(shape, generator=rng, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _grad_out(rng) -> float:
    return torch.rand((), generator=rng, dtype=torch.float64).item() * 3 + 0.5  # != 1


def _reference(z, variant, grad_out, device="cpu", **kw):
    z64 = z.detach().to(device).double().requires_grad_()
    ref = reference_dispersive_loss(z64, variant, upcast=True, **kw)
    (ref * grad_out).backward()
    return ref.item(), z64.grad.cpu()


def _triton(z, variant, grad_out, **kw):
    zq = z.clone().requires_grad_()
    out = dispersive_loss(zq, variant=variant, backend="triton", **kw)
    (out * grad_out).backward()
    return out, zq.grad


def _assert_grad_close(grad, ref_grad, dtype, grad_out, z, tau=1.0):
    assert grad.dtype == dtype and grad.shape == ref_grad.shape
    grad = grad.cpu().double()
    assert torch.isfinite(grad).all(), "an unwritten (NaN-poisoned) or non-finite gradient element"
    floor = CANCEL_EPS[dtype] * grad_out / (tau * z.cpu().double().norm(dim=1).min().item())
    floor += 2.0**-24 if dtype == torch.float16 else 0.0  # fp16 gradients of large D are subnormal
    scale = ref_grad.abs().max().item()
    err = (grad - ref_grad).abs().max().item()
    assert err <= GRAD_RTOL[dtype] * scale + floor, (err, scale)


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_float64_reference(variant, dtype, n, d, rng):
    z = _random((n, d), dtype, rng, SCALE[variant])
    grad_out = _grad_out(rng)
    ref, ref_grad = _reference(z, variant, grad_out, tau=0.7)
    out, grad = _triton(z, variant, grad_out, tau=0.7)
    assert out.dtype == torch.float32 and out.shape == ()
    assert abs(out.item() - ref) <= LOSS_ATOL[dtype] + LOSS_RTOL[dtype] * abs(ref), (out.item(), ref)
    _assert_grad_close(grad, ref_grad, dtype, grad_out, z, tau=0.7)


# The sizes the kernels are for: SiT-XL/2 at the release's local batch, and a 64-row tile at
# SiT-B/2 width. Split-K over every SM, full-width slabs. Seconds on a GPU (the float64
# reference runs there too); hours under the interpreter, whose coverage of the same code
# is the small odd shapes above.
PAPER_SHAPES = [(32, 256 * 1152), (64, 256 * 768)]


@pytest.mark.skipif(not ON_GPU, reason="paper-size inputs need a GPU (hours under the interpreter)")
@pytest.mark.parametrize("n,d", PAPER_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_paper_sizes_match_float64_reference(variant, dtype, n, d, rng):
    z = _random((n, d), dtype, rng, SCALE[variant])
    grad_out = _grad_out(rng)
    ref, ref_grad = _reference(z, variant, grad_out, device=DEVICE)
    out, grad = _triton(z, variant, grad_out)
    assert abs(out.item() - ref) <= LOSS_ATOL[dtype] + LOSS_RTOL[dtype] * abs(ref), (out.item(), ref)
    _assert_grad_close(grad, ref_grad, dtype, grad_out, z)


@pytest.mark.parametrize("variant", VARIANTS)
def test_many_row_tiles(variant, rng):
    """N = 200: four row tiles, ten tile pairs, the torch N x N epilogue."""
    z = _random((200, 40), torch.float32, rng, SCALE[variant])
    grad_out = _grad_out(rng)
    ref, ref_grad = _reference(z, variant, grad_out, tau=0.5)
    out, grad = _triton(z, variant, grad_out, tau=0.5)
    assert out.item() == pytest.approx(ref, rel=1e-5, abs=2e-6)
    _assert_grad_close(grad, ref_grad, torch.float32, grad_out, z)


@pytest.mark.parametrize("variant", ["infonce_l2", "hinge"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_shared_offset_does_not_cancel(variant, dtype, rng):
    """Rows sharing a large common component (30 vs a spread of 0.05): the shift by row 0
    keeps the distances exact, also when the shifted rows go to bf16 tensor cores."""
    common = 30 * torch.randn(1, 4096, generator=rng, dtype=torch.float64)
    z = (common + 0.05 * torch.randn(16, 4096, generator=rng, dtype=torch.float64)).to(dtype)
    ref = reference_dispersive_loss(z.double(), variant, tau=0.01, margin=0.01, upcast=True).item()
    out = dispersive_loss(z.to(DEVICE), variant=variant, tau=0.01, margin=0.01, backend="triton").item()
    assert out == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_hinge_with_the_margin_in_play(rng):
    """Half the pairs inside the margin, half outside: both branches of the clamp."""
    z = _random((24, 300), torch.float32, rng, 0.6)
    grad_out = _grad_out(rng)
    ref, ref_grad = _reference(z, "hinge", grad_out, margin=2.0)
    out, grad = _triton(z, "hinge", grad_out, margin=2.0)
    assert out.item() == pytest.approx(ref, rel=1e-5, abs=1e-7)
    _assert_grad_close(grad, ref_grad, torch.float32, grad_out, z)


@pytest.mark.parametrize("variant", ["infonce_l2", "hinge"])
def test_unnormalised_distances(variant, rng):
    """normalize_by_dim=False: squared distances not divided by D."""
    z = _random((9, 50), torch.float32, rng, 0.08)
    grad_out = _grad_out(rng)
    ref, ref_grad = _reference(z, variant, grad_out, tau=2.0, normalize_by_dim=False)
    out, grad = _triton(z, variant, grad_out, tau=2.0, normalize_by_dim=False)
    assert out.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    _assert_grad_close(grad, ref_grad, torch.float32, grad_out, z, tau=2.0)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gram_any_split_into_caller_buffer(shift, dtype, rng):
    """The split-K partial sums (uneven splits included) reduce to the exact Gram, written
    completely into a NaN-filled buffer the caller provides."""
    z = _random((65, 300), dtype, rng)
    y = z.cpu().double()
    y = y - y[:1] if shift else y
    expected = y @ y.T
    for split in (1, 3, 7):
        out = torch.full((65, 65), float("nan"), device=DEVICE)
        got = td.gram(z, shift, split=split, out=out)
        assert got is out and torch.isfinite(out).all()
        # 16-bit inputs: tensor-core fp32 accumulation truncates alignment bits (4.6e-6
        # relative seen on an H200 for fp16); fp32 inputs stay exact FMA.
        torch.testing.assert_close(out.cpu().double(), expected, rtol=2e-6 if dtype == torch.float32 else 2e-5,
                                   atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_into_caller_buffer(variant, rng):
    z = _random((17, 300), torch.float16, rng, SCALE[variant])
    loss, mix, state = td.forward(z, variant, 0.7)
    for t in (loss, mix, state):
        assert torch.isfinite(t).all()
    out = torch.full_like(z, float("nan"))
    dz = td.backward(torch.tensor(1.3, device=DEVICE), z, mix, state, variant, out=out)
    assert dz is out and torch.isfinite(out).all()
    _, ref_grad = _reference(z, variant, 1.3, tau=0.7)
    _assert_grad_close(out, ref_grad, torch.float16, 1.3, z, tau=0.7)


@pytest.mark.parametrize("variant", VARIANTS)
def test_deterministic(variant, rng):
    """Fixed-order reductions: two runs give the same bits."""
    z = _random((40, 300), torch.bfloat16, rng, SCALE[variant])
    a, ga = _triton(z, variant, 1.0)
    b, gb = _triton(z, variant, 1.0)
    assert torch.equal(a, b) and torch.equal(ga, gb)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on inf - inf
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_propagates(variant, bad, rng):
    z = _random((5, 40), torch.float32, rng)
    z[2, 3] = bad
    out, grad = _triton(z, variant, 1.0)
    assert not torch.isfinite(out), f"{variant} turned {bad} into {out.item()}"
    assert not torch.isfinite(grad).all(), f"{variant}: the gradient lost the {bad}"


def test_rows_with_a_stride(rng):
    """A row stride larger than D (a column slice): no copy, the kernels use the stride."""
    base = _random((9, 64), torch.float32, rng)
    z = base[:, 5:38]
    assert z.stride() == (64, 1)
    grad_out = _grad_out(rng)
    ref, ref_grad = _reference(z, "infonce_l2", grad_out)
    out, grad = _triton(z, "infonce_l2", grad_out)
    assert out.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    _assert_grad_close(grad, ref_grad, torch.float32, grad_out, z)


def test_block_shaped_input_is_flattened(rng):
    z = _random((6, 16, 12), torch.bfloat16, rng)  # (N, tokens, hidden)
    out, grad = _triton(z, "infonce_l2", 1.0)
    ref, ref_grad = _reference(z, "infonce_l2", 1.0)
    assert out.item() == pytest.approx(ref, rel=5e-5, abs=6e-5)
    _assert_grad_close(grad, ref_grad.reshape(z.shape), torch.bfloat16, 1.0, z.reshape(6, -1))


@pytest.mark.parametrize("n,dtype", [(td.MAX_N + 1, torch.float32), (5, torch.float64)])
def test_unsupported_inputs_fall_back_to_the_gram_path(n, dtype, rng, monkeypatch):
    calls = []
    monkeypatch.setattr(td, "forward", lambda *a, **k: calls.append(a))
    z = _random((n, 3), dtype, rng)
    grad_out = _grad_out(rng)
    ref, ref_grad = _reference(z, "infonce_l2", grad_out)
    out, grad = _triton(z, "infonce_l2", grad_out)
    assert not calls, "the fused path ran on an input it does not support"
    assert out.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_max_n_takes_the_fused_path(rng, monkeypatch):
    """N = MAX_N is inside the fused path (16 row tiles, 136 tile pairs)."""
    calls = []
    real = td.forward
    monkeypatch.setattr(td, "forward", lambda *a, **k: calls.append(a) or real(*a, **k))
    z = _random((td.MAX_N, 2), torch.float32, rng)
    out = dispersive_loss(z, backend="triton")
    assert calls
    assert out.item() == pytest.approx(reference_dispersive_loss(z.cpu(), upcast=True).item(), rel=1e-5, abs=1e-6)


def test_forward_rejects_what_it_cannot_run(rng):
    with pytest.raises(ValueError, match="N <= 1024"):
        td.forward(_random((td.MAX_N + 1, 2), torch.float32, rng), "infonce_l2")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        td.forward(_random((3, 2), torch.float64, rng), "infonce_l2")
    with pytest.raises(ValueError, match="contiguous"):
        td.forward(_random((3, 8), torch.float32, rng)[:, ::2], "infonce_l2")


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(td, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispersive_loss(torch.ones(3, 4), backend="triton")


def test_constants_match_the_reference():
    from kernels.reference import COSINE_EPS

    assert jit.COSINE_EPS.value == COSINE_EPS
    assert "triton" in kernels.dispersive._BACKENDS
    assert td.INTERPRETED != ON_GPU


def test_custom_op_registration_under_the_interpreter(rng):
    """torch.library's own consistency checks (schema, fake tensor, autograd) on the Triton op."""
    from kernels.ops import forward_op

    z = _random((5, 33), torch.float32, rng).requires_grad_()
    torch.library.opcheck(forward_op, (z, "infonce_l2", 0.5, 1.0, True, "triton"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compiled_fullgraph_with_the_triton_backend(rng):
    """The Triton custom op inside torch.compile(fullgraph=True): no break, eager's numbers."""
    torch._dynamo.reset()
    z = _random((7, 40), torch.float32, rng)

    def fn(z):
        return 3.0 * dispersive_loss(z, backend="triton", tau=0.5) + z.square().mean()

    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    eager = fn(za)
    eager.backward()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")  # no C++ build: keeps this file fast
    out = compiled(zb)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(zb.grad, za.grad)


_FIRST_CALL_COMPILED = """
import sys, torch, kernels
assert "kernels.fused.launch" not in sys.modules and "triton" not in sys.modules
fn = torch.compile(lambda z: kernels.dispersive_loss(z, backend="triton") * 2, fullgraph=True, backend="aot_eager")
z = torch.randn(5, 9, requires_grad=True)
out = fn(z)
out.backward()
ref = kernels.dispersive_loss(z.detach().double(), backend="reference") * 2
assert abs(out.item() - ref.item()) < 1e-5 and torch.isfinite(z.grad).all(), (out, ref)
print("ok")
"""


@pytest.mark.skipif(ON_GPU, reason="the subprocess runs the CPU interpreter")
def test_first_call_inside_torch_compile():
    """The kernels module is first imported while dynamo traces (a fresh process): still one graph."""
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _FIRST_CALL_COMPILED], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]



@pytest.mark.parametrize("variant", ["infonce_l2", "infonce_cosine", "hinge"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 33), (17, 300), (64, 15)])
def test_groups_match_each_batch_against_float64(variant, dtype, n, d, rng):
    """A stack of K batches in one call: each loss and each batch's gradient as if alone."""
    zs = [_random((n, d), dtype, rng, SCALE[variant]).requires_grad_() for _ in range(3)]
    grads_out = [_grad_out(rng) for _ in zs]
    out = kernels.dispersive_loss_groups(zs, variant=variant, backend="triton", tau=0.7)
    assert out.shape == (3,) and out.dtype == torch.float32
    sum(g * v for g, v in zip(grads_out, out)).backward()
    for z, g, value in zip(zs, grads_out, out):
        ref, ref_grad = _reference(z, variant, g, tau=0.7)
        assert abs(value.item() - ref) <= LOSS_ATOL[dtype] + LOSS_RTOL[dtype] * abs(ref), (value.item(), ref)
        _assert_grad_close(z.grad, ref_grad, dtype, g, z.detach(), tau=0.7)


def test_groups_backward_through_a_sum(rng):
    """``values.sum().backward()`` (the objective's equal-weight total) hands the stacked
    backward an expanded (stride 0) upstream gradient; every block must still get its own
    gradient (the launcher read g[k] past the one stored element before it made g contiguous).
    Blocks of different scales, so a block given another's numbers shows."""
    zs = [_random((9, 20), torch.float32, rng, s).requires_grad_() for s in (1.0, 0.3, 0.02)]
    out = kernels.dispersive_loss_groups(zs, backend="triton", tau=0.7)
    out.sum().backward()
    for z, value in zip(zs, out):
        ref, ref_grad = _reference(z, "infonce_l2", 1.0, tau=0.7)
        assert value.item() == pytest.approx(ref, rel=1e-5, abs=2e-6)
        _assert_grad_close(z.grad, ref_grad, torch.float32, 1.0, z.detach(), tau=0.7)


def test_groups_take_one_launch_per_kernel(rng, monkeypatch):
    """The stack goes through the fused forward once, not once per batch."""
    calls = []
    real = td.forward
    monkeypatch.setattr(td, "forward", lambda z, *a, **k: calls.append(tuple(z.shape)) or real(z, *a, **k))
    zs = [_random((8, 6, 5), torch.float32, rng) for _ in range(4)]  # (N, tokens, hidden) each
    out = kernels.dispersive_loss_groups(zs, backend="triton")
    assert calls == [(4, 8, 30)]
    expected = torch.stack([reference_dispersive_loss(z.cpu(), upcast=True) for z in zs]).float()
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant,n", [("covariance", 5), ("infonce_l2", 65)])
def test_groups_the_stack_cannot_take_fall_back_to_one_call_each(variant, n, rng, monkeypatch):
    shapes = []
    real = td.forward
    monkeypatch.setattr(td, "forward", lambda z, *a, **k: shapes.append(tuple(z.shape)) or real(z, *a, **k))
    zs = [_random((n, 7), torch.float32, rng, SCALE[variant]) for _ in range(2)]
    out = kernels.dispersive_loss_groups(zs, variant=variant, backend="triton")
    assert shapes == [(n, 7), (n, 7)]
    for z, v in zip(zs, out):
        assert v.item() == pytest.approx(reference_dispersive_loss(z.cpu(), variant, upcast=True).item(),
                                         rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="call per batch"):
        td.forward(torch.stack(zs), variant)


def test_groups_inside_torch_compile_fullgraph(rng):
    """The grouped call (stack + one custom op) stays in one graph and matches eager."""
    torch._dynamo.reset()
    zs = [_random((5, 12), torch.float32, rng) for _ in range(3)]

    def fn(*zs):
        weights = torch.tensor([1.0, 2.0, 3.0], device=zs[0].device)
        return (kernels.dispersive_loss_groups(list(zs), backend="triton") * weights).sum()

    eager_in = [z.clone().requires_grad_() for z in zs]
    compiled_in = [z.clone().requires_grad_() for z in zs]
    eager = fn(*eager_in)
    eager.backward()
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*compiled_in)
    out.backward()
    torch.testing.assert_close(out, eager)
    for a, b in zip(compiled_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad)
