"""DeepSpeed for a run: its JSON config, the optimizer and schedule, the engine."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from engine.training.config import TrainConfig


def deepspeed_config(cfg: TrainConfig, micro: int, accum: int) -> dict[str, Any]:
    """The DeepSpeed JSON for ``cfg``; entries of ``cfg.deepspeed_config`` override it."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 2:
        # Buckets of 50M elements: DeepSpeed's defaults (500M to reduce, 1B live parameters
        # under ZeRO-3) cost several GB per rank, more than an XL run on a small host has.
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=int(5e7))
    if cfg.zero_stage == 3:
        # sub_group_size: the optimizer steps 100M-element groups one after another, so
        # AdamW's temporaries are 0.4 GB instead of the size of the whole local partition.
        zero.update(stage3_prefetch_bucket_size=int(5e7), stage3_max_live_parameters=int(1e8),
                    stage3_max_reuse_distance=int(1e8), sub_group_size=int(1e8))
    if cfg.offload and cfg.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds = {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        # The client optimizer is torch's AdamW: deterministic resume, no JIT-built ops.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed_config:
        with open(cfg.deepspeed_config) as f:
            ds = _merge(ds, json.load(f))
    return ds


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def warmup_factor(warmup: int):
    """The learning-rate multiplier of step s: a linear warm-up over ``warmup`` steps, then 1."""
    return lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0


def build_engine(model: torch.nn.Module, cfg: TrainConfig, micro: int, accum: int, device: torch.device,
                 write_config_to: Path | None = None):
    """The DeepSpeed engine around ``model``: torch's AdamW (or apex's FusedAdam) with a linear
    warm-up, ZeRO as configured; ``write_config_to`` records the JSON DeepSpeed got."""
    import deepspeed  # heavy (JIT-built ops, many imports): only a training run needs it

    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.apex:
        try:
            from apex.optimizers import FusedAdam
        except ImportError as e:
            raise ImportError("--apex asks for apex's FusedAdam, but NVIDIA apex is not installed "
                              "(it is not on PyPI; build it from NVIDIA's repository), or drop --apex "
                              "to use torch's fused AdamW") from e
        optimizer = FusedAdam(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                              adam_w_mode=True)
    else:
        fused = o.fused and device.type == "cuda" and not cfg.offload
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps,
                                      weight_decay=o.weight_decay, fused=fused or None)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(o.warmup_steps))
    ds_config = deepspeed_config(cfg, micro, accum)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                      config=ds_config)
    if write_config_to is not None:  # the JSON DeepSpeed was given, for the record
        with open(write_config_to, "w") as f:
            json.dump(ds_config, f, indent=2)
    return engine
