"""The benchmark helpers work: report writer, providers, roofline counts, profile command.

Fast (tiny sizes); the benchmarks themselves run with ``pytest bench/``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import providers
from bench.conftest import BenchSettings
from bench.hardware import DeviceFigures, formula_counts, pass_roofline
from bench.report import fmt, render, write_report
from bench.timing import summarize
from kernels import reference_dispersive_loss
from tests.conftest import REPO



def _bench_row(name: str, median_s: float, extra: dict) -> dict:
    return {"name": name, "fullname": f"bench/x.py::{name}", "group": None, "params": {}, "param": None,
            "extra_info": extra, "options": {},
            "stats": {"median": median_s, "iqr": median_s / 10, "rounds": 5, "min": median_s, "max": median_s}}


def _fake_json(device: str = "cpu") -> dict:
    def disp(provider, ms, **more):
        return _bench_row(f"test_dispersive[{provider}]", ms / 1e3, {
            "kind": "dispersive", "provider": provider, "mode": "forward_backward", "n": 32, "d": 294_912,
            "dtype": "bf16", "device": device, "median_ms": ms, "iqr_ms": ms / 10, "GBps": 1.5,
            "TFLOPs": 0.01, "pct_memory_roofline": 10.0, "x_floor": 10.0, "floor_us": 20.0,
            "workspace_mib": 0.5, "roofline_source": "kernels.roofline", **more})

    rows = [disp("release", 40.0), disp("torch_compile", 30.0, compile_s=12.5), disp("torch_gram", 10.0)]
    if device == "cuda":
        rows.append(disp("triton", 0.05, device_ms=0.024, x_floor=1.2))
    rows.append(_bench_row("test_gram_speedup_bar[N32]", 1.0, {
        "kind": "bar", "bar": "torch_gram >= 4x faster than release", "n": 32, "d": 294_912,
        "target": 4.0, "measured": 4.6, "passed": True, "release_ms": 920.0, "torch_gram_ms": 200.0}))
    rows.append(_bench_row("test_train_step", 30.0, {
        "kind": "train_step", "model": "SiT-S/2", "batch": 8, "precision": "fp32", "hidden_dtype": "float32",
        "device": device, "depth": 12, "rounds": 4, "steps_per_round": 1, "target_pct": 5.0, "passed": True,
        "bar": "asserted (CPU bar)", "overhead_all_project_pct": 2.5,
        "settings": [{"setting": "none", "blocks": "-", "impl": "none", "images_per_s": 2.0,
                      "step_ms": 4000.0, "step_iqr_ms": 50.0, "overhead_pct": 0.0},
                     {"setting": "all/project", "blocks": "all", "impl": "project", "images_per_s": 1.95,
                      "step_ms": 4100.0, "step_iqr_ms": 60.0, "overhead_pct": 2.5}]}))
    rows.append(_bench_row("test_loader_throughput[torch]", 0.2, {"samples_per_s": 12000, "backend": "torch"}))
    return {"machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}, "python_version": "3.11"},
            "datetime": "2026-01-01T00:00:00", "version": "5.3.1", "benchmarks": rows,
            "bench": {"device": device, "machine": "Test CPU, 2 threads", "date": "2026-01-01 00:00 UTC",
                      "mode": "quick", "versions": {"torch": "2.x", "triton": "3.x", "python": "3.11"},
                      "measured": {"copy_GBps": 12.0},
                      "out_of_memory": [{"provider": "release", "mode": "backward", "n": 256, "d": 294_912,
                                         "dtype": "fp32", "error": "CUDA out of memory"}]}}


def test_report_tables_from_fake_json(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text(json.dumps(_fake_json()))
    text = write_report(path, tmp_path / "results.md")
    assert (tmp_path / "results.md").read_text() == text
    assert "- Machine: Test CPU, 2 threads (2 CPUs)" in text
    assert "torch 2.x, triton 3.x, python 3.11" in text and "2026-01-01 00:00 UTC" in text
    lines = text.splitlines()
    # The dispersive table: speed-up against the release of the same size and pass.
    row = next(line for line in lines if line.startswith("| 32 | 294,912 | bf16 | fwd+bwd | torch_gram |"))
    assert row.endswith("| 4.00x |")
    compiled = next(line for line in lines if "| torch_compile |" in line)
    assert "| 12.5 |" in compiled and compiled.endswith("| 1.33x |")
    assert any(line.startswith("| torch_gram >= 4x faster than release | 32 |") and "PASS" in line for line in lines)
    assert "| all/project | all | project | 1.95 | 4,100 | 60.0 | +2.50% |" in text
    assert "**+2.50%** of the step without it (target < 5%" in text
    assert "| test_loader_throughput[torch] | 200 | 20.0 | 5 | samples_per_s 12,000 |" in text
    assert "| 256 | 294,912 | fp32 | bwd | release | out of memory | - |" in text
    assert "## GPU targets" not in text  # CPU run
    # Every table row has as many cells as its header.
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            width = lines[i - 1].count("|")
            for body in lines[i + 1:]:
                if not body.startswith("|"):
                    break
                assert body.count("|") == width, body


def test_report_judges_gpu_targets() -> None:
    text = render(_fake_json("cuda"))
    assert "## GPU targets" in text and "| GPU ms |" in text
    assert "1.20x the floor (24.0 us vs 20.0 us) | PASS |" in text
    assert "2 of 2 comparisons faster | PASS |" in text


def test_report_rejects_other_json() -> None:
    with pytest.raises(ValueError, match="pytest-benchmark"):
        render({"not": "a benchmark file"})


def test_fmt_and_summarize() -> None:
    assert [fmt(v) for v in (1234.5, 12.34, 1.234, 0.01234, None, 3, True)] == \
        ["1,234", "12.3", "1.23", "0.0123", "-", "3", "yes"]
    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median"] == 3.0 and s["q1"] == 2.0 and s["q3"] == 4.0 and s["iqr"] == 2.0 and s["rounds"] == 5


def test_rounds_are_bounded() -> None:
    quick = BenchSettings(full=False, device=torch.device("cpu"))
    assert quick.rounds_for(10.0) == quick.min_rounds
    assert quick.rounds_for(1e-5) == quick.max_rounds
    assert quick.min_rounds <= quick.rounds_for(0.3) <= quick.max_rounds


def test_roofline_counts_follow_the_design() -> None:
    n, d = 32, 294_912
    # bf16: forward reads z (19 MB), backward reads z and writes dz.
    assert formula_counts(n, d, 2, "infonce_l2", "forward_backward") == (3 * n * d * 2, 4 * n * n * d)
    figures = DeviceFigures(torch.device("cpu"), copy_bytes_per_s=1e10)
    figures._matmul[torch.float32] = 1e11  # no measurement in a unit test
    line = pass_roofline(n, d, torch.bfloat16, "infonce_l2", "forward_backward", figures)
    assert line.floor_s == pytest.approx(3 * n * d * 2 / 1e10)
    assert 1.0 <= line.bytes / (3 * n * d * 2) < 1.1  # the kernels' counts add small side buffers
    assert line.memory_s == pytest.approx(line.bytes / 1e10)
    assert line.derived(2 * line.floor_s)["x_floor"] == pytest.approx(2.0)


@pytest.mark.parametrize("provider", ["release", "torch_gram", "triton"])
@pytest.mark.parametrize("mode", providers.MODES)
def test_providers_match_the_reference(provider: str, mode: str) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if providers.unavailable_reason(provider, device):
        pytest.skip(providers.unavailable_reason(provider, device))
    z = torch.randn(6, 3, 40, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_(True)
    fn, compile_s = providers.loss_fn(provider, z)
    assert compile_s is None
    setup, run = providers.timed_pass(fn, z, mode)
    args, kwargs = setup()
    out = run(*args, **kwargs)
    ref_z = z.detach().double().requires_grad_(True)
    ref = reference_dispersive_loss(ref_z, upcast=True)
    if mode == "forward":
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    else:
        (ref_grad,) = torch.autograd.grad(ref, ref_z)
        torch.testing.assert_close(out[0].double(), ref_grad, rtol=1e-4, atol=1e-7)


def test_release_provider_takes_bf16() -> None:
    """pdist has no bf16 kernel: the provider casts to fp32 (as autocast would) and still matches."""
    z = torch.randn(5, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).requires_grad_(True)
    fn, _ = providers.loss_fn("release", z)
    loss = fn(z)
    (grad,) = torch.autograd.grad(loss, z)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), reference_dispersive_loss(z.detach(), upcast=True), rtol=1e-5, atol=1e-6)


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown provider"):
        providers.unavailable_reason("pdist", "cpu")
    with pytest.raises(ValueError, match="unknown mode"):
        providers.timed_pass(lambda z: z.sum(), torch.zeros(2, 2), "sideways")


def test_release_term_swaps_only_the_implementation(monkeypatch) -> None:
    """Same model, batch and seed: the release's term and the project's give the same loss,
    and inside the swap it is the release's code that computes it (once per block)."""
    import kernels
    import models
    from engine.objectives.build import build_objective
    from engine.objectives.dispersive import DispersiveConfig

    model = models.create_model("sit_s", input_size=8, depth=2, hidden_size=64, num_heads=2, num_classes=10)
    objective = build_objective("sit", dispersive=DispersiveConfig(lambda_=0.25, blocks="all", backend="torch"))
    x, y = torch.randn(4, 4, 8, 8), torch.randint(0, 10, (4,))
    project = objective(model, x, y, generator=torch.Generator().manual_seed(0))
    original = kernels.dispersive_loss
    calls = []
    real = providers.release_dispersive_loss
    monkeypatch.setattr(providers, "release_dispersive_loss", lambda z, tau: calls.append(z.shape) or real(z, tau))
    with providers.release_term():
        assert kernels.dispersive_loss is not original
        release = objective(model, x, y, generator=torch.Generator().manual_seed(0))
    assert kernels.dispersive_loss is original
    assert len(calls) == 2  # one release call per block
    torch.testing.assert_close(release["loss"], project["loss"], rtol=1e-5, atol=1e-6)
    assert project["dispersive_total"] != 0


def test_profile_quick_writes_a_trace(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "bench.profile", "--quick", "--device", "cpu", "--steps", "1",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    trace = json.loads((tmp_path / "trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert "train_step/sit_all_blocks" in names
    assert any(n.startswith("dispersive/torch_gram/") and n.endswith("/backward") for n in names)
    assert "| provider | N | D | dtype | pass | ms | MB moved | GB/s |" in done.stdout
    assert "| release | 8 | 4,096 | float32 | forward |" in done.stdout
    assert (tmp_path / "profile.md").read_text().strip() == done.stdout.strip()


def test_launch_overhead_times_each_backend(capsys) -> None:
    from bench import launch_overhead

    out = launch_overhead.main(["--n", "4", "--d", "8", "--calls", "3", "--rounds", "1", "--device", "cpu"])
    assert set(out) == {"torch"} and out["torch"]["wall_us"] > 0
    assert "us wall per call" in capsys.readouterr().out


def test_json_path_takes_a_path_or_an_open_file(tmp_path: Path) -> None:
    """pytest-benchmark 5 parses --benchmark-json as a path, 4.x as a file opened for writing."""
    from types import SimpleNamespace

    from bench.conftest import json_path

    target = tmp_path / "b.json"
    assert json_path(SimpleNamespace(option=SimpleNamespace(benchmark_json=target))) == target
    with open(target, "wb") as fh:
        assert json_path(SimpleNamespace(option=SimpleNamespace(benchmark_json=fh))) == target
    assert json_path(SimpleNamespace(option=SimpleNamespace(benchmark_json=None))) is None


def test_tile_sweep_candidates_vary_one_thing_and_refuse_cpu(capsys) -> None:
    from bench import tile_sweep
    from kernels.fused.tiles import TILES

    base = TILES[(32, True)]
    cands = tile_sweep._candidates(base)
    assert cands[0] == ("current", base, 2)
    assert len({(t, p) for _, t, p in cands}) == len(cands)  # no candidate timed twice
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            tile_sweep.main([])
        assert "CUDA" in capsys.readouterr().err
