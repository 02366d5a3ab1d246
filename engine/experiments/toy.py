"""Toy-scale reproduction on the built-in digits: the same small SiT with and without Dispersive Loss.

    python -m engine.toy --out runs/toy                  # the comparison (< 30 min on 2 CPU cores)
    python -m engine.toy --out runs/toy --smoke          # seconds: a tiny model, a few steps (tests)
    python -m engine.toy sweep --out runs/toy --lambdas 0.25 0.5 --taus 0.5 1 \\
        --blocks last all --variants infonce_l2 --steps 600

What one comparison does:
  1. trains a small digit classifier (a CNN on 16x16) on a stratified 2/3 of the real digits and
     reports its accuracy on the held-out 1/3; its 64-d penultimate layer is the feature space;
  2. trains the SiT twice through ``engine/train.py`` (same seed, so the same initial weights,
     batches, times and noise; no flips, a mirrored digit is not a digit): once without the
     regulariser, once with it (default: the PyTorch release's lambda 0.25, tau 1, last block);
  3. samples both EMA models from the same noise and labels (``samples_per_class`` per digit,
     a fixed-step ODE), and measures
       FD           Frechet distance of the samples' classifier features to the real training
                    split's (``engine.evaluation.fid``); "real" is the held-out real digits' FD, the floor
       class acc.   the classifier's accuracy on the samples w.r.t. the label they were asked for
       probe top-1  linear probe of the block outputs at ``probe_t`` (``engine.probe``), best
                    block and last block, EMA and raw weights
       dispersion   the regularised block's mean pairwise squared distance / D and InfoNCE-L2
                    value at the run's tau against its floor -log N (raw weights, N = 256)
  4. writes ``samples.png`` (baseline left, Dispersive Loss right; one column per digit; same
     noise in the same place) and ``results.md`` / ``results.json``.

Everything is cached under --out: a training run is reused when its exact command line matches
(``runs/<tag>/toy_run.json``), its samples and scores when the evaluation settings match
(``toy_eval.json``), the classifier when its settings match; so a sweep shares the baseline and
the classifier, and an interrupted command resumes at the first missing piece.
"""

from __future__ import annotations

import sys
from pathlib import Path


import argparse
import dataclasses
import itertools
import json
import math
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config.paths import REPO_ROOT

NUM_CLASSES = 10
EVAL_VERSION = 2  # bump when what evaluate_run measures changes: cached scores are then redone


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DispSetting:
    """One setting of the regulariser's knobs (passed to engine/train.py as --disp-* flags)."""

    lambda_: float = 0.25
    tau: float = 1.0
    blocks: str = "last"
    """"last", "all", "paper" or comma-separated 0-based indices such as "0,2"."""
    variant: str = "infonce_l2"

    def __post_init__(self) -> None:
        from engine.objectives.base import DispersiveConfig

        blocks: Any = self.blocks
        if isinstance(blocks, (list, tuple)):
            blocks = ",".join(str(b) for b in blocks)
            object.__setattr__(self, "blocks", blocks)
        DispersiveConfig(lambda_=self.lambda_, tau=self.tau, blocks=self.block_choice(),
                         variant=self.variant)  # validates
        if self.lambda_ <= 0:
            raise ValueError("a Dispersive Loss run needs lambda > 0 (the baseline is the run without it)")

    def block_choice(self) -> Any:
        """``blocks`` as DispersiveConfig / resolve_blocks take it: a keyword or a tuple of ints."""
        if self.blocks in ("last", "all", "paper"):
            return self.blocks
        try:
            return tuple(int(b) for b in str(self.blocks).split(","))
        except ValueError:
            raise ValueError(f"blocks must be last, all, paper or comma-separated ints, got {self.blocks!r}") from None

    def tag(self) -> str:
        return f"disp_l{self.lambda_:g}_t{self.tau:g}_{self.blocks.replace(',', '-')}_{self.variant}"

    def flags(self) -> list[str]:
        return ["--disp-preset", "release", "--disp-lambda", f"{self.lambda_:g}", "--disp-tau", f"{self.tau:g}",
                "--disp-blocks", self.blocks, "--disp-variant", self.variant]

    def describe(self) -> str:
        return f"lambda {self.lambda_:g}, tau {self.tau:g}, blocks {self.blocks}, {self.variant}"


@dataclass(frozen=True)
class ToyConfig:
    steps: int = 2000
    """Optimizer steps of each SiT run (2,000 x 128 images: recognisable digits; 600 x 64 with
    patch 2 gave blurred blobs in our runs)."""
    depth: int = 6
    hidden_size: int = 128
    num_heads: int = 4
    patch_size: int = 4
    """4 x 4 patches of the 16 x 16 digits: 16 tokens. Patch 2 (64 tokens) was 6x slower per image
    on the CPU and reached no better samples within the time budget."""
    global_batch: int = 128
    """Also the local batch the regulariser sees (one process)."""
    lr: float = 1e-3
    warmup_steps: int = 50
    ema_decay: float = 0.995
    seed: int = 0
    samples_per_class: int = 100
    """Samples drawn per digit for the metrics (1,000 in all by default)."""
    sample_method: str = "heun"
    sample_steps: int = 16
    """ODE grid points (Heun: 2 model calls per step)."""
    sample_batch: int = 250
    grid_per_class: int = 8
    """Rows of the side-by-side PNG (samples per digit shown)."""
    classifier_epochs: int = 40
    probe_t: float = 0.5
    probe_samples: int | None = None
    """Latents the probe uses (None: all 1,797 digits)."""
    dispersion_samples: int = 256
    disp: DispSetting = field(default_factory=DispSetting)

    def __post_init__(self) -> None:
        for name in ("steps", "depth", "hidden_size", "num_heads", "global_batch", "samples_per_class",
                     "sample_batch", "classifier_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sample_steps < 2:
            raise ValueError(f"sample_steps must be >= 2, got {self.sample_steps}")

    @classmethod
    def smoke(cls, **overrides: Any) -> "ToyConfig":
        """A few steps of a tiny model: exercises every stage in seconds (numbers mean nothing)."""
        base = dict(steps=4, depth=2, hidden_size=32, num_heads=2, global_batch=16, warmup_steps=0,
                    samples_per_class=4, sample_steps=3, sample_batch=40, grid_per_class=2,
                    classifier_epochs=2, probe_samples=200, dispersion_samples=32)
        return cls(**{**base, **overrides})

    def train_flags(self) -> list[str]:
        return ["--model", "sit_s", "--depth", str(self.depth), "--hidden-size", str(self.hidden_size),
                "--num-heads", str(self.num_heads), "--patch-size", str(self.patch_size), "--data", "digits",
                "--global-batch", str(self.global_batch), "--max-steps", str(self.steps), "--lr", f"{self.lr:g}",
                "--warmup-steps", str(self.warmup_steps), "--ema-decay", f"{self.ema_decay:g}",
                "--seed", str(self.seed), "--zero-stage", "1", "--loader", "torch", "--num-workers", "0",
                "--no-flip", "--ckpt-every", str(self.steps), "--keep-last-k", "1",
                "--log-every", str(max(1, self.steps // 10)), "--sample-count", "10", "--sample-steps", "10"]

    def run_suffix(self) -> str:
        return f"s{self.steps}_d{self.depth}_h{self.hidden_size}_p{self.patch_size}"


# ---------------------------------------------------------------------------------------
# Training runs (through engine/train.py, in a subprocess: DeepSpeed state stays per run)
# ---------------------------------------------------------------------------------------


@dataclass
class TrainedRun:
    name: str
    path: Path
    checkpoint: Path
    seconds: float
    final: dict
    reused: bool


def _log(msg: str) -> None:
    print(f"[toy] {msg}", flush=True)


def train_run(root: Path, cfg: ToyConfig, disp: DispSetting | None) -> TrainedRun:
    """Train (or reuse) one SiT run under root/runs/<tag>; returns its release checkpoint."""
    name = disp.tag() if disp is not None else "baseline"
    path = root / "runs" / f"{name}_{cfg.run_suffix()}"
    argv = [*cfg.train_flags(), *(disp.flags() if disp is not None else ["--disp-preset", "none"]),
            "--results-dir", str(path)]
    stamp = path / "toy_run.json"
    ckpt = path / "checkpoints" / f"{cfg.steps:07d}.pt"
    if stamp.exists() and ckpt.exists():
        saved = json.loads(stamp.read_text())
        if saved.get("argv") == argv:
            _log(f"reusing {path.name} (trained in {saved['seconds']:.0f} s)")
            return TrainedRun(name, path, ckpt, saved["seconds"], saved.get("final", {}), True)
    if path.exists():
        shutil.rmtree(path)  # a stale or partial run with other settings
    path.mkdir(parents=True)
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / "build" / "cache" / "torch_extensions"))
    env.setdefault("TRITON_CACHE_DIR", str(REPO_ROOT / "build" / "cache" / "triton"))
    env["PYTHONUNBUFFERED"] = "1"
    _log(f"training {path.name}: {cfg.steps} steps ({disp.describe() if disp else 'no Dispersive Loss'}); "
         f"log in {path / 'train.log'}")
    start = time.perf_counter()
    with open(path / "train.log", "w") as log:
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "engine" / "train.py"), *argv], cwd=REPO_ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not ckpt.exists():
        tail = (path / "train.log").read_text()[-3000:]
        raise RuntimeError(f"training {path.name} failed (exit {proc.returncode}); end of its log:\n{tail}")
    summary = json.loads((path / "summary.json").read_text())
    final = summary.get("final", {})
    stamp.write_text(json.dumps({"argv": argv, "seconds": seconds, "final": final}, indent=2))
    _log(f"trained {path.name} in {seconds:.0f} s")
    return TrainedRun(name, path, ckpt, seconds, final, False)


# ---------------------------------------------------------------------------------------
# The digit classifier (feature space of the Frechet distance)
# ---------------------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """Two conv stages and a 64-d hidden layer on (N, 1, 16, 16) digits in [-1, 1]."""

    FEATURES = 64

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, self.FEATURES)
        self.fc2 = nn.Linear(self.FEATURES, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, 16, 8, 8)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (N, 32, 4, 4)
        return F.relu(self.fc1(h.flatten(1)))  # (N, 64): the FD feature space

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))  # (N, 10)


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (background -1 filled in): a little robustness."""
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    out = torch.roll(x, (dy, dx), dims=(2, 3))
    if dy:
        out[:, :, (0 if dy > 0 else -1)] = -1.0
    if dx:
        out[:, :, :, (0 if dx > 0 else -1)] = -1.0
    return out


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> DigitClassifier:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = DigitClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 64):
            idx = order[start:start + 64]
            loss = F.cross_entropy(net(_shift(x[idx], gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@dataclass
class RealData:
    x: torch.Tensor  # (1797, 1, 16, 16) in [-1, 1]
    y: torch.Tensor  # (1797,)
    train: np.ndarray  # indices of the classifier's (and FD reference's) split
    test: np.ndarray  # held-out indices


def real_digits(seed: int) -> RealData:
    from engine.data.datasets import digits_arrays
    from engine.evaluation.probe import stratified_split

    x, y = digits_arrays(16)
    train, test = stratified_split(y, 2 / 3, seed)
    return RealData(torch.from_numpy(x), torch.from_numpy(y), train, test)


def get_classifier(root: Path, cfg: ToyConfig, real: RealData) -> tuple[DigitClassifier, float]:
    """The cached classifier (retrained when its settings differ) and its held-out accuracy."""
    path = root / "classifier.pt"
    settings = {"epochs": cfg.classifier_epochs, "seed": cfg.seed, "arch": "conv16-conv32-fc64", "split": "2/3"}
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("settings") == settings:
            net = DigitClassifier()
            net.load_state_dict(saved["state_dict"])
            return net.eval(), float(saved["heldout_acc"])
    _log(f"training the digit classifier ({cfg.classifier_epochs} epochs)")
    net = train_classifier(real.x[real.train], real.y[real.train], cfg.classifier_epochs, cfg.seed)
    with torch.no_grad():
        acc = float((net(real.x[real.test]).argmax(1) == real.y[real.test]).float().mean())
    root.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "settings": settings, "heldout_acc": acc}, path)
    return net, acc


@torch.no_grad()
def classifier_features(net: DigitClassifier, x: torch.Tensor) -> np.ndarray:
    return torch.cat([net.features(x[i:i + 512]) for i in range(0, len(x), 512)]).double().numpy()


# ---------------------------------------------------------------------------------------
# Sampling and metrics
# ---------------------------------------------------------------------------------------


def sample_noise_and_labels(cfg: ToyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed noise and labels (row i asks for digit i % 10), identical for every run."""
    n = cfg.samples_per_class * NUM_CLASSES
    gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
    return torch.randn((n, 1, 16, 16), generator=gen), torch.arange(n) % NUM_CLASSES


@torch.no_grad()
def sample_run(ckpt_path: Path, cfg: ToyConfig, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """EMA samples (N, 1, 16, 16) as latents (unclamped)."""
    import models
    from engine.sampling.samplers import SamplerConfig, sample_latents
    from engine.diffusion.transport import TransportConfig

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
                 ref_stats, noise: torch.Tensor, labels: torch.Tensor) -> tuple[RunMetrics, torch.Tensor]:
    """Sample, score and probe one run; cached in the run folder (``toy_eval.json``) under a key of
    every setting that affects the numbers, so a sweep re-scores nothing it has scored before."""
    key = {"version": EVAL_VERSION, "eval": _jsonable({k: v for k, v in asdict(cfg).items() if k != "disp"}), "run": run.name,
           "checkpoint_mtime_ns": run.checkpoint.stat().st_mtime_ns}
    cache, latents_path = run.path / "toy_eval.json", run.path / "samples_latents.npy"
    if cache.exists() and latents_path.exists():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            metrics = RunMetrics(**saved["metrics"])
            metrics.train_seconds = run.seconds
            return metrics, torch.from_numpy(np.load(latents_path))
    metrics, samples = _evaluate_run(run, disp, cfg, real, net, ref_stats, noise, labels)
    np.save(latents_path, samples.numpy())
    cache.write_text(json.dumps({"key": key, "metrics": asdict(metrics)}, indent=2))
    return metrics, samples


def _evaluate_run(run: TrainedRun, disp: DispSetting | None, cfg: ToyConfig, real: RealData, net: DigitClassifier,
                  ref_stats, noise: torch.Tensor, labels: torch.Tensor) -> tuple[RunMetrics, torch.Tensor]:
    import models
    from engine.evaluation.fid import FeatureStatistics, frechet_distance_stats
    from engine.sampling.images import render_latents, save_npz
    from engine.evaluation.probe import ProbeConfig, probe_model
    from engine.diffusion.transport import TransportConfig
    from models import resolve_blocks

    _log(f"sampling and probing {run.name}")
    samples = sample_run(run.checkpoint, cfg, noise, labels)  # (N, 1, 16, 16)
    save_npz(run.path / "samples_ema.npz", render_latents(samples), labels.numpy())
    clamped = samples.clamp(-1.0, 1.0)  # the pixel range of the real digits
    feats = classifier_features(net, clamped)
    fd = frechet_distance_stats(FeatureStatistics.from_features(feats), ref_stats).distance
    with torch.no_grad():
        class_acc = float((net(clamped).argmax(1) == labels).float().mean())

    ckpt = models.load_checkpoint_file(run.checkpoint)
    transport = TransportConfig.of_checkpoint(ckpt)
    n_probe = cfg.probe_samples or len(real.x)
    # InfoNCE-L2 is reported at the run's own tau (1 for the baseline, the release's value).
    pcfg = ProbeConfig(t=cfg.probe_t, blocks="all", seed=cfg.seed, dispersion_samples=cfg.dispersion_samples,
                       tau=disp.tau if disp else 1.0)
    reports = {w: probe_model(models.load_model(ckpt, prefer=w), real.x[:n_probe], real.y[:n_probe], pcfg,
                              transport=transport, weights=w) for w in ("ema", "model")}
    depth = cfg.depth
    disp_block = resolve_blocks(disp.block_choice(), depth)[0] if disp else depth - 1
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


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------


def side_by_side_png(path: Path, left: torch.Tensor, right: torch.Tensor, titles: tuple[str, str],
                     per_class: int) -> Path:
    """Two sample grids (one column per digit, ``per_class`` rows) with a gap and a title each."""
    from PIL import Image, ImageDraw

    from engine.sampling.images import make_grid, render_latents, save_png

    n = min(per_class * NUM_CLASSES, len(left))
    grids = [make_grid(render_latents(s[:n]), nrow=NUM_CLASSES) for s in (left, right)]
    h, w, _ = grids[0].shape
    gap, head = 12, 14
    canvas = np.full((h + head, 2 * w + gap, 3), 255, np.uint8)
    canvas[head:, :w] = grids[0]
    canvas[head:, w + gap:] = grids[1]
    scale = max(1, math.ceil(512 / canvas.shape[1]))  # upscale first so the titles stay legible
    img = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for k, title in enumerate(titles):
        draw.text((k * (w + gap) * scale + 4, 2), title, fill=(0, 0, 0))
    return save_png(np.asarray(img), path, min_side=1)


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def results_table(rows: Sequence[RunMetrics], real_fd: float, clf_acc: float, cfg: ToyConfig) -> str:
    lines = [
        f"Digits, SiT depth {cfg.depth} / hidden {cfg.hidden_size} / patch {cfg.patch_size}, {cfg.steps} steps of "
        f"batch {cfg.global_batch}, seed {cfg.seed}; {cfg.samples_per_class * NUM_CLASSES} EMA samples "
        f"({cfg.sample_method} ODE, {cfg.sample_steps} grid points); probe at t = {cfg.probe_t}.",
        "",
        "| run | FD (lower is better) | class acc. | probe top-1 EMA best (block) / last | probe top-1 raw best (block) / last "
        "| regularised block: mean sq. dist / D | InfoNCE-L2 at the run's tau (floor) | eff. rank | final diffusion loss | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.setting} | {_fmt(r.fd)} | {_fmt(r.class_acc)} | {_fmt(r.probe_ema_best)} ({r.probe_ema_best_block}) / "
            f"{_fmt(r.probe_ema_last)} | {_fmt(r.probe_raw_best)} ({r.probe_raw_best_block}) / {_fmt(r.probe_raw_last)} | "
            f"block {r.disp_block}: {r.mean_sq_dist:.4g} | {_fmt(r.infonce_l2, 4)} ({_fmt(r.infonce_floor, 4)}) | "
            f"{r.eff_rank:.1f} | {_fmt(r.diffusion_loss, 4)} | {r.train_seconds:.0f} |")
    lines += ["", f"Real held-out digits: FD {real_fd:.3f} (the floor at this sample size), classifier accuracy "
              f"{clf_acc:.3f}."]
    return "\n".join(lines)


def per_block_table(rows: Sequence[RunMetrics]) -> str:
    depth = len(rows[0].per_block["ema"])
    head = "| run | weights | " + " | ".join(f"block {b}" for b in range(depth)) + " |"
    lines = ["Linear-probe top-1 per block:", "", head, "|---|---|" + "---|" * depth]
    for r in rows:
        for w in ("ema", "raw"):
            lines.append(f"| {r.setting} | {w} | " + " | ".join(f"{v:.3f}" for v in r.per_block[w]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------


@dataclass
class Shared:
    real: RealData
    net: DigitClassifier
    clf_acc: float
    ref_stats: Any
    real_fd: float
    noise: torch.Tensor
    labels: torch.Tensor


def prepare(root: Path, cfg: ToyConfig) -> Shared:
    from engine.evaluation.fid import FeatureStatistics, frechet_distance_stats

    real = real_digits(cfg.seed)
    net, acc = get_classifier(root, cfg, real)
    ref = FeatureStatistics.from_features(classifier_features(net, real.x[real.train]))
    held = FeatureStatistics.from_features(classifier_features(net, real.x[real.test]))
    real_fd = frechet_distance_stats(held, ref).distance
    noise, labels = sample_noise_and_labels(cfg)
    _log(f"classifier held-out accuracy {acc:.3f}; real held-out FD {real_fd:.3f}")
    return Shared(real, net, acc, ref, real_fd, noise, labels)


def run_compare(root: Path, cfg: ToyConfig) -> dict:
    """Baseline vs one Dispersive Loss setting: results.md, results.json, samples.png under root."""
    t0 = time.perf_counter()
    shared = prepare(root, cfg)
    rows, samples = [], []
    for disp in (None, cfg.disp):
        run = train_run(root, cfg, disp)
        m, s = evaluate_run(run, disp, cfg, shared.real, shared.net, shared.ref_stats, shared.noise, shared.labels)
        rows.append(m)
        samples.append(s)
    png = side_by_side_png(root / "samples.png", samples[0], samples[1],
                           ("baseline", f"Dispersive Loss ({cfg.disp.describe()})"), cfg.grid_per_class)
    table = results_table(rows, shared.real_fd, shared.clf_acc, cfg) + "\n\n" + per_block_table(rows)
    seconds = time.perf_counter() - t0
    text = f"# Toy comparison\n\n{table}\n\nWall time of this command: {seconds:.0f} s.\n"
    (root / "results.md").write_text(text)
    result = {"config": _jsonable(asdict(cfg)), "real_fd": shared.real_fd, "classifier_acc": shared.clf_acc,
              "runs": [asdict(r) for r in rows], "png": str(png), "seconds": seconds}
    (root / "results.json").write_text(json.dumps(result, indent=2))
    print(text, flush=True)
    return result


def run_sweep(root: Path, cfg: ToyConfig, settings: Sequence[DispSetting]) -> dict:
    """The baseline plus every setting (shared baseline run, classifier, noise): sweep_<suffix>.md/json."""
    t0 = time.perf_counter()
    shared = prepare(root, cfg)
    rows = []
    for disp in (None, *settings):
        run = train_run(root, cfg, disp)
        m, _ = evaluate_run(run, disp, cfg, shared.real, shared.net, shared.ref_stats, shared.noise, shared.labels)
        rows.append(m)
    seconds = time.perf_counter() - t0
    table = results_table(rows, shared.real_fd, shared.clf_acc, cfg)
    text = f"# Dispersive Loss sweep\n\n{table}\n\nWall time of this command: {seconds:.0f} s.\n"
    stem = root / f"sweep_{cfg.run_suffix()}"
    stem.with_suffix(".md").write_text(text)
    result = {"config": _jsonable(asdict(cfg)), "settings": [asdict(s) for s in settings],
              "real_fd": shared.real_fd, "classifier_acc": shared.clf_acc, "runs": [asdict(r) for r in rows],
              "seconds": seconds}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(text, flush=True)
    return result


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/toy", help="output folder (runs and results are cached here)")
    p.add_argument("--smoke", action="store_true", help="tiny model, a few steps: checks the pipeline in seconds")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 2000; smoke 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-class", type=int, default=None, help="samples per digit for the metrics")
    p.add_argument("--sample-steps", type=int, default=None, help="ODE grid points")
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None, help="default 4")
    p.add_argument("--global-batch", type=int, default=None, help="default 128")


def _config(args: argparse.Namespace, **extra: Any) -> ToyConfig:
    overrides = {k: v for k, v in (("steps", args.steps), ("samples_per_class", args.samples_per_class),
                                    ("sample_steps", args.sample_steps), ("depth", args.depth),
                                    ("hidden_size", args.hidden_size), ("patch_size", args.patch_size),
                                    ("global_batch", args.global_batch)) if v is not None}
    overrides.update(seed=args.seed, **extra)
    return ToyConfig.smoke(**overrides) if args.smoke else ToyConfig(**overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.toy", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_arguments(p)
    p.add_argument("--lambda", dest="lambda_", type=float, default=0.25, help="Dispersive Loss weight")
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--blocks", default="last", help="last, all, paper, or e.g. 0,3")
    p.add_argument("--variant", default="infonce_l2")
    return p


def build_sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.toy sweep",
                                description="Sweep the regulariser's knobs against one shared baseline.")
    _common_arguments(p)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.25])
    p.add_argument("--taus", type=float, nargs="+", default=[1.0])
    p.add_argument("--blocks", nargs="+", default=["last"], help="each: last, all, paper, or e.g. 0,3")
    p.add_argument("--variants", nargs="+", default=["infonce_l2"])
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sweep":
        parser = build_sweep_parser()
        args = parser.parse_args(argv[1:])
        try:  # bad knob values: a usage error naming the problem, before anything trains
            settings = [DispSetting(lambda_=l, tau=t, blocks=b, variant=v) for l, t, b, v in
                        itertools.product(args.lambdas, args.taus, args.blocks, args.variants)]
            cfg = _config(args)
        except (ValueError, TypeError) as e:
            parser.error(str(e))
        return run_sweep(Path(args.out), cfg, settings)
    if argv and argv[0] == "run":
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = _config(args, disp=DispSetting(lambda_=args.lambda_, tau=args.tau, blocks=args.blocks,
                                             variant=args.variant))
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    return run_compare(Path(args.out), cfg)
