"""Exponential moving average of the weights, in fp32, under every ZeRO stage.

The EMA is a full fp32 copy on every rank (like the releases' ``ema`` model). Its
source is the fp32 master weights: under ZeRO-1/2 in fp32 the module's own
parameters; otherwise (bf16, or ZeRO-3 where the module holds only shards)
DeepSpeed gathers each full fp32 parameter (``safe_get_full_fp32_param``, a
collective every rank joins). That gather costs one all-gather of the model per
update, which is why ``update`` can be called every k steps.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def _full_fp32(param: nn.Parameter, gather: bool) -> torch.Tensor:
    if not gather:
        return param.detach()
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    # Frozen parameters (the sin-cos position table) have no fp32 master copy.
    full = safe_get_full_fp32_param(param) if param.requires_grad else None
    if full is not None:
        return full
    if hasattr(param, "ds_id"):  # a ZeRO-3 shard: gather the full tensor
        with deepspeed.zero.GatheredParameters([param]):
            return param.data.float().clone()
    return param.detach()


class EMA:
    def __init__(self, module: nn.Module):
        # Built from the freshly initialised module, before DeepSpeed shards it: the
        # releases start the EMA as an exact copy of the initial weights.
        self.model = copy.deepcopy(module).float().eval().requires_grad_(False)
        self.names = [n for n, _ in module.named_parameters()]

    def _sources(self, engine, gather: bool):
        return [_full_fp32(p, gather) for p in engine.module.parameters()]

    @torch.no_grad()
    def update(self, engine, decay: float, gather: bool) -> None:
        ema_params = list(self.model.parameters())
        sources = [s.to(ema_params[0].device, torch.float32) for s in self._sources(engine, gather)]
        torch._foreach_lerp_(ema_params, sources, 1.0 - decay)

    @torch.no_grad()
    def full_weights(self, engine, gather: bool) -> dict[str, torch.Tensor]:
        """The training model's full fp32 state_dict (a collective when ``gather``)."""
        weights = dict(zip(self.names, (s.float().cpu().clone() for s in self._sources(engine, gather))))
        # Buffers (the fixed sin-cos position table) are never sharded.
        for name, buf in engine.module.named_buffers():
            weights[name] = buf.float().cpu().clone()
        return weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)
