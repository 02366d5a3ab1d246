"""Engine pieces that need no process group: config, flags, DeepSpeed JSON, checkpoint folders."""
from __future__ import annotations

import json

import pytest
import torch

from engine.training.checkpoint import COMPLETE, CheckpointDir, atomic_torch_save
from engine.training.config import TrainConfig
from engine.train import parse
from engine.training.deepspeed_setup import deepspeed_config


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_flags_reach_every_section():
    cfg = parse(["--model", "SiT-B/2", "--lr", "3e-4", "--betas", "0.9", "0.95", "--zero-stage", "3",
                 "--precision", "bf16", "--disp-preset", "paper", "--disp-tau", "0.25", "--disp-blocks", "0,5",
                 "--transport-path", "gvp", "--no-flip", "--global-batch", "64", "--profile-steps", "3", "5"])
    assert cfg.model.name == "SiT-B/2" and cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.zero_stage == 3 and cfg.precision == "bf16" and cfg.data.flip is False
    # The preset sets lambda; the explicit flags override tau and blocks.
    assert cfg.dispersive.lambda_ == 0.5 and cfg.dispersive.tau == 0.25 and cfg.dispersive.blocks == (0, 5)
    assert cfg.transport.path.value == "gvp" and cfg.profile_steps == (3, 5)


def test_release_defaults():
    cfg = TrainConfig()
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas) == (1e-4, 0.0, (0.9, 0.999))
    assert (cfg.global_batch, cfg.ema_decay, cfg.optim.warmup_steps) == (256, 0.9999, 0)


def test_config_file_round_trip(tmp_path):
    from engine.config.flags import config_to_dict
    cfg = parse(["--model", "dit_s", "--disp-preset", "release", "--max-steps", "7"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config_to_dict(cfg)))
    again = parse(["--config", str(path), "--max-steps", "9"])
    assert again.max_steps == 9 and again.model.name == "dit_s"
    assert again.dispersive == cfg.dispersive and again.transport == cfg.transport


@pytest.mark.parametrize("argv, message", [
    (["--model", "sit_q"], "unknown model"),
    (["--disp-tau", "0"], "DispersiveConfig.tau must be a finite number > 0, got 0.0"),
    (["--disp-tau", "-1"], "DispersiveConfig.tau must be a finite number > 0, got -1.0"),
    (["--lr", "nan"], "OptimSection.lr must be a finite number > 0, got nan"),
    (["--timeout-minutes", "0"], "TrainConfig.timeout_minutes must be a finite number > 0, got 0.0"),
    (["--timeout-minutes", "-1"], "TrainConfig.timeout_minutes must be a finite number > 0, got -1.0"),
    (["--max-steps", "0"], "TrainConfig.max_steps must be an int >= 1, got 0"),
    (["--ckpt-every", "-1"], "TrainConfig.ckpt_every must be an int >= 0, got -1"),
    (["--model", "dit_s", "--objective", "meanflow"], "'meanflow' needs a SiT"),
    (["--global-batch", "10", "--micro-batch", "4"], "not divisible"),
    (["--data", "/nonexistent/latents"], "no latent dataset"),
    (["--disp-variant", "l2"], "invalid choice: 'l2'"),
    (["--zero-stage", "4"], "invalid choice"),
    (["--resume", "/nonexistent/ckpt"], "no such checkpoint"),
])
def test_invalid_options_fail_before_any_work(capsys, argv, message):
    err = _error(capsys, argv)
    assert message in err, err


def test_world_size_divisibility_names_the_fix(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    err = _error(capsys, ["--global-batch", "256"])
    assert "world size 3" in err and "multiple of" in err


def test_deepspeed_json_from_config(tmp_path):
    cfg = parse(["--zero-stage", "3", "--precision", "bf16", "--grad-clip", "1.0", "--offload",
                 "--global-batch", "64"])
    ds = deepspeed_config(cfg, micro=8, accum=2)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    override = tmp_path / "ds.json"
    override.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123}, "bf16": {"enabled": False}}))
    cfg = parse(["--zero-stage", "2", "--deepspeed-config", str(override)])
    ds = deepspeed_config(cfg, micro=8, accum=1)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                       "reduce_bucket_size": 123}  # the user's value wins
    assert ds["bf16"]["enabled"] is False


def test_checkpoint_dir_complete_only_and_prune(tmp_path):
    ckpts = CheckpointDir(tmp_path)
    for step, complete in [(100, True), (200, True), (300, False), (400, True), (500, False)]:
        ckpts.path(step).mkdir(parents=True)
        atomic_torch_save({"step": step}, ckpts.release_path(step))
        if complete:
            ckpts.mark_complete(step)
    assert ckpts.steps() == [100, 200, 400]
    assert ckpts.resolve_resume("auto") == ckpts.path(400)
    assert ckpts.resolve_resume(None) is None
    with pytest.raises(FileNotFoundError, match="no COMPLETE marker"):
        ckpts.resolve_resume(str(ckpts.path(500)))
    removed = ckpts.prune(keep_last_k=2)
    # The oldest complete one goes, and so does the interrupted 300 (older than 400);
    # 500 may still be in progress, so it stays.
    assert removed == [100, 300]
    assert ckpts.steps() == [200, 400] and ckpts.path(500).exists()
    assert not ckpts.release_path(100).exists() and (ckpts.path(400) / COMPLETE).exists()
    assert torch.load(ckpts.release_path(400), weights_only=True) == {"step": 400}


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "x.pt"
    atomic_torch_save({"a": 1}, target)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_torch_save({"a": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temporary file left behind


@pytest.mark.parametrize("key, value, message", [
    ("precision", "fp64", "TrainConfig.precision must be one of 'fp32', 'bf16', got 'fp64'"),
    ("zero_stage", 7, "TrainConfig.zero_stage must be one of 0, 1, 2, 3, got 7"),
    ("ema_decay", 1.5, "TrainConfig.ema_decay must be a finite number >= 0 and < 1, got 1.5"),
])
def test_config_json_values_are_checked_against_the_field_types(tmp_path, capsys, key, value, message):
    from engine.config.flags import config_to_dict
    data = config_to_dict(TrainConfig())
    data[key] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    assert message in _error(capsys, ["--config", str(path)])


def test_block_choice_and_deepspeed_json_are_checked_before_launch(tmp_path, capsys):
    err = _error(capsys, ["--model", "sit_s", "--depth", "2", "--disp-blocks", "7"])
    assert "block index 7 out of range for depth 2" in err, err
    err = _error(capsys, ["--model", "sit_s", "--depth", "2", "--disp-preset", "paper"])
    assert "depth 2 < 4" in err, err
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    assert "not valid JSON" in _error(capsys, ["--deepspeed-config", str(bad)])
