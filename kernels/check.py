"""Ahead-of-time compile gate for the fused kernels; needs no GPU.

    python -m kernels.check                 # every configuration, sm_80 and sm_90
    python -m kernels.check --jobs 4 --json build/aot.json

The command only: the configurations and what fails them are in ``kernels.fused.aot``
(its docstring), which imports triton; this module does not.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .fused.aot import ARCHS, compile_all, specs  # triton is imported when they run, not here

_REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRITON_CACHE_DIR", str(_REPO / "build" / "cache" / "triton"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                        help="parallel compile processes")
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="only these (repeatable)")
    parser.add_argument("--only", help="only configurations whose label contains this text")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    jobs = [(spec, arch) for arch in (args.arch or ARCHS) for spec in specs()
            if not args.only or args.only in spec.label]
    results = compile_all(jobs, args.jobs)
    failed = [r for r in results if not r.ok]
    for r in results:
        if r.ok and args.quiet:
            continue
        status = "ok  " if r.ok else "FAIL"
        print(f"{status} sm_{r.arch} regs {r.registers:4d} spill {r.spill_bytes:4d} smem {r.shared_bytes:7d} "
              f"mma {'y' if r.mma else 'n'} {r.seconds:5.1f}s  {r.spec}")
        for problem in r.problems:
            print(f"       -> {problem}")
    elapsed = time.perf_counter() - start
    print(f"kernels.check: {len(results) - len(failed)}/{len(results)} configurations pass "
          f"({elapsed:.1f}s with {args.jobs} jobs)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
