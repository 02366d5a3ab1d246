"""Samplers: SiT ODE/SDE integrators, DiT DDPM/DDIM loops, classifier-free guidance.

Everything here drives a *model function* ``model_fn(x, t) -> network output`` with x of
shape (N, C, H, W) and t of shape (N,) in the model's own time: flow time in [0, 1] for SiT
(0 noise, 1 data), the ORIGINAL timestep index 0..T-1 for DiT (T-1 noise, 0 data).
``guided_model_fn`` turns a model and labels into one, with or without guidance.

SiT grids follow the release: ``num_steps`` is the number of grid points
``linspace(t0, t1, num_steps)``, so the fixed-step ODE methods take num_steps - 1 steps;
the SDE takes num_steps - 1 stochastic steps and one last step from t1 to 1. Every ODE
method runs through torchdiffeq's ``odeint``, as the SiT release's sampler does, so the
fixed-grid methods are the release's own arithmetic. Default step counts have one owner,
``SamplerConfig.default_steps``: 250 (the SiT and DiT sample scripts' default) for every
sampler but MeanFlow's (1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

from models import unwrap_model
from engine.diffusion.gaussian import DiffusionConfig, GaussianDiffusion
from engine.sampling.meanflow import meanflow_velocity_fn, sample_meanflow
from engine.config.checks import parse_choice
from engine.diffusion.transport import CheckMode, DiffusionForm, PathType, Transport, TransportConfig, expand_like

ModelFn = Callable[[Tensor, Tensor], Tensor]


class SamplerKind(str, Enum):
    ODE = "ode"  # SiT: probability-flow ODE of the interpolant
    SDE = "sde"  # SiT: reverse SDE with a chosen diffusion coefficient
    DDPM = "ddpm"  # DiT: ancestral sampling
    DDIM = "ddim"  # DiT: DDIM with eta
    MEANFLOW = "meanflow"  # MeanFlow models: z_r = z_t - (t - r) u(z_t, r, t), num_steps evaluations


class ODEMethod(str, Enum):
    """ODE solvers, each torchdiffeq's method of the name in ``_ODEINT_METHOD`` (the name the
    SiT release passes to odeint as ``--sampling-method``)."""

    EULER = "euler"
    MIDPOINT = "midpoint"
    HEUN = "heun"  # explicit trapezoid (Heun's 2nd order): torchdiffeq's "heun2"
    RK4 = "rk4"  # torchdiffeq's fixed-grid "rk4": Kutta's 3/8-rule 4th order, not the classical 1/6-1/3 form
    DOPRI5 = "dopri5"  # adaptive Dormand-Prince 5(4)


_ODEINT_METHOD = {ODEMethod.EULER: "euler", ODEMethod.MIDPOINT: "midpoint", ODEMethod.HEUN: "heun2",
                  ODEMethod.RK4: "rk4", ODEMethod.DOPRI5: "dopri5"}


class SDEMethod(str, Enum):
    EULER = "euler"  # Euler-Maruyama
    HEUN = "heun"  # noise first, then a Heun drift step (the release's stochastic Heun)


class LastStep(str, Enum):
    """How the SDE covers [1 - last_step_size, 1] after its last stochastic step."""

    NONE = "none"  # stop at t1 (then t1 = 1 - sample_eps)
    MEAN = "mean"  # one deterministic step of the SDE drift (no noise)
    TWEEDIE = "tweedie"  # jump to E[x_data | x_t] = (x + sigma^2 score) / alpha
    EULER = "euler"  # one Euler step of the ODE velocity


# ---------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: out = uncond + scale * (cond - uncond)."""

    scale: float = 1.0
    """1 = no guidance (one conditional forward)."""
    channels: Literal["release", "all"] | int = "release"
    """"release": the first 3 output channels only (the releases' default, kept there for
    reproducibility; the other channels are the conditional prediction); "all": every
    channel (the standard form); an int k: the first k channels."""
    interval: tuple[float, float] | None = None
    """Guide only where t_lo <= t <= t_hi, in the model's time (SiT: flow time in [0, 1];
    DiT: original step index); elsewhere only the conditional prediction is computed."""

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) \
                or not math.isfinite(self.scale):
            raise ValueError(f"guidance scale must be a finite number, got {self.scale!r}")
        ch = self.channels
        if not (ch in ("release", "all") or (isinstance(ch, int) and not isinstance(ch, bool) and ch >= 1)):
            raise ValueError(f"guidance channels must be 'release', 'all' or an int >= 1, got {ch!r}")
        if self.interval is not None:
            lo, hi = (float(v) for v in self.interval)
            if not lo <= hi:
                raise ValueError(f"guidance interval needs t_lo <= t_hi, got {self.interval!r}")
            object.__setattr__(self, "interval", (lo, hi))

    @property
    def active(self) -> bool:
        return self.scale != 1.0

    @property
    def forward_channels(self) -> int | Literal["all"] | None:
        """The ``guidance_channels`` argument of ``model.forward_with_cfg``."""
        return None if self.channels == "release" else self.channels


def null_label(model: torch.nn.Module) -> int:
    """The null-class label of a model trained with label dropout; ValueError otherwise."""
    cfg = unwrap_model(model).config
    if cfg.class_dropout_prob <= 0:
        raise ValueError(
            f"classifier-free guidance needs a null class, but this model was built with "
            f"class_dropout_prob={cfg.class_dropout_prob} (its label table has only the "
            f"{cfg.num_classes} real classes): use guidance scale 1"
        )
    return cfg.num_classes


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
    null = null_label(model)
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


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (CPU
    generators give the same numbers whatever device x is on)."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def _progress_bar(n: int, desc: str):
    """A tqdm bar of n steps, advanced by the caller (``update()``); close it when done."""
    from tqdm.auto import tqdm

    return tqdm(total=n, desc=desc, leave=False)


def _steps(n: int, progress: bool, desc: str):
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc, leave=False)


def _time_grid(t0: float, t1: float, num_steps: int, x: Tensor) -> Tensor:
    """linspace(t0, t1, num_steps): float32 built on the CPU as the release does (so the times
    match it bit for bit), float64 for a float64 state."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.linspace(t0, t1, num_steps, dtype=dtype).to(x.device)


def _check_steps(num_steps: int, minimum: int = 2) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < minimum:
        raise ValueError(f"num_steps must be an int >= {minimum}, got {num_steps!r}")


# ---------------------------------------------------------------------------------------
# SiT: ODE
# ---------------------------------------------------------------------------------------


def velocity_fn(model_fn: ModelFn, transport: Transport) -> Callable[[Tensor, Tensor], Tensor]:
    """(x, t) -> dx/dt: the network output read as a velocity."""
    return lambda x, t: transport.velocity(model_fn(x, t), x, t)


@torch.no_grad()
def sample_ode(model_fn: ModelFn, x0: Tensor, transport: Transport | TransportConfig | None = None, *,
               method: ODEMethod | str = ODEMethod.DOPRI5, num_steps: int | None = None, atol: float = 1e-6,
               rtol: float = 1e-3, reverse: bool = False, progress: bool = False) -> Tensor:
    """Integrate the interpolant's ODE from noise x0 at t0 to data at t1 (or back, ``reverse``).

    As the SiT release: torchdiffeq's ``odeint`` with the method's torchdiffeq name
    (``ODEMethod``). Fixed-step methods step exactly on the grid linspace(t0, t1, num_steps)
    (default ``SamplerConfig.default_steps("ode")``; atol/rtol unused); dopri5 adapts its
    steps to atol/rtol and returns the value at t1 (the grid's inner points would only be
    interpolated outputs, so they are not asked for: the result is the same). Returns the
    final state (N, C, H, W); the intermediate states are not kept.
    """
    from torchdiffeq import odeint

    transport = transport if isinstance(transport, Transport) else Transport(transport)
    method = parse_choice(ODEMethod, method, "ODE method")
    num_steps = SamplerConfig.default_steps(SamplerKind.ODE) if num_steps is None else num_steps
    _check_steps(num_steps)
    t0, t1 = transport.config.interval(CheckMode.ODE)
    grid = _time_grid(t0, t1, num_steps, x0)
    if reverse:
        grid = grid.flip(0)
    f = velocity_fn(model_fn, transport)
    n = x0.shape[0]

    def rhs(t: Tensor, x: Tensor) -> Tensor:
        return f(x, torch.ones(n, device=x.device, dtype=grid.dtype) * t)  # t: (N,)

    ends = grid[[0, -1]]  # odeint's output times: only the final state is wanted
    if method is ODEMethod.DOPRI5:
        options = None
        if transport.config.path is PathType.VP:
            # Adaptive steps may overshoot the last output time and interpolate back; past
            # t = 1 the VP path has alpha > 1 and sigma = NaN, so make the steps end at t1.
            options = {"step_t": grid[-1:]}
        # tolerances as one-element lists, as the release passes them: its error norm then
        # rounds as the release's does (plain floats land ~2e-7 away on the fixture model)
        return odeint(rhs, x0, ends, method="dopri5", atol=[atol], rtol=[rtol], options=options)[-1]

    # The fixed-grid solver steps on every point of ``grid`` and reports only the ends.
    options = {"grid_constructor": lambda func, y0, t: grid}
    bar = _progress_bar(num_steps - 1, f"ode-{method.value}") if progress else None
    if bar is not None:
        rhs.callback_step = lambda t0, y0, dt: bar.update()  # torchdiffeq calls it once per step
    try:
        return odeint(rhs, x0, ends, method=_ODEINT_METHOD[method], atol=atol, rtol=rtol, options=options)[-1]
    finally:
        if bar is not None:
            bar.close()


# ---------------------------------------------------------------------------------------
# SiT: SDE
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def sample_sde(model_fn: ModelFn, x0: Tensor, transport: Transport | TransportConfig | None = None, *,
               method: SDEMethod | str = SDEMethod.EULER, num_steps: int | None = None,
               diffusion_form: DiffusionForm | str = DiffusionForm.SIGMA, diffusion_norm: float = 1.0,
               last_step: LastStep | str | None = LastStep.MEAN, last_step_size: float = 0.04,
               generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """dx = [v + w(t) score] dt + sqrt(2 w(t)) dW from noise x0 at t0 towards data at t = 1.

    num_steps - 1 stochastic steps on linspace(t0, t1, num_steps) (default
    ``SamplerConfig.default_steps("sde")``), then the last step (``LastStep``) from t1 over
    ``last_step_size``. Returns the final state.
    """
    transport = transport if isinstance(transport, Transport) else Transport(transport)
    method = parse_choice(SDEMethod, method, "SDE method")
    last = parse_choice(LastStep, "none" if last_step is None else last_step, "SDE last step")
    form = parse_choice(DiffusionForm, diffusion_form, "diffusion form")
    num_steps = SamplerConfig.default_steps(SamplerKind.SDE) if num_steps is None else num_steps
    _check_steps(num_steps)
    if last is LastStep.NONE:
        last_step_size = 0.0
    elif not 0 < last_step_size < 1:
        raise ValueError(f"last_step_size must be in (0, 1), got {last_step_size}")
    t0, t1 = transport.config.interval(CheckMode.SDE, diffusion_form=form, last_step_size=last_step_size)
    grid = _time_grid(t0, t1, num_steps, x0)
    dt = grid[1] - grid[0]
    n = x0.shape[0]

    def drift_and_w(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = model_fn(x, t)  # one model call gives both the velocity and the score
        w = transport.diffusion_coefficient(x, t, form, diffusion_norm)
        v = transport.velocity(out, x, t)
        # Where w vanishes (e.g. form "sigma" at t = 1) the score may be 0/0: the drift is v.
        noise_term = torch.where(w == 0, torch.zeros_like(v), w * transport.score(out, x, t))
        return v + noise_term, w, v

    x = x0
    for i in _steps(num_steps - 1, progress, f"sde-{method.value}"):
        t = torch.ones(n, device=x.device, dtype=grid.dtype) * grid[i]
        dw = randn_like(x, generator) * torch.sqrt(dt)
        if method is SDEMethod.EULER:
            drift, w, _ = drift_and_w(x, t)
            x = x + drift * dt + torch.sqrt(2 * w) * dw
        else:
            w = transport.diffusion_coefficient(x, t, form, diffusion_norm)
            x_hat = x + torch.sqrt(2 * w) * dw
            k1, _, _ = drift_and_w(x_hat, t)
            k2, _, _ = drift_and_w(x_hat + dt * k1, t + dt)
            x = x_hat + 0.5 * dt * (k1 + k2)

    t = torch.ones(n, device=x.device, dtype=grid.dtype) * t1
    if last is LastStep.MEAN:
        drift, _, _ = drift_and_w(x, t)
        x = x + drift * last_step_size
    elif last is LastStep.EULER:
        _, _, v = drift_and_w(x, t)
        x = x + v * last_step_size
    elif last is LastStep.TWEEDIE:
        c = transport.path.coefficients(expand_like(t, x))
        score = transport.score(model_fn(x, t), x, t)
        x = (x + c.sigma**2 * score) / c.alpha
    return x


# ---------------------------------------------------------------------------------------
# DiT: DDPM and DDIM
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def sample_ddpm(model_fn: ModelFn, x_T: Tensor, diffusion: GaussianDiffusion, *,
                clip_denoised: bool = False, generator: torch.Generator | None = None,
                progress: bool = False) -> Tensor:
    """Ancestral sampling over every step of ``diffusion`` (respace it for fewer steps)."""
    x = x_T
    n = x.shape[0]
    steps = diffusion.num_timesteps
    for j in _steps(steps, progress, "ddpm"):
        i = steps - 1 - j
        t = torch.full((n,), i, device=x.device, dtype=torch.long)
        p = diffusion.p_mean_variance(model_fn(x, diffusion.model_time(t)), x, t, clip_denoised)
        if i > 0:  # no noise on the last step
            x = p["mean"] + torch.exp(0.5 * p["log_variance"]) * randn_like(x, generator)
        else:
            x = p["mean"]
    return x


@torch.no_grad()
def sample_ddim(model_fn: ModelFn, x_T: Tensor, diffusion: GaussianDiffusion, *, eta: float = 0.0,
                clip_denoised: bool = False, generator: torch.Generator | None = None,
                progress: bool = False) -> Tensor:
    """DDIM over every step of ``diffusion``; eta = 0 is deterministic, eta = 1 ~ DDPM."""
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    x = x_T
    n = x.shape[0]
    steps = diffusion.num_timesteps
    for j in _steps(steps, progress, "ddim"):
        i = steps - 1 - j
        t = torch.full((n,), i, device=x.device, dtype=torch.long)
        p = diffusion.p_mean_variance(model_fn(x, diffusion.model_time(t)), x, t, clip_denoised)
        # eps re-derived from the (possibly clipped) x0 prediction, as the releases do
        eps = diffusion.predict_eps(x, t, p["pred_xstart"])
        a_bar = diffusion.extract(diffusion.alphas_cumprod, t, x)
        a_prev = diffusion.extract(diffusion.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_bar)) * torch.sqrt(1 - a_bar / a_prev)
        x = p["pred_xstart"] * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev - sigma**2) * eps
        if eta > 0 and i > 0:
            x = x + sigma * randn_like(x, generator)
    return x


# ---------------------------------------------------------------------------------------
# One entry point for every sampler
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerConfig:
    """Which sampler and its settings; defaults follow the releases' evaluation settings."""

    kind: SamplerKind = SamplerKind.ODE
    """"ode" or "sde" (SiT models), "ddpm" or "ddim" (DiT models)."""
    method: ODEMethod | SDEMethod | None = None
    """ODE: euler, midpoint, heun, rk4, dopri5 (default); SDE: euler (default), heun."""
    num_steps: int | None = None
    """SiT: grid points (adaptive dopri5 ignores it); DiT: respaced steps (default
    respacing str(num_steps)); MeanFlow: model evaluations. None (the default) resolves to
    ``default_steps(kind)`` when the config is built, so it is always an int afterwards."""
    atol: float = 1e-6
    rtol: float = 1e-3
    diffusion_form: DiffusionForm = DiffusionForm.SIGMA
    diffusion_norm: float = 1.0
    last_step: LastStep = LastStep.MEAN
    last_step_size: float = 0.04
    eta: float = 0.0
    """DDIM noise level."""
    clip_denoised: bool = False
    """DiT: clamp the x0 prediction to [-1, 1] (off for latents)."""
    respacing: str | None = None
    """DiT: timestep respacing ("K", "K1,K2,..", "ddimK"); None = str(num_steps)."""

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
        _check_steps(self.num_steps, 1 if kind in (SamplerKind.DDPM, SamplerKind.DDIM, SamplerKind.MEANFLOW) else 2)

    @property
    def family(self) -> str:
        return "sit" if self.kind in (SamplerKind.ODE, SamplerKind.SDE, SamplerKind.MEANFLOW) else "dit"

    @staticmethod
    def default_steps(kind: SamplerKind | str) -> int:
        """The default ``num_steps`` of a sampler kind: 250 for SiT's ODE and SDE (the SiT
        sample scripts' ``--num-sampling-steps``) and DiT's DDPM and DDIM (DiT's), 1 for
        MeanFlow (one-step generation)."""
        kind = parse_choice(SamplerKind, kind, "sampler")
        return 1 if kind is SamplerKind.MEANFLOW else 250

    @classmethod
    def default_for(cls, family: str) -> "SamplerConfig":
        """SiT: dopri5 ODE (atol 1e-6, rtol 1e-3); DiT: 250-step DDPM."""
        if family == "sit":
            return cls(kind=SamplerKind.ODE)
        if family == "dit":
            return cls(kind=SamplerKind.DDPM)
        raise ValueError(f"unknown model family {family!r}; valid: 'sit', 'dit'")


def sample_latents(model: torch.nn.Module, y: Tensor, noise: Tensor, *,
                   sampler: SamplerConfig | None = None, guidance: Guidance | None = None,
                   transport: TransportConfig | None = None, diffusion: DiffusionConfig | None = None,
                   generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """Class-conditional latents (N, C, H, W) from starting noise (N, C, H, W) and labels (N,).

    SiT models take ``transport`` (the training path/prediction; default linear velocity),
    DiT models ``diffusion`` (default the release's). ``generator`` drives SDE/DDPM/DDIM noise.
    """
    model_cfg = unwrap_model(model).config
    family = model_cfg.family
    if model_cfg.second_time_input and (sampler is None or sampler.kind is SamplerKind.MEANFLOW):
        # a MeanFlow model: 1 step unless told otherwise
        steps = sampler.num_steps if sampler else SamplerConfig.default_steps(SamplerKind.MEANFLOW)
        return sample_meanflow(model, y, noise, steps=steps,
                               cfg_scale=guidance.scale if guidance is not None else 1.0, progress=progress)
    if sampler is not None and sampler.kind is SamplerKind.MEANFLOW:
        raise ValueError("sampler 'meanflow' needs a MeanFlow model (second_time_input=True)")
    sampler = sampler or SamplerConfig.default_for(family)
    if sampler.family != family:
        raise ValueError(f"sampler {sampler.kind.value!r} is for {sampler.family.upper()} models, "
                         f"but this is a {family.upper()} model")
    if noise.shape[0] != y.shape[0]:
        raise ValueError(f"noise has {noise.shape[0]} rows but y has {y.shape[0]}")
    if model_cfg.second_time_input:  # a MeanFlow model's instantaneous velocity u(z, t, t)
        model_fn = meanflow_velocity_fn(model, y, guidance.scale if guidance is not None else 1.0)
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
    diffusion = diffusion or DiffusionConfig(learn_sigma=unwrap_model(model).config.learn_sigma)
    spaced = diffusion.build(sampler.respacing if sampler.respacing is not None else str(sampler.num_steps))
    if sampler.kind is SamplerKind.DDPM:
        return sample_ddpm(model_fn, noise, spaced, clip_denoised=sampler.clip_denoised,
                           generator=generator, progress=progress)
    return sample_ddim(model_fn, noise, spaced, eta=sampler.eta, clip_denoised=sampler.clip_denoised,
                       generator=generator, progress=progress)


__all__: Sequence[str] = [
    "Guidance", "LastStep", "ModelFn", "ODEMethod", "SDEMethod", "SamplerConfig", "SamplerKind",
    "guided_model_fn", "null_label", "randn_like", "sample_ddim", "sample_ddpm", "sample_latents",
    "sample_ode", "sample_sde", "velocity_fn",
]
