"""python -m engine.probe (the command; its library is engine.evaluation.probe)."""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.evaluation.probe import *  # noqa: F401,F403  (temporary: the CLI moves here next)
from engine.evaluation.probe import build_parser, main  # noqa: F401

if __name__ == "__main__":
    main()
