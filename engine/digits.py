"""Write the built-in digits dataset in the latent format (engine/data/datasets.py says how).

    python -m engine.digits OUT_DIR [--size 16] [--overwrite]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from engine.data.datasets import make_digits_dataset
from engine.data.format import open_latent_dataset


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m engine.digits",
                                description="Write the built-in digits dataset in the latent format.")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--size", type=int, default=16, help="output side length (default 16)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    out = make_digits_dataset(args.out_dir, size=args.size, overwrite=args.overwrite)
    print(open_latent_dataset(out))


if __name__ == "__main__":
    main()
