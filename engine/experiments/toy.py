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
and one PNG of every run's curves. A study (``run_study``) does the same at several training
seeds (seed, seed + 1, ...; the classifier, the real split, the sampling noise and the probe stay
the base seed's, so the seeds change the training only) and writes per setting the mean and
spread over seeds of FD, class accuracy, the EMA probe's best block, the final diffusion loss and
the term's gap to its floor (``results.md`` / ``results.json``, ``study.png``).

Everything is cached under the output folder: a training run is reused when its exact command
line matches (``runs/<tag>/toy_run.json``), its samples and scores when the evaluation settings
match (``toy_eval.json``), the classifier when its settings match; so a sweep shares the baseline
and the classifier, and an interrupted command resumes at the first missing piece. Each training
seed has its own run folders (``_seed<k>``; seed 0's carry none).
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from engine.evaluation.fid import FeatureStatistics, frechet_distance_stats
from engine.experiments.classifier import DigitClassifier, RealData, classifier_features, get_classifier, real_digits
from engine.experiments.report import (per_block_table, results_table, side_by_side_png, study_png, study_summary,
                                       study_table)
from engine.experiments.runs import train_run
from engine.experiments.scoring import (RunMetrics, evaluate_run, sample_noise_and_labels, sample_run, score_samples,
                                        term_gap)
from engine.experiments.settings import NUM_CLASSES, DispSetting, ToyConfig, log
from engine.sampling.images import make_grid, render_latents, save_png
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


def _finish(path: Path, title: str, table: str, t0: float, result: dict, quiet: bool = False) -> dict:
    """Write the markdown (title, table, wall time) and the JSON (``result`` plus the wall time);
    print the markdown unless ``quiet``."""
    seconds = time.perf_counter() - t0
    text = f"# {title}\n\n{table}\n\nWall time of this command: {seconds:.0f} s.\n"
    path.with_suffix(".md").write_text(text)
    result = {**result, "seconds": seconds}
    path.with_suffix(".json").write_text(json.dumps(result, indent=2))
    if not quiet:
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


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{seconds:.0f} s" if seconds < 90 else f"{minutes} min" if minutes < 90 else \
        f"{minutes // 60} h {minutes % 60:02d} min"


def run_study(root: Path, cfg: ToyConfig, settings: Sequence[DispSetting], seeds: int) -> dict:
    """The baseline and every setting at ``seeds`` training seeds (cfg.seed, cfg.seed + 1, ...),
    seed by seed, each (setting, seed) its own cached run, all scored against the base seed's
    classifier, reference and noise: results.md / results.json (every run, and per setting the
    mean, sample std, min, max and values over seeds: ``report.spread``) and study.png under root,
    written again after every run (a study of hours can be read, and cut, at any point)."""
    t0 = time.perf_counter()
    shared = prepare(root, cfg)
    seed_list = [cfg.seed + k for k in range(seeds)]
    jobs = [(disp, seed) for seed in seed_list for disp in (None, *settings)]
    rows: list[dict] = []
    # Wall time of each (setting, seed) this command trained from step 0: a resumed launch's
    # share of a run would make the estimate too short.
    spent: list[float] = []
    for k, (disp, seed) in enumerate(jobs, 1):
        left = f"; about {_duration(statistics.fmean(spent) * (len(jobs) - k + 1))} left" if spent else ""
        log(f"study run {k} of {len(jobs)}: {disp.describe() if disp else 'no Dispersive Loss'}, seed {seed}{left}")
        start = time.perf_counter()
        run = train_run(root, cfg, disp, seed)
        m, _ = evaluate_run(run, disp, cfg, shared.real, shared.net, shared.ref_stats, shared.noise, shared.labels)
        if not run.reused and not run.resumed:
            spent.append(time.perf_counter() - start)
        rows.append({**asdict(m), "seed": seed, "term_gap": term_gap(run.final), "path": str(run.path)})
        result = _study_report(root, cfg, settings, seed_list, shared, rows, len(jobs), t0, quiet=k < len(jobs))
    return result


def _study_report(root: Path, cfg: ToyConfig, settings: Sequence[DispSetting], seed_list: list[int],
                  shared: Shared, rows: list[dict], jobs: int, t0: float, quiet: bool) -> dict:
    """results.md / results.json / study.png of the runs finished so far (``jobs`` in all)."""
    summary = study_summary(rows)
    done = "" if len(rows) == jobs else f" ({len(rows)} of {jobs} runs finished)"
    png = study_png(root / "study.png", summary, title=f"digits, {cfg.steps} steps of batch {cfg.global_batch}, "
                    f"training seeds {seed_list[0]}..{seed_list[-1]}{done}")
    table = study_table(summary, seed_list, shared.real_fd, shared.clf_acc, cfg)
    return _finish(root / "results", f"Dispersive Loss study{done}", table, t0,
                   {"config": cfg.as_json(), "seeds": seed_list, "settings": [asdict(s) for s in settings],
                    "real_fd": shared.real_fd, "classifier_acc": shared.clf_acc, "finished": len(rows),
                    "jobs": jobs, "summary": summary, "runs": rows, "png": str(png)}, quiet=quiet)


def score_run_dir(run_dir: Path, cfg: ToyConfig, cache: Path) -> dict:
    """Scores the final EMA weights of any digits run of ``engine/train.py`` (the demo's): FD and
    class accuracy of ``samples_per_class`` samples per digit, as a comparison scores its runs
    (the classifier cached in ``cache``). Written to ``run_dir/digits_score.json``; returned."""
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{summary_path}: not a finished run of engine/train.py (no summary.json)")
    summary = json.loads(summary_path.read_text())
    if summary["release_checkpoint"] is None:
        raise FileNotFoundError(f"{run_dir}: trained with --ckpt-every 0, so there is no checkpoint to score")
    checkpoint = Path(summary["release_checkpoint"])
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint}: the run's final checkpoint is missing")
    shared = prepare(cache, cfg)
    start = time.perf_counter()
    samples = sample_run(checkpoint, cfg, shared.noise, shared.labels)
    fd, class_acc = score_samples(samples, shared.labels, shared.net, shared.ref_stats)
    # The first rows of the scored samples (row i asks for digit i % 10): the picture of these numbers.
    shown = render_latents(samples[:cfg.grid_per_class * NUM_CLASSES].clamp(-1.0, 1.0))
    grid = save_png(make_grid(shown, nrow=NUM_CLASSES), run_dir / "digits_score.png")
    result = {"run": str(run_dir), "checkpoint": str(checkpoint), "samples": len(shared.labels),
              "grid": str(grid), "curves": str(run_dir / "curves.png"),
              "term": term_state(summary.get("final", {})),
              "sampler": f"{cfg.sample_method} ODE, {cfg.sample_steps} grid points", "fd": fd,
              "class_acc": class_acc, "real_heldout_fd": shared.real_fd, "classifier_heldout_acc": shared.clf_acc,
              "seconds": time.perf_counter() - start}
    (run_dir / "digits_score.json").write_text(json.dumps(result, indent=2))
    return result


def term_state(final: dict, tol: float = 1e-3) -> list[str]:
    """One sentence per regularized block from a run's last logged metrics: its gap to the floor,
    its off-diagonal softmax weight, and whether it is still acting (gap above ``tol``, the
    saturation warning's threshold)."""
    out = []
    for key in sorted(k for k in final if k.startswith("dispersive/block_") and k.endswith("/gap")):
        block, gap = key.split("/")[1], final[key]
        share = final.get(key.replace("/gap", "/off_diagonal"))
        weight = f", off-diagonal softmax weight {share:.2f}" if share is not None else ""
        verdict = ("acting" if gap > tol else
                   f"at its floor (gap <= {tol:g}): its gradient is ~0, the run trains the plain diffusion loss")
        out.append(f"{block.replace('_', ' ')}: gap {gap:.4f} to its floor{weight}: {verdict}")
    return out
