"""The training engine under the ``deepspeed`` launcher with 2 CPU ranks (gloo)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data.format import LatentDatasetWriter
from tests.engine_helpers import TINY, losses, metrics, run_engine

pytestmark = pytest.mark.slow
STEPS = 10
# A fast EMA (0.5) so that the EMA of 10 steps is far from the initial weights.
COMMON = [*TINY, "--data", "digits", "--global-batch", "16", "--log-every", "1", "--disp-preset", "release",
          "--ema-decay", "0.5"]


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    """10 steps of the same tiny SiT under ZeRO-1, -2 and -3 (fp32), checkpoint every 5."""
    runs = {}
    for stage in (1, 2, 3):
        out = tmp_path_factory.mktemp(f"zero{stage}")
        run_engine([*COMMON, "--zero-stage", str(stage), "--max-steps", str(STEPS), "--ckpt-every", "5",
                    "--results-dir", str(out)])
        runs[stage] = out
    return runs


def test_losses_agree_across_zero_stages(stage_runs):
    curves = {stage: losses(out) for stage, out in stage_runs.items()}
    assert sorted(curves[1]) == list(range(1, STEPS + 1))
    for stage in (2, 3):
        for step, value in curves[1].items():
            # Same data, seeds and maths; only the order of the gradient reductions differs.
            assert curves[stage][step] == pytest.approx(value, rel=1e-4), (stage, step)
    assert all(math.isfinite(v) for v in curves[1].values())
    # The EMA: rank 0's full copy (ZeRO-1/2) and the sharded one (ZeRO-3) agree.
    emas = {stage: torch.load(out / "checkpoints" / "0000010.pt", weights_only=True)["ema"]
            for stage, out in stage_runs.items()}
    init = torch.load(stage_runs[1] / "checkpoints" / "0000005.pt", weights_only=True)["model"]
    for key, value in emas[1].items():
        for stage in (2, 3):
            torch.testing.assert_close(emas[stage][key], value, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(emas[1][k], init[k]) for k in init)
    record = metrics(stage_runs[1])[-1]
    for key in ("diffusion_loss", "dispersive/block_1", "grad_norm", "lr", "images_per_s", "tflops",
                "time/data", "time/forward", "time/backward", "time/optimizer",
                "dispersive/block_1/gap", "dispersive/block_1/off_diagonal", "dispersive/block_1/rms"):
        assert key in record, key
    # the floor of the release term for this run's local batch (16 over 2 ranks)
    assert record["dispersive/block_1/gap"] == pytest.approx(record["dispersive/block_1"] + math.log(8), abs=1e-6)
    assert 0.0 <= record["dispersive/block_1/off_diagonal"] <= 1.0 and record["dispersive/block_1/rms"] > 0


def test_resume_is_bit_identical(stage_runs, tmp_path):
    """5 steps, stop, resume for 5 more == 10 steps straight (ZeRO-2, torch AdamW, CPU)."""
    args = [*COMMON, "--zero-stage", "2", "--ckpt-every", "5", "--results-dir", str(tmp_path)]
    run_engine([*args, "--max-steps", "5"])
    proc = run_engine([*args, "--max-steps", str(STEPS), "--resume", "auto"])
    assert "resumed from" in proc.stdout and "at step 5" in proc.stdout
    straight, resumed = losses(stage_runs[2]), losses(tmp_path)
    for step in range(1, STEPS + 1):
        assert resumed[step] == straight[step], f"step {step}: {resumed[step]!r} != {straight[step]!r}"
    ema_a = torch.load(stage_runs[2] / "checkpoints" / "0000010.pt", weights_only=True)["ema"]
    ema_b = torch.load(tmp_path / "checkpoints" / "0000010.pt", weights_only=True)["ema"]
    for key in ema_a:
        assert torch.equal(ema_a[key], ema_b[key]), key


def test_checkpoints_release_format_and_keep_last_k(stage_runs):
    import models

    ckpts = stage_runs[3] / "checkpoints"
    assert (ckpts / "step_0000010" / "COMPLETE").exists()
    release = torch.load(ckpts / "0000010.pt", map_location="cpu", weights_only=True)
    assert {"model", "ema", "args"} <= set(release)
    assert release["args"]["model"] == "SiT-S/2"
    model = models.load_model(ckpts / "0000010.pt")  # EMA preferred
    for key, value in release["ema"].items():
        torch.testing.assert_close(model.state_dict()[key], value)
    # ZeRO-3 gathered the full fp32 weights for "model": every tensor has its full shape.
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in release["model"].items()} == shapes
    summary = json.loads((stage_runs[3] / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["sample_grid"].endswith(".png")


def test_kill_during_checkpoint_save_leaves_previous_loadable(tmp_path):
    args = [*COMMON, "--zero-stage", "2", "--ckpt-every", "2", "--max-steps", "6", "--results-dir", str(tmp_path)]
    from tests.engine_helpers import engine_env
    crashed = run_engine(args, env=engine_env(DISPERSIVE_FAULT_KILL_IN_SAVE="4"), check=False)
    assert crashed.returncode != 0
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "step_0000002" / "COMPLETE").exists()
    assert (ckpts / "step_0000004").is_dir() and not (ckpts / "step_0000004" / "COMPLETE").exists()
    proc = run_engine([*args, "--resume", "auto"])
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    # The resumed run passed step 4 again and saved it properly this time.
    assert (ckpts / "step_0000004" / "COMPLETE").exists() and (ckpts / "step_0000006" / "COMPLETE").exists()


def _dataset(path, nan_rows: list[int], n: int = 48):
    """A valid dataset whose shard is then corrupted on disk (the writer refuses NaN)."""
    rng = np.random.default_rng(0)
    with LatentDatasetWriter(path, shape=(1, 16, 16), num_classes=10, dtype="float32",
                             scale_factor=1.0, source="test: injected NaN") as w:
        w.append(rng.standard_normal((n, 1, 16, 16)).astype(np.float32) * 0.5, rng.integers(0, 10, n))
    (shard,) = path.glob("latents-*.npy")
    latents = np.load(shard, mmap_mode="r+")
    latents[nan_rows] = np.nan
    latents.flush()
    return path


def test_nonfinite_batch_is_skipped_on_every_rank(tmp_path):
    data = _dataset(tmp_path / "data", nan_rows=[7])
    out = tmp_path / "run"
    # 48 samples / global batch 16 = 3 steps: exactly one step sees the NaN sample, on one rank.
    run_engine([*TINY, "--data", str(data), "--global-batch", "16", "--max-steps", "3", "--log-every", "1",
                "--zero-stage", "2", "--disp-preset", "release", "--results-dir", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 1
    release = torch.load(out / "checkpoints" / "0000003.pt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in release["model"].values())
    assert all(torch.isfinite(v).all() for v in release["ema"].values())


def test_consecutive_nonfinite_steps_stop_without_checkpoint(tmp_path):
    data = _dataset(tmp_path / "data", nan_rows=list(range(48)))
    out = tmp_path / "run"
    proc = run_engine([*TINY, "--data", str(data), "--global-batch", "16", "--max-steps", "10",
                       "--max-nonfinite", "2", "--zero-stage", "1", "--results-dir", str(out)], check=False)
    assert proc.returncode != 0
    assert "2 consecutive steps had a non-finite loss" in proc.stdout + proc.stderr
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step_*"))


def test_sigterm_writes_a_final_checkpoint_and_exits_cleanly(tmp_path):
    """Preemption: a scheduler signals every training process; they agree, save once, exit 0."""
    import signal
    import subprocess
    import time

    import psutil

    from tests.engine_helpers import REPO, _port, engine_env, release_shared_memory
    deepspeed = __import__("sys").executable.replace("python", "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", _port(), "engine/train.py", *COMMON,
           "--zero-stage", "2", "--max-steps", "100000", "--ckpt-every", "100000", "--results-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=engine_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while not (tmp_path / "metrics.jsonl").exists() or len(metrics(tmp_path)) < 3:
            assert proc.poll() is None and time.time() < deadline, "the run ended before it was signalled"
            time.sleep(0.5)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if any(a.startswith("--local_rank=") for a in p.cmdline())]  # not the launcher
        assert len(workers) == 2
        for p in workers:
            p.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        release_shared_memory(cmd[cmd.index("--master_port") + 1])
    assert proc.returncode == 0, out[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_by_signal"] is True and summary["step"] < 100000
    assert (tmp_path / "checkpoints" / f"step_{summary['step']:07d}" / "COMPLETE").exists()


def test_meanflow_trains_on_two_ranks_and_samples_in_one_step(tmp_path):
    import models
    from engine.sampling.meanflow import sample_meanflow

    run_engine([*COMMON, "--objective", "meanflow", "--zero-stage", "3", "--precision", "bf16",
                "--max-steps", "3", "--results-dir", str(tmp_path)])
    record = metrics(tmp_path)[-1]
    assert record["step"] == 3 and math.isfinite(record["mf_error"])
    assert math.isfinite(record["dispersive/block_1"]) and record["dispersive_total"] < 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sample_grid"].endswith(".png")
    model = models.load_model(tmp_path / "checkpoints" / "0000003.pt")
    assert model.config.second_time_input and not model.config.learn_sigma
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0 = sample_meanflow(model, torch.arange(4), noise, steps=1)
        u = model(noise, torch.ones(4), torch.arange(4), h=torch.ones(4))  # u(z_1, r=0, t=1)
    torch.testing.assert_close(x0, noise - u)


def test_literal_sit_xl_command_zero3_bf16_two_ranks(tmp_path):
    """`deepspeed engine/train.py --model sit_xl` on a CPU machine: 2 steps, ZeRO-3, bf16, 2 ranks,
    micro batch 1, synthetic 4x32x32 latents (the full 675M-parameter model). --ckpt-every 0: its
    checkpoint would take ~15 GB of the CI machine's disk (a ZeRO-3 bf16 save of a small model is
    tested in test_meanflow_trains_on_two_ranks_and_samples_in_one_step)."""
    proc = run_engine(["--model", "sit_xl", "--zero-stage", "3", "--precision", "bf16", "--micro-batch", "1",
                "--global-batch", "2", "--max-steps", "2", "--log-every", "1", "--data", "synthetic",
                "--synthetic-samples", "8", "--sample-count", "1", "--sample-steps", "2",
                "--loader", "torch", "--num-workers", "0", "--disp-preset", "release", "--ckpt-every", "0",
                "--results-dir", str(tmp_path)], timeout=1500)
    assert "SMOKE TEST on 8 random synthetic latents" in proc.stdout  # said in words, not just --print-config
    assert "675,129,632 parameters" in proc.stdout  # SiT-XL/2's count, pos_embed included
    assert "no checkpoint will be written" in proc.stdout
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["diffusion_loss"]) and math.isfinite(r["dispersive/block_27"]) for r in records)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["checkpoint"] is None and summary["release_checkpoint"] is None
    assert not list(tmp_path.rglob("*.pt")) and Path(summary["sample_grid"]).exists()


def test_a_gvp_noise_run_samples_with_its_own_transport(tmp_path):
    """Trained with --transport-path gvp --transport-prediction noise: sampling its checkpoint
    with no transport flags gives exactly the samples of asking for gvp/noise."""
    from engine.sample import main as sample

    run_engine([*COMMON, "--transport-path", "gvp", "--transport-prediction", "noise", "--max-steps", "2",
                "--results-dir", str(tmp_path / "run")])
    ckpt = str(tmp_path / "run" / "checkpoints" / "0000002.pt")
    common = ["--ckpt", ckpt, "--num-samples", "4", "--sampler", "ode", "--method", "euler", "--num-steps", "4",
              "--no-progress", "--render", "minmax"]

    def images(name: str, *flags: str) -> np.ndarray:
        with np.load(sample([*common, "--out", str(tmp_path / name), *flags])["npz"]) as z:
            return z["arr_0"]

    implicit = images("implicit")
    np.testing.assert_array_equal(implicit, images("explicit", "--transport-path", "gvp",
                                                   "--transport-prediction", "noise"))
    assert not np.array_equal(implicit, images("linear", "--transport-path", "linear",
                                               "--transport-prediction", "velocity"))
