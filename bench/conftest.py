"""pytest-benchmark settings of ``pytest bench/``: options, device, rounds, results.

    pytest bench/                         # quick: a representative subset, < 10 min on 2 CPU cores
    pytest bench/ --full                  # the paper's sizes (for GPUs); also BENCH_FULL=1
    pytest bench/ --bench-device cpu      # default: cuda when present, else cpu

Results: pytest-benchmark JSON (``--benchmark-json``, default build/bench/benchmark.json)
and a Markdown table beside it (build/bench/results.md; machine, versions and date in its
header), also printed at the end of the terminal summary.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "build" / "bench"
# Compiled artefacts stay in the ignored build area (torch.compile's inductor, Triton).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO / "build" / "cache" / "inductor"))
os.environ.setdefault("TRITON_CACHE_DIR", str(REPO / "build" / "cache" / "triton"))

_MARKDOWN = pytest.StashKey[str]()
_STARTED = pytest.StashKey[float]()
_FIGURES = pytest.StashKey[object]()
_OOM = pytest.StashKey[list]()


@dataclass(frozen=True)
class BenchSettings:
    """What one ``pytest bench/`` run measures, and how long it may spend per case."""

    full: bool
    """The paper's sizes (every N x D x dtype) instead of the quick subset."""
    device: torch.device
    """Device of the tensors and models under test."""

    @property
    def target_s(self) -> float:
        """Timed seconds to aim for per case (rounds = target / one call, within bounds)."""
        return 5.0 if self.full else 2.0

    @property
    def min_rounds(self) -> int:
        return 5 if self.full else 3

    @property
    def max_rounds(self) -> int:
        return 100 if self.device.type == "cuda" else (30 if self.full else 15)

    def rounds_for(self, seconds_per_call: float) -> int:
        """Rounds for a call of that length: enough for a stable median, bounded in time."""
        wanted = math.ceil(self.target_s / max(seconds_per_call, 1e-6))
        return max(self.min_rounds, min(self.max_rounds, wanted))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bench", "dispersive-dit benchmarks")
    group.addoption("--full", action="store_true", default=False,
                    help="benchmark the paper's sizes (N in 16..256, SiT-S..XL widths, fp32 and bf16); "
                         "meant for GPUs. Also set by BENCH_FULL=1.")
    group.addoption("--bench-device", default=None,
                    help="device of the benchmarks (default: cuda when available, else cpu)")


def settings(config: pytest.Config) -> BenchSettings:
    """The run's settings from the command line and the environment."""
    full = bool(config.getoption("full", default=False)) or os.environ.get("BENCH_FULL", "") not in ("", "0")
    name = config.getoption("bench_device", default=None) or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--bench-device {name}: CUDA is not available in this torch build/machine")
    return BenchSettings(full=full, device=device)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STARTED] = time.time()
    # Runs before pytest-benchmark's own configure (trylast), which reads this option.
    if not hasattr(config.option, "benchmark_json") or config.option.collectonly:
        return
    if config.option.benchmark_json is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / "benchmark.json"
        # pytest-benchmark >= 5 takes a path; 4.x parses the option as a file opened for writing.
        config.option.benchmark_json = path if _benchmark_major() >= 5 else open(path, "wb")
    json_path(config).parent.mkdir(parents=True, exist_ok=True)  # pytest-benchmark won't


def _benchmark_major() -> int:
    from importlib.metadata import version

    return int(version("pytest-benchmark").split(".")[0])


def json_path(config: pytest.Config) -> Path | None:
    """The JSON report's path: the option is a path (pytest-benchmark >= 5) or an open file (4.x)."""
    option = getattr(config.option, "benchmark_json", None)
    if option is None:
        return None
    return Path(option.name if hasattr(option, "write") else option)  # a Path has .name too


@pytest.fixture(scope="session")
def bench_settings(pytestconfig: pytest.Config) -> BenchSettings:
    return settings(pytestconfig)


@pytest.fixture(scope="session")
def figures(pytestconfig: pytest.Config, bench_settings: BenchSettings):
    """The device's measured copy bandwidth and matmul rates (measured once per run)."""
    from .hardware import device_figures

    result = device_figures(bench_settings.device)
    pytestconfig.stash[_FIGURES] = result  # read back into the JSON header at the end
    return result


@pytest.fixture(scope="session")
def record_oom(pytestconfig: pytest.Config):
    """Records a case that ran out of device memory; the report lists it with the timings."""
    cases = pytestconfig.stash.setdefault(_OOM, [])
    return cases.append


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    """Adds the run's environment to the JSON: device, versions, mode, measured ceilings."""
    from .timing import machine_description, now, versions

    run = settings(config)
    env = {"device": str(run.device), "machine": machine_description(run.device), "versions": versions(),
           "date": now(), "mode": "full" if run.full else "quick", "cpu_count": os.cpu_count()}
    measured = config.stash.get(_FIGURES, None)
    if measured is not None:
        env["measured"] = measured.as_dict()
    env["out_of_memory"] = config.stash.get(_OOM, [])
    output_json["bench"] = env


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # pytest-benchmark's own sessionfinish (a hook wrapper) has written the JSON by now.
    option = getattr(session.config.option, "benchmark_json", None)
    if hasattr(option, "flush") and not option.closed:
        option.flush()  # 4.x: written through a file object left open
    path = json_path(session.config)
    # No JSON from this run (no benchmark ran, or --benchmark-disable): no stale report either.
    if path is None or not Path(path).exists() or Path(path).stat().st_mtime < session.config.stash[_STARTED]:
        return
    from .report import write_report

    try:
        session.config.stash[_MARKDOWN] = write_report(Path(path), Path(path).with_name("results.md"))
    except Exception as err:  # a broken report must not hide the benchmarks' own outcome
        session.config.stash[_MARKDOWN] = f"(could not write the Markdown report: {err!r})"


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    text = config.stash.get(_MARKDOWN, None)
    if text is None:
        return
    path = json_path(config).with_name("results.md")
    terminalreporter.write_sep("=", f"benchmark results (also in {path})")
    terminalreporter.write_line(text)
