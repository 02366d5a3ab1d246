"""DiT objective: discrete Gaussian diffusion (DDPM) with timestep respacing.

Conventions (those of the DiT release, which inherits them from ADM / improved DDPM):
  * T = 1000 steps, linear betas 1e-4 .. 0.02 (scaled by 1000 / T for other T), or the
    cosine schedule; t = 0 is the least noisy step, t = T - 1 pure noise.
  * the network predicts epsilon; with ``learn_sigma`` it also outputs v in [-1, 1] per
    element and the variance is the log-space mix
    ``log var = (v + 1)/2 * log beta_t + (1 - v)/2 * log beta~_t`` ("learned range").
  * training loss per sample = mse(eps) + vb, where vb is the variational bound term in
    bits per dimension: the decoder's discretized Gaussian log-likelihood at t = 0 and
    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) otherwise. vb sees a *detached* mean
    ("frozen mean"), so it trains only the variance and mse alone trains the mean.
  * every schedule table is computed in float64 and rounded to float32 when indexed.

Respacing (``respace``) keeps a subset of the original steps and recomputes betas so the
kept steps have the same alphas_cumprod; the network is still called with the ORIGINAL
timestep indices (``timestep_map``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from itertools import accumulate, repeat
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from engine.config.checks import parse_choice
from engine.diffusion.transport import mean_flat


class NoiseSchedule(str, Enum):
    LINEAR = "linear"
    COSINE = "cosine"  # Nichol & Dhariwal's squared-cosine alpha_bar


class VarianceType(str, Enum):
    LEARNED_RANGE = "learned_range"  # network outputs the mix between beta and beta~
    FIXED_SMALL = "fixed_small"  # posterior variance beta~_t
    FIXED_LARGE = "fixed_large"  # beta_t (with beta~_1 at t = 0 for a usable log)


def linear_betas(num_timesteps: int) -> np.ndarray:
    scale = 1000.0 / num_timesteps  # keeps the total noise of the 1000-step schedule
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.array(betas, dtype=np.float64)


@dataclass(frozen=True)
class DiffusionConfig:
    """The DiT training diffusion; defaults reproduce the release (create_diffusion(""))."""

    num_timesteps: int = 1000
    """Number of diffusion steps T of the training schedule."""
    schedule: NoiseSchedule = NoiseSchedule.LINEAR
    """"linear" (DiT) or "cosine"."""
    learn_sigma: bool = True
    """The network also outputs the variance interpolation (2x channels); adds the vb term."""
    sigma_small: bool = False
    """Without learn_sigma: use the posterior variance (True) or beta_t (False, DiT)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", parse_choice(NoiseSchedule, self.schedule, "noise schedule"))
        if isinstance(self.num_timesteps, bool) or not isinstance(self.num_timesteps, int) \
                or self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {self.num_timesteps!r}")

    @property
    def variance_type(self) -> VarianceType:
        if self.learn_sigma:
            return VarianceType.LEARNED_RANGE
        return VarianceType.FIXED_SMALL if self.sigma_small else VarianceType.FIXED_LARGE

    def betas(self) -> np.ndarray:
        if self.schedule is NoiseSchedule.LINEAR:
            return linear_betas(self.num_timesteps)
        return cosine_betas(self.num_timesteps)

    def build(self, respacing: str | Sequence[int] | None = None) -> "GaussianDiffusion":
        """The diffusion, respaced when ``respacing`` is given (see ``space_timesteps``)."""
        base = GaussianDiffusion(self.betas(), self.variance_type)
        if respacing is None or respacing == "":
            return base
        return base.respace(space_timesteps(self.num_timesteps, respacing))


def space_timesteps(num_timesteps: int, spec: str | int | Sequence[int]) -> list[int]:
    """The original steps to keep, sorted; the same steps as DiT's ``space_timesteps``.

    spec: an int or "K" -> K steps over [0, T-1], ends included; "K1,K2,..." -> the T steps
    cut into len(counts) sections (the first T % len(counts) one step longer), K_i steps
    from section i; "ddimK" -> every s-th step from 0, for the smallest integer stride s in
    1..T-1 that gives exactly K steps (the strides DiT tries; ValueError when none does).

    Within a section of ``size`` steps, K > 1 steps sit at offsets round(o) for o = 0, d,
    d + d, ... with d = (size - 1) / (K - 1): the offsets are running float sums, as in DiT,
    not j * d, and the two round differently for some counts (21 of 1000 keeps step 499 this
    way, 500 the other). Python's round (halves to even) throughout. K = 1 keeps the
    section's first step.
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        counts = [spec]
    elif isinstance(spec, str):
        text = spec.strip().lower()
        if text.startswith("ddim"):
            return _ddim_steps(num_timesteps, text[4:], spec)
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(
                f"bad timestep respacing {spec!r}: use 'K', 'K1,K2,...' or 'ddimK'"
            ) from None
    else:
        counts = [int(c) for c in spec]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"timestep respacing needs positive counts, got {spec!r}")
    base, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        offsets = accumulate(repeat(stride, count - 1), initial=0.0)  # 0, d, d + d, ...
        kept += [start + round(o) for o in offsets]
        start += size
    return sorted(set(kept))


def _ddim_steps(num_timesteps: int, count_text: str, spec: str) -> list[int]:
    """range(0, T, s) for the smallest stride s in 1..T-1 giving int(count_text) steps."""
    try:
        want = int(count_text)
    except ValueError:
        raise ValueError(f"bad timestep respacing {spec!r}: 'ddimK' needs an integer K") from None
    lengths = {stride: len(range(0, num_timesteps, stride)) for stride in range(1, num_timesteps)}
    for stride, length in lengths.items():
        if length == want:
            return list(range(0, num_timesteps, stride))
    lower = max((n for n in lengths.values() if n < want), default=None)
    higher = min((n for n in lengths.values() if n > want), default=None)
    near = " or ".join(f"ddim{n}" for n in (lower, higher) if n is not None)
    raise ValueError(
        f"{spec!r}: no integer stride in 1..{num_timesteps - 1} keeps exactly {want} of "
        f"{num_timesteps} steps" + (f" (nearest that exist: {near})" if near else "")
    )


# ---------------------------------------------------------------------------------------
# Likelihood helpers
# ---------------------------------------------------------------------------------------


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Phi(x) through the tanh approximation used by the releases (matches their numbers)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) for data quantised to 256 bins on [-1, 1] under N(means, e^(2 log_scales)).

    The end bins extend to -inf / +inf (x below -0.999 or above 0.999).
    """
    inv_std = torch.exp(-log_scales)
    centred = x - means
    cdf_upper = approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_upper = torch.log(cdf_upper.clamp(min=1e-12))  # bin [-inf, x + 1/255]
    log_lower_tail = torch.log((1.0 - cdf_lower).clamp(min=1e-12))  # bin [x - 1/255, inf]
    log_bin = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_upper, torch.where(x > 0.999, log_lower_tail, log_bin))


# ---------------------------------------------------------------------------------------
# The diffusion
# ---------------------------------------------------------------------------------------


class GaussianDiffusion:
    """Tables and per-step formulas of a (possibly respaced) DDPM."""

    def __init__(self, betas: np.ndarray, variance_type: VarianceType | str = VarianceType.LEARNED_RANGE,
                 timestep_map: Sequence[int] | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.variance_type = parse_choice(VarianceType, variance_type, "variance type")
        self._device_tables: dict[tuple[int, torch.device], Tensor] = {}
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = list(range(len(betas))) if timestep_map is None else list(timestep_map)
        if len(self.timestep_map) != len(betas):
            raise ValueError("timestep_map must have one entry per beta")

        alphas = 1.0 - betas
        acp = np.cumprod(alphas)
        acp_prev = np.append(1.0, acp[:-1])
        self.alphas_cumprod = acp
        self.alphas_cumprod_prev = acp_prev
        self.sqrt_alphas_cumprod = np.sqrt(acp)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1)
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t)
        self.posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        # beta~_0 = 0: use beta~_1 in its place so the log stays finite.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
            if len(betas) > 1 else np.array([self.betas[0]])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(acp_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)
        self.log_betas = np.log(betas)
        # "fixed large" variance: beta_t, with beta~_1 at t = 0 (a better decoder variance)
        self.log_variance_large = (np.log(np.append(self.posterior_variance[1], betas[1:]))
                                   if len(betas) > 1 else self.log_betas)

    # ---- respacing -------------------------------------------------------------------
    def respace(self, keep: Sequence[int]) -> "GaussianDiffusion":
        """A diffusion over the kept steps with the same alphas_cumprod at each of them."""
        keep = sorted(set(int(k) for k in keep))
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"kept steps must lie in [0, {self.num_timesteps - 1}], got {keep[:5]}...")
        betas, last = [], 1.0
        for k in keep:
            betas.append(1.0 - self.alphas_cumprod[k] / last)
            last = self.alphas_cumprod[k]
        return GaussianDiffusion(np.array(betas), self.variance_type,
                                 [self.timestep_map[k] for k in keep])

    def model_time(self, t: Tensor) -> Tensor:
        """Original timestep indices (what the network was trained with) for local steps t."""
        key = (id(self.timestep_map), t.device)
        table = self._device_tables.get(key)
        if table is None:
            table = self._device_tables[key] = torch.tensor(self.timestep_map, device=t.device)
        return table[t]  # int64 original indices

    # ---- table lookup ------------------------------------------------------------------
    def extract(self, table: np.ndarray, t: Tensor, like: Tensor) -> Tensor:
        """table[t] as float32, broadcastable against ``like`` (N, ...).

        Indexed in float64 and then rounded, as the releases do; each table is copied to a
        device once and kept (no host-to-device copy per training step).
        """
        key = (id(table), t.device)
        on_device = self._device_tables.get(key)
        if on_device is None:
            on_device = self._device_tables[key] = torch.from_numpy(table).to(t.device)
        vals = on_device[t].float()
        return vals.reshape(t.shape[0], *([1] * (like.dim() - 1)))

    # ---- forward process -------------------------------------------------------------
    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return (self.extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, clipped log variance) of q(x_{t-1} | x_t, x_0)."""
        mean = (self.extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self.extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, self.extract(self.posterior_log_variance_clipped, t, x_t)

    def predict_xstart(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps(self, x_t: Tensor, t: Tensor, x_start: Tensor) -> Tensor:
        return ((self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x_start)
                / self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    # ---- reverse process -------------------------------------------------------------
    def p_mean_variance(self, output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = False,
                        denoised_fn: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) from the network output (N, C or 2C, H, W) at local steps t.

        Returns mean, log_variance and pred_xstart (N, C, H, W).
        """
        c = x_t.shape[1]
        output = output.float()
        if self.variance_type is VarianceType.LEARNED_RANGE:
            if output.shape[1] != 2 * c:
                raise ValueError(
                    f"learned-range variance needs {2 * c} output channels (eps and v), got "
                    f"{output.shape[1]}: was the model built with learn_sigma=True?"
                )
            eps, v = output[:, :c], output[:, c:]
            lo = self.extract(self.posterior_log_variance_clipped, t, x_t)
            hi = self.extract(self.log_betas, t, x_t)
            frac = (v + 1) / 2
            log_variance = frac * hi + (1 - frac) * lo
        else:
            eps = output[:, :c]
            table = (self.log_variance_large if self.variance_type is VarianceType.FIXED_LARGE
                     else self.posterior_log_variance_clipped)
            log_variance = self.extract(table, t, x_t).expand_as(x_t)
        x_start = self.predict_xstart(x_t, t, eps)
        if denoised_fn is not None:
            x_start = denoised_fn(x_start)
        if clip_denoised:
            x_start = x_start.clamp(-1, 1)
        mean, _ = self.q_posterior(x_start, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": x_start}

    # ---- training ----------------------------------------------------------------------
    def vb_terms_bpd(self, output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The bound term (N,) in bits/dim: decoder NLL at t = 0, KL to the posterior otherwise."""
        true_mean, true_log_var = self.q_posterior(x_start, x_t, t)
        p = self.p_mean_variance(output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, p["mean"], 0.5 * p["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def loss_terms(self, output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor,
                   noise: Tensor) -> dict[str, Tensor]:
        """Per-sample ``loss`` = ``mse`` (+ ``vb`` with a learned variance), each (N,).

        ``output`` is the network's prediction at (x_t, model_time(t)).
        """
        c = x_t.shape[1]
        output = output.float()
        eps = output[:, :c]
        terms = {"mse": mean_flat((noise - eps) ** 2)}
        if self.variance_type is VarianceType.LEARNED_RANGE:
            # Frozen mean: the bound sees a detached eps, so it only trains the variance half.
            frozen = torch.cat([eps.detach(), output[:, c:]], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms
