"""Linear probes and dispersion statistics of a checkpoint's block outputs, for its raw and EMA weights.

    python -m engine.probe --ckpt runs/toy/runs/<run>/checkpoints/0002000.pt --data digits --t 0.5

The library is engine/evaluation/probe.py (``probe_checkpoint``; its docstring says what is
measured and why the model is given its null label by default).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
from dataclasses import asdict
from typing import Sequence

import models
from engine.evaluation.probe import ProbeConfig, ProbeReport, format_probe_table, probe_checkpoint


def _blocks(text: str) -> str | tuple[int, ...]:
    if text in ("all", "last", "paper"):
        return text
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be all, last, paper or comma-separated ints, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    cfg = ProbeConfig
    p = argparse.ArgumentParser(prog="python -m engine.probe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--ckpt", required=True, help="checkpoint with 'model' and 'ema' weights")
    p.add_argument("--data", default="digits", help="'digits' or a latent dataset folder (engine/data/DATA.md)")
    p.add_argument("--t", type=float, default=cfg.t, help=f"noise level: 1 = data, 0 = noise (default {cfg.t})")
    p.add_argument("--blocks", type=_blocks, default=cfg.blocks, help="all, last, paper, or e.g. 0,3,5")
    p.add_argument("--weights", nargs="+", choices=["model", "ema"], default=["model", "ema"])
    p.add_argument("--labels", choices=["null", "true"], default=cfg.labels,
                   help="label given to the model (default: its null label)")
    p.add_argument("--train-fraction", type=float, default=cfg.train_fraction)
    p.add_argument("--max-samples", type=int, default=None, help="use at most this many latents")
    p.add_argument("--dispersion-samples", type=int, default=cfg.dispersion_samples)
    p.add_argument("--tau", type=float, default=cfg.tau, help="temperature of the reported InfoNCE-L2")
    p.add_argument("--C", type=float, default=cfg.C, help="inverse regularisation of the probe")
    p.add_argument("--seed", type=int, default=cfg.seed)
    p.add_argument("--batch-size", type=int, default=cfg.batch_size)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the report here")
    return p


def main(argv: Sequence[str] | None = None) -> list[ProbeReport]:
    args = build_parser().parse_args(argv)
    cfg = ProbeConfig(t=args.t, blocks=args.blocks, train_fraction=args.train_fraction, seed=args.seed,
                      batch_size=args.batch_size, labels=args.labels, C=args.C,
                      dispersion_samples=args.dispersion_samples, tau=args.tau)
    reports = probe_checkpoint(args.ckpt, args.data, cfg, weights=args.weights, max_samples=args.max_samples,
                               device=args.device)
    print(format_probe_table(reports, f"{args.ckpt} at t = {args.t} (labels: {args.labels})"))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"config": asdict(cfg), "reports": [asdict(r) for r in reports]}, indent=2))
    return reports


def cli(argv: Sequence[str] | None = None) -> None:
    """``main`` for a person at a shell: a mistake (a bad value, a missing or unrecognisable
    checkpoint, a model without a null label) is one line on stderr and exit status 2."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, KeyError, models.CheckpointMismatchError) as err:
        print(f"python -m engine.probe: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
