"""ADM's sample metrics of a samples .npz against a reference batch (the library: engine/evaluation/adm.py).

    python -m engine.evaluate REF_BATCH.npz SAMPLES.npz --inception pt_inception-2015-12-05-6726825d.pth
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

from engine.evaluation.adm import IS_SPLITS, PR_BATCH, PR_NEIGHBOURS, EvaluationResult, evaluate_batches
from engine.evaluation.fid import FD_METHODS
from engine.evaluation.inception import InceptionWeightsError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.evaluate", description="ADM's sample metrics: FID, sFID, Inception Score, precision and recall.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Inception weights: --inception PATH or $DISP_INCEPTION_WEIGHTS "
                                       "(pt_inception-2015-12-05-6726825d.pth from pytorch-fid's releases).")
    p.add_argument("ref_batch", help="reference .npz (arr_0 uint8 NHWC; optional mu, sigma, mu_s, sigma_s)")
    p.add_argument("sample_batch", help="samples .npz (arr_0 uint8 NHWC), e.g. from python -m engine.sample")
    p.add_argument("--inception", default=None, help="FID Inception weights file (never downloaded)")
    p.add_argument("--batch-size", type=int, default=100, help="images per Inception forward")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--num-splits", type=int, default=IS_SPLITS, help="Inception Score splits")
    p.add_argument("--k", type=int, default=PR_NEIGHBOURS, help="nearest neighbours for precision/recall")
    p.add_argument("--pr-batch-size", type=int, default=PR_BATCH, help="rows per distance block")
    p.add_argument("--fd-method", choices=FD_METHODS, default="eigh",
                   help="Frechet square root: eigh (symmetric, default) or sqrtm (ADM's scipy path)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> EvaluationResult:
    args = build_parser().parse_args(argv)
    result = evaluate_batches(args.ref_batch, args.sample_batch, inception=args.inception,
                              batch_size=args.batch_size, device=args.device, num_splits=args.num_splits,
                              k=args.k, pr_batch_size=args.pr_batch_size, fd_method=args.fd_method,
                              progress=not args.no_progress)
    print(result.summary())
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(asdict(result), indent=2))
    return result


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, KeyError, InceptionWeightsError) as e:  # a user's mistake: one line
        print(f"python -m engine.evaluate: error: {e}", file=sys.stderr)
        sys.exit(2)
