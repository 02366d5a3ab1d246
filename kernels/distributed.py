"""Global-batch scope: gather z across data-parallel ranks, gradient only to the local rows.

With ``scope="global"`` every rank computes the loss of the whole global batch (the same
value on every rank). Its gradient with respect to this rank's rows is the local slice of
the global gradient; every rank computes that same global gradient, so backward needs no
communication. Data-parallel training then averages parameter gradients over ranks
(DDP, DeepSpeed): the average of the per-rank contributions is the single-process
gradient divided by the world size, so the local slice is multiplied by the world size
here. After averaging, every parameter sees exactly the gradient of the global-batch loss.

Every rank must hold the same number of rows (the single-tensor all-gather needs equal
sizes; checking it would take a collective, so it is the caller's contract).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


# torch >= 2.13 renamed all_gather_into_tensor (still there, deprecated); the project supports torch >= 2.4.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _GatherRows(torch.autograd.Function):
    """(N, D) local rows -> (world * N, D), rank-major; backward: world * the local slice."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, group) -> torch.Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        z = z.contiguous()
        out = z.new_empty((world * z.shape[0], *z.shape[1:]))           # (W * N, D)
        _all_gather(out, z, group=group)
        ctx.world, ctx.rank, ctx.rows = world, rank, z.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        local = grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]      # (N, D)
        return local * ctx.world, None


def gather_rows(z: torch.Tensor, group=None) -> torch.Tensor:
    """All rows of the global batch (rank-major) with the gradient scaling described above.

    Without an initialised process group (or with one rank) this is ``z`` itself, so
    ``scope="global"`` equals ``scope="local"`` in a single process.
    """
    if not _active(group):
        return z
    return _GatherRows.apply(z, group)
