"""One toy training run: engine/train.py in a subprocess (DeepSpeed state stays per run), reused when its command line matches."""
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


def train_run(root: Path, cfg: ToyConfig, disp: DispSetting | None, seed: int | None = None) -> TrainedRun:
    """Train (or reuse) one SiT run under root/runs/<tag>_<suffix>[_seed<k>] (training seed
    ``seed``, None: cfg.seed; folders of seed 0 carry no seed); returns its release checkpoint."""
    name = disp.tag() if disp is not None else "baseline"
    seed = cfg.seed if seed is None else seed
    path = root / "runs" / (f"{name}_{cfg.run_suffix()}" + (f"_seed{seed}" if seed else ""))
    argv = [*cfg.train_flags(seed), *(disp.flags() if disp is not None else ["--disp-preset", "none"]),
            "--results-dir", str(path)]
    stamp = path / "toy_run.json"
    ckpt = path / "checkpoints" / f"{cfg.steps:07d}.pt"
    if stamp.exists() and ckpt.exists():
        saved = json.loads(stamp.read_text())
        if saved.get("argv") == argv:
            log(f"reusing {path.name} (trained in {saved['seconds']:.0f} s)")
            return TrainedRun(name, path, ckpt, saved["seconds"], saved.get("final", {}), True, seed)
    if path.exists():
        shutil.rmtree(path)  # a stale or partial run with other settings
    path.mkdir(parents=True)
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / "build" / "cache" / "torch_extensions"))
    env.setdefault("TRITON_CACHE_DIR", str(REPO_ROOT / "build" / "cache" / "triton"))
    env["PYTHONUNBUFFERED"] = "1"
    log(f"training {path.name}: {cfg.steps} steps ({disp.describe() if disp else 'no Dispersive Loss'}); "
        f"log in {path / 'train.log'}")
    start = time.perf_counter()
    with open(path / "train.log", "w") as train_log:
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "engine" / "train.py"), *argv], cwd=REPO_ROOT, env=env,
                              stdout=train_log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not ckpt.exists():
        tail = (path / "train.log").read_text()[-3000:]
        raise RuntimeError(f"training {path.name} failed (exit {proc.returncode}); end of its log:\n{tail}")
    summary = json.loads((path / "summary.json").read_text())
    final = summary.get("final", {})
    stamp.write_text(json.dumps({"argv": argv, "seconds": seconds, "final": final}, indent=2))
    log(f"trained {path.name} in {seconds:.0f} s")
    return TrainedRun(name, path, ckpt, seconds, final, False, seed)
