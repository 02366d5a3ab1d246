"""SiT objectives: stochastic-interpolant paths, what the network predicts, loss weights.

Time convention (as in the SiT release): ``x_t = alpha_t * x_data + sigma_t * noise`` with
t = 0 pure noise and t = 1 data; sampling integrates from t = 0 to t = 1.

Paths (``PathType``):
  * ``linear``: alpha_t = t, sigma_t = 1 - t (rectified flow / flow matching);
  * ``gvp``: alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2) (variance preserving, trig);
  * ``vp``: the VP-SDE interpolant with a linear beta from ``vp_beta_min`` (at t = 1) to
    ``vp_beta_max`` (at t = 0): log alpha_t = -(1-t)^2 (bmax - bmin) / 4 - (1-t) bmin / 2,
    sigma_t = sqrt(1 - alpha_t^2).

What the network predicts (``Prediction``): the velocity ``d/dt x_t = alpha'_t x + sigma'_t
noise``, the noise itself, or the score ``-noise / sigma_t``. Velocity training is plain MSE;
noise and score training can be weighted (``LossWeight``) by the drift variance
``w_t = (alpha'/alpha) sigma^2 - sigma sigma'``: ``velocity`` uses (w_t / sigma_t)^2 (the
velocity-space error), ``likelihood`` uses w_t / sigma_t^2 (the ELBO weight).

Where a path or a prediction is singular at the ends of [0, 1], time is kept inside
[eps, 1 - eps] (``TransportConfig.interval``): the VP path is cut at 1 - eps (sigma -> 0 at
t = 1), noise/score predictions on Linear/GVP are cut at both ends (1/sigma at t = 1 and
1/alpha in the drift at t = 0), velocity on Linear/GVP is regular on all of [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, NamedTuple

import torch
from torch import Tensor

from engine.config.checks import parse_choice



# ---------------------------------------------------------------------------------------
# Choices: enums parsed from user strings with an error that lists the valid spellings
# ---------------------------------------------------------------------------------------


def _lookup(args: Any, key: str) -> Any:
    """``args[key]`` of a dict or ``args.key`` of an ``argparse.Namespace``; None when absent."""
    if args is None:
        return None
    return args.get(key) if isinstance(args, Mapping) else getattr(args, key, None)


class PathType(str, Enum):
    LINEAR = "linear"
    GVP = "gvp"
    VP = "vp"


class Prediction(str, Enum):
    VELOCITY = "velocity"
    NOISE = "noise"
    SCORE = "score"


class LossWeight(str, Enum):
    NONE = "none"
    VELOCITY = "velocity"
    LIKELIHOOD = "likelihood"


class DiffusionForm(str, Enum):
    """Diffusion coefficient w(t) of the SDE sampler dx = [v + w s] dt + sqrt(2 w) dW."""

    CONSTANT = "constant"  # w = norm
    SBDM = "sbdm"  # w = norm * drift variance (score-based diffusion models' choice)
    SIGMA = "sigma"  # w = norm * sigma_t (the release's sampling default)
    LINEAR = "linear"  # w = norm * (1 - t)
    DECREASING = "decreasing"  # w = (norm * cos(pi t) + 1)^2 / 4
    INCREASING_DECREASING = "increasing-decreasing"  # w = norm * sin(pi t)^2


class CheckMode(str, Enum):
    TRAIN = "train"
    ODE = "ode"
    SDE = "sde"


# ---------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------


class PathCoefficients(NamedTuple):
    """alpha_t, d alpha_t / dt, sigma_t, d sigma_t / dt, each shaped like the t given."""

    alpha: Tensor
    d_alpha: Tensor
    sigma: Tensor
    d_sigma: Tensor


class InterpolantPath:
    """x_t = alpha_t x_data + sigma_t noise. Subclasses give the four coefficients."""

    def coefficients(self, t: Tensor) -> PathCoefficients:
        raise NotImplementedError

    def d_log_alpha(self, t: Tensor) -> Tensor:
        """alpha'_t / alpha_t (infinite at t = 0 for Linear/GVP)."""
        c = self.coefficients(t)
        return c.d_alpha / c.alpha

    def drift_variance(self, t: Tensor) -> Tensor:
        """w_t = (alpha'/alpha) sigma^2 - sigma sigma': velocity = (alpha'/alpha) x + w_t score."""
        c = self.coefficients(t)
        return self.d_log_alpha(t) * c.sigma**2 - c.sigma * c.d_sigma


class LinearPath(InterpolantPath):
    def coefficients(self, t: Tensor) -> PathCoefficients:
        one = torch.ones_like(t)
        return PathCoefficients(t, one, 1 - t, -one)

    def d_log_alpha(self, t: Tensor) -> Tensor:
        return 1 / t


class GVPPath(InterpolantPath):
    def coefficients(self, t: Tensor) -> PathCoefficients:
        half_pi = math.pi / 2
        s, c = torch.sin(half_pi * t), torch.cos(half_pi * t)
        return PathCoefficients(s, half_pi * c, c, -half_pi * s)

    def d_log_alpha(self, t: Tensor) -> Tensor:
        return math.pi / (2 * torch.tan(math.pi / 2 * t))


class VPPath(InterpolantPath):
    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min, self.beta_max = beta_min, beta_max

    def _log_alpha(self, t: Tensor) -> Tensor:
        s = 1 - t  # time since the data end
        return -0.25 * s**2 * (self.beta_max - self.beta_min) - 0.5 * s * self.beta_min

    def d_log_alpha(self, t: Tensor) -> Tensor:
        # = beta(t) / 2 with beta running linearly from beta_max (t = 0) to beta_min (t = 1).
        return 0.5 * (1 - t) * (self.beta_max - self.beta_min) + 0.5 * self.beta_min

    def coefficients(self, t: Tensor) -> PathCoefficients:
        log_alpha = self._log_alpha(t)
        alpha = torch.exp(log_alpha)
        d_alpha = alpha * self.d_log_alpha(t)
        alpha_sq = torch.exp(2 * log_alpha)
        sigma = torch.sqrt(1 - alpha_sq)
        d_sigma = -alpha_sq * self.d_log_alpha(t) / sigma  # d/dt sqrt(1 - alpha^2)
        return PathCoefficients(alpha, d_alpha, sigma, d_sigma)


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransportConfig:
    """How a SiT model is trained and how its output is read at sampling time."""

    path: PathType = PathType.LINEAR
    """Interpolant: "linear", "gvp" or "vp" (the release's "Linear", "GVP", "VP" also parse)."""
    prediction: Prediction = Prediction.VELOCITY
    """What the network outputs: "velocity", "noise" or "score"."""
    loss_weight: LossWeight = LossWeight.NONE
    """"none", "velocity" or "likelihood"; only meaningful for noise/score predictions."""
    train_eps: float | None = None
    """Training times are kept in [eps, 1 - eps] where the path needs it; None = the
    release's default (VP 1e-5; noise/score on Linear/GVP 1e-3; velocity on Linear/GVP 0)."""
    sample_eps: float | None = None
    """The same for sampling; None = the release's default (VP 1e-3; noise/score on
    Linear/GVP 1e-3; velocity on Linear/GVP 0)."""
    vp_beta_min: float = 0.1
    """VP path: beta at t = 1 (data end)."""
    vp_beta_max: float = 20.0
    """VP path: beta at t = 0 (noise end)."""

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise the string spellings to enums in place.
        object.__setattr__(self, "path", parse_choice(PathType, self.path, "path"))
        object.__setattr__(self, "prediction", parse_choice(Prediction, self.prediction, "prediction"))
        weight = LossWeight.NONE if self.loss_weight is None else self.loss_weight
        object.__setattr__(self, "loss_weight", parse_choice(LossWeight, weight, "loss weight"))
        if self.prediction is Prediction.VELOCITY and self.loss_weight is not LossWeight.NONE:
            # The release silently ignores a weight for velocity; refuse instead of surprising.
            raise ValueError(
                f"loss_weight={self.loss_weight.value!r} only applies to noise/score predictions; "
                "velocity training is plain MSE (use loss_weight='none')"
            )
        for name in ("train_eps", "sample_eps"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value < 0.5):
                raise ValueError(f"{name} must be None or a number in [0, 0.5), got {value!r}")
        if not (0 < self.vp_beta_min < self.vp_beta_max):
            raise ValueError(
                f"need 0 < vp_beta_min < vp_beta_max, got {self.vp_beta_min}, {self.vp_beta_max}"
            )

    def _default_eps(self) -> tuple[float, float]:
        if self.path is PathType.VP:
            return 1e-5, 1e-3
        if self.prediction is not Prediction.VELOCITY:
            return 1e-3, 1e-3
        return 0.0, 0.0  # velocity on Linear/GVP is regular everywhere

    @property
    def resolved_train_eps(self) -> float:
        return self._default_eps()[0] if self.train_eps is None else float(self.train_eps)

    @property
    def resolved_sample_eps(self) -> float:
        return self._default_eps()[1] if self.sample_eps is None else float(self.sample_eps)

    def interval(
        self,
        mode: CheckMode | str = CheckMode.TRAIN,
        *,
        diffusion_form: DiffusionForm | str = DiffusionForm.SIGMA,
        last_step_size: float = 0.0,
    ) -> tuple[float, float]:
        """(t0, t1) over which to train or sample.

        VP: t1 = 1 - eps (sigma vanishes at t = 1). Linear/GVP with noise or score output,
        or any SDE: t0 = eps where 1/alpha or the SBDM coefficient blows up (noise/score
        models always, SDE with the SBDM form), t1 = 1 - eps. For an SDE with a separate
        last step, sampling stops at 1 - last_step_size and the last step covers the rest.
        """
        mode = parse_choice(CheckMode, mode, "interval mode")
        form = parse_choice(DiffusionForm, diffusion_form, "diffusion form")
        sde = mode is CheckMode.SDE
        eps = self.resolved_train_eps if mode is CheckMode.TRAIN else self.resolved_sample_eps
        end = 1 - last_step_size if (sde and last_step_size > 0) else 1 - eps
        if self.path is PathType.VP:
            return 0.0, end
        if self.prediction is not Prediction.VELOCITY or sde:
            needs_t0 = self.prediction is not Prediction.VELOCITY or form is DiffusionForm.SBDM
            return (eps if needs_t0 else 0.0), end
        return 0.0, 1.0

    @classmethod
    def of_checkpoint(cls, ckpt: Any, **flags: Any) -> "TransportConfig":
        """The transport a SiT checkpoint was trained with: the one reader every command uses.

        Field by field, the first that is set wins: ``flags`` (a command's ``--transport-*``
        values; None means not given) > this project's saved training config
        (``args["train_config"]["transport"]``, written by the trainer) > the release's
        training args (``path_type``, ``prediction``, ``loss_weight``, ``train_eps``,
        ``sample_eps``; an ``argparse.Namespace`` or a dict) > the defaults (linear, velocity).
        """
        unknown = sorted(set(flags) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown TransportConfig field(s) {unknown}")
        args = ckpt.get("args") if isinstance(ckpt, Mapping) else None
        train_cfg = _lookup(args, "train_config")
        saved = train_cfg.get("transport") if isinstance(train_cfg, Mapping) else None
        # The release's flag names (SiT train.py) for our fields.
        release = {"path": _lookup(args, "path_type"), "prediction": _lookup(args, "prediction"),
                   "loss_weight": _lookup(args, "loss_weight"), "train_eps": _lookup(args, "train_eps"),
                   "sample_eps": _lookup(args, "sample_eps")}
        chosen: dict[str, Any] = {}
        for f in fields(cls):
            for source in (flags, saved if isinstance(saved, Mapping) else {}, release):
                if source.get(f.name) is not None:
                    chosen[f.name] = source[f.name]
                    break
        prediction = parse_choice(Prediction, chosen.get("prediction", Prediction.VELOCITY), "prediction")
        if prediction is Prediction.VELOCITY and flags.get("loss_weight") is None:
            # A saved weight of a noise/score run means nothing once --transport-prediction
            # asks for velocity (and a weight never matters for sampling).
            chosen.pop("loss_weight", None)
        return cls(**chosen)

    def build_path(self) -> InterpolantPath:
        if self.path is PathType.LINEAR:
            return LinearPath()
        if self.path is PathType.GVP:
            return GVPPath()
        return VPPath(self.vp_beta_min, self.vp_beta_max)


# ---------------------------------------------------------------------------------------
# The transport: training targets and conversions between predictions
# ---------------------------------------------------------------------------------------


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """(N,) -> (N, 1, ..., 1) broadcastable against x (N, ...)."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


class Transport:
    """Training loss and sampling conversions of one ``TransportConfig``."""

    def __init__(self, config: TransportConfig | None = None):
        self.config = config if config is not None else TransportConfig()
        self.path = self.config.build_path()

    # ---- training --------------------------------------------------------------------
    def sample_time(self, n: int, *, device: torch.device | str = "cpu",
                    generator: torch.Generator | None = None) -> Tensor:
        """n training times, uniform on the training interval, float32 on ``device``."""
        t0, t1 = self.config.interval(CheckMode.TRAIN)
        gen_device = generator.device if generator is not None else device
        u = torch.rand(n, generator=generator, device=gen_device)
        return (u * (t1 - t0) + t0).to(device)

    def interpolate(self, t: Tensor, noise: Tensor, x_data: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, u_t): the point on the path and its time derivative (the velocity target)."""
        c = self.path.coefficients(expand_like(t, x_data))
        x_t = c.alpha * x_data + c.sigma * noise  # (N, C, H, W)
        u_t = c.d_alpha * x_data + c.d_sigma * noise  # (N, C, H, W)
        return x_t, u_t

    def loss_per_sample(self, prediction: Tensor, t: Tensor, noise: Tensor, x_t: Tensor,
                        u_t: Tensor) -> Tensor:
        """Per-sample loss (N,) of the network output for the configured prediction."""
        if prediction.shape != x_t.shape:
            raise ValueError(f"model output {tuple(prediction.shape)} does not match the input "
                             f"{tuple(x_t.shape)}: a SiT objective needs a SiT model (family 'sit')")
        pred = prediction.float()  # under autocast the model may return bf16
        kind = self.config.prediction
        if kind is Prediction.VELOCITY:
            return mean_flat((pred - u_t) ** 2)
        tt = expand_like(t, x_t)
        sigma = self.path.coefficients(tt).sigma
        weight_kind = self.config.loss_weight
        if weight_kind is LossWeight.NONE:
            weight = torch.ones_like(sigma)
        else:
            w = self.path.drift_variance(tt)
            weight = (w / sigma) ** 2 if weight_kind is LossWeight.VELOCITY else w / sigma**2
        if kind is Prediction.NOISE:
            return mean_flat(weight * (pred - noise) ** 2)
        # score target -noise / sigma, compared after multiplying by sigma (well scaled)
        return mean_flat(weight * (pred * sigma + noise) ** 2)

    # ---- sampling: read any prediction as a velocity or a score -----------------------
    def velocity(self, output: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The ODE velocity field from the network output at (x, t)."""
        kind = self.config.prediction
        if kind is Prediction.VELOCITY:
            return output
        tt = expand_like(t, x)
        score = output if kind is Prediction.SCORE else -output / self.path.coefficients(tt).sigma
        return self.path.d_log_alpha(tt) * x + self.path.drift_variance(tt) * score

    def score(self, output: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """grad log p_t(x) from the network output."""
        kind = self.config.prediction
        tt = expand_like(t, x)
        if kind is Prediction.SCORE:
            return output
        c = self.path.coefficients(tt)
        if kind is Prediction.NOISE:
            return -output / c.sigma
        # velocity = (a'/a) x + w s  =>  s = (r v - x) / (sigma^2 - r sigma sigma'), r = a/a'
        # (written with r = alpha/alpha', which stays finite at t = 0 where alpha = 0)
        r = c.alpha / c.d_alpha
        return (r * output - x) / (c.sigma**2 - r * c.d_sigma * c.sigma)

    def diffusion_coefficient(self, x: Tensor, t: Tensor, form: DiffusionForm | str = DiffusionForm.SIGMA,
                              norm: float = 1.0) -> Tensor:
        """w(t) for the SDE sampler, broadcastable against x."""
        form = parse_choice(DiffusionForm, form, "diffusion form")
        tt = expand_like(t, x)
        if form is DiffusionForm.CONSTANT:
            return torch.full_like(tt, norm)
        if form is DiffusionForm.SBDM:
            return norm * self.path.drift_variance(tt)
        if form is DiffusionForm.SIGMA:
            return norm * self.path.coefficients(tt).sigma
        if form is DiffusionForm.LINEAR:
            return norm * (1 - tt)
        if form is DiffusionForm.DECREASING:
            return 0.25 * (norm * torch.cos(math.pi * tt) + 1) ** 2
        return norm * torch.sin(math.pi * tt) ** 2
