"""DiT's objective: DDPM training, mse(eps) + vb (see ``engine.diffusion.gaussian``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from engine.diffusion.gaussian import DiffusionConfig, GaussianDiffusion
from engine.objectives.base import _Base, _randn


@dataclass
class DiTObjective(_Base):
    """DDPM training of DiT models: mse(eps) + vb (see ``engine.diffusion.gaussian``)."""

    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    family: ClassVar[str] = "dit"

    def __post_init__(self) -> None:
        self._diffusion: GaussianDiffusion = self.diffusion.build()

    def grid_sampler(self, steps: int) -> dict[str, Any]:
        return {"kind": "ddim", "num_steps": steps}

    def compute(self, model: torch.nn.Module, x: Tensor, y: Tensor, t: Tensor, noise: Tensor,
                valid: Tensor | None = None, diagnostics: bool = False) -> dict[str, Tensor]:
        """The objective at given integer steps t (N,) and noise (N, C, H, W)."""
        x = x.float()
        x_t = self._diffusion.q_sample(x, t, noise)  # (N, C, H, W)
        out, hidden, blocks = self._call_model(model, x_t, self._diffusion.model_time(t), y)
        terms = self._diffusion.loss_terms(out, x, x_t, t, noise)  # each (N,)
        extras = {k: v for k, v in terms.items() if k != "loss"}
        return self._finish(terms["loss"], valid, hidden, blocks, extras, diagnostics)

    def __call__(self, model: torch.nn.Module, x: Tensor, y: Tensor, valid: Tensor | None = None,
                 generator: torch.Generator | None = None, diagnostics: bool = False) -> dict[str, Tensor]:
        device = generator.device if generator is not None else x.device
        # t first, then noise: the release's order
        t = torch.randint(0, self._diffusion.num_timesteps, (x.shape[0],), generator=generator,
                          device=device).to(x.device)
        noise = _randn(x.shape, x, generator)
        return self.compute(model, x, y, t, noise, valid, diagnostics)
