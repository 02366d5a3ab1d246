"""Checkpoint directories that are either complete or ignored.

Layout under ``<results_dir>/checkpoints``::

    step_0001000/            DeepSpeed's files (every rank writes its shards), plus
        trainer-rank00.pt    per-rank state: RNG streams, data position, counters, EMA (shard)
        config.json          the run's whole config at this save (what a resume compares)
        NONFINITE            only when saved inside a streak of skipped non-finite steps
        COMPLETE             written last, by rank 0, after every rank has finished
    0001000.pt               release-format file {"model", "ema", "args", "config"}

A directory without ``COMPLETE`` is a save that was interrupted (a crash, a kill -9, the
launcher's SIGKILL 30 s after a SIGTERM, a full disk): ``--resume auto`` never picks it, so
the previous checkpoint stays the one in use. Release files are written to a temporary name
and renamed, so they are never partial. A folder may hold nothing else: the three plain-text
files above, and files that load with torch's restricted unpickler (``check_checkpoint_folder``).
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from engine.distributed import any_true, barrier

_TAG = re.compile(r"^step_(\d{7,})$")
COMPLETE = "COMPLETE"
CONFIG = "config.json"
NONFINITE = "NONFINITE"
TEXT_FILES = (COMPLETE, CONFIG, NONFINITE)  # plain text: never unpickled


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from or written; the message names the file."""


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def step_of(path: Path) -> int | None:
    """The step in a checkpoint folder's name ``step_NNNNNNN``; None for another name."""
    m = _TAG.match(Path(path).name)
    return int(m.group(1)) if m else None


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

    def interrupted_after(self, step: int) -> list[int]:
        """Saves newer than ``step`` that never completed (what ``auto`` passed over)."""
        complete = set(self.steps())
        return [s for s in self.steps(complete_only=False) if s > step and s not in complete]

    def mark_complete(self, step: int) -> None:
        marker = self.path(step) / COMPLETE
        tmp = marker.with_name(COMPLETE + ".tmp")
        tmp.write_text(f"{step}\n")
        os.replace(tmp, marker)

    def healthy(self, step: int) -> bool:
        """False for a checkpoint saved inside a streak of non-finite steps."""
        return not (self.path(step) / NONFINITE).exists()

    def prune(self, keep_last_k: int, protect: tuple[int, ...] = ()) -> list[int]:
        """Removes all but the newest ``keep_last_k`` complete checkpoints, and interrupted
        saves older than the newest complete one; never the steps in ``protect`` (the one just
        written, the one resumed from) nor the newest healthy one (a save during a streak of
        non-finite steps may not push the last good state out). Returns the removed steps."""
        complete = self.steps()
        healthy = [s for s in complete if self.healthy(s)]
        protect = (*protect, *healthy[-1:])
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


class UnsafeCheckpointError(CheckpointError):
    """A file of a checkpoint folder holds something other than tensors and plain data."""


def _deepspeed_data_classes() -> list[type]:
    """The only non-plain types DeepSpeed's own checkpoint files hold (found by loading every
    file of ZeRO-1/2/3, fp32 and bf16 saves with ``weights_only=True``): plain data records."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # lazy: DeepSpeed is heavy to import
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def check_checkpoint_folder(path: Path, ranks: int | None = None) -> None:
    """A folder a resume may read: the files a save writes are all there (``trainer-rankRR.pt``
    for each of ``ranks`` ranks when given, DeepSpeed's model states), and every file but the
    plain-text ones loads with torch's restricted unpickler (``weights_only``: tensors, plain
    types and DeepSpeed's few data records), before anything reads it for real.

    DeepSpeed unpickles its files with code execution allowed, and a resume reads files that
    anyone with write access to a shared results folder could have replaced: a pickled
    ``__reduce__`` payload there would run on every rank. The check reads no tensor data
    (``mmap``), so it costs little even for an XL optimizer state. A damaged file (truncated,
    overwritten) is named here too, instead of by torch's zip reader on every rank.
    """
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file())
    names = {p.name for p in files}
    saved_ranks = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"trainer-rank(\d+)\.pt", n)))
    missing = [] if saved_ranks else ["trainer-rank00.pt"]
    if not any(n.endswith("model_states.pt") for n in names):
        missing.append("DeepSpeed's *model_states.pt")
    if missing:
        raise CheckpointError(f"cannot resume from {path}: it is not a whole checkpoint ({', '.join(missing)} "
                              f"missing; it holds {sorted(names) or 'nothing'})")
    if ranks is not None and len(saved_ranks) != ranks:
        raise CheckpointError(f"cannot resume from {path}: it was saved by {len(saved_ranks)} rank(s) and this "
                              f"launch has {ranks}; resume with {len(saved_ranks)} rank(s)")
    allowed = _deepspeed_data_classes()
    for file in files:
        if file.name in TEXT_FILES:
            continue
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:  # a type the restricted unpickler refuses: maybe code
            reason = str(e).strip().splitlines()
            detail = next((line for line in reason if "GLOBAL" in line), reason[0] if reason else type(e).__name__)
            raise UnsafeCheckpointError(
                f"refusing to resume from {path}: {file.name} does not load as tensors and plain data "
                f"({detail.strip()[:300]}). A checkpoint folder may hold only what this trainer and "
                "DeepSpeed write; a file that needs a full unpickler could run code on every rank.") from None
        except Exception as e:  # not a readable torch file at all
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"cannot resume from {path}: {file.name} is damaged ({detail[:200]}); it may "
                                  "have been truncated or overwritten. Resume from an older step "
                                  "(--resume DIR) or restore the file") from None
    if CONFIG in names:
        try:
            json.loads((path / CONFIG).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot resume from {path}: {CONFIG} is not valid JSON ({e})") from None


def saved_config(path: Path) -> dict[str, Any] | None:
    """The config a checkpoint was saved with: its ``config.json``, else (saves made before that
    file existed) the ``train_config`` of the release-format file beside it; None if neither."""
    path = Path(path)
    if (path / CONFIG).exists():
        return json.loads((path / CONFIG).read_text())
    step = step_of(path)
    release = None if step is None else path.parent / f"{step:07d}.pt"
    if release is None or not release.exists():
        return None
    try:
        args = torch.load(release, map_location="cpu", weights_only=True, mmap=True).get("args", {})
    except Exception:  # an unreadable release file says nothing about the config
        return None
    return args.get("train_config") if isinstance(args, dict) else None


def _no_space(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


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
        self._writing: Path = self.dir.root  # the file a save is writing (named if it fails)
        self._parked: Path = self.dir.root
        self._ema_full: dict[str, torch.Tensor] | None = None

    def _state_file(self, path: Path) -> Path:
        return path / f"trainer-rank{self.rank:02d}.pt"

    def save(self, step: int, counters: dict[str, int], *, config: dict[str, Any],
             healthy: bool = True) -> Path:
        """Writes the checkpoint of ``step`` (``config``: the run's, as JSON; ``healthy=False``
        inside a streak of non-finite steps). A write that fails on any rank (a full disk
        above all) fails the save on every rank, named: the folder stays without ``COMPLETE``
        (so it never counts) and no older checkpoint is pruned."""
        path = self.dir.path(step)
        self._agree(step, path, lambda: self._write_parts(step, path, counters))
        self._agree(step, path, lambda: self._publish(step, path, config, healthy) if self.is_main else None)
        return path

    def _write_parts(self, step: int, path: Path, counters: dict[str, int]) -> None:
        """Every rank's files: DeepSpeed's, the parked full weights (rank 0), the per-rank state."""
        self._writing = path / "(DeepSpeed's files)"
        self.engine.save_checkpoint(str(self.dir.root), tag=tag_for(step), save_latest=False)
        # Collectives under ZeRO-3 and bf16: every rank joins, rank 0 keeps the results. The
        # full weights are parked in a file and memory-mapped back, so that rank 0 never holds
        # two full fp32 copies (5.4 GB for XL) at once.
        full = self.full_weights(self.is_main)
        self._parked = path / "model-weights.tmp.pt"
        if self.is_main:
            self._writing = self._parked
            torch.save(full, self._parked)
            del full
        ema_full = self.ema.full_state_dict(self.engine)
        self._ema_full = ema_full
        self._writing = self._state_file(path)
        _fault("NOSPACE_IN_SAVE", step, self.is_main, self._writing)
        torch.save({**counters, "rng": rng_state(), "loader": self.loader.state_dict(),
                    "ema": self.ema.shard_state()}, self._writing)
        if self.is_main and os.environ.get("DISPERSIVE_FAULT_KILL_IN_SAVE") == str(step):
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection (tests): a crash mid-save
        if self.is_main and os.environ.get("DISPERSIVE_FAULT_SLOW_SAVE"):
            time.sleep(float(os.environ["DISPERSIVE_FAULT_SLOW_SAVE"]))  # (tests): a save longer than a grace period

    def _publish(self, step: int, path: Path, config: dict[str, Any], healthy: bool) -> None:
        """Rank 0, once every rank's files are on disk: the release file, the config, the markers."""
        full = torch.load(self._parked, map_location="cpu", weights_only=True, mmap=True)
        self._writing = self.dir.release_path(step)
        atomic_torch_save({"model": full, "ema": self._ema_full, **self.release_fields(), "step": step},
                          self._writing)
        del full
        self._ema_full = None
        self._parked.unlink()
        self._writing = path / CONFIG
        self._writing.write_text(json.dumps(config, indent=2))
        if not healthy:
            (path / NONFINITE).write_text(f"saved at step {step} inside a streak of non-finite steps\n")
        self._writing = path / COMPLETE
        self.dir.mark_complete(step)
        protect = (step,) if self.resumed_from is None else (step, self.resumed_from)
        self.dir.prune(self.keep_last_k, protect=protect)

    def _agree(self, step: int, path: Path, work: Callable[[], None]) -> None:
        """Runs ``work``; then every rank learns whether a write failed anywhere (one tiny
        all-reduce, which is also the barrier between the phases of a save)."""
        failure: OSError | None = None
        try:
            work()
        except OSError as e:
            failure = e
        if not bool(any_true(torch.tensor([failure is not None]))[0]):
            return
        complete = (path / COMPLETE).exists()  # only pruning comes after COMPLETE
        if self.is_main and not complete:  # an incomplete folder only holds disk space
            shutil.rmtree(path, ignore_errors=True)
        kept = ", ".join(map(str, self.dir.steps())) or "none"
        if failure is None:
            raise CheckpointError(f"the checkpoint of step {step} was not saved: another rank could not write "
                                  f"its part (its error names the file); checkpoints kept: {kept}")
        what = "no space left on device" if _no_space(failure) else f"{type(failure).__name__}: {failure}"
        if complete:
            raise CheckpointError(f"the checkpoint of step {step} was saved, but then {what} while removing "
                                  f"older ones (checkpoints now: {kept}); fix the folder's permissions or space "
                                  "and resume with --resume auto")
        raise CheckpointError(f"the checkpoint of step {step} was not saved: {what} while writing "
                              f"{self._writing}; it does not count and no older checkpoint was removed "
                              f"(kept: {kept}). Free space (or choose --results-dir elsewhere) and resume "
                              "with --resume auto")

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
        interrupted = self.dir.interrupted_after(self.resumed_from)
        moved, aside = self.dir.set_aside_after(self.resumed_from) if self.is_main else ([], None)
        barrier()  # no rank goes on before the folder is settled
        if not moved:
            return None
        kinds = [f"{s} (an interrupted save: no {COMPLETE})" if s in interrupted else str(s) for s in moved]
        return (f"resuming from step {self.resumed_from} abandons the newer checkpoints of that run "
                f"(steps {', '.join(kinds)}): moved to {aside}, where nothing resumes or prunes them")


def _fault(name: str, step: int, here: bool, file: Path) -> None:
    """Fault injection for tests: ``DISPERSIVE_FAULT_<name>=<step>`` makes rank 0 fail as a full
    disk would, while writing ``file``."""
    if here and os.environ.get(f"DISPERSIVE_FAULT_{name}") == str(step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
