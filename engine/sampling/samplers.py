"""Which sampler, with which settings (``SamplerConfig``), and the one entry point that runs it.

The integrators themselves live in ``engine.sampling.integrators`` (SiT ODE/SDE, DiT
DDPM/DDIM), MeanFlow's few-step sampler in ``engine.sampling.meanflow``, classifier-free
guidance in ``engine.sampling.guidance``. Default step counts have one owner,
``SamplerConfig.default_steps``: 250 (the SiT and DiT sample scripts' default) for every
sampler but MeanFlow's (1); the default sampler of a model, ``SamplerConfig.for_model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor

from engine.config.checks import parse_choice
from engine.diffusion.gaussian import DiffusionConfig
from engine.diffusion.transport import DiffusionForm, Transport, TransportConfig
from engine.sampling.guidance import Guidance, guided_model_fn
from engine.sampling.integrators import (RELEASE_STEPS, LastStep, ODEMethod, SDEMethod, check_steps, sample_ddim,
                                         sample_ddpm, sample_ode, sample_sde)
from engine.sampling.meanflow import meanflow_velocity_fn, sample_meanflow
from models import ModelConfig, unwrap_model


class SamplerKind(str, Enum):
    ODE = "ode"  # SiT: probability-flow ODE of the interpolant
    SDE = "sde"  # SiT: reverse SDE with a chosen diffusion coefficient
    DDPM = "ddpm"  # DiT: ancestral sampling
    DDIM = "ddim"  # DiT: DDIM with eta
    MEANFLOW = "meanflow"  # MeanFlow models: z_r = z_t - (t - r) u(z_t, r, t), num_steps evaluations


@dataclass(frozen=True)
class SamplerConfig:
    """Which sampler and its settings; defaults follow the releases' evaluation settings."""

    cli_names: ClassVar[dict[str, str]] = {"kind": "sampler"}
    cli_defaults: ClassVar[dict[str, str]] = {  # what --help shows where the default depends on the model
        "kind": "the model's: ode for SiT, ddpm for DiT, meanflow for a MeanFlow model",
        "method": "dopri5 for ode, euler for sde",
        "num_steps": f"{RELEASE_STEPS}; 1 for meanflow",
    }

    kind: SamplerKind = SamplerKind.ODE
    """"ode" or "sde" (SiT models), "ddpm" or "ddim" (DiT models), "meanflow" (MeanFlow models)."""
    method: ODEMethod | SDEMethod | None = None
    """ODE: euler, midpoint, heun, rk4, dopri5; SDE: euler, heun."""
    num_steps: int | None = None
    """SiT ODE/SDE: grid points (adaptive dopri5 adapts its own steps); DiT: respaced steps
    (default respacing str(num_steps)); MeanFlow: network evaluations. None becomes
    ``default_steps(kind)`` when the config is built (an int afterwards)."""
    atol: float = 1e-6
    """dopri5: absolute tolerance."""
    rtol: float = 1e-3
    """dopri5: relative tolerance."""
    diffusion_form: DiffusionForm = DiffusionForm.SIGMA
    """SDE: the diffusion coefficient w(t)."""
    diffusion_norm: float = 1.0
    """SDE: scale of w(t)."""
    last_step: LastStep = LastStep.MEAN
    """SDE: how the last stretch [t1, 1] is covered."""
    last_step_size: float = 0.04
    """SDE: length of that last stretch."""
    eta: float = 0.0
    """DDIM noise level."""
    clip_denoised: bool = False
    """DiT: clamp the x0 prediction to [-1, 1] (off for latents)."""
    respacing: str | None = None
    """DiT timestep respacing ("K", "K1,K2,..", "ddimK"); None = str(num_steps)."""

    def __post_init__(self) -> None:
        kind = parse_choice(SamplerKind, self.kind, "sampler")
        object.__setattr__(self, "kind", kind)
        if kind is SamplerKind.ODE:
            object.__setattr__(self, "method", parse_choice(ODEMethod, self.method or "dopri5", "ODE method"))
        elif kind is SamplerKind.SDE:
            object.__setattr__(self, "method", parse_choice(SDEMethod, self.method or "euler", "SDE method"))
        elif self.method is not None:
            raise ValueError(f"sampler {kind.value!r} takes no method (got {self.method!r})")
        if self.num_steps is None:
            object.__setattr__(self, "num_steps", self.default_steps(kind))
        object.__setattr__(self, "diffusion_form",
                           parse_choice(DiffusionForm, self.diffusion_form, "diffusion form"))
        object.__setattr__(self, "last_step", parse_choice(
            LastStep, "none" if self.last_step is None else self.last_step, "SDE last step"))
        check_steps(self.num_steps, 1 if kind in (SamplerKind.DDPM, SamplerKind.DDIM, SamplerKind.MEANFLOW) else 2)

    @property
    def family(self) -> str:
        return "sit" if self.kind in (SamplerKind.ODE, SamplerKind.SDE, SamplerKind.MEANFLOW) else "dit"

    @staticmethod
    def default_steps(kind: SamplerKind | str) -> int:
        """The default ``num_steps`` of a sampler kind: ``RELEASE_STEPS`` (250) for SiT's ODE
        and SDE (the SiT sample scripts' ``--num-sampling-steps``) and DiT's DDPM and DDIM
        (DiT's), 1 for MeanFlow (one-step generation)."""
        kind = parse_choice(SamplerKind, kind, "sampler")
        return 1 if kind is SamplerKind.MEANFLOW else RELEASE_STEPS

    @classmethod
    def default_for(cls, family: str) -> "SamplerConfig":
        """SiT: dopri5 ODE (atol 1e-6, rtol 1e-3); DiT: 250-step DDPM."""
        if family == "sit":
            return cls(kind=SamplerKind.ODE)
        if family == "dit":
            return cls(kind=SamplerKind.DDPM)
        raise ValueError(f"unknown model family {family!r}; valid: 'sit', 'dit'")

    @classmethod
    def for_model(cls, model_cfg: ModelConfig, **given: Any) -> "SamplerConfig":
        """The settings ``given`` (field -> value) for a model; ``kind`` defaults to the model's
        own sampler (meanflow for a MeanFlow model, else ``default_for(model_cfg.family)``) and
        the other fields to the chosen kind's defaults."""
        if "kind" not in given:
            given["kind"] = SamplerKind.MEANFLOW if model_cfg.second_time_input \
                else cls.default_for(model_cfg.family).kind
        return cls(**given)

    def check_model(self, model_cfg: ModelConfig) -> None:
        """ValueError unless this sampler fits the model (its family; meanflow: a MeanFlow model)."""
        if self.kind is SamplerKind.MEANFLOW and not model_cfg.second_time_input:
            raise ValueError("sampler 'meanflow' needs a MeanFlow model (second_time_input=True)")
        if self.family != model_cfg.family:
            raise ValueError(f"sampler {self.kind.value!r} is for {self.family.upper()} models, "
                             f"but this is a {model_cfg.family.upper()} model")


def sample_latents(model: torch.nn.Module, y: Tensor, noise: Tensor, *,
                   sampler: SamplerConfig | None = None, guidance: Guidance | None = None,
                   transport: TransportConfig | None = None, diffusion: DiffusionConfig | None = None,
                   generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """Class-conditional latents (N, C, H, W) from starting noise (N, C, H, W) and labels (N,).

    ``sampler`` defaults to the model's own (``SamplerConfig.for_model``). SiT models take
    ``transport`` (the training path/prediction; default linear velocity), DiT models
    ``diffusion`` (default the release's). ``generator`` drives SDE/DDPM/DDIM noise.
    """
    model_cfg = unwrap_model(model).config
    sampler = sampler or SamplerConfig.for_model(model_cfg)
    sampler.check_model(model_cfg)
    scale = guidance.scale if guidance is not None else 1.0
    if sampler.kind is SamplerKind.MEANFLOW:
        return sample_meanflow(model, y, noise, steps=sampler.num_steps, cfg_scale=scale, progress=progress)
    if noise.shape[0] != y.shape[0]:
        raise ValueError(f"noise has {noise.shape[0]} rows but y has {y.shape[0]}")
    if model_cfg.second_time_input:  # a MeanFlow model's instantaneous velocity u(z, t, t)
        model_fn = meanflow_velocity_fn(model, y, scale)
    else:
        model_fn = guided_model_fn(model, y, guidance)
    if sampler.kind is SamplerKind.ODE:
        return sample_ode(model_fn, noise, Transport(transport), method=sampler.method,
                          num_steps=sampler.num_steps, atol=sampler.atol, rtol=sampler.rtol,
                          progress=progress)
    if sampler.kind is SamplerKind.SDE:
        return sample_sde(model_fn, noise, Transport(transport), method=sampler.method,
                          num_steps=sampler.num_steps, diffusion_form=sampler.diffusion_form,
                          diffusion_norm=sampler.diffusion_norm, last_step=sampler.last_step,
                          last_step_size=sampler.last_step_size, generator=generator, progress=progress)
    diffusion = diffusion or DiffusionConfig(learn_sigma=model_cfg.learn_sigma)
    spaced = diffusion.build(sampler.respacing if sampler.respacing is not None else str(sampler.num_steps))
    if sampler.kind is SamplerKind.DDPM:
        return sample_ddpm(model_fn, noise, spaced, clip_denoised=sampler.clip_denoised,
                           generator=generator, progress=progress)
    return sample_ddim(model_fn, noise, spaced, eta=sampler.eta, clip_denoised=sampler.clip_denoised,
                       generator=generator, progress=progress)


__all__ = ["SamplerConfig", "SamplerKind", "sample_latents"]
