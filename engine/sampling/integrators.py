"""The integrators: SiT ODE/SDE and DiT DDPM/DDIM loops over a model function.

Everything here drives a *model function* ``model_fn(x, t) -> network output`` with x of
shape (N, C, H, W) and t of shape (N,) in the model's own time: flow time in [0, 1] for SiT
(0 noise, 1 data), the ORIGINAL timestep index 0..T-1 for DiT (T-1 noise, 0 data).
``engine.sampling.guidance.guided_model_fn`` turns a model and labels into one.

SiT grids follow the release: ``num_steps`` is the number of grid points
``linspace(t0, t1, num_steps)``, so the fixed-step ODE methods take num_steps - 1 steps;
the SDE takes num_steps - 1 stochastic steps and one last step from t1 to 1. Every ODE
method runs through torchdiffeq's ``odeint``, as the SiT release's sampler does, so the
fixed-grid methods are the release's own arithmetic. The default step count is
``RELEASE_STEPS`` (``SamplerConfig.default_steps`` says it per sampler kind).
"""

from __future__ import annotations

from enum import Enum
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from engine.config.checks import parse_choice
from engine.diffusion.gaussian import GaussianDiffusion
from engine.diffusion.transport import CheckMode, DiffusionForm, PathType, Transport, TransportConfig, expand_like

ModelFn = Callable[[Tensor, Tensor], Tensor]

RELEASE_STEPS = 250
"""Grid points / steps of the SiT and DiT sample scripts (``--num-sampling-steps``)."""


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
# Small helpers
# ---------------------------------------------------------------------------------------


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (CPU
    generators give the same numbers whatever device x is on)."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def _steps(n: int, progress: bool, desc: str):
    return tqdm(range(n), desc=desc, leave=False) if progress else range(n)


def _time_grid(t0: float, t1: float, num_steps: int, x: Tensor) -> Tensor:
    """linspace(t0, t1, num_steps): float32 built on the CPU as the release does (so the times
    match it bit for bit), float64 for a float64 state."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.linspace(t0, t1, num_steps, dtype=dtype).to(x.device)


def check_steps(num_steps: int, minimum: int = 2) -> None:
    """ValueError unless ``num_steps`` is an int >= ``minimum``."""
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
    (default ``RELEASE_STEPS``; atol/rtol unused); dopri5 adapts its steps to atol/rtol and
    returns the value at t1 (the grid's inner points would only be interpolated outputs, so
    they are not asked for: the result is the same). Returns the final state (N, C, H, W);
    the intermediate states are not kept.
    """
    from torchdiffeq import odeint  # lazy: it imports scipy (~0.4 s), and only the ODE needs it

    transport = transport if isinstance(transport, Transport) else Transport(transport)
    method = parse_choice(ODEMethod, method, "ODE method")
    num_steps = RELEASE_STEPS if num_steps is None else num_steps
    check_steps(num_steps)
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
    bar = tqdm(total=num_steps - 1, desc=f"ode-{method.value}", leave=False) if progress else None
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
    ``RELEASE_STEPS``), then the last step (``LastStep``) from t1 over ``last_step_size``.
    Returns the final state.
    """
    transport = transport if isinstance(transport, Transport) else Transport(transport)
    method = parse_choice(SDEMethod, method, "SDE method")
    last = parse_choice(LastStep, "none" if last_step is None else last_step, "SDE last step")
    form = parse_choice(DiffusionForm, diffusion_form, "diffusion form")
    num_steps = RELEASE_STEPS if num_steps is None else num_steps
    check_steps(num_steps)
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


__all__ = ["LastStep", "ModelFn", "ODEMethod", "RELEASE_STEPS", "SDEMethod", "check_steps", "randn_like",
           "sample_ddim", "sample_ddpm", "sample_ode", "sample_sde", "velocity_fn"]
