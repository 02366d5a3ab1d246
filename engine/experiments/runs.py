"""One toy training run: engine/train.py in a subprocess (DeepSpeed state stays per run), reused
when its command line matches, and resumed from its last checkpoint when a launch of the same
command line was cut (a study outlives sessions and machines: a cut costs at most SAVE_EVERY steps)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine.config.paths import REPO_ROOT
from engine.experiments.settings import DispSetting, ToyConfig, log
from engine.training.checkpoint import CheckpointDir

SAVE_EVERY = 250
"""Steps between a run's checkpoints. Launch-only: not part of the run's key (the saved command
line), since a save changes nothing in the run (resume is bit-identical: tests/engine/training/test_runs.py)."""


@dataclass
class TrainedRun:
    name: str
    path: Path
    checkpoint: Path
    seconds: float
    final: dict
    reused: bool
    seed: int
    """The training seed."""
    resumed: bool = False
    """This launch continued a cut run (``seconds`` then covers only the steps it trained)."""


def train_run(root: Path, cfg: ToyConfig, disp: DispSetting | None, seed: int | None = None) -> TrainedRun:
    """Train (or reuse) one SiT run under root/runs/<tag>_<suffix>[_seed<k>] (training seed
    ``seed``, None: cfg.seed; folders of seed 0 carry no seed); returns its release checkpoint."""
    name = disp.tag() if disp is not None else "baseline"
    seed = cfg.seed if seed is None else seed
    path = root / "runs" / (f"{name}_{cfg.run_suffix()}" + (f"_seed{seed}" if seed else ""))
    argv = [*cfg.train_flags(seed), *(disp.flags() if disp is not None else ["--disp-preset", "none"]),
            "--results-dir", str(path)]
    stamp, launch = path / "toy_run.json", path / "toy_launch.json"
    ckpt = path / "checkpoints" / f"{cfg.steps:07d}.pt"
    if stamp.exists() and ckpt.exists():
        saved = json.loads(stamp.read_text())
        if saved.get("argv") == argv:
            log(f"reusing {path.name} (trained in {saved['seconds']:.0f} s)")
            return TrainedRun(name, path, ckpt, saved["seconds"], saved.get("final", {}), True, seed)
    resuming = not stamp.exists() and launch.exists() and json.loads(launch.read_text()).get("argv") == argv
    if not resuming:
        if path.exists():
            shutil.rmtree(path)  # a stale run with other settings, or one cut before any record of its command
        path.mkdir(parents=True)
        launch.write_text(json.dumps({"argv": argv}, indent=2))
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / "build" / "cache" / "torch_extensions"))
    env.setdefault("TRITON_CACHE_DIR", str(REPO_ROOT / "build" / "cache" / "triton"))
    env["PYTHONUNBUFFERED"] = "1"
    saved_steps = CheckpointDir(path / "checkpoints").steps() if resuming else []
    # What --resume auto will do: the latest complete save, or step 0 if the cut came before the first.
    what = (f"resuming {path.name} at step {saved_steps[-1]}" if saved_steps else
            f"relaunching {path.name} (cut before its first checkpoint: from step 0)" if resuming else
            f"training {path.name}")
    log(f"{what}: {cfg.steps} steps ({disp.describe() if disp else 'no Dispersive Loss'}); "
        f"log in {path / 'train.log'}")
    # The key's flags, then the launch's: argparse keeps the last --ckpt-every.
    cmd = [sys.executable, str(REPO_ROOT / "engine" / "train.py"), *argv,
           "--ckpt-every", str(min(SAVE_EVERY, cfg.steps)), "--resume", "auto"]
    start = time.perf_counter()
    with open(path / "train.log", "a" if resuming else "w") as train_log:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=train_log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not ckpt.exists():
        tail = (path / "train.log").read_text()[-3000:]
        raise RuntimeError(f"training {path.name} failed (exit {proc.returncode}); end of its log:\n{tail}")
    summary = json.loads((path / "summary.json").read_text())
    final = summary.get("final", {})
    # seconds: this launch's (a resumed run's earlier launches were cut before they could say)
    stamp.write_text(json.dumps({"argv": argv, "seconds": seconds, "resumed": resuming, "final": final}, indent=2))
    log(f"trained {path.name} in {seconds:.0f} s" + (" (this launch; resumed)" if resuming else ""))
    return TrainedRun(name, path, ckpt, seconds, final, False, seed, resuming)
