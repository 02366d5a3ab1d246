"""Checkpoint directories that are either complete or ignored.

Layout under ``<results_dir>/checkpoints``::

    step_0001000/            DeepSpeed's files (every rank writes its shards), plus
        ema.pt               the fp32 EMA weights (rank 0)
        trainer-rank00.pt    per-rank state: RNG streams, data position, counters
        COMPLETE             written last, by rank 0, after every rank has finished
    0001000.pt               release-format file {"model", "ema", "args", "config"}

A directory without ``COMPLETE`` is a save that was interrupted (a crash, a kill -9):
``--resume auto`` never picks it, so the previous checkpoint stays the one in use.
Release files are written to a temporary name and renamed, so they are never partial.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

_TAG = re.compile(r"^step_(\d{7,})$")
COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class CheckpointDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, step: int) -> Path:
        return self.root / tag_for(step)

    def release_path(self, step: int) -> Path:
        return self.root / f"{step:07d}.pt"

    def steps(self, complete_only: bool = True) -> list[int]:
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            m = _TAG.match(child.name)
            if m and child.is_dir() and (not complete_only or (child / COMPLETE).exists()):
                found.append(int(m.group(1)))
        return sorted(found)

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def resolve_resume(self, resume: str | None) -> Path | None:
        """``None``: fresh start; ``auto``: the latest complete checkpoint, if any; else a path."""
        if resume is None:
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / COMPLETE).exists():
            raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint directory "
                                    f"(no {COMPLETE} marker); complete ones here: {self.steps()}")
        return path

    def mark_complete(self, step: int) -> None:
        marker = self.path(step) / COMPLETE
        tmp = marker.with_name(COMPLETE + ".tmp")
        tmp.write_text(f"{step}\n")
        os.replace(tmp, marker)

    def prune(self, keep_last_k: int) -> list[int]:
        """Removes all but the newest ``keep_last_k`` complete checkpoints, and interrupted
        saves older than the newest complete one. Returns the removed steps."""
        complete = self.steps()
        removed = complete[:-keep_last_k] if keep_last_k > 0 else []
        newest = complete[-1] if complete else -1
        removed += [s for s in self.steps(complete_only=False) if s not in complete and s < newest]
        for step in removed:
            shutil.rmtree(self.path(step), ignore_errors=True)
            self.release_path(step).unlink(missing_ok=True)
        return sorted(removed)
