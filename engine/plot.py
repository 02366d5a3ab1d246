"""Draw a training run's curves from its metrics.jsonl: diffusion loss, each block's Dispersive
term against its floor -log N (InfoNCE-L2), gradient norm and throughput, in one PNG.

    python -m engine.plot runs/demo-20261122-024122                # -> RUN_DIR/curves.png
    python -m engine.plot RUN_DIR --out /tmp/curves.png

Works on a finished run, a running one and a killed one (a half-written last line is skipped).
The trainer writes RUN_DIR/curves.png itself at the end of every run.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
from typing import Sequence

from engine.training.plots import plot_run_curves, run_floor

PROG = "python -m engine.plot"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a training run's results_dir (it holds metrics.jsonl)")
    p.add_argument("--out", help="the PNG to write (default RUN_DIR/curves.png)")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    run = Path(args.run_dir)
    try:
        path = plot_run_curves(run, args.out, floor=run_floor(run))
    except (FileNotFoundError, ValueError) as e:  # no run there, or nothing logged yet: one line
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(path)
    return path


if __name__ == "__main__":
    main()
