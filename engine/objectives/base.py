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

import inspect
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Literal, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import Tensor

from engine.diffusion.gaussian import DiffusionConfig, GaussianDiffusion
from models import unwrap_model
from engine.config.checks import parse_choice
from engine.diffusion.transport import Transport, TransportConfig

BlockSpec = Union[int, Sequence[int], Literal["last", "all", "paper"]]
Scope = Literal["local", "global"]
SCOPES: tuple[str, ...] = ("local", "global")


def _kernel_variants() -> tuple[str, ...]:
    from kernels import VARIANTS

    return tuple(VARIANTS)


# ---------------------------------------------------------------------------------------
# Dispersive regularizer configuration
# ---------------------------------------------------------------------------------------


class DispersivePreset(str, Enum):
    PAPER = "paper"  # JAX runs of the paper: lambda 0.5, tau 0.5, block depth // 4 (from 1)
    RELEASE = "release"  # PyTorch release: lambda 0.25, tau 1, last block
    NONE = "none"  # regularizer off


@dataclass(frozen=True)
class DispersiveConfig:
    """The Dispersive Loss term added to a diffusion objective.

    total = lambda_ * sum_k w_k * dispersive_loss(hidden_k) over the chosen blocks.
    """

    lambda_: float = 0.0
    """Weight lambda of the whole term; 0 turns the regularizer off (no hidden states taken)."""
    tau: float = 1.0
    """Temperature of the InfoNCE variants (> 0)."""
    variant: str = "infonce_l2"
    """``kernels.VARIANTS``: infonce_l2, infonce_cosine, hinge, covariance."""
    blocks: BlockSpec = "last"
    """Block outputs to regularize: "last", "all", "paper" (block depth // 4 counted from 1),
    a 0-based index or a list of them (negative counts from the end)."""
    block_weights: tuple[float, ...] | None = None
    """w_k per chosen block, in the order of ``blocks``; None = equal weights 1/K (a mean over
    blocks, so lambda keeps its meaning whatever the number of blocks)."""
    scope: Scope = "local"
    """"local": over each device's own batch (the paper and the release); "global": over the
    batch gathered from all ranks (passed to ``kernels.dispersive_loss(scope=...)``)."""
    margin: float = 1.0
    """Hinge margin on the normalised squared distance."""
    normalize_by_dim: bool = True
    """Divide squared distances by D = tokens * hidden, as the release does."""
    backend: str = "auto"
    """``kernels.dispersive_loss`` backend: auto, triton, torch, reference."""

    def __post_init__(self) -> None:
        for name in ("lambda_", "tau", "margin"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"DispersiveConfig.{name} must be a finite number, got {value!r}")
        if self.lambda_ < 0:
            raise ValueError(f"DispersiveConfig.lambda_ must be >= 0, got {self.lambda_}")
        if self.tau <= 0:
            raise ValueError(f"DispersiveConfig.tau must be > 0, got {self.tau}")
        if self.margin <= 0:
            raise ValueError(f"DispersiveConfig.margin must be > 0, got {self.margin}")
        variants = _kernel_variants()
        if self.variant not in variants:
            raise ValueError(f"unknown dispersive variant {self.variant!r}; valid: {', '.join(variants)}")
        if self.scope not in SCOPES:
            raise ValueError(f"unknown dispersive scope {self.scope!r}; valid: {', '.join(SCOPES)}")
        blocks = self.blocks
        if isinstance(blocks, str):
            if blocks not in ("last", "all", "paper"):
                raise ValueError(f"unknown block choice {blocks!r}; valid: 'last', 'all', 'paper', "
                                 "an int or a list of ints")
        else:
            items = [blocks] if isinstance(blocks, int) else list(blocks)
            if not items or any(isinstance(b, bool) or not isinstance(b, int) for b in items):
                raise ValueError(f"blocks must be 'last', 'all', 'paper', an int or a non-empty list "
                                 f"of ints, got {blocks!r}")
            object.__setattr__(self, "blocks", items[0] if isinstance(blocks, int) else tuple(items))
        if self.block_weights is not None:
            weights = tuple(float(w) for w in self.block_weights)
            if not weights or any(not math.isfinite(w) or w < 0 for w in weights):
                raise ValueError(f"block_weights must be finite numbers >= 0, got {self.block_weights!r}")
            object.__setattr__(self, "block_weights", weights)
            n = 1 if isinstance(self.blocks, int) else (len(self.blocks) if isinstance(self.blocks, tuple) else None)
            if n is not None and n != len(weights):
                raise ValueError(f"{len(weights)} block_weights for {n} blocks {self.blocks!r}")

    @property
    def enabled(self) -> bool:
        return self.lambda_ > 0

    @classmethod
    def preset(cls, name: DispersivePreset | str, **overrides: Any) -> "DispersiveConfig":
        """Named settings: "paper", "release" or "none"; keyword overrides applied on top."""
        which = parse_choice(DispersivePreset, name, "dispersive preset")
        base = {
            DispersivePreset.PAPER: dict(lambda_=0.5, tau=0.5, blocks="paper"),
            DispersivePreset.RELEASE: dict(lambda_=0.25, tau=1.0, blocks="last"),
            DispersivePreset.NONE: dict(lambda_=0.0),
        }[which]
        return cls(**{**base, "variant": "infonce_l2", "normalize_by_dim": True, **overrides})

    def resolve(self, depth: int) -> list[tuple[int, float]]:
        """[(0-based block index, weight)] for a model of ``depth`` blocks."""
        from models import resolve_blocks

        blocks = list(self.blocks) if isinstance(self.blocks, tuple) else self.blocks
        indices = resolve_blocks(blocks, depth)
        if self.block_weights is None:
            weights = [1.0 / len(indices)] * len(indices)
        else:
            if len(self.block_weights) != len(indices):
                raise ValueError(f"{len(self.block_weights)} block_weights for {len(indices)} blocks "
                                 f"({self.blocks!r} at depth {depth})")
            weights = list(self.block_weights)
        return list(zip(indices, weights))


def _kernel_accepts_scope() -> bool:
    import kernels

    return "scope" in inspect.signature(kernels.dispersive_loss).parameters


def dispersive_terms(hidden: Sequence[Tensor], blocks: Sequence[tuple[int, float]],
                     config: DispersiveConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """(lambda * sum_k w_k L_k with grad, {"dispersive/block_k": L_k detached})."""
    import kernels

    kwargs: dict[str, Any] = dict(variant=config.variant, tau=config.tau, margin=config.margin,
                                  normalize_by_dim=config.normalize_by_dim, backend=config.backend)
    if config.scope != "local":
        # Passed only when needed, so this works with kernels that predate `scope`.
        if not _kernel_accepts_scope():
            raise ValueError("scope='global' needs kernels.dispersive_loss(scope=...), which this "
                             "version of kernels does not have")
        kwargs["scope"] = config.scope
    # One call for all blocks: on the Triton backend one launch per kernel instead of one
    # call per block (the per-call host cost dominates at the paper's sizes).
    values = kernels.dispersive_loss_groups(list(hidden), **kwargs)                # (K,) fp32
    weights = [w for _, w in blocks]
    if all(w == weights[0] for w in weights):  # the default 1/K: no weight tensor needed
        total = values.sum() * weights[0]
    else:
        total = (values * torch.tensor(weights, dtype=values.dtype).to(values.device, non_blocking=True)).sum()
    logs = {f"dispersive/block_{index}": v for (index, _), v in zip(blocks, values.detach())}
    return config.lambda_ * total, logs


# ---------------------------------------------------------------------------------------
# The common interface
# ---------------------------------------------------------------------------------------


@runtime_checkable
class Objective(Protocol):
    """A training objective: one model call, a dict of scalars (see the module docstring)."""

    family: str

    def __call__(self, model: torch.nn.Module, x: Tensor, y: Tensor, valid: Tensor | None = None,
                 generator: torch.Generator | None = None) -> dict[str, Tensor]: ...


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

    def _call_model(self, model: torch.nn.Module, x_t: Tensor, t: Tensor, y: Tensor
                    ) -> tuple[Tensor, list[Tensor], list[tuple[int, float]]]:
        if not self.dispersive.enabled:
            return model(x_t, t, y), [], []
        depth = unwrap_model(model).config.depth
        blocks = self.dispersive.resolve(depth)
        out, hidden = model(x_t, t, y, return_hidden=[b for b, _ in blocks])
        return out, hidden, blocks

    def _finish(self, per_sample: Tensor, valid: Tensor | None, hidden: list[Tensor],
                blocks: list[tuple[int, float]], extras: dict[str, Tensor]) -> dict[str, Tensor]:
        diffusion_loss = _masked_mean(per_sample, valid)
        out: dict[str, Tensor] = {}
        if blocks:
            total, logs = dispersive_terms(hidden, blocks, self.dispersive)
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


@dataclass
class SiTObjective(_Base):
    """Flow / interpolant training of SiT models (see ``engine.diffusion.transport``)."""

    transport: TransportConfig = field(default_factory=TransportConfig)
    family: ClassVar[str] = "sit"

    def __post_init__(self) -> None:
        self._transport = Transport(self.transport)

    def compute(self, model: torch.nn.Module, x: Tensor, y: Tensor, t: Tensor, noise: Tensor,
                valid: Tensor | None = None) -> dict[str, Tensor]:
        """The objective at given times t (N,) in [0, 1] and noise (N, C, H, W)."""
        x = x.float()
        x_t, u_t = self._transport.interpolate(t, noise, x)  # (N, C, H, W) each
        out, hidden, blocks = self._call_model(model, x_t, t, y)
        per_sample = self._transport.loss_per_sample(out, t, noise, x_t, u_t)  # (N,)
        return self._finish(per_sample, valid, hidden, blocks, {})

    def __call__(self, model: torch.nn.Module, x: Tensor, y: Tensor, valid: Tensor | None = None,
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
        noise = _randn(x.shape, x, generator)  # noise first, then t: the release's order
        t = self._transport.sample_time(x.shape[0], device=x.device, generator=generator)
        return self.compute(model, x, y, t, noise, valid)


@dataclass
class DiTObjective(_Base):
    """DDPM training of DiT models: mse(eps) + vb (see ``engine.diffusion.gaussian``)."""

    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    family: ClassVar[str] = "dit"

    def __post_init__(self) -> None:
        self._diffusion: GaussianDiffusion = self.diffusion.build()

    def compute(self, model: torch.nn.Module, x: Tensor, y: Tensor, t: Tensor, noise: Tensor,
                valid: Tensor | None = None) -> dict[str, Tensor]:
        """The objective at given integer steps t (N,) and noise (N, C, H, W)."""
        x = x.float()
        x_t = self._diffusion.q_sample(x, t, noise)  # (N, C, H, W)
        out, hidden, blocks = self._call_model(model, x_t, self._diffusion.model_time(t), y)
        terms = self._diffusion.loss_terms(out, x, x_t, t, noise)  # each (N,)
        extras = {k: v for k, v in terms.items() if k != "loss"}
        return self._finish(terms["loss"], valid, hidden, blocks, extras)

    def __call__(self, model: torch.nn.Module, x: Tensor, y: Tensor, valid: Tensor | None = None,
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
        device = generator.device if generator is not None else x.device
        # t first, then noise: the release's order
        t = torch.randint(0, self._diffusion.num_timesteps, (x.shape[0],), generator=generator,
                          device=device).to(x.device)
        noise = _randn(x.shape, x, generator)
        return self.compute(model, x, y, t, noise, valid)


def build_objective(family: Literal["sit", "dit"], *, transport: TransportConfig | None = None,
                    diffusion: DiffusionConfig | None = None,
                    dispersive: DispersiveConfig | str | None = None) -> Objective:
    """The objective of a model family; ``dispersive`` may be a config or a preset name."""
    if isinstance(dispersive, (str, DispersivePreset)):
        dispersive = DispersiveConfig.preset(dispersive)
    dispersive = dispersive if dispersive is not None else DispersiveConfig()
    if family == "sit":
        if diffusion is not None:
            raise ValueError("diffusion= is the DiT objective's setting; SiT takes transport=")
        return SiTObjective(dispersive=dispersive, transport=transport or TransportConfig())
    if family == "dit":
        if transport is not None:
            raise ValueError("transport= is the SiT objective's setting; DiT takes diffusion=")
        return DiTObjective(dispersive=dispersive, diffusion=diffusion or DiffusionConfig())
    raise ValueError(f"unknown model family {family!r}; valid: 'sit', 'dit'")


__all__ = [
    "BlockSpec", "DispersiveConfig", "DispersivePreset", "DiTObjective", "Objective", "SiTObjective",
    "build_objective", "dispersive_terms",
]
