"""Toy-scale reproduction on the built-in digits: the same small SiT with and without Dispersive Loss.

    python -m engine.toy --out runs/toy                  # the comparison (< 30 min on 2 CPU cores)
    python -m engine.toy --out runs/toy --smoke          # seconds: a tiny model, a few steps (tests)
    python -m engine.toy sweep --out runs/toy --lambdas 0.25 0.5 --taus 0.5 1 \\
        --blocks last all --variants infonce_l2 --scale-invariant no yes --steps 600
    python -m engine.toy sweep --study --seeds 3 --out runs/study
        # issue 17's study (DispSetting.study: release, paper, scale-invariant InfoNCE-L2 at tau 0.25 /
        # 0.5 / 1 on the last and on all blocks, cosine) and the baseline at training seeds 0, 1, 2:
        # 30 runs (~7 h on 2 cores); per setting mean ± std over seeds in results.md, min, max and
        # every value in results.json, study.png; rerun to resume (finished runs are reused)
    python -m engine.toy score RUN_DIR                   # FD and class accuracy of a digits run's EMA samples

The library, and what a comparison measures and caches: engine/experiments/toy.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
from typing import Any, Sequence

from engine.experiments.settings import DispSetting, ToyConfig
from engine.experiments.toy import run_compare, run_study, run_sweep, score_run_dir

PROG = "python -m engine.toy"


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
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_arguments(p)
    p.add_argument("--lambda", dest="lambda_", type=float, default=0.25, help="Dispersive Loss weight")
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--blocks", default="last", help="last, all, paper, or e.g. 0,3")
    p.add_argument("--variant", default="infonce_l2")
    p.add_argument("--scale-invariant", action="store_true", help="--disp-scale-invariant (infonce_l2, hinge)")
    return p


def build_sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} sweep",
                                description="Sweep the regulariser's knobs against one shared baseline.")
    _common_arguments(p)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.25])
    p.add_argument("--taus", type=float, nargs="+", default=[1.0])
    p.add_argument("--blocks", nargs="+", default=["last"], help="each: last, all, paper, or e.g. 0,3")
    p.add_argument("--variants", nargs="+", default=["infonce_l2"])
    p.add_argument("--scale-invariant", nargs="+", choices=("no", "yes"), default=["no"])
    p.add_argument("--study", action="store_true", help="issue 17's settings instead of the knobs' product")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per setting (seed, seed + 1, ...); "
                   "> 1: mean and spread per setting in results.md / results.json and study.png")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sweep":
        parser = build_sweep_parser()
        args = parser.parse_args(argv[1:])
        knobs = ("lambdas", "taus", "blocks", "variants", "scale_invariant")
        if args.study and any(getattr(args, k) != parser.get_default(k) for k in knobs):
            parser.error("--study names its own settings: leave out --lambdas, --taus, --blocks, --variants, "
                         "--scale-invariant")
        if args.seeds < 1:
            parser.error(f"--seeds must be >= 1, got {args.seeds}")
        try:  # bad knob values: a usage error naming the problem, before anything trains
            settings = DispSetting.study() if args.study else DispSetting.product(
                args.lambdas, args.taus, args.blocks, args.variants, [v == "yes" for v in args.scale_invariant])
            cfg = _config(args)
        except (ValueError, TypeError) as e:
            parser.error(str(e))
        if args.seeds > 1:
            return run_study(Path(args.out), cfg, settings, args.seeds)
        return run_sweep(Path(args.out), cfg, settings)
    if argv and argv[0] == "score":
        p = argparse.ArgumentParser(prog=f"{PROG} score", description="FD and class accuracy of the EMA "
                                    "samples of a finished digits run of engine/train.py (the demo's)")
        p.add_argument("run_dir", type=Path)
        p.add_argument("--samples-per-class", type=int, default=100)
        p.add_argument("--cache", type=Path, default=Path("build/cache/toy"), help="where the classifier is kept")
        args = p.parse_args(argv[1:])
        r = score_run_dir(args.run_dir, ToyConfig(samples_per_class=args.samples_per_class), args.cache)
        print(f"[toy] {r['samples']} EMA samples ({r['sampler']}): class accuracy {r['class_acc']:.3f}, "
              f"FD {r['fd']:.2f} to the real digits (real held-out digits: FD {r['real_heldout_fd']:.2f}; "
              f"classifier held-out accuracy {r['classifier_heldout_acc']:.3f})", flush=True)
        print(f"[toy] sample grid (one column per digit): {r['grid']}; curves: {r['curves']}", flush=True)
        for line in r["term"] or ["no Dispersive term in this run"]:
            print(f"[toy] dispersive term, {line}", flush=True)
        return r
    if argv and argv[0] == "run":
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = _config(args, disp=DispSetting(lambda_=args.lambda_, tau=args.tau, blocks=args.blocks,
                                             variant=args.variant, scale_invariant=args.scale_invariant))
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    return run_compare(Path(args.out), cfg)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # a user's mistake found while running: one line
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
