"""The toy harness's outputs: the results tables (markdown) and the side-by-side sample PNG."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from engine.experiments.scoring import RunMetrics
from engine.experiments.settings import NUM_CLASSES, ToyConfig
from engine.sampling.images import make_grid, render_latents, save_png


def side_by_side_png(path: Path, left: torch.Tensor, right: torch.Tensor, titles: tuple[str, str],
                     per_class: int) -> Path:
    """Two sample grids (one column per digit, ``per_class`` rows) with a gap and a title each."""
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
