"""Training objectives with the Dispersive Loss regularizer, behind one interface.

    objective = build_objective("sit", transport=TransportConfig(),
                                dispersive=DispersiveConfig.preset("release"))
    out = objective(model, x, y, valid=None, generator=g)
    out["loss"].backward()

Every objective calls the model ONCE, with ``return_hidden`` set to the chosen blocks when
the regularizer is on, and returns

    loss                 scalar with grad: diffusion_loss + dispersive_total
    diffusion_loss       detached: mean over valid samples of the per-sample diffusion loss
    dispersive/block_k   detached: the dispersive loss of block k's output (0-based k), unweighted
    dispersive_total     detached: lambda * sum_k w_k * dispersive/block_k (0 when off)

plus family-specific detached extras (DiT: ``mse`` and ``vb``).

Padding: ``valid`` (bool (B,)) removes padded rows from the diffusion loss mean. The
dispersive term is computed on ALL rows, padded ones included: selecting rows by a mask
would need a host synchronisation (the count of valid rows) and a copy of every hidden
state; padded rows are rare (the last batch of an epoch) and repeat real samples.

Randomness (time steps and noise) comes from ``generator`` when given, else from the global
RNG, drawn on the generator's device; so a trainer that saves the generator state resumes
bit-identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

import models
from engine.objectives.dispersive import DispersiveConfig, dispersive_terms
from models import ModelConfig, unwrap_model


# ---------------------------------------------------------------------------------------
# The common interface
# ---------------------------------------------------------------------------------------


@runtime_checkable
class Objective(Protocol):
    """A training objective: one model call, a dict of scalars (see the module docstring)."""

    family: str
    dispersive: DispersiveConfig

    def __call__(self, model: torch.nn.Module, x: Tensor, y: Tensor, valid: Tensor | None = None,
                 generator: torch.Generator | None = None, diagnostics: bool = False) -> dict[str, Tensor]:
        """``diagnostics``: also the dispersive term's per-block diagnostics (log steps)."""

    def model_overrides(self) -> dict[str, Any]:
        """``models.create_model`` arguments the objective needs (MeanFlow: a second time input)."""

    def flops_per_image(self, config: ModelConfig) -> float:
        """Model FLOPs per training image (forward + backward), for throughput and MFU."""

    def grid_sampler(self, steps: int) -> dict[str, Any]:
        """``SamplerConfig`` fields for the trainer's sample grids (kept plain: objectives sit
        below the sampling package)."""

    def sampling_transport(self) -> Any:
        """The ``TransportConfig`` its samples are read with (None outside SiT)."""


def _masked_mean(per_sample: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return per_sample.mean()
    if valid.dtype != torch.bool or valid.shape != per_sample.shape:
        raise ValueError(f"valid must be a bool tensor of shape {tuple(per_sample.shape)}, "
                         f"got {valid.dtype} {tuple(valid.shape)}")
    w = valid.to(per_sample.dtype)
    # clamp: an all-padding batch gives 0 rather than NaN (no host sync to test for it)
    return (per_sample * w).sum() / w.sum().clamp(min=1.0)


def _randn(shape: Sequence[int], like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32).to(like.device)


@dataclass
class _Base:
    dispersive: DispersiveConfig = field(default_factory=DispersiveConfig)

    def model_overrides(self) -> dict[str, Any]:
        return {}

    def flops_per_image(self, config: ModelConfig) -> float:
        return models.flops_per_sample(config, backward=True)

    def sampling_transport(self) -> Any:
        return None

    def _call_model(self, model: torch.nn.Module, x_t: Tensor, t: Tensor, y: Tensor
                    ) -> tuple[Tensor, list[Tensor], list[tuple[int, float]]]:
        if not self.dispersive.enabled:
            return model(x_t, t, y), [], []
        depth = unwrap_model(model).config.depth
        blocks = self.dispersive.resolve(depth)
        out, hidden = model(x_t, t, y, return_hidden=[b for b, _ in blocks])
        return out, hidden, blocks

    def _finish(self, per_sample: Tensor, valid: Tensor | None, hidden: list[Tensor],
                blocks: list[tuple[int, float]], extras: dict[str, Tensor],
                diagnostics: bool = False) -> dict[str, Tensor]:
        diffusion_loss = _masked_mean(per_sample, valid)
        out: dict[str, Tensor] = {}
        if blocks:
            total, logs = dispersive_terms(hidden, blocks, self.dispersive, diagnostics)
            loss = diffusion_loss + total
            out.update(logs)
        else:
            total = torch.zeros((), device=per_sample.device)
            loss = diffusion_loss
        out["loss"] = loss
        out["diffusion_loss"] = diffusion_loss.detach()
        out["dispersive_total"] = total.detach()
        out.update({k: _masked_mean(v, valid).detach() for k, v in extras.items()})
        return out
