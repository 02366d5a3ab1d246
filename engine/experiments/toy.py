"""The toy harness: the same small SiT on the built-in digits with and without Dispersive Loss (command: engine/toy.py).

What one comparison (``run_compare``) does:
  1. trains a small digit classifier (a CNN on 16x16) on a stratified 2/3 of the real digits and
     reports its accuracy on the held-out 1/3; its 64-d penultimate layer is the feature space
     (``engine.experiments.classifier``);
  2. trains the SiT twice through ``engine/train.py`` (same seed, so the same initial weights,
     batches, times and noise; no flips, a mirrored digit is not a digit): once without the
     regulariser, once with it (default: the PyTorch release's lambda 0.25, tau 1, last block)
     (``engine.experiments.runs``);
  3. samples both EMA models from the same noise and labels (``samples_per_class`` per digit,
     a fixed-step ODE), and measures (``engine.experiments.scoring``)
       FD           Frechet distance of the samples' classifier features to the real training
                    split's (``engine.evaluation.fid``); "real" is the held-out real digits' FD, the floor
       class acc.   the classifier's accuracy on the samples w.r.t. the label they were asked for
       probe top-1  linear probe of the block outputs at ``probe_t`` (``engine.evaluation.probe``),
                    best block and last block, EMA and raw weights
       dispersion   the regularised block's mean pairwise squared distance / D and InfoNCE-L2
                    value at the run's tau against its floor -log N (raw weights, N = 256)
  4. writes ``samples.png`` (baseline left, Dispersive Loss right; one column per digit; same
     noise in the same place), ``curves.png`` (both runs' diffusion loss and Dispersive term
     against its floor, ``engine.training.plots``) and ``results.md`` / ``results.json``
     (``engine.experiments.report``).

A sweep (``run_sweep``) does 2 and 3 for the baseline and every setting, and writes one table
and one PNG of every run's curves.

Everything is cached under the output folder: a training run is reused when its exact command
line matches (``runs/<tag>/toy_run.json``), its samples and scores when the evaluation settings
match (``toy_eval.json``), the classifier when its settings match; so a sweep shares the baseline
and the classifier, and an interrupted command resumes at the first missing piece.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from engine.evaluation.fid import FeatureStatistics, frechet_distance_stats
from engine.experiments.classifier import DigitClassifier, RealData, classifier_features, get_classifier, real_digits
from engine.experiments.report import per_block_table, results_table, side_by_side_png
from engine.experiments.runs import train_run
from engine.experiments.scoring import RunMetrics, evaluate_run, sample_noise_and_labels
from engine.experiments.settings import DispSetting, ToyConfig, log
from engine.training.plots import plot_comparison


@dataclass
class Shared:
    """What every run of a comparison or sweep is scored against."""

    real: RealData
    net: DigitClassifier
    clf_acc: float
    ref_stats: FeatureStatistics
    real_fd: float
    noise: torch.Tensor
    labels: torch.Tensor


def prepare(root: Path, cfg: ToyConfig) -> Shared:
    real = real_digits(cfg.seed)
    net, acc = get_classifier(root, cfg, real)
    ref = FeatureStatistics.from_features(classifier_features(net, real.x[real.train]))
    held = FeatureStatistics.from_features(classifier_features(net, real.x[real.test]))
    real_fd = frechet_distance_stats(held, ref).distance
    noise, labels = sample_noise_and_labels(cfg)
    log(f"classifier held-out accuracy {acc:.3f}; real held-out FD {real_fd:.3f}")
    return Shared(real, net, acc, ref, real_fd, noise, labels)


def _train_and_score(root: Path, cfg: ToyConfig, shared: Shared,
                     settings: Sequence[DispSetting | None],
                     curves: Path) -> tuple[list[RunMetrics], list[torch.Tensor]]:
    """Train (or reuse) and score one run per setting (None: the baseline); their training curves
    side by side in the PNG ``curves``."""
    rows, samples, folders = [], [], []
    for disp in settings:
        run = train_run(root, cfg, disp)
        m, s = evaluate_run(run, disp, cfg, shared.real, shared.net, shared.ref_stats, shared.noise, shared.labels)
        rows.append(m)
        samples.append(s)
        folders.append((m.setting, run.path))
    plot_comparison(folders, curves, title=f"digits, {cfg.steps} steps of batch {cfg.global_batch}")
    return rows, samples


def _finish(path: Path, title: str, table: str, t0: float, result: dict) -> dict:
    """Write the markdown (title, table, wall time) and the JSON (``result`` plus the wall time); print the markdown."""
    seconds = time.perf_counter() - t0
    text = f"# {title}\n\n{table}\n\nWall time of this command: {seconds:.0f} s.\n"
    path.with_suffix(".md").write_text(text)
    result = {**result, "seconds": seconds}
    path.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(text, flush=True)
    return result


def run_compare(root: Path, cfg: ToyConfig) -> dict:
    """Baseline vs one Dispersive Loss setting: results.md, results.json, samples.png under root."""
    t0 = time.perf_counter()
    shared = prepare(root, cfg)
    rows, samples = _train_and_score(root, cfg, shared, (None, cfg.disp), root / "curves.png")
    png = side_by_side_png(root / "samples.png", samples[0], samples[1],
                           ("baseline", f"Dispersive Loss ({cfg.disp.describe()})"), cfg.grid_per_class)
    table = results_table(rows, shared.real_fd, shared.clf_acc, cfg) + "\n\n" + per_block_table(rows)
    return _finish(root / "results", "Toy comparison", table, t0,
                   {"config": cfg.as_json(), "real_fd": shared.real_fd, "classifier_acc": shared.clf_acc,
                    "runs": [asdict(r) for r in rows], "png": str(png), "curves": str(root / "curves.png")})


def run_sweep(root: Path, cfg: ToyConfig, settings: Sequence[DispSetting]) -> dict:
    """The baseline plus every setting (shared baseline run, classifier, noise): sweep_<suffix>.md/json."""
    t0 = time.perf_counter()
    shared = prepare(root, cfg)
    curves = root / f"sweep_{cfg.run_suffix()}_curves.png"
    rows, _ = _train_and_score(root, cfg, shared, (None, *settings), curves)
    table = results_table(rows, shared.real_fd, shared.clf_acc, cfg)
    return _finish(root / f"sweep_{cfg.run_suffix()}", "Dispersive Loss sweep", table, t0,
                   {"config": cfg.as_json(), "settings": [asdict(s) for s in settings],
                    "real_fd": shared.real_fd, "classifier_acc": shared.clf_acc, "runs": [asdict(r) for r in rows],
                    "curves": str(curves)})
