"""Linear probe and dispersion statistics (engine.probe) on tiny models."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import models
from engine.evaluation.probe import (ProbeConfig, block_features, dispersion_stats, linear_probe, noised,
                                     probe_checkpoint, probe_model)
from engine.probe import main
from engine.diffusion.transport import TransportConfig

TINY = dict(depth=2, hidden_size=32, num_heads=2, input_size=16, in_channels=1, num_classes=10)


def tiny_model(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.create_model("sit_s", **{**TINY, **kw})
    # adaLN-Zero makes a fresh model's blocks the identity; perturb every weight so blocks differ.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def digits(n: int = 120):
    from engine.data.datasets import digits_arrays

    x, y = digits_arrays(16)
    return torch.from_numpy(x[:n]), torch.from_numpy(y[:n])


# ---------------------------------------------------------------------------------------
# Dispersion statistics
# ---------------------------------------------------------------------------------------


def test_dispersion_of_a_collapsed_batch():
    z = torch.ones(16, 4, 8) * 3.0
    s = dispersion_stats(z)
    assert s["mean_sq_dist"] == 0.0 and s["eff_rank"] == 1.0
    assert s["infonce_l2"] == pytest.approx(0.0, abs=1e-12)  # every pair at distance 0
    assert s["floor"] == pytest.approx(-math.log(16))


def test_dispersion_of_a_spread_batch():
    n, d = 12, 40
    z = torch.zeros(n, d, dtype=torch.float64)
    z[torch.arange(n), torch.arange(n)] = 50.0  # orthogonal rows, pairwise distance^2 = 2 * 50^2
    s = dispersion_stats(z, tau=1.0)
    assert s["mean_sq_dist"] == pytest.approx(2 * 50.0**2 / d)
    # Centring leaves n - 1 equal singular values: effective rank n - 1.
    assert s["eff_rank"] == pytest.approx(n - 1, rel=1e-9)
    # Far apart compared with tau: the loss sits at its floor -log N (log of the N diagonal terms / N^2).
    assert s["infonce_l2"] == pytest.approx(-math.log(n), abs=1e-9)


def test_dispersion_matches_brute_force(rng):
    z = torch.randn(20, 3, 7, generator=rng, dtype=torch.float64) + 100.0  # a large common offset
    flat = z.reshape(20, -1)
    d2 = torch.cdist(flat, flat) ** 2 / flat.shape[1]
    expected = d2.sum() / (20 * 19)
    s = dispersion_stats(z, tau=0.5)
    assert s["mean_sq_dist"] == pytest.approx(float(expected), rel=1e-9)
    loss = torch.logsumexp((-d2 / 0.5).reshape(-1), 0) - 2 * math.log(20)
    assert s["infonce_l2"] == pytest.approx(float(loss), rel=1e-6)
    sv = torch.linalg.svdvals(flat - flat.mean(0))
    p = sv / sv.sum()
    assert s["eff_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)


# ---------------------------------------------------------------------------------------
# The probe itself
# ---------------------------------------------------------------------------------------


def test_linear_probe_separable_and_random():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 10)) * 5
    y = np.repeat(np.arange(4), 50)
    x = centres[y] + rng.standard_normal((200, 10))
    idx = rng.permutation(200)
    tr, te = idx[:100], idx[100:]
    assert linear_probe(x[tr], y[tr], x[te], y[te]) >= 0.98
    noise = rng.standard_normal((200, 10))
    assert linear_probe(noise[tr], y[tr], noise[te], y[te]) < 0.5  # chance is 0.25


def test_noising_follows_the_sit_path():
    model = tiny_model()
    x, _ = digits(8)
    noise = torch.randn_like(x)
    clean, t1 = noised(model, x, 1.0, noise, TransportConfig())
    pure, t0 = noised(model, x, 0.0, noise, TransportConfig())
    torch.testing.assert_close(clean, x)
    torch.testing.assert_close(pure, noise)
    assert float(t1[0]) == 1.0 and float(t0[0]) == 0.0
    half, _ = noised(model, x, 0.5, noise, TransportConfig())
    torch.testing.assert_close(half, 0.5 * x + 0.5 * noise)


def test_block_features_shapes_and_null_labels():
    model = tiny_model()
    x, y = digits(40)
    cfg = ProbeConfig(blocks="all", batch_size=16, dispersion_samples=10)
    blocks, pooled, flat = block_features(model, x, y, cfg)
    assert blocks == [0, 1]
    assert [tuple(p.shape) for p in pooled] == [(40, 32)] * 2
    assert [tuple(f.shape) for f in flat] == [(10, 64 * 32)] * 2  # 8x8 tokens of width 32
    # With the null label the representation cannot depend on the true one...
    _, pooled_perm, _ = block_features(model, x, y.roll(1), cfg)
    torch.testing.assert_close(pooled_perm[1], pooled[1])
    # ...with the true label it does (it enters every block through adaLN).
    true_cfg = ProbeConfig(blocks="all", batch_size=16, labels="true", dispersion_samples=0)
    _, a, _ = block_features(model, x, y, true_cfg)
    _, b, _ = block_features(model, x, y.roll(1), true_cfg)
    assert not torch.allclose(a[1], b[1])


def test_null_labels_need_a_null_class():
    model = tiny_model(class_dropout_prob=0.0)
    x, y = digits(8)
    with pytest.raises(ValueError, match="null label.*--labels true.*needs a null class.*class_dropout_prob=0.0"):
        block_features(model, x, y, ProbeConfig())


def test_probe_model_reports_every_block():
    model = tiny_model()
    x, y = digits(200)
    report = probe_model(model, x, y, ProbeConfig(blocks="all", dispersion_samples=32), weights="ema")
    assert report.weights == "ema" and [b.block for b in report.blocks] == [0, 1]
    for b in report.blocks:
        assert 0.0 <= b.top1 <= 1.0
        assert b.mean_sq_dist > 0 and 1.0 <= b.eff_rank <= 32
        assert b.floor == pytest.approx(-math.log(32)) and b.infonce_l2 >= b.floor - 1e-9
    assert report.best().top1 == max(b.top1 for b in report.blocks)


def _checkpoint(tmp_path):
    raw, ema = tiny_model(0), tiny_model(1)
    ckpt = {"model": raw.state_dict(), "ema": ema.state_dict(), "config": raw.config.to_dict(),
            "args": {"train_config": {"transport": {"path": "linear", "prediction": "velocity"}}}}
    path = tmp_path / "tiny.pt"
    torch.save(ckpt, path)
    return path, raw, ema


def test_probe_checkpoint_model_and_ema(tmp_path):
    path, raw, ema = _checkpoint(tmp_path)
    cfg = ProbeConfig(blocks="last", dispersion_samples=16)
    reports = probe_checkpoint(path, "digits", cfg, max_samples=150)
    assert [r.weights for r in reports] == ["model", "ema"]
    x, y = digits(150)
    direct = probe_model(ema, x, y, cfg, weights="ema")
    assert reports[1].blocks[0].top1 == direct.blocks[0].top1  # the EMA weights were probed
    assert reports[1].blocks[0].mean_sq_dist == pytest.approx(direct.blocks[0].mean_sq_dist)
    assert reports[0].blocks[0].mean_sq_dist != pytest.approx(reports[1].blocks[0].mean_sq_dist)


def test_cli_writes_a_table_and_json(tmp_path, capsys):
    path, _, _ = _checkpoint(tmp_path)
    out = tmp_path / "probe.json"
    main(["--ckpt", str(path), "--data", "digits", "--t", "0.5", "--max-samples", "100", "--blocks", "0,1",
          "--dispersion-samples", "8", "--json", str(out)])
    text = capsys.readouterr().out
    assert "| model | 0 |" in text and "| ema | 1 |" in text
    saved = json.loads(out.read_text())
    assert saved["config"]["t"] == 0.5 and len(saved["reports"]) == 2
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
        ProbeConfig(t=1.5)
