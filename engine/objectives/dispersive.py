"""The Dispersive Loss term of an objective: its typed config, presets and the per-block sum.

    total = lambda_ * sum_k w_k * kernels.dispersive_loss(hidden_k) over the chosen blocks
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, Sequence, Union

import torch
from torch import Tensor

import kernels
from engine.config.checks import fail, literals, number, one_of, parse_choice
from kernels.dispersive import Backend, Scope
from kernels.reference import Variant, scale_invariant_refusal
from models import resolve_blocks

BlockSpec = Union[int, Sequence[int], Literal["last", "all", "paper"]]


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
    variant: Variant = "infonce_l2"
    """The loss (``kernels.VARIANTS``): infonce_l2, infonce_cosine, hinge, covariance."""
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
    backend: Backend = "auto"
    """``kernels.dispersive_loss`` backend: auto, triton, torch, reference."""
    scale_invariant: bool = False
    """infonce_l2 and hinge only: divide the squared distances by the batch's mean off-diagonal
    squared distance, so the term no longer falls by scaling the block output up (normalize_by_dim
    then has no effect; the margin is in units of that mean)."""

    def __post_init__(self) -> None:
        owner = "DispersiveConfig"
        number(owner, "lambda_", self.lambda_, low=0)
        number(owner, "tau", self.tau, low=0, low_open=True)
        number(owner, "margin", self.margin, low=0, low_open=True)
        literals(self)  # variant, scope, backend: the kernels' own Literal types
        if not isinstance(self.scale_invariant, bool):
            raise fail(owner, "scale_invariant", "a bool", self.scale_invariant)
        refusal = scale_invariant_refusal(self.variant) if self.scale_invariant else None
        if refusal is not None:
            raise fail(owner, "scale_invariant", refusal, self.scale_invariant)
        blocks = self.blocks
        if isinstance(blocks, str):
            one_of(owner, "blocks", blocks, ("last", "all", "paper"))
        else:
            items = [blocks] if isinstance(blocks, int) else list(blocks)
            if not items or any(isinstance(b, bool) or not isinstance(b, int) for b in items):
                raise fail(owner, "blocks", "'last', 'all', 'paper', an int or a non-empty list of ints", blocks)
            object.__setattr__(self, "blocks", items[0] if isinstance(blocks, int) else tuple(items))
        if self.block_weights is not None:
            weights = tuple(self.block_weights)
            if not weights or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)
                                  or w < 0 for w in weights):
                raise fail(owner, "block_weights", "finite numbers >= 0", self.block_weights)
            object.__setattr__(self, "block_weights", tuple(float(w) for w in weights))
            n = 1 if isinstance(self.blocks, int) else (len(self.blocks) if isinstance(self.blocks, tuple) else None)
            if n is not None and n != len(weights):
                raise fail(owner, "block_weights", f"one weight per block ({n} for {self.blocks!r})",
                           self.block_weights)

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


def dispersive_terms(hidden: Sequence[Tensor], blocks: Sequence[tuple[int, float]], config: DispersiveConfig,
                     diagnostics: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """(lambda * sum_k w_k L_k with grad, {"dispersive/block_k": L_k detached}).

    With ``diagnostics`` (the trainer asks on log steps only) also, per block, detached:
    ``/gap`` the term minus its floor (``kernels.dispersive_floor``, the scale-invariant one
    with ``config.scale_invariant``; 0 = at the floor, where its gradient vanishes),
    ``/off_diagonal`` for the InfoNCE variants the softmax weight on pairs i != j (the share
    that carries gradient), ``/rms`` the block output's RMS (the floor can be reached by
    scaling the residual stream up, which the final LayerNorm hides; not with
    ``scale_invariant``).
    """
    # One call for all blocks: on the Triton backend one launch per kernel instead of one
    # call per block (the per-call host cost dominates at the paper's sizes).
    values = kernels.dispersive_loss_groups(
        list(hidden), variant=config.variant, tau=config.tau, margin=config.margin,
        normalize_by_dim=config.normalize_by_dim, backend=config.backend,
        **({"scope": config.scope} if config.scope != "local" else {}),
        **({"scale_invariant": True} if config.scale_invariant else {}))         # (K,) fp32
    weights = [w for _, w in blocks]
    if all(w == weights[0] for w in weights):  # the default 1/K: no weight tensor needed
        total = values.sum() * weights[0]
    else:
        total = (values * torch.tensor(weights, dtype=values.dtype).to(values.device, non_blocking=True)).sum()
    logs = {f"dispersive/block_{index}": v for (index, _), v in zip(blocks, values.detach())}
    if diagnostics:
        logs.update(_diagnostics(hidden, blocks, values.detach(), config))
    return config.lambda_ * total, logs


def _diagnostics(hidden: Sequence[Tensor], blocks: Sequence[tuple[int, float]], values: Tensor,
                 config: DispersiveConfig) -> dict[str, Tensor]:
    """Detached device scalars: no host synchronisation here."""
    rows = hidden[0].shape[0]
    if config.scope == "global" and torch.distributed.is_initialized():
        rows *= torch.distributed.get_world_size()  # the term sees the gathered batch
    floor = kernels.dispersive_floor(config.variant, rows, config.tau, config.margin,
                                     scale_invariant=config.scale_invariant)
    out: dict[str, Tensor] = {}
    for (index, _), value, h in zip(blocks, values, hidden):
        key = f"dispersive/block_{index}"
        out[f"{key}/gap"] = value - floor
        share = kernels.off_diagonal_share(config.variant, value, rows, config.tau)
        if share is not None:
            out[f"{key}/off_diagonal"] = share
        # fp32 accumulation without an fp32 copy of a bf16 block output
        out[f"{key}/rms"] = torch.linalg.vector_norm(h.detach(), dtype=torch.float32) / h.numel() ** 0.5
    return out
