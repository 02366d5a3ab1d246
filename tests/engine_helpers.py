"""Launching the training engine from tests: ``deepspeed`` with CPU ranks, or plain python."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "sit_s", "--depth", "2", "--hidden-size", "64", "--num-heads", "4",
        "--sample-steps", "3", "--sample-count", "4", "--loader", "torch", "--num-workers", "0"]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def engine_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "cache" / "torch_extensions"))
    env.setdefault("TRITON_CACHE_DIR", str(REPO / "build" / "cache" / "triton"))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_engine(args: list[str], *, ranks: int = 2, env: dict[str, str] | None = None,
               check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus ranks engine/train.py args`` (ranks > 0) or ``python engine/train.py``."""
    port = _port()
    if ranks:
        deepspeed = Path(sys.executable).with_name("deepspeed")
        cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", port, "engine/train.py", *args]
    else:
        cmd = [sys.executable, "engine/train.py", *args]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env or engine_env(), capture_output=True, text=True,
                              timeout=timeout)
    finally:
        release_shared_memory(port)
    if check and proc.returncode != 0:
        raise AssertionError(f"engine failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def release_shared_memory(port: str) -> None:
    """A killed CPU rank cannot unlink its DeepSpeed /dev/shm buffer: do it for the test."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)


def metrics(results: Path) -> list[dict]:
    return [json.loads(line) for line in open(results / "metrics.jsonl")]


def losses(results: Path) -> dict[int, float]:
    """step -> total loss logged by rank 0 (diffusion + lambda * dispersive)."""
    return {r["step"]: r["diffusion_loss"] + r["dispersive_total"] for r in metrics(results)}
