"""Curves of training runs from their ``metrics.jsonl``: one run's (the trainer's ``curves.png``,
``python -m engine.plot``) and several runs side by side (the toy harness's comparisons).

A run's record stream may be unfinished: a running run has no summary yet, a killed one may end
in half a line, and a run resumed after a crash logs some steps twice (the later record wins).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import kernels
from engine.config.flags import config_from_dict
from engine.objectives.dispersive import DispersiveConfig
from engine.training.config import TrainConfig

DPI = 100
RUN_SIZE = (12.0, 8.0)  # inches: a 1200 x 800 PNG
COMPARISON_SIZE = (12.0, 4.5)  # 1200 x 450
_BLOCK = re.compile(r"dispersive/block_(\d+)")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, one per logged step in step order; lines that are not
    whole JSON records (the half line a killed run leaves) are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a training run writes it into its results_dir "
                                "at its first log step)")
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    if not by_step:
        raise ValueError(f"{path}: no metrics records yet (a run writes one every --log-every steps)")
    return [by_step[s] for s in sorted(by_step)]


@dataclass(frozen=True)
class Floor:
    """The lowest value one block's unweighted term can take (``kernels.dispersive_floor``) for the
    N rows it sees: -log N for InfoNCE-L2, whose log-mean-exp runs over all N^2 pairs including
    i = j (distance 0)."""

    value: float
    n: int
    variant: str

    @classmethod
    def of(cls, disp: DispersiveConfig, micro: int, world: int) -> "Floor | None":
        """The floor of a run's term (None when it is off): N is the micro batch, or micro x world
        under ``scope global``."""
        if not disp.enabled:
            return None
        n = micro * (world if disp.scope == "global" else 1)
        value = kernels.dispersive_floor(disp.variant, n, disp.tau, disp.margin,
                                         scale_invariant=disp.scale_invariant)
        variant = f"{disp.variant} (scale-invariant)" if disp.scale_invariant else disp.variant
        return cls(value, n, variant)

    def label(self) -> str:
        name = "-log N" if self.variant == "infonce_l2" else self.variant
        return f"floor {name} = {self.value:.3f} (N = {self.n})"


def run_floor(run_dir: str | os.PathLike) -> Floor | None:
    """``Floor.of`` a run, from the ``config.json`` and ``deepspeed_config.json`` it wrote; None when
    the term is off or the files are missing or unreadable."""
    run_dir = Path(run_dir)
    try:
        cfg = config_from_dict(TrainConfig, json.loads((run_dir / "config.json").read_text()))
        ds = json.loads((run_dir / "deepspeed_config.json").read_text())
        micro = int(ds["train_micro_batch_size_per_gpu"])
        world = int(ds["train_batch_size"]) // (micro * int(ds.get("gradient_accumulation_steps", 1)))
    except (OSError, KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return Floor.of(cfg.dispersive, micro, world)


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def block_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """The ``dispersive/block_K`` keys present (each block's term, not its diagnostics such as
    ``dispersive/block_K/gap``), in block order."""
    keys = {k for r in records for k in r if _BLOCK.fullmatch(k)}
    return sorted(keys, key=lambda k: int(_BLOCK.fullmatch(k).group(1)))


def _figure(size: tuple[float, float], rows: int, cols: int):
    # matplotlib costs ~0.4 s to import and every rank imports the trainer; only rank 0 draws, once.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without pyplot's global state
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, path)  # a reader never sees half a PNG
    return path


def _floor_line(ax, floor: Floor | None) -> None:
    if floor is not None:
        ax.axhline(floor.value, color="0.4", linestyle="--", linewidth=1, label=floor.label())


def _panel(ax, title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator  # with the Figure: see _figure

    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def plot_curves(records: Sequence[dict[str, Any]], path: str | os.PathLike, *, floor: Floor | None = None,
                title: str = "") -> Path:
    """Four panels: diffusion loss; each block's Dispersive term against ``floor``; grad norm;
    throughput (images/s; the medians of TFLOP/s and MFU in its title)."""
    fig, axes = _figure(RUN_SIZE, 2, 2)
    (loss_ax, disp_ax), (norm_ax, speed_ax) = axes
    loss_ax.plot(*_series(records, "diffusion_loss"), color="C0")
    _panel(loss_ax, "diffusion loss", "loss")
    blocks = block_keys(records)
    for k, key in enumerate(blocks):
        disp_ax.plot(*_series(records, key), color=f"C{k % 10}", label=key.partition("/")[2].replace("_", " "))
    if blocks:
        _floor_line(disp_ax, floor)
        disp_ax.legend(fontsize="small")
    else:
        disp_ax.text(0.5, 0.5, "Dispersive Loss off", ha="center", va="center", transform=disp_ax.transAxes)
    _panel(disp_ax, "Dispersive Loss per block (unweighted)", "term")
    steps, norms = _series(records, "grad_norm")
    norm_ax.plot(steps, norms, color="C2")
    if norms and all(v > 0 and math.isfinite(v) for v in norms) and max(norms) > 10 * min(norms):
        norm_ax.set_yscale("log")
    _panel(norm_ax, "gradient norm", "global L2 norm")
    speed_ax.plot(*_series(records, "images_per_s"), color="C3")
    rates = [f"median {np.median(_series(records, 'tflops')[1] or [math.nan]):.3g} TFLOP/s"]
    mfu = _series(records, "mfu")[1]
    if mfu:
        rates.append(f"MFU {np.median(mfu):.1%}")
    _panel(speed_ax, f"throughput ({', '.join(rates)})", "images/s")
    last = records[-1]["step"] if records else 0
    fig.suptitle(f"{title} (up to step {last})" if title else f"up to step {last}")
    return _save(fig, path)


def plot_run_curves(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
                    floor: Floor | None = None) -> Path:
    """``plot_curves`` of ``run_dir/metrics.jsonl`` into ``out`` (default ``run_dir/curves.png``)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    return plot_curves(records, out if out is not None else run_dir / "curves.png", floor=floor,
                       title=run_dir.resolve().name)


def plot_comparison(runs: Sequence[tuple[str, str | os.PathLike]], path: str | os.PathLike, *,
                    title: str = "") -> Path:
    """Several runs (label, run folder) in one PNG: their diffusion losses, and their Dispersive
    terms (the mean over a run's blocks, unweighted) with each run's floor."""
    fig, axes = _figure(COMPARISON_SIZE, 1, 2)
    loss_ax, disp_ax = axes[0]
    floors: set[Floor] = set()
    for k, (label, run_dir) in enumerate(runs):
        records = read_metrics(Path(run_dir) / "metrics.jsonl")
        loss_ax.plot(*_series(records, "diffusion_loss"), color=f"C{k % 10}", label=label)
        blocks = block_keys(records)
        rows = [r for r in records if all(isinstance(r.get(b), (int, float)) for b in blocks)] if blocks else []
        if rows:
            mean = [sum(r[b] for b in blocks) / len(blocks) for r in rows]
            disp_ax.plot([r["step"] for r in rows], mean, color=f"C{k % 10}",
                         label=label + (f" (mean of {len(blocks)} blocks)" if len(blocks) > 1 else ""))
            floor = run_floor(run_dir)
            if floor is not None:
                floors.add(floor)
    for floor in sorted(floors, key=lambda f: f.value):  # one line per distinct floor
        _floor_line(disp_ax, floor)
    _panel(loss_ax, "diffusion loss", "loss")
    _panel(disp_ax, "Dispersive Loss term (unweighted)", "term")
    for ax in (loss_ax, disp_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
