"""Telling the user, once, when the Dispersive term has stopped acting.

At its floor the term's gradient is ~0: the run then trains the plain diffusion objective,
often after having scaled the residual stream up to get there (the ``/rms`` diagnostic).
"""
from __future__ import annotations

from typing import Mapping

MESSAGE = (
    "every regularized block's dispersive term has stayed within {tol:g} of its floor for {windows} log "
    "windows (gaps: {gaps}): it has stopped acting (its gradient is ~0), and the run now trains "
    "the plain diffusion loss. Options that change it: a larger --disp-tau (the InfoNCE terms keep a "
    "gradient at larger distances), --disp-scale-invariant (distances relative to the batch's mean: "
    "no floor reachable by scaling up), --disp-variant infonce_cosine (bounded and scale invariant), "
    "--disp-blocks (earlier blocks), --disp-lambda (its weight), or --disp-preset none for the baseline."
)


class SaturationWatch:
    """Feeds on each log record; ``update`` returns the warning text once, the first time every
    ``dispersive/block_k/gap`` of the record has been within ``tol`` of 0 for ``windows``
    consecutive records, else None."""

    def __init__(self, windows: int = 3, tol: float = 1e-3):
        self.windows, self.tol = windows, tol
        self.run = 0
        self.warned = False

    def update(self, record: Mapping[str, float]) -> str | None:
        gaps = {k: v for k, v in record.items() if k.startswith("dispersive/block_") and k.endswith("/gap")}
        if not gaps:
            return None
        self.run = self.run + 1 if all(abs(v) <= self.tol for v in gaps.values()) else 0
        if self.warned or self.run < self.windows:
            return None
        self.warned = True
        shown = ", ".join(f"{k.split('/')[1]} {v:.2g}" for k, v in sorted(gaps.items()))
        return MESSAGE.format(tol=self.tol, windows=self.windows, gaps=shown)
