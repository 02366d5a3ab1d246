"""Trainer behaviour that needs no process group: defaults, start-up words, data dtype."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.training.config import DataSection, TrainConfig
from engine.training.metrics import PhaseTimer
from engine.objectives.build import build_objective
from engine.objectives.dispersive import DispersiveConfig
from engine.train import parse
from engine.training.trainer import Trainer, describe_data
from tests.engine.objectives.test_objectives import tiny


def test_the_literal_command_trains_with_the_release_regularizer():
    cfg = parse(["--model", "sit_xl"])
    assert cfg.dispersive == DispersiveConfig.preset("release") and cfg.dispersive.enabled
    assert TrainConfig().dispersive == DispersiveConfig.preset("release")
    assert not parse(["--disp-preset", "none"]).dispersive.enabled
    assert not parse(["--disp-lambda", "0"]).dispersive.enabled
    assert parse(["--disp-tau", "0.5"]).dispersive == DispersiveConfig.preset("release", tau=0.5)


def test_help_shows_the_real_defaults(capsys):
    import pytest

    with pytest.raises(SystemExit):
        parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--disp-lambda LAMBDA Weight lambda of the whole term; 0 turns the regularizer off (no hidden " \
        "states taken). (default: 0.25)" in text
    assert '--transport-path {linear,gvp,vp} Interpolant: "linear", "gvp" or "vp" (the release\'s "Linear", ' \
        '"GVP", "VP" also parse). (default: linear)' in text


def test_startup_line_says_when_the_run_is_a_smoke_test():
    words = describe_data(DataSection(), Path("build/data/synthetic"), "4x32x32, 1000 classes")
    assert words.startswith("SMOKE TEST on 512 random synthetic latents (4x32x32, 1000 classes)")
    assert "no --data was given" in words and "--data DIR" in words and "engine.extract_latents" in words
    real = describe_data(DataSection(data="/data/in256"), Path("/data/in256"), "4x32x32, 1000 classes")
    assert real == "data /data/in256 (4x32x32, 1000 classes)" and "SMOKE" not in real


def test_bf16_runs_keep_the_data_latents_fp32():
    """The trainer hands the objective the loader's fp32 latents under bf16; the model casts its
    own input, so the noisy input and the target are formed from unrounded data."""
    trainer = Trainer.__new__(Trainer)  # only what _micro_step touches
    trainer.cfg = parse(["--precision", "bf16"])
    trainer.timer = PhaseTimer(torch.device("cpu"))
    trainer.engine = object()
    seen = {}

    def objective(model, x, y, valid=None, diagnostics=False):
        seen["x"] = x
        return {"loss": x.sum()}

    trainer.objective = objective
    x = torch.randn(4, 2, 8, 8) * 3 + 0.123456789  # values bf16 would round
    trainer._micro_step({"x": x, "y": torch.zeros(4, dtype=torch.long), "valid": torch.ones(4, dtype=torch.bool)})
    assert seen["x"].dtype == torch.float32 and torch.equal(seen["x"], x)


def test_sit_objective_trains_a_bf16_model_on_fp32_data():
    model = tiny().to(torch.bfloat16)
    obj = build_objective("sit", dispersive=DispersiveConfig.preset("release"))
    x = torch.randn(4, 2, 8, 8)
    out = obj(model, x, torch.randint(0, 5, (4,)), generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)


class _Engine:
    """What train_step touches of a DeepSpeed engine, for one rank and no process group."""
    skipped_steps = 0

    def backward(self, loss):
        pass

    def step(self):
        pass

    def get_global_grad_norm(self):
        return 1.0

    def get_lr(self):
        return [1e-4]


def test_a_signal_during_the_stop_vote_is_not_lost(monkeypatch, tmp_path):
    """SIGTERM handled while this rank waits in the all-reduce that agrees on stopping: that
    reduce answers 'go on' (the vote was cast before), and the next step's vote must carry the
    signal; it once overwrote it, and the run trained on until the launcher's SIGKILL."""
    import engine.training.trainer as trainer_module
    from engine.distributed import any_true

    trainer = Trainer.__new__(Trainer)
    trainer.cfg = parse(["--global-batch", "4"])
    trainer.timer = PhaseTimer(torch.device("cpu"))
    trainer.engine, trainer.accum, trainer.is_main, trainer.out, trainer.gather = _Engine(), 1, True, tmp_path, False
    trainer.ema = type("EMA", (), {"update": lambda *args: None})()
    trainer.step = trainer.images_seen = trainer.skipped = trainer.nonfinite_run = 0
    trainer._nan_from, trainer._signalled, trainer._stop = None, False, False
    trainer._micro_step = lambda batch, diagnostics=False: (torch.tensor(1.0), {"loss": torch.tensor(1.0)})
    votes = []

    def reduce_then_signal(flags):
        votes.append(bool(flags[1]))
        if len(votes) == 1:
            trainer._on_signal(15, None)  # the handler runs as the reduce returns
        return any_true(flags)

    monkeypatch.setattr(trainer_module, "any_true", reduce_then_signal)
    batches = iter([{}] * 2)
    trainer.train_step(batches)
    assert votes == [False] and trainer._stop is False  # the step that was under way completes
    trainer.train_step(batches)
    assert votes == [False, True] and trainer._stop is True
