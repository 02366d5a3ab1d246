"""Linear probes and dispersion statistics of a SiT/DiT model's block outputs (the command:
``python -m engine.probe``).

What it measures, for the raw weights and the EMA weights of a checkpoint (it holds both):

* Linear probe: labelled latents are noised to time ``t`` along the model's own path (SiT:
  ``x_t = alpha_t x + sigma_t eps``, t = 1 data, t = 0 noise; DiT: the DDPM forward process at
  step round((1 - t) (T - 1))), every chosen block's output (N, T, D) is mean-pooled over tokens
  to (N, D), and a logistic regression (standardised features, sklearn's L-BFGS) is fitted on a
  stratified split and scored (top-1) on the rest. The noise is drawn once from ``--seed``, so
  two checkpoints are probed on identical inputs.
* Dispersion statistics of each block output, flattened per sample to (N, T*D) exactly as the
  regulariser sees it, on the first ``--dispersion-samples`` latents:
    mean_sq_dist   mean over pairs i != j of ||z_i - z_j||^2 / (T*D)
    eff_rank       exp(entropy of the normalised singular values of the centred batch) (Roy and
                   Vetterli 2007): 1 for a batch on a line, up to N for a spread-out batch
    infonce_l2     the InfoNCE-L2 Dispersive Loss at ``--tau`` (``kernels.dispersive_loss``); its
                   floor is -log N, reached when every pair is far apart compared with tau: there
                   the loss is flat and its gradient vanishes (so the regulariser does nothing)

Labels: a class-conditional model gets its label through adaLN in every block, so probing with
the true label would read the label back, not a learned representation. By default the model is
given its null ("unconditional") label, which exists when it was trained with label dropout
(``class_dropout_prob > 0``, the releases' 0.1); ``--labels true`` overrides.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

import kernels
import models
from engine.data.datasets import digits_arrays
from engine.data.format import open_latent_dataset
from engine.diffusion.gaussian import DiffusionConfig
from engine.diffusion.transport import Transport, TransportConfig

LabelMode = Literal["null", "true"]


@dataclass(frozen=True)
class ProbeConfig:
    t: float = 0.5
    """Time the latents are noised to (1 = clean data, 0 = pure noise; SiT's convention)."""
    blocks: str | tuple[int, ...] = "all"
    """Blocks to read: "all", "last", "paper", or 0-based indices."""
    train_fraction: float = 0.5
    """Stratified share of the latents the probe is fitted on; it is scored on the rest."""
    seed: int = 0
    """Seed of the split and of the noise."""
    batch_size: int = 256
    labels: LabelMode = "null"
    """What the model is told: its null label ("null", default) or the true one ("true")."""
    C: float = 1.0
    """Inverse L2 strength of the logistic regression."""
    max_iter: int = 3000
    dispersion_samples: int = 256
    """Latents (the first ones) the dispersion statistics use; 0 skips them."""
    tau: float = 1.0
    """Temperature of the reported InfoNCE-L2 value."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.t <= 1.0:
            raise ValueError(f"t must be in [0, 1] (1 = data, 0 = noise), got {self.t}")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        if self.labels not in ("null", "true"):
            raise ValueError(f"labels must be 'null' or 'true', got {self.labels!r}")
        if self.batch_size < 1 or self.dispersion_samples < 0 or self.tau <= 0 or self.C <= 0:
            raise ValueError("batch_size must be >= 1, dispersion_samples >= 0, tau > 0 and C > 0")


@dataclass
class BlockReport:
    block: int
    """0-based block index."""
    top1: float
    """Linear-probe top-1 accuracy on the held-out split."""
    mean_sq_dist: float = math.nan
    eff_rank: float = math.nan
    infonce_l2: float = math.nan
    floor: float = math.nan
    """-log N: the InfoNCE-L2 value of a fully dispersed batch."""


@dataclass
class ProbeReport:
    weights: str
    """"model" (raw) or "ema"."""
    blocks: list[BlockReport] = field(default_factory=list)

    def best(self) -> BlockReport:
        return max(self.blocks, key=lambda b: b.top1)


# ---------------------------------------------------------------------------------------
# Data and noise
# ---------------------------------------------------------------------------------------


def load_labelled_latents(data: str | os.PathLike, *, size: int | None = None,
                          max_samples: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(latents (N, C, H, W) float32, labels (N,) int64): "digits" or a latent dataset folder."""
    if str(data) == "digits":
        x, y = digits_arrays(size or 16)
    else:
        ds = open_latent_dataset(data)
        n = len(ds)
        idx = np.arange(n)
        if max_samples is not None and max_samples < n:
            idx = np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))
        x, y = ds.get_batch(idx)
        x = np.asarray(x, dtype=np.float32)
    if max_samples is not None and str(data) == "digits":
        x, y = x[:max_samples], y[:max_samples]
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, dtype=np.int64))


def noised(model: torch.nn.Module, x: Tensor, t: float, noise: Tensor,
           transport: TransportConfig | None) -> tuple[Tensor, Tensor]:
    """(x_t, model time (N,)) for clean latents x at probe time t (1 = data)."""
    cfg = models.unwrap_model(model).config
    n = x.shape[0]
    if cfg.family == "sit":
        tt = torch.full((n,), float(t), dtype=torch.float32)
        x_t, _ = Transport(transport).interpolate(tt, noise, x)
        return x_t, tt
    diffusion = DiffusionConfig(learn_sigma=cfg.learn_sigma).build()
    step = int(round((1.0 - t) * (diffusion.num_timesteps - 1)))
    steps = torch.full((n,), step, dtype=torch.long)
    return diffusion.q_sample(x, steps, noise), steps.float()


def model_labels(model: torch.nn.Module, y: Tensor, mode: LabelMode) -> Tensor:
    """What the model is told: y itself ("true") or its null label ("null"; a ValueError when
    it has none)."""
    if mode == "true":
        return y
    null = models.unwrap_model(model).config.require_null_class(
        "probing with the null label (labels='null'; labels='true', --labels true, gives the model the true "
        "label instead, which it reads through adaLN in every block, so the probe then sees the label)")
    return torch.full_like(y, null)


# ---------------------------------------------------------------------------------------
# Features and statistics
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def block_features(model: torch.nn.Module, x: Tensor, y: Tensor, cfg: ProbeConfig, *,
                   transport: TransportConfig | None = None, noise: Tensor | None = None
                   ) -> tuple[list[int], list[Tensor], list[Tensor]]:
    """(block indices, pooled features per block (N, D), flattened outputs of the first
    ``cfg.dispersion_samples`` rows per block (n, T*D)), all float32 on the CPU."""
    inner = models.unwrap_model(model)
    blocks = models.resolve_blocks(cfg.blocks if isinstance(cfg.blocks, str) else list(cfg.blocks), inner.config.depth)
    device = next(inner.parameters()).device
    if noise is None:
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(cfg.seed))
    labels = model_labels(model, y, cfg.labels)
    pooled: list[list[Tensor]] = [[] for _ in blocks]
    flat: list[list[Tensor]] = [[] for _ in blocks]
    kept = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, x.shape[0], cfg.batch_size):
            sl = slice(start, start + cfg.batch_size)
            x_t, tt = noised(model, x[sl], cfg.t, noise[sl], transport)
            _, hidden = model(x_t.to(device), tt.to(device), labels[sl].to(device), return_hidden=blocks)
            take = max(0, min(cfg.dispersion_samples - kept, x_t.shape[0]))
            for k, h in enumerate(hidden):  # h: (n, T, D)
                pooled[k].append(h.float().mean(dim=1).cpu())  # (n, D)
                if take:
                    flat[k].append(h[:take].float().reshape(take, -1).cpu())  # (take, T*D)
            kept += take
    finally:
        model.train(was_training)
    return (blocks, [torch.cat(p) for p in pooled],
            [torch.cat(f) if f else torch.empty(0) for f in flat])


def dispersion_stats(z: Tensor, tau: float = 1.0) -> dict[str, float]:
    """Mean normalised pairwise squared distance, effective rank and InfoNCE-L2 of a batch (N, ...)."""
    z = z.reshape(z.shape[0], -1).double()
    n, d = z.shape
    if n < 2:
        raise ValueError(f"dispersion statistics need at least 2 samples, got {n}")
    zc = z - z.mean(0, keepdim=True)  # distances are translation invariant; centring avoids cancellation
    sq = (zc * zc).sum(1)
    gram = zc @ zc.T  # (N, N)
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0) / d
    mean_sq = float(dist.sum() / (n * (n - 1)))  # the diagonal is 0
    # Singular values of Zc are the square roots of the Gram's eigenvalues (N x N, cheap; an
    # SVD of the N x T*D matrix is not).
    ev = torch.linalg.eigvalsh(gram)
    ev = torch.where(ev > 1e-10 * ev.max(), ev, torch.zeros_like(ev))  # rounding noise is not rank
    s = ev.sqrt()
    p = s / s.sum().clamp_min(torch.finfo(torch.float64).tiny)
    p = p[p > 0]
    eff_rank = float(torch.exp(-(p * p.log()).sum()))
    loss = float(kernels.dispersive_loss(z, tau=tau, backend="torch"))
    return {"mean_sq_dist": mean_sq, "eff_rank": eff_rank, "infonce_l2": loss, "floor": -math.log(n)}


def stratified_split(y: np.ndarray, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split  # lazy: scikit-learn (with scipy) takes ~1 s to import

    idx = np.arange(len(y))
    train, test = train_test_split(idx, train_size=train_fraction, stratify=y, random_state=seed)
    return np.sort(train), np.sort(test)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 C: float = 1.0, max_iter: int = 3000) -> float:
    """Top-1 of a logistic regression on standardised features."""
    # lazy: scikit-learn (with scipy) takes ~1 s to import, and only the probe's fits need it
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    # One BLAS thread: this problem is tiny (hundreds x D), and multi-threaded BLAS on a busy
    # machine made each fit 30x slower in our measurements.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # top-1 is what we report either way
        clf.fit(train_x, train_y)
        return float((clf.predict(test_x) == test_y).mean())


def probe_model(model: torch.nn.Module, x: Tensor, y: Tensor, cfg: ProbeConfig | None = None, *,
                transport: TransportConfig | None = None, weights: str = "model") -> ProbeReport:
    """Probe every chosen block of ``model`` on latents x (N, C, H, W) with labels y (N,)."""
    cfg = cfg or ProbeConfig()
    blocks, pooled, flat = block_features(model, x, y, cfg, transport=transport)
    y_np = y.numpy()
    train, test = stratified_split(y_np, cfg.train_fraction, cfg.seed)
    report = ProbeReport(weights)
    for b, feats, z in zip(blocks, pooled, flat):
        f = feats.numpy().astype(np.float64)
        row = BlockReport(b, linear_probe(f[train], y_np[train], f[test], y_np[test], C=cfg.C, max_iter=cfg.max_iter))
        if z.numel():
            for key, value in dispersion_stats(z, cfg.tau).items():
                setattr(row, key, value)
        report.blocks.append(row)
    return report


def probe_checkpoint(path: str | os.PathLike | Mapping[str, Any], data: str = "digits",
                     cfg: ProbeConfig | None = None, *, weights: Sequence[str] = ("model", "ema"),
                     max_samples: int | None = None, device: str | torch.device = "cpu") -> list[ProbeReport]:
    """Probe the raw and EMA weights of a checkpoint on the same latents and noise."""
    cfg = cfg or ProbeConfig()
    ckpt = models.load_checkpoint_file(path) if isinstance(path, (str, os.PathLike)) else path
    transport = TransportConfig.of_checkpoint(ckpt)
    reports = []
    x = y = None
    for which in weights:
        model = models.load_model(ckpt, prefer=which).to(device)
        if x is None:
            mc = model.config
            x, y = load_labelled_latents(data, size=mc.input_size, max_samples=max_samples, seed=cfg.seed)
            if tuple(x.shape[1:]) != (mc.in_channels, mc.input_size, mc.input_size):
                raise ValueError(f"latents are {tuple(x.shape[1:])} but the model takes "
                                 f"{(mc.in_channels, mc.input_size, mc.input_size)}")
        reports.append(probe_model(model, x, y, cfg, transport=transport, weights=which))
    return reports


def format_probe_table(reports: Sequence[ProbeReport], title: str | None = None) -> str:
    """A Markdown table: one row per (weights, block)."""
    lines = [f"**{title}**", ""] if title else []
    lines += ["| weights | block | probe top-1 | mean sq. dist / D | eff. rank | InfoNCE-L2 (floor) |",
              "|---|---|---|---|---|---|"]
    for r in reports:
        for b in r.blocks:
            lines.append(f"| {r.weights} | {b.block} | {b.top1:.3f} | {b.mean_sq_dist:.4g} | {b.eff_rank:.1f} | "
                         f"{b.infonce_l2:.4f} ({b.floor:.4f}) |")
    return "\n".join(lines)
