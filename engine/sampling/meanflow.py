"""Sampling a MeanFlow model: z_r = z_t - (t - r) u(z_t, r, t), from t = 1 (noise) to 0 (data).

``sample_meanflow(model, y, noise, steps=1)`` is the 1-NFE sampler; ``meanflow_velocity_fn``
reads the model's instantaneous velocity as a SiT velocity field for the ODE/SDE samplers.
The model and its training live in ``engine.objectives.meanflow``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from engine.objectives.meanflow import check_meanflow_model
from models import labels_as_given, unwrap_model


def meanflow_times(steps: int = 1, times: Sequence[float] | None = None) -> list[float]:
    """The time grid from 1 (noise) to 0 (data): ``times`` as given (checked), else uniform."""
    if times is None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        return [1.0 - i / steps for i in range(steps + 1)]
    grid = [float(s) for s in times]
    if len(grid) < 2 or any(not 0.0 <= s <= 1.0 for s in grid) or any(a <= b for a, b in zip(grid, grid[1:])):
        raise ValueError(f"times must be >= 2 strictly decreasing values in [0, 1], got {list(times)!r}")
    return grid


def _null_for(module: torch.nn.Module) -> int:
    return unwrap_model(module).config.require_null_class("classifier-free guidance (cfg_scale != 1)")


def _u_guided(model: torch.nn.Module, z: Tensor, t: Tensor, y: Tensor, h: Tensor, cfg_scale: float,
              null: int | None) -> Tensor:
    if cfg_scale == 1.0:
        return model(z, t, y, h=h).float()
    both = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]),
                 h=torch.cat([h, h])).float()  # (2N, C, H, W)
    cond, uncond = both.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def sample_meanflow(model: torch.nn.Module, y: Tensor, noise: Tensor, *, steps: int = 1,
                    times: Sequence[float] | None = None, cfg_scale: float = 1.0,
                    progress: bool = False) -> Tensor:
    """Latents (N, C, H, W) from noise (N, C, H, W) and labels (N,): z_r = z_t - (t - r) u(z_t, r, t).

    ``steps`` network evaluations on a uniform grid from t = 1 to 0, or the grid ``times``.
    MeanFlow's guidance is trained into u (``MeanFlowConfig.omega/kappa``): keep ``cfg_scale``
    at 1; another value applies ordinary CFG on top (2N rows per evaluation). The model's label
    dropout is off during sampling whatever its mode. The state is float32 (float64 noise stays
    float64).
    """
    check_meanflow_model(model)
    if noise.shape[0] != y.shape[0]:
        raise ValueError(f"noise has {noise.shape[0]} rows but y has {y.shape[0]}")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
    null = _null_for(model) if cfg_scale != 1.0 else None
    grid = meanflow_times(steps, times)
    z = noise if noise.dtype == torch.float64 else noise.float()
    n = z.shape[0]
    indices: Any = range(len(grid) - 1)
    if progress:
        indices = tqdm(indices, desc="meanflow", leave=False)
    with labels_as_given(model):
        for i in indices:
            t_val, r_val = grid[i], grid[i + 1]
            t = torch.full((n,), t_val, device=z.device, dtype=z.dtype)
            h = torch.full((n,), t_val - r_val, device=z.device, dtype=z.dtype)
            u = _u_guided(model, z, t, y, h, cfg_scale, null)  # (N, C, H, W)
            z = z - (t_val - r_val) * u.to(z.dtype)
    return z


def meanflow_velocity_fn(model: torch.nn.Module, y: Tensor, cfg_scale: float = 1.0
                         ) -> Callable[[Tensor, Tensor], Tensor]:
    """A MeanFlow model as a SiT-convention velocity ``model_fn(x, t)`` for ``engine.sampling.integrators``'
    ODE/SDE integrators (with the default linear-path velocity transport).

    The instantaneous velocity is u with r = t (h = 0); SiT time s runs the other way
    (s = 1 - t, s = 1 data), so dx/ds = -u(x, t = 1 - s, t). Label dropout is not switched off
    here: call it on a model in eval mode.
    """
    check_meanflow_model(model)
    null = _null_for(model) if cfg_scale != 1.0 else None

    def model_fn(x: Tensor, s: Tensor) -> Tensor:
        t = 1.0 - s
        return -_u_guided(model, x, t, y, torch.zeros_like(t), cfg_scale, null).to(x.dtype)

    return model_fn
