"""Classifier-free guidance: its settings (``Guidance``) and the guided model function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from engine.config.checks import fail, number
from engine.sampling.integrators import ModelFn
from models import ModelConfig, unwrap_model


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: out = uncond + scale * (cond - uncond)."""

    cli_names: ClassVar[dict[str, str]] = {"scale": "cfg_scale", "channels": "guidance_channels",
                                           "interval": "guidance_interval"}

    scale: float = 1.0
    """Guidance scale; 1 = no guidance (one conditional forward)."""
    channels: Literal["release", "all"] | int = "release"
    """"release": the first 3 output channels only (the releases' default, kept there for
    reproducibility; the other channels are the conditional prediction); "all": every
    channel (the standard form); an int k: the first k channels."""
    interval: tuple[float, float] | None = None
    """T_LO T_HI: guide only where t_lo <= t <= t_hi, in the model's time (SiT: flow time in
    [0, 1]; DiT: original step index); elsewhere only the conditional prediction is computed."""

    def __post_init__(self) -> None:
        number("Guidance", "scale", self.scale)
        ch = self.channels
        if not (ch in ("release", "all") or (isinstance(ch, int) and not isinstance(ch, bool) and ch >= 1)):
            raise fail("Guidance", "channels", "'release', 'all' or an int >= 1", ch)
        if self.interval is not None:
            rule = "(t_lo, t_hi) with t_lo <= t_hi"
            try:
                lo, hi = (number("Guidance", "interval", v) for v in self.interval)
            except (TypeError, ValueError):
                raise fail("Guidance", "interval", rule, self.interval) from None
            if not lo <= hi:
                raise fail("Guidance", "interval", rule, self.interval)
            object.__setattr__(self, "interval", (lo, hi))

    @property
    def active(self) -> bool:
        return self.scale != 1.0

    @property
    def forward_channels(self) -> int | Literal["all"] | None:
        """The ``guidance_channels`` argument of ``model.forward_with_cfg``."""
        return None if self.channels == "release" else self.channels

    def null_class(self, model_cfg: ModelConfig) -> int | None:
        """The null-class label this guidance needs of a model (None when inactive); a
        ValueError, before any work, when the model has none (``ModelConfig.require_null_class``)."""
        if not self.active:
            return None
        return model_cfg.require_null_class(f"classifier-free guidance at scale {self.scale:g} "
                                            "(scale 1 needs none)")


def guided_model_fn(model: torch.nn.Module, y: Tensor, guidance: Guidance | None = None, *,
                    layout: Literal["paired", "release"] = "paired") -> ModelFn:
    """model_fn(x, t) for labels y, guided as ``guidance`` says.

    layout "paired" (default): x and y hold the N samples themselves; each guided call runs
    the model once on 2N rows ([x, x] with [y, null]) and returns the N guided outputs.
    layout "release": the releases' convention, x and y already hold 2N rows whose second
    half carries the null label; the state's second half rides along (and is discarded by
    the caller). Both give the same first-half samples.

    With an interval, whether t is inside is decided on the host from t[0] (one device sync
    per model call; all rows of a sampler step share t).
    """
    guidance = guidance or Guidance()
    inner = unwrap_model(model)
    if not guidance.active:
        return lambda x, t: model(x, t, y)
    null = guidance.null_class(inner.config)
    chans = guidance.forward_channels

    def inside(t: Tensor) -> bool:
        if guidance.interval is None:
            return True
        t0 = float(t.reshape(-1)[0])  # host sync: decides whether to pay for the uncond pass
        return guidance.interval[0] <= t0 <= guidance.interval[1]

    if layout == "release":
        def release_fn(x: Tensor, t: Tensor) -> Tensor:
            if not inside(t):
                return model(x, t, y)
            return inner.forward_with_cfg(x, t, y, guidance.scale, guidance_channels=chans)
        return release_fn
    if layout != "paired":
        raise ValueError(f"unknown guidance layout {layout!r}; valid: 'paired', 'release'")
    y_pair = torch.cat([y, torch.full_like(y, null)])  # (2N,)

    def paired_fn(x: Tensor, t: Tensor) -> Tensor:
        if not inside(t):
            return model(x, t, y)  # (N, C, H, W)
        n = x.shape[0]
        out = inner.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), y_pair, guidance.scale,
                                     guidance_channels=chans)  # (2N, C, H, W)
        return out[:n]

    return paired_fn


__all__ = ["Guidance", "guided_model_fn"]
