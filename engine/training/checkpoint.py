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
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from engine.distributed import barrier

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

    def prune(self, keep_last_k: int, protect: tuple[int, ...] = ()) -> list[int]:
        """Removes all but the newest ``keep_last_k`` complete checkpoints, and interrupted
        saves older than the newest complete one; never the steps in ``protect`` (the one just
        written, the one resumed from). Returns the removed steps."""
        complete = self.steps()
        removed = complete[:-keep_last_k] if keep_last_k > 0 else []
        newest = complete[-1] if complete else -1
        removed += [s for s in self.steps(complete_only=False) if s not in complete and s < newest]
        removed = [s for s in removed if s not in protect]
        for step in removed:
            shutil.rmtree(self.path(step), ignore_errors=True)
            self.release_path(step).unlink(missing_ok=True)
        return sorted(removed)

    def set_aside_after(self, step: int) -> tuple[list[int], Path | None]:
        """Moves every checkpoint newer than ``step`` (complete or not, with its release file) into
        ``abandoned-after-NNNNNNN[-k]/``: a resume from an older step starts a new timeline, and
        the old one's newer saves must neither be resumed by ``auto`` nor pruned ahead of the new
        ones. Returns (the steps moved, the folder)."""
        newer = [s for s in self.steps(complete_only=False) if s > step]
        if not newer:
            return [], None
        aside = self.root / f"abandoned-after-{step:07d}"
        k = 1
        while aside.exists():
            aside, k = self.root / f"abandoned-after-{step:07d}-{k}", k + 1
        aside.mkdir()
        for s in newer:
            os.replace(self.path(s), aside / self.path(s).name)
            if self.release_path(s).exists():
                os.replace(self.release_path(s), aside / self.release_path(s).name)
        return newer, aside


def rng_state() -> dict[str, Any]:
    """Every RNG stream of this process as tensors and plain types (``weights_only`` loads it)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    n = state["numpy"]
    torch.set_rng_state(state["torch"])
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class UnsafeCheckpointError(RuntimeError):
    """A file of a checkpoint folder holds something other than tensors and plain data."""


def _deepspeed_data_classes() -> list[type]:
    """The only non-plain types DeepSpeed's own checkpoint files hold (found by loading every
    file of ZeRO-1/2/3, fp32 and bf16 saves with ``weights_only=True``): plain data records."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # lazy: DeepSpeed is heavy to import
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def check_checkpoint_folder(path: Path) -> None:
    """Every file of the folder must load with torch's restricted unpickler (``weights_only``:
    tensors, plain types and DeepSpeed's few data records), before anything reads it for real.

    DeepSpeed unpickles its files with code execution allowed, and a resume reads files that
    anyone with write access to a shared results folder could have replaced: a pickled
    ``__reduce__`` payload there would run on every rank. The check reads no tensor data
    (``mmap``), so it costs little even for an XL optimizer state.
    """
    allowed = _deepspeed_data_classes()
    for file in sorted(p for p in Path(path).iterdir() if p.is_file() and p.name != COMPLETE):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # any reason it does not load safely: refuse, naming the file
            reason = str(e).strip().splitlines()
            detail = next((line for line in reason if "GLOBAL" in line), reason[0] if reason else type(e).__name__)
            raise UnsafeCheckpointError(
                f"refusing to resume from {path}: {file.name} does not load as tensors and plain data "
                f"({detail.strip()[:300]}). A checkpoint folder may hold only what this trainer and "
                "DeepSpeed write; a file that needs a full unpickler could run code on every rank.") from None


class CheckpointManager:
    """Saves and restores everything a run needs to continue bit-identically: DeepSpeed's
    weights, optimizer and schedule; per rank the counters, the RNG streams, the data
    position and the EMA (or its ZeRO-3 shard); and a release-format file of the full fp32
    weights. Every rank calls ``save`` and ``load`` (both contain collectives)."""

    def __init__(self, root: Path, *, rank: int, keep_last_k: int, engine: Any, ema: Any, loader: Any,
                 full_weights: Callable[[bool], dict[str, torch.Tensor] | None],
                 release_fields: Callable[[], dict[str, Any]]):
        """``full_weights(keep)``: the full fp32 weights (a collective; None unless ``keep``);
        ``release_fields()``: what the release-format file holds besides the weights."""
        self.dir = CheckpointDir(root)
        self.rank, self.is_main, self.keep_last_k = rank, rank == 0, keep_last_k
        self.engine, self.ema, self.loader = engine, ema, loader
        self.full_weights, self.release_fields = full_weights, release_fields
        self.resumed_from: int | None = None

    def _state_file(self, path: Path) -> Path:
        return path / f"trainer-rank{self.rank:02d}.pt"

    def save(self, step: int, counters: dict[str, int]) -> Path:
        path = self.dir.path(step)
        self.engine.save_checkpoint(str(self.dir.root), tag=tag_for(step), save_latest=False)
        # Collectives under ZeRO-3 and bf16: every rank joins, rank 0 keeps the results. The
        # full weights are parked in a file and memory-mapped back, so that rank 0 never holds
        # two full fp32 copies (5.4 GB for XL) at once.
        full = self.full_weights(self.is_main)
        parked = path / "model-weights.tmp.pt"
        if self.is_main:
            torch.save(full, parked)
            full = torch.load(parked, map_location="cpu", weights_only=True, mmap=True)
        ema_full = self.ema.full_state_dict(self.engine)
        torch.save({**counters, "rng": rng_state(), "loader": self.loader.state_dict(),
                    "ema": self.ema.shard_state()}, self._state_file(path))
        if self.is_main and os.environ.get("DISPERSIVE_FAULT_KILL_IN_SAVE") == str(step):
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection (tests): a crash mid-save
        barrier()  # every rank's files are on disk before the checkpoint is declared complete
        if self.is_main:
            atomic_torch_save({"model": full, "ema": ema_full, **self.release_fields(), "step": step},
                              self.dir.release_path(step))
            del full
            parked.unlink()
            self.dir.mark_complete(step)
            protect = (step,) if self.resumed_from is None else (step, self.resumed_from)
            self.dir.prune(self.keep_last_k, protect=protect)
        barrier()
        return path

    def load(self, path: Path) -> dict[str, Any]:
        """Restores the run from ``path``; returns the counters saved with it. Every file is
        checked with a restricted unpickler first (``check_checkpoint_folder``)."""
        check_checkpoint_folder(path)
        _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
        mine = self._state_file(path)
        if not mine.exists():
            raise FileNotFoundError(f"{mine} is missing: resume with the same number of ranks as the "
                                    f"run that saved {path}")
        state = torch.load(mine, map_location="cpu", weights_only=True)
        self.ema.load_shard_state(state.pop("ema"))
        self.loader.load_state_dict(state.pop("loader"))
        set_rng_state(state.pop("rng"))
        self.resumed_from = int(state["step"])
        return state

    def abandon_newer(self) -> str | None:
        """After a resume: rank 0 sets the newer checkpoints of the old timeline aside (every rank
        waits); returns the sentence for the log, or None when there were none."""
        moved, aside = self.dir.set_aside_after(self.resumed_from) if self.is_main else ([], None)
        barrier()
        if not moved:
            return None
        return (f"resuming from step {self.resumed_from} abandons the newer checkpoints of that run "
                f"(steps {', '.join(map(str, moved))}): moved to {aside}, where nothing resumes or prunes them")
