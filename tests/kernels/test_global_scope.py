"""scope="global": two CPU ranks (gloo) against one process holding the whole batch
(every variant, and the scale-invariant ones: their m is the gathered batch's)."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels import VARIANTS, DispersiveLoss, dispersive_loss
from kernels.reference import SCALE_INVARIANT_VARIANTS

WORLD = 2
N_LOCAL, D_IN, D_OUT = 3, 7, 10
# (variant, scale_invariant) pairs the ranks run
CASES = [(v, False) for v in VARIANTS] + [(v, True) for v in SCALE_INVARIANT_VARIANTS]
SCALES = (1e-3, 10.0, 1e3)  # scale-invariant cases: the global loss of c z, on the ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem():
    """Inputs of the whole global batch and the projection both setups share."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(WORLD * N_LOCAL, D_IN, generator=gen, dtype=torch.float64)
    weight = torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64) * 0.4
    return x, weight


def _loss(x, weight, variant, scope, scale_invariant=False, c=1.0):
    z = torch.tanh(x @ weight.T) * c                                       # (N, D_OUT)
    return dispersive_loss(z, variant=variant, tau=0.6, margin=2.0, scope=scope, scale_invariant=scale_invariant)


def _rank_main(rank: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for variant, scale_invariant in CASES:
            x, weight = _problem()
            weight = weight.clone().requires_grad_()
            x_local = x[rank * N_LOCAL:(rank + 1) * N_LOCAL].clone().requires_grad_()
            loss = _loss(x_local, weight, variant, "global", scale_invariant)
            loss.backward()
            # What DDP / DeepSpeed do with parameter gradients: the mean over ranks.
            grad = weight.grad.clone()
            dist.all_reduce(grad)
            grad /= WORLD
            scaled = []
            for c in SCALES if scale_invariant else ():
                # the loss of c z and grad . z over the global batch: the sum of the local slices
                z = (torch.tanh(x_local.detach() @ weight.detach().T) * c).requires_grad_()
                value = dispersive_loss(z, variant=variant, tau=0.6, margin=2.0, scope="global", scale_invariant=True)
                value.backward()
                sums = torch.stack([(z.grad * z.detach()).sum(), z.grad.square().sum(), z.detach().square().sum()])
                dist.all_reduce(sums)
                scaled.append((value.item(), abs(sums[0].item()) / (sums[1] * sums[2]).sqrt().item()))
            # numpy copies: a tensor would travel as shared memory that dies with this process
            queue.put(((variant, scale_invariant), rank, loss.item(), grad.numpy(), x_local.grad.numpy(), scaled))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    """Runs both ranks once (every case) and returns {(case, rank): (loss, grad, x_grad, scaled)}."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        items = [queue.get(timeout=180) for _ in range(WORLD * len(CASES))]
    finally:
        for p in procs:
            p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return {(case, rank): (loss, torch.from_numpy(grad), torch.from_numpy(x_grad), scaled)
            for case, rank, loss, grad, x_grad, scaled in items}


@pytest.mark.slow
@pytest.mark.parametrize("variant,scale_invariant", CASES)
def test_two_ranks_equal_one_process(variant, scale_invariant, two_ranks):
    x, weight = _problem()
    weight = weight.clone().requires_grad_()
    xs = x.clone().requires_grad_()
    single = _loss(xs, weight, variant, "local", scale_invariant)
    single.backward()
    for rank in range(WORLD):
        loss, avg_grad, x_grad, _ = two_ranks[((variant, scale_invariant), rank)]
        # Same loss on every rank: that of the global batch.
        assert loss == pytest.approx(single.item(), rel=1e-12, abs=1e-14)
        # Averaged parameter gradients equal the single-process gradient.
        torch.testing.assert_close(avg_grad, weight.grad, rtol=1e-10, atol=1e-12)
        # The input gradient reaches only the local rows, scaled by the world size
        # (the averaging divides it back).
        local = xs.grad[rank * N_LOCAL:(rank + 1) * N_LOCAL]
        torch.testing.assert_close(x_grad, WORLD * local, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("variant", SCALE_INVARIANT_VARIANTS)
def test_two_ranks_scale_invariant(variant, two_ranks):
    """The global loss of c z is that of z (m is the gathered batch's: a local m would not give
    the single-process value above), and the global gradient is orthogonal to the global z."""
    for rank in range(WORLD):
        loss, _, _, scaled = two_ranks[((variant, True), rank)]
        for value, cosine in scaled:
            assert value == pytest.approx(loss, rel=1e-12)
            assert cosine < 1e-10


@pytest.mark.parametrize("scale_invariant", [False, True])
def test_global_without_process_group_is_local(scale_invariant, rng):
    assert not dist.is_initialized()
    z = torch.randn(5, 8, generator=rng, requires_grad=True)
    a = dispersive_loss(z, scope="global", scale_invariant=scale_invariant)
    (ga,) = torch.autograd.grad(a, z)
    b = dispersive_loss(z, scope="local", scale_invariant=scale_invariant)
    (gb,) = torch.autograd.grad(b, z)
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_scope_is_validated():
    with pytest.raises(ValueError, match="scope"):
        dispersive_loss(torch.ones(3, 4), scope="world")
    with pytest.raises(ValueError, match="scope"):
        DispersiveLoss(scope="batch")
    assert "scope='global'" in repr(DispersiveLoss(scope="global"))
