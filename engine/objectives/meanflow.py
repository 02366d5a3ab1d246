"""MeanFlow (Geng et al. 2025, arXiv 2505.13447): one-step generation, with Dispersive Loss.

Time convention -- the REVERSE of SiT's (``engine.diffusion.transport``: t = 0 noise, t = 1 data):

    z_t = (1 - t) x + t e,   v = e - x,   t = 0 data, t = 1 noise.

The network predicts the average velocity ``u(z, r, t) = 1/(t - r) * int_r^t v(z_s, s) ds``
over [r, t] (r <= t) and sees the two times as (t, h = t - r): ``model(z, t, y, h=t - r)``. A
MeanFlow model is a SiT-family ``DiffusionTransformer`` built with ``second_time_input=True``
and ``learn_sigma=False`` (nothing to learn in a sigma half).

Training (the MeanFlow identity u = v - (t - r) du/dt):

    u_tgt = stopgrad(v_g - (t - r) du/dt),   du/dt = v_g . d_z u + d_t u

where du/dt is one forward-mode Jacobian-vector product through the network with tangents
(v_g, 0, 1) for (z, r, t) -- the network's own second input h = t - r then gets tangent 1
by the chain rule, which ``average_velocity_jvp`` leaves to autodiff by computing h inside.
``v_g`` is the guided velocity (classifier-free guidance folded into the target):

    v_g = omega v + kappa u(z, t, t | y) + (1 - omega - kappa) u(z, t, t | null)

for rows whose time t lies in ``guidance_interval`` and whose label was kept; ``v_g = v``
elsewhere (omega = 1, kappa = 0 is plain MeanFlow with no extra forward). Labels are dropped
to the null class with the model's ``class_dropout_prob`` p, by this objective (the model's own
random label dropout is switched off during the calls, so every pass sees the same labels). By
default as the official code does it (``MeanFlowConfig.label_drop = "leading"``): Binomial(N, p)
rows are dropped, always the FIRST ones of the batch -- the rows that have r = t -- so the
r != t rows keep their labels (unless the count exceeds the r = t rows, see ``label_drop``);
``"per_row"`` drops each row independently. A dropped row's target is unguided (v_g = v).
Per sample: ``err = ||u - u_tgt||^2`` (summed over C, H, W as the reference does),
weighted adaptively by ``err / stopgrad((err + c)^p)``; ``loss = mean(weighted) +
lambda * dispersive`` with the Dispersive Loss on the hidden states of the same forward that
produced u.

Why two passes, and what they cost. The reference computes the target and the loss from one
JVP whose primal output carries the parameter gradients. Here the target is a JVP on the
UNWRAPPED module under ``torch.no_grad`` (it is stop-grad: no parameter gradient is needed,
and nothing of it is stored for backward), and the loss comes from an ordinary forward through
the model passed in -- a DeepSpeed engine included, so its hooks, gradient reduction and
ZeRO partitioning see the one pass that matters. That is correct under ZeRO-1/2/3 (for ZeRO-3
the JVP runs inside ``deepspeed.zero.GatheredParameters``: one extra all-gather of the full
model per step, and the full parameters resident on every rank while the JVP runs; ZeRO-3's
submodule hooks and its process-wide ``F.linear`` replacement, which have no forward-mode
rules, are set aside meanwhile). Rows with r = t need no JVP (their target is v_g), so it runs
on the other 25% of the batch only. Counted with ``torch.utils.flop_counter`` on SiT-B/4
(batch 8): a JVP costs 3.0 forwards per row, so one MeanFlow step is 3.8 forwards per image
without guidance (SiT: 3.0), 4.8 with kappa = 0 (one guidance forward) and 5.8 with kappa > 0
(two) -- below the reference's fused JVP on every row (about 5, 6, 7).
``MeanFlowConfig.forward_equivalents`` gives the estimate (for MFU).

Attention under the JVP: only SDPA's math path (and the model's explicit "math" backend) has
forward-mode derivatives; SDPA's fused kernels and flash-attn have none. During the JVP every
attention layer is switched to SDPA with the math kernel forced (flash-attn layers fall back to
it); the loss forward keeps the fast kernel. bf16: the JVP runs in the model's own dtype (or
under the caller's autocast); the target, the squared error and the loss are fp32.

Sampling: ``z_r = z_t - (t - r) u(z_t, r, t)`` from t = 1 (noise) down to 0 (data);
``engine.sampling.meanflow.sample_meanflow(model, y, noise, steps=1)`` is the 1-NFE sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor

import models
from engine.objectives.base import _Base
from engine.objectives.jvp import eager_forward, target_passes
from models import labels_as_given, unwrap_model

Reduction = Literal["sum", "mean"]
REDUCTIONS: tuple[str, ...] = ("sum", "mean")
LabelDrop = Literal["leading", "per_row"]
LABEL_DROPS: tuple[str, ...] = get_args(LabelDrop)


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"MeanFlowConfig.{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class MeanFlowConfig:
    """The MeanFlow objective. Defaults: the paper's ImageNet settings, without guidance."""

    time_mean: float = -0.4
    """Mean of the logit-normal time distribution: t = sigmoid(N(time_mean, time_std^2))."""
    time_std: float = 1.0
    """Standard deviation of the logit-normal time distribution (> 0)."""
    r_equals_t: float = 0.75
    """Fraction of each batch with r = t (flow-matching rows); the paper's "ratio of r != t"
    is 1 - this = 25%. As in the reference, the first floor(N * fraction) rows of the
    (shuffled) batch get r = t."""
    adaptive_p: float = 1.0
    """Adaptive loss weight power p: loss = err / stopgrad((err + c)^p); 0 = plain squared error."""
    adaptive_c: float = 0.01
    """Adaptive loss weight constant c (> 0), relative to the per-sample error ``reduction``."""
    reduction: Reduction = "sum"
    """Per-sample squared error summed over (C, H, W) (the reference) or averaged ("mean")."""
    omega: float = 1.0
    """Guidance weight on the conditional velocity v in the target (1 with kappa 0 = no guidance)."""
    kappa: float = 0.0
    """Guidance weight on the network's own conditional u(z, t, t | y), in [0, 1); the effective
    CFG scale is omega / (1 - kappa)."""
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    """Guide the target only for rows with t_lo <= t <= t_hi (MeanFlow time, 1 = noise)."""
    label_drop: LabelDrop = "leading"
    """Which rows lose their label (null class, unguided target) for a model with
    class_dropout_prob p > 0. "leading", as the official JAX code's cond_drop: the count is
    Binomial(N, p) (N uniform draws below p) and the FIRST that many rows are dropped -- the r = t
    rows, which ``sample_times`` puts first (floor(N * r_equals_t) of them), unless the count
    exceeds those (p = 0.1, r_equals_t = 0.75: probability < 1e-6 for N >= 8 rows per rank).
    "per_row": every row independently with probability p, r != t rows included."""
    sample_steps: int = 1
    """Sampler steps (network evaluations) for the training sample grids."""

    def __post_init__(self) -> None:
        for name in ("time_mean", "time_std", "r_equals_t", "adaptive_p", "adaptive_c", "omega", "kappa"):
            _finite(name, getattr(self, name))
        if self.time_std <= 0:
            raise ValueError(f"MeanFlowConfig.time_std must be > 0, got {self.time_std}")
        if not 0.0 <= self.r_equals_t <= 1.0:
            raise ValueError(f"MeanFlowConfig.r_equals_t must be in [0, 1], got {self.r_equals_t}")
        if self.adaptive_p < 0:
            raise ValueError(f"MeanFlowConfig.adaptive_p must be >= 0, got {self.adaptive_p}")
        if self.adaptive_c <= 0:
            raise ValueError(f"MeanFlowConfig.adaptive_c must be > 0, got {self.adaptive_c}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"MeanFlowConfig.reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.label_drop not in LABEL_DROPS:
            raise ValueError(f"MeanFlowConfig.label_drop must be one of {LABEL_DROPS}, got {self.label_drop!r}")
        if self.omega <= 0:
            raise ValueError(f"MeanFlowConfig.omega must be > 0, got {self.omega}")
        if not 0.0 <= self.kappa < 1.0:
            raise ValueError(f"MeanFlowConfig.kappa must be in [0, 1), got {self.kappa}")
        interval = tuple(self.guidance_interval)
        if len(interval) != 2:
            raise ValueError(f"MeanFlowConfig.guidance_interval must be (t_lo, t_hi), got {self.guidance_interval!r}")
        lo, hi = (_finite("guidance_interval", v) for v in interval)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"MeanFlowConfig.guidance_interval needs 0 <= t_lo <= t_hi <= 1, got {interval!r}")
        object.__setattr__(self, "guidance_interval", (lo, hi))
        if isinstance(self.sample_steps, bool) or not isinstance(self.sample_steps, int) or self.sample_steps < 1:
            raise ValueError(f"MeanFlowConfig.sample_steps must be an int >= 1, got {self.sample_steps!r}")

    @property
    def guidance_active(self) -> bool:
        """Whether the target needs the network's own velocities (extra forwards)."""
        return self.omega != 1.0 or self.kappa != 0.0

    @property
    def forward_equivalents(self) -> float:
        """Model FLOPs of one training step per image, in forward passes (SiT's step is 3): the
        loss forward and backward (3), the JVP on the r != t rows (3 forwards each), and 0, 1 or
        2 guidance forwards. Multiply ``models.flops_per_sample(cfg)`` by it for MFU."""
        guidance = 0.0 if not self.guidance_active else (2.0 if self.kappa > 0 else 1.0)
        return 3.0 + 3.0 * (1.0 - self.r_equals_t) + guidance

    @property
    def effective_scale(self) -> float:
        """The CFG scale the trained 1-step model realises: omega / (1 - kappa)."""
        return self.omega / (1.0 - self.kappa)


# ---------------------------------------------------------------------------------------
# Model checks and the temporary switches the passes need
# ---------------------------------------------------------------------------------------


def check_meanflow_model(module: torch.nn.Module) -> Any:
    """The (unwrapped) model's ``ModelConfig``; ValueError unless it can learn u(z, r, t)."""
    inner = unwrap_model(module)
    cfg = getattr(inner, "config", None)
    if cfg is None or not hasattr(cfg, "second_time_input"):
        raise TypeError(f"MeanFlow needs a models.DiffusionTransformer, got {type(inner).__name__}")
    if cfg.family != "sit" or not cfg.second_time_input or cfg.learn_sigma:
        raise ValueError(
            "MeanFlow needs a SiT model with a second time input and no sigma half: "
            "models.create_model('sit_...', second_time_input=True, learn_sigma=False); got "
            f"family={cfg.family!r}, second_time_input={cfg.second_time_input}, learn_sigma={cfg.learn_sigma}")
    return cfg


# ---------------------------------------------------------------------------------------
# Times, guided velocity, target
# ---------------------------------------------------------------------------------------


def sample_times(n: int, config: MeanFlowConfig, *, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(t, r), each (n,) float32 with t >= r: two logit-normal draws sorted, then r = t on the
    first floor(n * r_equals_t) rows."""
    gen_device = generator.device if generator is not None else device
    normal = torch.randn(2, n, generator=generator, device=gen_device, dtype=torch.float32)
    a, b = torch.sigmoid(normal * config.time_std + config.time_mean).to(device)  # (n,) each
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    same = torch.arange(n, device=t.device) < int(n * config.r_equals_t)
    return t, torch.where(same, t, r)


def _col(s: Tensor, like: Tensor) -> Tensor:
    """(N,) -> (N, 1, 1, 1) in like's dtype, for per-sample scaling of (N, C, H, W)."""
    return s.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def guided_velocity(module: torch.nn.Module, z: Tensor, t: Tensor, y: Tensor, v: Tensor,
                    keep: Tensor | None, config: MeanFlowConfig) -> Tensor:
    """v_g = omega v + kappa u(z,t,t|y) + (1 - omega - kappa) u(z,t,t|null), fp32 (N, C, H, W).

    Rows outside ``guidance_interval`` or with ``keep`` False (label dropped) get v. The network's
    velocities are u with r = t (h = 0), computed without grad in one batched forward of 2N rows
    when kappa > 0.
    """
    if not config.guidance_active:
        return v
    cfg = check_meanflow_model(module)
    if cfg.class_dropout_prob <= 0:
        raise ValueError("MeanFlow guidance (omega != 1 or kappa != 0) needs the unconditional "
                         "velocity: build the model with class_dropout_prob > 0 (a null class)")
    n = z.shape[0]
    null = torch.full_like(y, cfg.require_null_class())
    h0 = torch.zeros_like(t)
    forward = eager_forward(module)
    with target_passes(module, jvp=False):
        if config.kappa > 0:
            both = forward(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, null]),
                           h=torch.cat([h0, h0])).float()  # (2N, C, H, W)
            u_cond, u_uncond = both[:n], both[n:]
        else:
            u_cond, u_uncond = None, forward(z, t, null, h=h0).float()  # (N, C, H, W)
    lo, hi = config.guidance_interval
    inside = (t >= lo) & (t <= hi)
    if keep is not None:
        inside = inside & keep
    omega = _col(torch.where(inside, config.omega, 1.0), v)
    kappa = _col(torch.where(inside, config.kappa, 0.0), v)
    v_g = omega * v + (1.0 - omega - kappa) * u_uncond
    if u_cond is not None:
        v_g = v_g + kappa * u_cond
    return v_g


def average_velocity_jvp(module: torch.nn.Module, z: Tensor, r: Tensor, t: Tensor, y: Tensor,
                         v: Tensor) -> tuple[Tensor, Tensor]:
    """(u(z, r, t), du/dt) along dz/dt = v, dr/dt = 0, dt/dt = 1; no grad, in the model's dtype.

    One ``torch.func.jvp`` through the unwrapped module (attention switched to SDPA math,
    ZeRO-3 parameters gathered, label dropout off). The network's inputs are (t, h = t - r):
    h is formed inside the differentiated function, so its tangent (1) comes from autodiff.
    """
    check_meanflow_model(module)
    forward = eager_forward(module)

    def u_fn(z_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
        return forward(z_, t_, y, h=t_ - r_)

    with target_passes(module, jvp=True):
        u, dudt = torch.func.jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    return u, dudt


def meanflow_target(module: torch.nn.Module, z: Tensor, r: Tensor, t: Tensor, y: Tensor,
                    v: Tensor) -> Tensor:
    """u_tgt = v - (t - r) du/dt, fp32 and detached, (N, C, H, W)."""
    _, dudt = average_velocity_jvp(module, z, r, t, y, v)
    v = v.float()  # fp32 whatever the model's dtype: (t - r) is never rounded to bf16
    return (v - _col((t - r).clamp(0.0, 1.0), v) * dudt.float()).detach()


def _per_sample(sq: Tensor, reduction: Reduction) -> Tensor:
    """(N, C, H, W) squared errors -> (N,), summed (the reference) or averaged."""
    flat = sq.flatten(1)
    return flat.sum(1) if reduction == "sum" else flat.mean(1)


def adaptive_weighted(err: Tensor, p: float, c: float) -> Tensor:
    """err / stopgrad((err + c)^p), per sample: gradient err'/(err + c)^p (p = 1: ~ d log err)."""
    if p == 0:
        return err
    return err / (err.detach() + c) ** p


# ---------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------


@dataclass
class MeanFlowObjective(_Base):
    """MeanFlow training on the shared backbone, with the Dispersive Loss (``engine.objectives.base``).

    ``objective(model, x, y, valid=None, generator=None)`` with ``model`` a DiffusionTransformer
    or a wrapper of one (DeepSpeed engine, DDP, compile). Returns

        loss              scalar with grad: diffusion_loss + dispersive_total
        diffusion_loss    detached: mean over valid rows of the adaptively weighted error
        dispersive/...    as the other objectives (hidden states of the loss forward)
        dispersive_total  detached
        mf_error          detached: mean unweighted ||u - u_tgt||^2 (in ``reduction``)
        v_error           detached: mean ||u - v||^2 (monitoring, as the reference's v_loss)
    """

    config: MeanFlowConfig = field(default_factory=MeanFlowConfig)
    family: ClassVar[str] = "meanflow"

    def model_overrides(self) -> dict[str, Any]:
        """u(z, r, t) needs the second time input; the average velocity has no sigma half."""
        return {"second_time_input": True, "learn_sigma": False}

    def flops_per_image(self, config: Any) -> float:
        return models.flops_per_sample(config) * self.config.forward_equivalents

    def grid_sampler(self, steps: int) -> dict[str, Any]:
        return {"kind": "meanflow", "num_steps": self.config.sample_steps}

    def compute(self, model: torch.nn.Module, x: Tensor, y: Tensor, t: Tensor, r: Tensor, noise: Tensor,
                keep: Tensor | None = None, valid: Tensor | None = None, same_rows: int = 0,
                diagnostics: bool = False) -> dict[str, Tensor]:
        """The objective at given times t >= r (N,), noise (N, C, H, W) and kept labels.

        keep: bool (N,), False rows get the null label (and an unguided target); None keeps all.
        same_rows: the caller guarantees r == t on the first ``same_rows`` rows (unchecked: a
        check would cost a host sync). Their target is v_g exactly ((t - r) du/dt = 0), so the
        JVP runs on the other rows only -- with the paper's 75% of r = t rows, a quarter of the
        batch.
        """
        cfg = check_meanflow_model(model)
        if t.shape != (x.shape[0],) or r.shape != t.shape:
            raise ValueError(f"t and r must have shape ({x.shape[0]},), got {tuple(t.shape)} and {tuple(r.shape)}")
        x, noise, t, r = x.float(), noise.float(), t.float(), r.float()
        z = (1.0 - _col(t, x)) * x + _col(t, x) * noise  # (N, C, H, W)
        v = noise - x  # (N, C, H, W)
        if keep is not None:
            if cfg.class_dropout_prob <= 0 and not bool(keep.all()):
                raise ValueError("labels can only be dropped for a model with class_dropout_prob > 0")
            y = torch.where(keep, y, torch.full_like(y, cfg.require_null_class()))
        v_g = guided_velocity(model, z, t, y, v, keep, self.config)  # (N, C, H, W) fp32, no grad
        n, k = x.shape[0], max(0, min(int(same_rows), x.shape[0]))
        u_tgt = v_g
        if k < n:
            tail = meanflow_target(model, z[k:], r[k:], t[k:], y[k:], v_g[k:])  # (N - k, C, H, W)
            u_tgt = torch.cat([v_g[:k], tail]) if k else tail

        # The loss pass: an ordinary forward through the model as given (DeepSpeed sees it).
        blocks = self.dispersive.resolve(cfg.depth) if self.dispersive.enabled else []
        with labels_as_given(model):
            if blocks:
                u, hidden = model(z, t, y, h=t - r, return_hidden=[b for b, _ in blocks])
            else:
                u, hidden = model(z, t, y, h=t - r), []
        u = u.float()  # (N, C, H, W)
        err = _per_sample((u - u_tgt) ** 2, self.config.reduction)  # (N,)
        weighted = adaptive_weighted(err, self.config.adaptive_p, self.config.adaptive_c)
        extras = {"mf_error": err.detach(), "v_error": _per_sample((u.detach() - v) ** 2, self.config.reduction)}
        return self._finish(weighted, valid, hidden, blocks, extras, diagnostics)

    def sample_inputs(self, model: torch.nn.Module, x: Tensor, generator: torch.Generator | None = None
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(t, r, noise, keep) drawn in the reference's order: times, then noise, then N uniforms
        for the label mask (None for a model without a null class). With the model's
        ``class_dropout_prob`` p, the rows with a uniform below p are dropped ("per_row"), or as
        many rows, the first ones -- the r = t rows ("leading", the default and the reference's)."""
        cfg = check_meanflow_model(model)
        n = x.shape[0]
        t, r = sample_times(n, self.config, device=x.device, generator=generator)
        gen_device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=torch.float32).to(x.device)
        drop = torch.rand(n, generator=generator, device=gen_device).to(x.device) < cfg.class_dropout_prob
        if self.config.label_drop == "leading":  # no host sync: the count stays a tensor
            drop = torch.arange(n, device=x.device) < drop.sum()
        return t, r, noise, (~drop if cfg.class_dropout_prob > 0 else None)

    def __call__(self, model: torch.nn.Module, x: Tensor, y: Tensor, valid: Tensor | None = None,
                 generator: torch.Generator | None = None, diagnostics: bool = False) -> dict[str, Tensor]:
        t, r, noise, keep = self.sample_inputs(model, x, generator)
        same = int(x.shape[0] * self.config.r_equals_t)  # sample_times puts r = t on these rows
        return self.compute(model, x, y, t, r, noise, keep=keep, valid=valid, same_rows=same, diagnostics=diagnostics)


__all__ = [
    "LABEL_DROPS", "MeanFlowConfig", "MeanFlowObjective", "adaptive_weighted",
    "average_velocity_jvp", "check_meanflow_model", 
    "guided_velocity", "labels_as_given", "meanflow_target",
    "sample_times",
]
