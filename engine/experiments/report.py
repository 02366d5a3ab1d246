"""The toy harness's outputs: the results tables (markdown), the side-by-side sample PNG, and a
multi-seed study's summary (mean and spread per setting), table and PNG."""
from __future__ import annotations

import math
import statistics
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


def _setup(cfg: ToyConfig, seeds: str) -> str:
    return (f"Digits, SiT depth {cfg.depth} / hidden {cfg.hidden_size} / patch {cfg.patch_size}, {cfg.steps} steps of "
            f"batch {cfg.global_batch}, {seeds}; {cfg.samples_per_class * NUM_CLASSES} EMA samples "
            f"({cfg.sample_method} ODE, {cfg.sample_steps} grid points); probe at t = {cfg.probe_t}.")


def results_table(rows: Sequence[RunMetrics], real_fd: float, clf_acc: float, cfg: ToyConfig) -> str:
    lines = [
        _setup(cfg, f"seed {cfg.seed}"),
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


STUDY_METRICS = (("fd", "FD mean ± std", 3), ("class_acc", "class acc. mean ± std", 3),
                 ("probe_ema_best", "probe top-1 (EMA, best block)", 3),
                 ("diffusion_loss", "final diffusion loss", 4), ("term_gap", "term's gap to its floor", 4))
"""(key of a study row, column title, decimals): the metrics a study summarises over seeds."""


def spread(values: Sequence[float | None]) -> dict:
    """A metric over seeds: every value (None for a missing or non-finite one), and over the
    finite ones n, mean, sample std (n - 1; None under 2 values), min and max (None without any)."""
    vals = [None if v is None or not math.isfinite(v) else float(v) for v in values]
    xs = [v for v in vals if v is not None]
    return {"n": len(xs), "mean": statistics.fmean(xs) if xs else None,
            "std": statistics.stdev(xs) if len(xs) > 1 else None,
            "min": min(xs, default=None), "max": max(xs, default=None), "values": vals}


JUDGED = (("fd", "FD", True), ("class_acc", "class acc.", False))
"""(metric, name, lower is better): the sample metrics a setting is judged on against the baseline."""


def versus(m: dict, base: dict, lower_is_better: bool) -> str:
    """A setting's seeds against the baseline's on one metric: "better" when even its worst seed
    beats the baseline's best, "worse" when even its best seed is behind the baseline's worst,
    else "within the spread" (the two seeds' ranges overlap); "n/a" under 2 seeds on either side.
    With 3 seeds each, complete separation by chance alone has probability 1/20 per direction."""
    if min(m["n"], base["n"]) < 2:
        return "n/a"
    sign = 1.0 if lower_is_better else -1.0
    best, worst = sorted((sign * m["min"], sign * m["max"]))
    base_best, base_worst = sorted((sign * base["min"], sign * base["max"]))
    return "better" if worst < base_best else "worse" if best > base_worst else "within the spread"


def study_summary(rows: Sequence[dict]) -> list[dict]:
    """One entry per setting (rows grouped by run name, in first-seen order; the first is the
    baseline): its label, its seeds, the spread of each STUDY_METRICS metric over them, and per
    JUDGED metric how its seeds compare with the baseline's (``versus``; None for the baseline)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["name"], []).append(r)
    out = [{"name": name, "setting": rs[0]["setting"], "seeds": [r["seed"] for r in rs],
            "metrics": {key: spread([r[key] for r in rs]) for key, _, _ in STUDY_METRICS}}
           for name, rs in groups.items()]
    for k, g in enumerate(out):
        g["versus"] = None if k == 0 else {key: versus(g["metrics"][key], out[0]["metrics"][key], low)
                                           for key, _, low in JUDGED}
    return out


def _mean_std(m: dict, digits: int) -> str:
    if m["mean"] is None:
        return "n/a"
    return _fmt(m["mean"], digits) + ("" if m["std"] is None else f" ± {_fmt(m['std'], digits)}")


def study_table(summary: Sequence[dict], seeds: Sequence[int], real_fd: float, clf_acc: float,
                cfg: ToyConfig) -> str:
    lines = [
        _setup(cfg, f"training seeds {', '.join(map(str, seeds))} (classifier, real split, sampling noise and probe: "
                    f"seed {cfg.seed})"),
        "",
        "| setting | n seeds | " + " | ".join(title for _, title, _ in STUDY_METRICS) + " | "
        + " | ".join(f"{name} vs baseline" for _, name, _ in JUDGED) + " |",
        "|---|---|" + "---|" * (len(STUDY_METRICS) + len(JUDGED)),
    ]
    for g in summary:
        judged = [g["versus"][key] if g["versus"] else "(baseline)" for key, _, _ in JUDGED]
        lines.append(f"| {g['setting']} | {len(g['seeds'])} | "
                     + " | ".join(_mean_std(g["metrics"][key], d) for key, _, d in STUDY_METRICS) + " | "
                     + " | ".join(judged) + " |")
    lines += ["", "Mean ± sample standard deviation over the seeds (min, max and each seed's value in results.json). "
              "vs baseline: better = every seed of the setting beats every seed of the baseline, worse = every "
              "seed is behind every baseline seed, within the spread = the ranges overlap (n/a: under 2 seeds). "
              "Gap: the Dispersive term minus its floor at the run's last log step (the trainer's "
              "dispersive/block_k/gap, mean over the regularised blocks; 0 = at the floor, where its gradient "
              "vanishes).", "",
              f"Real held-out digits: FD {real_fd:.3f} (the floor at this sample size), classifier accuracy "
              f"{clf_acc:.3f}."]
    return "\n".join(lines)


_SHORT = (("no Dispersive Loss", "baseline"), ("lambda ", "λ"), ("tau ", "τ"), ("blocks ", ""),
          (", infonce_l2", ""), ("infonce_cosine", "cosine"), ("scale-invariant", "SI"))


def short_label(setting: str) -> str:
    """A setting's description (DispSetting.describe) short enough for an axis tick:
    "lambda 0.25, tau 0.5, blocks all, infonce_l2, scale-invariant" -> "λ0.25, τ0.5, all, SI"."""
    for long, short in _SHORT:
        setting = setting.replace(long, short)
    return setting


def study_png(path: Path, summary: Sequence[dict], title: str = "") -> Path:
    """FD and class accuracy per setting (two panels): each seed a point (one colour per seed), a
    tick at the mean, and the first setting's (the baseline's) min..max over seeds shaded across
    the panel with its mean dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # as engine.training.plots: no pyplot
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12.0, 5.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    seeds = sorted({s for g in summary for s in g["seeds"]})
    for ax, (key, name) in zip(axes, (("fd", "FD to the real digits (lower is better)"),
                                      ("class_acc", "class accuracy"))):
        base = summary[0]["metrics"][key]
        if base["mean"] is not None:
            ax.axhspan(base["min"], base["max"], color="0.88", label=f"{summary[0]['name']}: min..max over seeds")
            ax.axhline(base["mean"], color="0.45", linestyle="--", linewidth=1, label=f"{summary[0]['name']}: mean")
        for i, g in enumerate(summary):
            m = g["metrics"][key]
            for j, (seed, v) in enumerate(zip(g["seeds"], m["values"])):
                if v is not None:
                    x = i + (j - (len(g["seeds"]) - 1) / 2) * 0.12
                    ax.scatter([x], [v], s=22, color=f"C{seeds.index(seed) % 10}",
                               label=f"seed {seed}" if i == 0 else None, zorder=3)
            if m["mean"] is not None:
                ax.plot([i - 0.3, i + 0.3], [m["mean"]] * 2, color="k", linewidth=1.5, zorder=2,
                        label="mean over seeds" if i == 0 else None)
        ax.set_xticks(range(len(summary)), [short_label(g["setting"]) for g in summary], rotation=35,
                      ha="right", fontsize="small")
        ax.set_title(name)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()  # one legend for both panels, below them
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize="small")
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
