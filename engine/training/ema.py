"""Exponential moving average of the weights, in fp32, under every ZeRO stage.

The source of the average is always the fp32 master weights.

* ZeRO-0/1/2 (:class:`FullEMA`): rank 0 keeps a full fp32 copy, like the releases'
  ``ema`` model. In fp32 the module's own parameters are the master weights; in bf16
  DeepSpeed gathers each fp32 parameter (``safe_get_full_fp32_param``, a collective
  every rank joins), one parameter at a time so that no second full copy is alive.
* ZeRO-3 (:class:`ShardedEMA`): every rank averages its own partition of the fp32
  master weights, so a step needs no communication and an XL model's 2.7 GB EMA is
  split over the ranks; the full weights are gathered only to save or sample.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn


def _is_zero3(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def _gather_zero3(param: nn.Parameter, shard: torch.Tensor | None) -> torch.Tensor:
    """The full tensor of a ZeRO-3 parameter from every rank's flat fp32 partition (DeepSpeed's
    layout: rank r holds elements [r * P, (r + 1) * P) of the flattened, padded tensor)."""
    if shard is None:  # frozen: no fp32 master copy exists, gather the module's own shards
        import deepspeed  # lazy: a heavy import (seconds), and only ZeRO-3 runs reach here
        with deepspeed.zero.GatheredParameters([param]):
            return param.data.float().clone()
    world = dist.get_world_size() if dist.is_initialized() else 1
    buffer = torch.empty(world * shard.numel(), dtype=torch.float32, device=shard.device)
    if world > 1:
        dist.all_gather_into_tensor(buffer, shard.float().contiguous())
    else:
        buffer.copy_(shard.flatten())
    return buffer[: param.ds_numel].view(param.ds_shape)


def full_fp32(param: nn.Parameter, gather: bool) -> torch.Tensor:
    """The full fp32 master value of ``param`` (a collective when ``gather``)."""
    if not gather:
        return param.detach()
    from deepspeed.utils import safe_get_full_fp32_param  # lazy: heavy, and only gathering needs it

    full = safe_get_full_fp32_param(param) if param.requires_grad else None
    if full is not None:
        return full
    if _is_zero3(param):
        return _gather_zero3(param, None)
    return param.detach()


@torch.no_grad()
def full_state_dict(engine, names: list[str], gather: bool, keep: bool) -> dict[str, torch.Tensor] | None:
    """The training model's full fp32 weights on the rank that ``keep``s them (every rank
    must call this when ``gather``); parameters are gathered one at a time."""
    weights = {}
    for name, param in zip(names, engine.module.parameters()):
        full = full_fp32(param, gather)
        if keep:
            weights[name] = full.float().cpu().clone()
    if not keep:
        return None
    for name, buf in engine.module.named_buffers():  # buffers are never sharded
        weights[name] = buf.float().cpu().clone()
    return weights


class FullEMA:
    def __init__(self, module: nn.Module, keep: bool = True):
        # Built from the freshly initialised module, before DeepSpeed touches it: the
        # releases start the EMA as an exact copy of the initial weights.
        self.model = copy.deepcopy(module).float().eval().requires_grad_(False) if keep else None
        self.names = [n for n, _ in module.named_parameters()]

    @torch.no_grad()
    def update(self, engine, decay: float, gather: bool) -> None:
        ema_params = list(self.model.parameters()) if self.model is not None else None
        for i, param in enumerate(engine.module.parameters()):
            full = full_fp32(param, gather)  # a collective when gathering: every rank joins
            if ema_params is not None:
                ema_params[i].lerp_(full.to(ema_params[i].device, torch.float32), 1.0 - decay)

    def full_state_dict(self, engine) -> dict[str, torch.Tensor] | None:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()} if self.model else None

    def shard_state(self) -> dict[str, torch.Tensor] | None:
        return self.full_state_dict(None)

    def load_shard_state(self, state: dict[str, torch.Tensor] | None) -> None:
        if self.model is not None:
            self.model.load_state_dict(state, strict=True)


class ShardedEMA:
    """EMA of this rank's partition of the ZeRO-3 fp32 master weights."""

    def __init__(self, engine, names: list[str], initial: dict[str, torch.Tensor]):
        """``initial``: the fp32 weights as initialised, before DeepSpeed sharded them."""
        from deepspeed.utils import safe_get_local_fp32_param  # lazy: heavy, ZeRO-3 only

        self.names = names
        self._local = safe_get_local_fp32_param
        # Trainable parameters: a copy of the local fp32 partition (DeepSpeed built it from
        # the initial weights). Frozen ones (the fixed sin-cos table) never change.
        self.shards: dict[str, torch.Tensor] = {}
        self.frozen: dict[str, torch.Tensor] = {}
        for name, param in zip(names, engine.module.parameters()):
            if param.requires_grad:
                self.shards[name] = self._local(param).detach().float().clone()
            else:
                self.frozen[name] = initial[name].cpu()

    @torch.no_grad()
    def update(self, engine, decay: float, gather: bool = True) -> None:
        for name, param in zip(self.names, engine.module.parameters()):
            if name in self.shards:
                self.shards[name].lerp_(self._local(param).float(), 1.0 - decay)

    @torch.no_grad()
    def full_state_dict(self, engine) -> dict[str, torch.Tensor] | None:
        """Collective: rank 0 gets the full fp32 EMA weights, the other ranks None."""
        keep = not dist.is_initialized() or dist.get_rank() == 0
        weights = {}
        for name, param in zip(self.names, engine.module.parameters()):
            full = self.frozen[name] if name in self.frozen else _gather_zero3(param, self.shards[name])
            if keep:
                weights[name] = full.cpu().clone()
        if not keep:
            return None
        for name, buf in engine.module.named_buffers():
            weights[name] = buf.float().cpu().clone()
        return weights

    def shard_state(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.shards.items()}

    def load_shard_state(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shards) or any(state[k].shape != v.shape for k, v in self.shards.items()):
            raise ValueError("the checkpoint's ZeRO-3 EMA shards do not match this run's partitioning: "
                             "resume with the same number of ranks as the run that saved it")
        for k, v in state.items():
            self.shards[k].copy_(v)


def ema_builder(module: nn.Module, *, sharded: bool, keep: bool, device: torch.device):
    """What the EMA needs from the freshly initialised ``module``, taken before DeepSpeed
    partitions or casts it; the returned function makes the EMA once the engine exists.

    ``sharded`` (ZeRO-3): each rank averages its own partition (only the frozen parameters,
    the sin-cos table, are kept from the initial weights); else a full copy, on rank 0 only
    (``keep``)."""
    names = [n for n, _ in module.named_parameters()]
    if not sharded:
        full = FullEMA(module, keep=keep)
        if full.model is not None:
            full.model.to(device)
        return lambda engine: full
    initial = {n: p.detach().float().clone() for n, p in module.named_parameters() if not p.requires_grad}
    return lambda engine: ShardedEMA(engine, names, initial)
