"""Sampling a toy run from the shared noise and scoring it: FD and class accuracy of the samples, linear probe and dispersion of the blocks."""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import models
from engine.diffusion.transport import TransportConfig
from engine.evaluation.fid import FeatureStatistics, frechet_distance_stats
from engine.evaluation.probe import ProbeConfig, probe_model
from engine.experiments.classifier import DigitClassifier, RealData, classifier_features
from engine.experiments.runs import TrainedRun
from engine.experiments.settings import NUM_CLASSES, DispSetting, ToyConfig, log
from engine.sampling.images import render_latents, save_npz
from engine.sampling.samplers import SamplerConfig, sample_latents

EVAL_VERSION = 2  # bump when what evaluate_run measures changes: cached scores are then redone


def sample_noise_and_labels(cfg: ToyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed noise and labels (row i asks for digit i % 10), identical for every run."""
    n = cfg.samples_per_class * NUM_CLASSES
    gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
    return torch.randn((n, 1, 16, 16), generator=gen), torch.arange(n) % NUM_CLASSES


@torch.no_grad()
def sample_run(ckpt_path: Path, cfg: ToyConfig, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """EMA samples (N, 1, 16, 16) as latents (unclamped)."""
    ckpt = models.load_checkpoint_file(ckpt_path)
    model = models.load_model(ckpt, prefer="ema")
    sampler = SamplerConfig(kind="ode", method=cfg.sample_method, num_steps=cfg.sample_steps)
    transport = TransportConfig.of_checkpoint(ckpt)
    out = [sample_latents(model, labels[i:i + cfg.sample_batch], noise[i:i + cfg.sample_batch], sampler=sampler,
                          transport=transport) for i in range(0, len(labels), cfg.sample_batch)]
    return torch.cat(out)


@dataclass
class RunMetrics:
    name: str
    setting: str
    fd: float
    class_acc: float
    probe_ema_best: float
    probe_ema_best_block: int
    probe_ema_last: float
    probe_raw_best: float
    probe_raw_best_block: int
    probe_raw_last: float
    disp_block: int
    """The block whose dispersion is reported: the first regularised one (last for the baseline)."""
    mean_sq_dist: float
    infonce_l2: float
    infonce_floor: float
    eff_rank: float
    diffusion_loss: float
    train_seconds: float
    per_block: dict = field(default_factory=dict)
    """{"ema": [top-1 per block], "raw": [...]}"""


def evaluate_run(run: TrainedRun, disp: DispSetting | None, cfg: ToyConfig, real: RealData, net: DigitClassifier,
                 ref_stats: FeatureStatistics, noise: torch.Tensor,
                 labels: torch.Tensor) -> tuple[RunMetrics, torch.Tensor]:
    """Sample, score and probe one run; cached in the run folder (``toy_eval.json``) under a key of
    every setting that affects the numbers, so a sweep re-scores nothing it has scored before."""
    key = {"version": EVAL_VERSION, "eval": {k: v for k, v in cfg.as_json().items() if k != "disp"}, "run": run.name,
           "checkpoint_mtime_ns": run.checkpoint.stat().st_mtime_ns}
    cache, latents_path = run.path / "toy_eval.json", run.path / "samples_latents.npy"
    if cache.exists() and latents_path.exists():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            metrics = RunMetrics(**saved["metrics"])
            metrics.train_seconds = run.seconds
            return metrics, torch.from_numpy(np.load(latents_path))
    metrics, samples = _score_run(run, disp, cfg, real, net, ref_stats, noise, labels)
    np.save(latents_path, samples.numpy())
    cache.write_text(json.dumps({"key": key, "metrics": asdict(metrics)}, indent=2))
    return metrics, samples


def term_gap(final: dict) -> float | None:
    """The Dispersive term's gap to its floor at a run's last log step (its ``final`` metrics): the
    mean over the regularised blocks of the trainer's ``dispersive/block_k/gap`` (the term is the
    mean of the blocks' values, so this is its own gap; 0 = at the floor, where its gradient
    vanishes); None for a run without the term."""
    gaps = [float(v) for k, v in final.items() if re.fullmatch(r"dispersive/block_\d+/gap", k)]
    return sum(gaps) / len(gaps) if gaps else None


def score_samples(samples: torch.Tensor, labels: torch.Tensor, net: DigitClassifier,
                  ref_stats: FeatureStatistics) -> tuple[float, float]:
    """(FD of the samples' classifier features to ``ref_stats``, the classifier's accuracy on them
    w.r.t. the ``labels`` they were asked for); samples (N, 1, 16, 16) latents, clamped first to
    the pixel range of the real digits."""
    clamped = samples.clamp(-1.0, 1.0)
    fd = frechet_distance_stats(FeatureStatistics.from_features(classifier_features(net, clamped)),
                                ref_stats).distance
    with torch.no_grad():
        class_acc = float((net(clamped).argmax(1) == labels).float().mean())
    return fd, class_acc


def _score_run(run: TrainedRun, disp: DispSetting | None, cfg: ToyConfig, real: RealData, net: DigitClassifier,
               ref_stats: FeatureStatistics, noise: torch.Tensor,
               labels: torch.Tensor) -> tuple[RunMetrics, torch.Tensor]:
    log(f"sampling and probing {run.name}")
    samples = sample_run(run.checkpoint, cfg, noise, labels)  # (N, 1, 16, 16)
    save_npz(run.path / "samples_ema.npz", render_latents(samples), labels.numpy())
    fd, class_acc = score_samples(samples, labels, net, ref_stats)

    ckpt = models.load_checkpoint_file(run.checkpoint)
    transport = TransportConfig.of_checkpoint(ckpt)
    n_probe = cfg.probe_samples or len(real.x)
    # InfoNCE-L2 is reported at the run's own tau (1 for the baseline, the release's value).
    pcfg = ProbeConfig(t=cfg.probe_t, blocks="all", seed=cfg.seed, dispersion_samples=cfg.dispersion_samples,
                       tau=disp.tau if disp else 1.0)
    reports = {w: probe_model(models.load_model(ckpt, prefer=w), real.x[:n_probe], real.y[:n_probe], pcfg,
                              transport=transport, weights=w) for w in ("ema", "model")}
    depth = cfg.depth
    disp_block = models.resolve_blocks(disp.block_choice(), depth)[0] if disp else depth - 1
    raw_row = reports["model"].blocks[disp_block]
    ema, raw = reports["ema"], reports["model"]
    metrics = RunMetrics(
        name=run.name, setting=disp.describe() if disp else "no Dispersive Loss", fd=fd, class_acc=class_acc,
        probe_ema_best=ema.best().top1, probe_ema_best_block=ema.best().block, probe_ema_last=ema.blocks[-1].top1,
        probe_raw_best=raw.best().top1, probe_raw_best_block=raw.best().block, probe_raw_last=raw.blocks[-1].top1,
        disp_block=disp_block, mean_sq_dist=raw_row.mean_sq_dist, infonce_l2=raw_row.infonce_l2,
        infonce_floor=raw_row.floor, eff_rank=raw_row.eff_rank,
        diffusion_loss=float(run.final.get("diffusion_loss", math.nan)), train_seconds=run.seconds,
        per_block={"ema": [b.top1 for b in ema.blocks], "raw": [b.top1 for b in raw.blocks]})
    return metrics, samples
