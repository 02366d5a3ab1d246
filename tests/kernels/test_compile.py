"""torch.compile sees the loss as one custom op: no graph break, same value and gradient."""
from __future__ import annotations

import os

from tests.conftest import REPO

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO / "build" / "cache" / "inductor"))

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
from kernels import VARIANTS, dispersive_loss  # noqa: E402
from kernels.ops import backward_op, forward_op  # noqa: E402


class _Tiny(torch.nn.Module):
    """A projection, the loss on its output, and a second term: the loss sits inside a graph."""

    def __init__(self, variant: str):
        super().__init__()
        self.proj = torch.nn.Linear(12, 20)
        self.variant = variant

    def forward(self, x):
        z = torch.tanh(self.proj(x)).reshape(x.shape[0], 4, 5)          # (N, T, C)
        return z.square().mean() + 0.5 * dispersive_loss(z, variant=self.variant, tau=0.5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_fullgraph_matches_eager(variant, rng):
    torch._dynamo.reset()
    model = _Tiny(variant)
    x = torch.randn(6, 12, generator=rng)
    eager = model(x)
    (g_eager,) = torch.autograd.grad(eager, model.proj.weight)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break raises
    out = compiled(x)
    (g_compiled,) = torch.autograd.grad(out, model.proj.weight)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-6)


def test_the_op_is_in_the_captured_graph(rng):
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm

    fn = torch.compile(lambda z: dispersive_loss(z) * 2, backend=backend, fullgraph=True)
    z = torch.randn(5, 7, generator=rng)
    assert fn(z).item() == pytest.approx(2 * dispersive_loss(z).item(), rel=1e-6)
    assert any("dispersive.forward" in t for t in seen), seen


@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck_torch_backend(variant, rng):
    """torch.library's consistency checks: schema, fake tensors, autograd, AOT dispatch."""
    z = torch.randn(4, 9, generator=rng, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(forward_op, (z, variant, 0.5, 1.0, True, "torch"))
    loss, mix, state = forward_op(z.detach(), variant, 0.5, 1.0, True, "torch")
    torch.library.opcheck(backward_op, (torch.tensor(1.5, dtype=torch.float64), z.detach(), mix, state, variant, "torch"))


def test_custom_op_gradcheck(rng):
    """The op's registered autograd (what compiled graphs use) and the eager path, both exact."""
    z = torch.randn(5, 6, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: forward_op(z, "hinge", 1.0, 3.0, True, "torch")[0], (z,))
    assert torch.autograd.gradcheck(lambda z: kernels.dispersive_loss(z, variant="hinge", margin=3.0), (z,))


@pytest.mark.parametrize("variant", VARIANTS)
def test_eager_calls_skip_the_op_dispatch_with_identical_results(variant, rng):
    """Eager mode runs the same implementation as the op without its dispatch overhead."""
    from torch.profiler import profile

    z = torch.randn(32, 8192 + 5, generator=rng, requires_grad=True)   # > 1 MiB: pooled memory
    with profile() as prof:
        loss = kernels.dispersive_loss(z, variant=variant, tau=0.5)
        grad, = torch.autograd.grad(loss, z)
    names = {e.key for e in prof.key_averages()}
    assert not any(n.startswith("dispersive::") for n in names), sorted(names)
    loss_op, mix, state = forward_op(z.detach(), variant, 0.5, 1.0, True, "torch")
    grad_op = backward_op(torch.ones(()), z.detach(), mix, state, variant, "torch")
    assert torch.equal(loss, loss_op) and torch.equal(grad, grad_op)


def test_double_backward_is_exact_eagerly_and_refused_when_compiled(rng):
    """Eager calls and the op (tests/kernels/test_fidelity.py has the full checks): a backward
    with create_graph=True differentiates a plain-torch formula, so second derivatives are exact
    (this test asserted a RuntimeError before they were). Compiled graphs keep the closed-form
    ``dispersive::backward`` (AOTAutograd traces the backward without create_graph), and a double
    backward through them raises: torch.compile does not support it."""
    from torch._dynamo.backends.common import aot_autograd

    z = torch.randn(6, 9, generator=rng, dtype=torch.float64, requires_grad=True)
    loss = lambda z: kernels.dispersive_loss(z, variant="hinge", margin=3.0)  # noqa: E731
    assert torch.autograd.gradgradcheck(loss, (z,))

    torch._dynamo.reset()
    backward_nodes = []

    def keep_backward(gm, example_inputs):
        backward_nodes.extend(str(node.target) for node in gm.graph.nodes)
        return gm

    compiled = torch.compile(loss, backend=aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=keep_backward),
                             fullgraph=True)
    grad, = torch.autograd.grad(compiled(z), z)
    torch.testing.assert_close(grad, torch.autograd.grad(loss(z), z)[0])
    assert any("dispersive.backward" in t for t in backward_nodes), backward_nodes
    with pytest.raises(RuntimeError):  # at create_graph=True already, or at the second grad
        grad, = torch.autograd.grad(compiled(z), z, create_graph=True)
        torch.autograd.grad(grad.square().sum(), z)


def test_fake_tracing_records_the_op(rng):
    """make_fx with fake tensors (no torch.compile) goes through the op, not the eager path."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda z: kernels.dispersive_loss(z) * 2, tracing_mode="fake")(torch.randn(32, 8192, generator=rng))
    assert any("dispersive.forward" in str(node.target) for node in gm.graph.nodes)


def test_split_k_gram_gradcheck(rng, monkeypatch):
    """The split-K product for few rows (here with 4-column chunks and a remainder), exact in fp64."""
    from kernels import gram

    monkeypatch.setattr(gram, "SPLIT_K_CHUNK", 4)
    z = torch.randn(5, 11, generator=rng, dtype=torch.float64, requires_grad=True)
    for variant in ("infonce_l2", "infonce_cosine"):
        assert torch.autograd.gradcheck(lambda z: kernels.dispersive_loss(z, variant=variant, tau=0.7), (z,))
