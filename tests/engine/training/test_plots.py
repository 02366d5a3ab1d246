"""python -m engine.plot and engine.training.plots on run folders as the trainer leaves them:
finished, still being written, killed mid-line; the floor read from the run's configs."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from PIL import Image

from engine.config.flags import config_to_dict
from engine.objectives.dispersive import DispersiveConfig
from engine.plot import main
from engine.training.config import TrainConfig
from engine.training.plots import (COMPARISON_SIZE, DPI, RUN_SIZE, block_keys, plot_comparison, read_metrics,
                                  run_floor)
from tests.engine_helpers import REPO

RUN_PNG = (int(RUN_SIZE[0] * DPI), int(RUN_SIZE[1] * DPI))


def _record(step: int, blocks=(1,)) -> dict:
    """A record shaped like the trainer's (mfu None on CPUs)."""
    return {"step": step, "images_per_s": 100.0 + step, "tflops": 0.01, "mfu": None, "skipped_steps": 0,
            **{f"dispersive/block_{b}": -0.5 - 0.05 * step - 0.1 * b for b in blocks},  # above -log 8
            **{f"dispersive/block_{b}/gap": 1.5 - 0.05 * step - 0.1 * b for b in blocks},  # a diagnostic
            "diffusion_loss": 1.0 / step, "dispersive_total": -0.25, "grad_norm": 2.0, "lr": 1e-4,
            "time/data": 0.01, "time/forward": 0.1}


def _run(folder, steps: int, *, disp: DispersiveConfig | None = None, blocks=(1,), world: int = 2,
         micro: int = 8):
    """A run folder: config.json, deepspeed_config.json and ``steps`` metrics records."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(global_batch=world * micro, micro_batch=micro,
                      dispersive=disp or DispersiveConfig.preset("release"))
    (folder / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    (folder / "deepspeed_config.json").write_text(json.dumps(
        {"train_batch_size": world * micro, "train_micro_batch_size_per_gpu": micro,
         "gradient_accumulation_steps": 1}))
    with open(folder / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps(_record(step, blocks)) + "\n")
    return folder


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
        return img.size


def test_plot_command_on_a_finished_run(tmp_path, capsys):
    run = _run(tmp_path / "run", 20, blocks=(0, 3, 5))
    (run / "summary.json").write_text("{}")
    assert main([str(run)]) == run / "curves.png"
    assert capsys.readouterr().out.strip() == str(run / "curves.png")
    assert _png_size(run / "curves.png") == RUN_PNG


def test_plot_command_on_a_run_being_written(tmp_path):
    run = _run(tmp_path / "run", 3)  # no summary.json yet
    out = tmp_path / "now.png"
    main([str(run), "--out", str(out)])
    assert _png_size(out) == RUN_PNG
    with open(run / "metrics.jsonl", "a") as f:  # the run goes on
        f.write(json.dumps(_record(4)) + "\n")
    main([str(run), "--out", str(out)])
    assert _png_size(out) == RUN_PNG


def test_plot_command_on_a_killed_run_with_half_a_last_line(tmp_path):
    run = _run(tmp_path / "run", 5)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(_record(6))[:40])  # killed while writing step 6
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert _png_size(main([str(run)])) == RUN_PNG


def test_a_run_resumed_after_a_crash_keeps_the_later_records(tmp_path):
    run = _run(tmp_path / "run", 4)
    with open(run / "metrics.jsonl", "a") as f:  # crashed at 4 after a checkpoint at 2; resumed
        f.write('{"step": 5, "ima\n')
        for step in (3, 4, 5):
            f.write(json.dumps({**_record(step), "diffusion_loss": 9.0}) + "\n")
    records = read_metrics(run / "metrics.jsonl")
    assert [(r["step"], r["diffusion_loss"]) for r in records] == [(1, 1.0), (2, 0.5), (3, 9.0), (4, 9.0),
                                                                    (5, 9.0)]


@pytest.mark.parametrize("content", [None, "", '{"step": 1, "diff'])
def test_missing_or_empty_metrics_is_one_error_line(tmp_path, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    proc = subprocess.run([sys.executable, "-m", "engine.plot", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m engine.plot: error: "), proc.stderr
    assert "metrics.jsonl" in lines[0]
    assert not (tmp_path / "curves.png").exists()


def test_floor_is_minus_log_of_the_batch_the_term_sees(tmp_path):
    local = run_floor(_run(tmp_path / "local", 1, world=2, micro=8))
    assert (local.value, local.n) == (pytest.approx(-math.log(8)), 8)
    assert local.label() == "floor -log N = -2.079 (N = 8)"
    glob = DispersiveConfig.preset("release", scope="global")
    assert run_floor(_run(tmp_path / "global", 1, disp=glob, world=2, micro=8)).value == pytest.approx(-math.log(16))
    hinge = DispersiveConfig.preset("release", variant="hinge", margin=2.0)
    assert run_floor(_run(tmp_path / "hinge", 1, disp=hinge, micro=8)).value == pytest.approx(4.0 / 8)
    assert run_floor(_run(tmp_path / "off", 1, disp=DispersiveConfig.preset("none"))) is None
    assert run_floor(tmp_path / "nothing") is None


def test_only_the_block_terms_are_curves_not_their_diagnostics():
    record = {**_record(1, blocks=(2, 10)), "dispersive/block_2/gap": 0.1, "dispersive/block_2/rms": 3.0,
              "dispersive/block_10/off_diagonal": 0.5}
    assert block_keys([record]) == ["dispersive/block_2", "dispersive/block_10"]


def test_comparison_of_runs_in_one_png(tmp_path):
    base = _run(tmp_path / "baseline", 6, disp=DispersiveConfig.preset("none"), blocks=())
    disp = _run(tmp_path / "disp", 6)
    out = plot_comparison([("baseline", base), ("Dispersive Loss", disp)], tmp_path / "cmp.png", title="t")
    assert _png_size(out) == (int(COMPARISON_SIZE[0] * DPI), int(COMPARISON_SIZE[1] * DPI))
