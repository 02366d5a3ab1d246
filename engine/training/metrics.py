"""Training observability: the metrics sinks (JSONL + CSV, TensorBoard, wandb), phase timers with
NVTX ranges, MFU."""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import netrc
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

# Dense peak TFLOP/s by (device-name fragment, precision), from the vendors' data sheets.
_PEAK_TFLOPS = {
    ("H200", "bf16"): 989.0, ("H200", "fp32"): 67.0,
    ("H100", "bf16"): 989.0, ("H100", "fp32"): 67.0,  # SXM; PCIe is lower, see below
    ("H100 PCIe", "bf16"): 756.0, ("H100 PCIe", "fp32"): 51.0,
    ("A100", "bf16"): 312.0, ("A100", "fp32"): 19.5,
    ("L40S", "bf16"): 362.0, ("L40S", "fp32"): 91.6,
    ("A10", "bf16"): 125.0, ("A10", "fp32"): 31.2,
}


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """Peak dense TFLOP/s of ``device`` for ``precision``; None when unknown (e.g. CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [(frag, v) for (frag, p), v in _PEAK_TFLOPS.items() if p == precision and frag in name]
    return max(matches, key=lambda m: len(m[0]))[1] if matches else None


class PhaseTimer:
    """Wall time per named phase (data / forward / backward / optimizer ...).

    Each phase is also an NVTX range on CUDA and a ``record_function`` range for
    torch.profiler traces. With ``sync=True`` the device is synchronised at phase
    boundaries so that GPU time lands in the right phase; that host sync costs
    throughput, so the trainer enables it only on the steps it logs.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}
        self.sync = False

    @contextlib.contextmanager
    def phase(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.nvtx.range_push(name)
        if self.sync and cuda:
            torch.cuda.synchronize(self.device)  # host sync: timing steps only
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(name):
                yield
        finally:
            if self.sync and cuda:
                torch.cuda.synchronize(self.device)  # host sync: timing steps only
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start
            if cuda:
                torch.cuda.nvtx.range_pop()

    def pop(self) -> dict[str, float]:
        totals, self.totals = self.totals, {}
        return totals


class MetricSink:
    """Where the metrics of a run go. One interface for every destination: ``scalars`` (one
    record per log step), ``image`` (an (H, W, 3) uint8 picture, e.g. a sample grid), ``close``."""

    def scalars(self, step: int, record: dict[str, Any]) -> None:
        pass

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        pass

    def close(self) -> None:
        pass


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    """The record's scalars (the step itself and values that are not numbers, e.g. MFU None, left out)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


class FileSink(MetricSink):
    """One record per log step appended to ``metrics.jsonl`` and ``metrics.csv`` (the images are
    the trainer's PNGs already)."""

    def __init__(self, folder: Path):
        self.jsonl = folder / "metrics.jsonl"
        self.csv = folder / "metrics.csv"
        self._columns: list[str] | None = None

    def scalars(self, step: int, record: dict[str, Any]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        if self._columns is None:
            self._columns = ["step", *record]
            new = not self.csv.exists()
            with open(self.csv, "a", newline="") as f:
                if new:
                    csv.writer(f).writerow(self._columns)
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerow([step if c == "step" else record.get(c, "") for c in self._columns])


class TensorBoardSink(MetricSink):
    """TensorBoard event files in ``folder`` (``tensorboard --logdir RUN_DIR/tensorboard``), flushed
    at every write so that a killed run keeps what it logged."""

    def __init__(self, folder: Path, purge_step: int | None = None):
        """``purge_step``: a run resumed from step S passes S + 1, so that what a crashed session
        logged after its checkpoint is hidden instead of shown twice (TensorBoard's purge)."""
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    def scalars(self, step: int, record: dict[str, Any]) -> None:
        for tag, value in _numbers(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_available() -> bool:
    try:
        return importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):
        return False


WANDB_MISSING = ("--wandb needs the wandb package, which is not installed: pip install wandb "
                 "(or pip install -e '.[wandb]'), or leave --wandb out")


def wandb_mode(environ: Mapping[str, str] = os.environ) -> str | None:
    """``offline`` unless the user chose a mode (WANDB_MODE) or is logged in (WANDB_API_KEY, or the
    W&B host in ~/.netrc / $NETRC, where ``wandb login`` writes the key); None leaves it to wandb."""
    if environ.get("WANDB_MODE") or environ.get("WANDB_API_KEY"):
        return None
    host = urlparse(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        logged_in = netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return None if logged_in else "offline"


class WandbSink(MetricSink):
    """A Weights & Biases run in ``folder/wandb`` (offline when there is no login, see ``wandb_mode``)."""

    def __init__(self, folder: Path, project: str, config: dict[str, Any] | None = None):
        try:
            import wandb  # optional dependency (the ``wandb`` extra): only runs that ask for it need it
        except ImportError:
            raise ImportError(WANDB_MISSING) from None
        self.wandb = wandb
        self.run = wandb.init(project=project, name=folder.name, dir=str(folder), config=config,
                              mode=wandb_mode())

    def scalars(self, step: int, record: dict[str, Any]) -> None:
        self.run.log(_numbers(record), step=step)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricSinks(MetricSink):
    """The run's sinks behind one object: every call goes to each of them (none on ranks > 0)."""

    def __init__(self, sinks: Sequence[MetricSink] = ()):
        self.sinks = list(sinks)

    @classmethod
    def open(cls, folder: Path, *, enabled: bool, tensorboard: bool = True, wandb: str | None = None,
             config: dict[str, Any] | None = None, resumed_at: int | None = None) -> "MetricSinks":
        """metrics.jsonl/csv always, TensorBoard in ``folder/tensorboard`` when ``tensorboard``, a
        wandb run of project ``wandb`` when given; nothing when not ``enabled`` (ranks > 0).
        ``resumed_at``: the step a resumed run continues from (TensorBoard hides later events of
        the earlier session; the jsonl keeps both and its readers take the later record)."""
        if not enabled:
            return cls()
        sinks: list[MetricSink] = [FileSink(folder)]
        if tensorboard:
            purge = None if resumed_at is None else resumed_at + 1
            sinks.append(TensorBoardSink(folder / "tensorboard", purge_step=purge))
        if wandb:
            sinks.append(WandbSink(folder, wandb, config))
        return cls(sinks)

    def scalars(self, step: int, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.scalars(step, record)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        for sink in self.sinks:
            sink.image(tag, step, image)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
