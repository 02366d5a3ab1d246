"""SiT's objective: flow / interpolant training (see ``engine.diffusion.transport``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from engine.diffusion.transport import Transport, TransportConfig
from engine.objectives.base import _Base, _randn


@dataclass
class SiTObjective(_Base):
    """Flow / interpolant training of SiT models (see ``engine.diffusion.transport``)."""

    transport: TransportConfig = field(default_factory=TransportConfig)
    family: ClassVar[str] = "sit"

    def __post_init__(self) -> None:
        self._transport = Transport(self.transport)

    def grid_sampler(self, steps: int) -> dict[str, Any]:
        return {"kind": "ode", "method": "euler", "num_steps": steps}

    def sampling_transport(self) -> TransportConfig:
        return self.transport

    def compute(self, model: torch.nn.Module, x: Tensor, y: Tensor, t: Tensor, noise: Tensor,
                valid: Tensor | None = None, diagnostics: bool = False) -> dict[str, Tensor]:
        """The objective at given times t (N,) in [0, 1] and noise (N, C, H, W)."""
        x = x.float()
        x_t, u_t = self._transport.interpolate(t, noise, x)  # (N, C, H, W) each
        out, hidden, blocks = self._call_model(model, x_t, t, y)
        per_sample = self._transport.loss_per_sample(out, t, noise, x_t, u_t)  # (N,)
        return self._finish(per_sample, valid, hidden, blocks, {}, diagnostics)

    def __call__(self, model: torch.nn.Module, x: Tensor, y: Tensor, valid: Tensor | None = None,
                 generator: torch.Generator | None = None, diagnostics: bool = False) -> dict[str, Tensor]:
        noise = _randn(x.shape, x, generator)  # noise first, then t: the release's order
        t = self._transport.sample_time(x.shape[0], device=x.device, generator=generator)
        return self.compute(model, x, y, t, noise, valid, diagnostics)
