"""MeanFlow objective and sampler (engine/objectives/meanflow.py) on tiny models."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import models
from engine.objectives.build import build_objective
from engine.objectives.meanflow import (MeanFlowConfig, MeanFlowObjective, adaptive_weighted, average_velocity_jvp,
                                        guided_velocity, meanflow_target, sample_times)
from engine.objectives.meanflow_presets import MEANFLOW_PRESETS, meanflow_preset
from engine.sampling.meanflow import meanflow_times, meanflow_velocity_fn, sample_meanflow
from engine.objectives.dispersive import DispersiveConfig
from tests.conftest import REPO

TINY = dict(input_size=8, patch_size=2, depth=2, hidden_size=64, num_heads=4, num_classes=10,
            learn_sigma=False, second_time_input=True)


def tiny_model(seed: int = 0, attention: str = "math", dtype=torch.float32, **overrides) -> torch.nn.Module:
    """A tiny MeanFlow backbone whose adaLN-zero / zero-output layers are perturbed, so u and
    its derivatives are not identically zero."""
    torch.manual_seed(seed)
    model = models.create_model("sit_s", attention=attention, **{**TINY, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype)


def batch(rng: torch.Generator, n: int = 6, dtype=torch.float32):
    x = torch.randn(n, 4, 8, 8, generator=rng, dtype=dtype)
    y = torch.randint(0, 10, (n,), generator=rng)
    return x, y


# ---------------------------------------------------------------------------------------
# The JVP target
# ---------------------------------------------------------------------------------------


def _float64_time_features(t, dim, max_period=10000.0):
    """models.dit.timestep_embedding without its fp32 cast (same formula), for float64 checks."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype) / half)
    args = t[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@pytest.mark.parametrize("time_features", ["float64", "model"])
def test_jvp_matches_finite_differences(rng, monkeypatch, time_features):
    """du/dt along (dz, dr, dt) = (v, 0, 1), with the net's inputs (t, h = t - r), against central
    differences in float64. The model computes its time features and layer norms in fp32 (on
    purpose, for bf16 runs): "float64" swaps in the same formulas in float64 to check to 1e-9;
    "model" keeps them, good to about 1e-4 of the derivative's scale."""
    if time_features == "float64":
        monkeypatch.setattr(models.dit, "timestep_embedding", _float64_time_features)
        monkeypatch.setattr(models.dit.FP32LayerNorm, "forward",
                            lambda self, x: torch.nn.functional.layer_norm(x, (self.hidden_size,), eps=self.eps))
    eps, tol = (1e-5, 1e-9) if time_features == "float64" else (1e-3, 2e-4)
    # SDPA (math kernel in the JVP) is float64 throughout; the "math" backend's softmax is fp32.
    model = tiny_model(attention="sdpa", dtype=torch.float64).eval()
    z, y = batch(rng, dtype=torch.float64)
    v = torch.randn(z.shape, generator=rng, dtype=torch.float64)
    t = torch.tensor([0.9, 0.7, 0.55, 0.4, 0.95, 0.3], dtype=torch.float64)
    r = torch.tensor([0.1, 0.7, 0.2, 0.05, 0.5, 0.0], dtype=torch.float64)
    u, dudt = average_velocity_jvp(model, z, r, t, y, v)

    @torch.no_grad()
    def u_at(z_, r_, t_, h_=None):
        return model(z_, t_, y, h=t_ - r_ if h_ is None else h_)

    fd = (u_at(z + eps * v, r, t + eps) - u_at(z - eps * v, r, t - eps)) / (2 * eps)
    torch.testing.assert_close(u, u_at(z, r, t), rtol=1e-12, atol=1e-12)
    scale = dudt.abs().max().item()
    assert scale > 1e-2  # a real derivative, not zeros
    torch.testing.assert_close(dudt, fd, rtol=0, atol=tol * scale)
    # The check can tell the chain rule apart: holding h = t - r fixed is far off.
    h = t - r
    fd_h_fixed = (u_at(z + eps * v, r, t + eps, h) - u_at(z - eps * v, r, t - eps, h)) / (2 * eps)
    assert (fd_h_fixed - fd).abs().max() > 100 * tol * scale
    # and the target is v - (t - r) du/dt, in fp32
    tgt = meanflow_target(model, z, r, t, y, v)
    assert tgt.dtype == torch.float32 and not tgt.requires_grad
    expected = v - (t - r).view(-1, 1, 1, 1) * fd
    torch.testing.assert_close(tgt, expected.float(), rtol=1e-5, atol=1e-5 + tol * scale)


def test_jvp_on_default_sdpa_kernel(rng):
    """torch's CPU SDPA kernel and flash-attn have no forward-mode AD; the JVP forces SDPA's math
    kernel, and the layers' backends are restored afterwards."""
    sdpa, math_model = tiny_model(attention="sdpa"), tiny_model(attention="math")
    z, y = batch(rng)
    v, t, r = torch.randn_like(z), torch.full((6,), 0.8), torch.full((6,), 0.3)
    u1, d1 = average_velocity_jvp(sdpa, z, r, t, y, v)
    u2, d2 = average_velocity_jvp(math_model, z, r, t, y, v)
    torch.testing.assert_close(u1, u2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d1, d2, rtol=1e-4, atol=1e-5)
    assert all(b.attn.backend == "sdpa" for b in sdpa.blocks)
    # flash-attn layers (no forward-mode AD) fall back to SDPA math for the JVP and get their
    # kernel back afterwards; a stand-in kernel that must never run proves the fallback.
    def flash_kernel(*args, **kwargs):
        raise AssertionError("flash-attn called inside the JVP")

    for block in sdpa.blocks:
        block.attn.backend, block.attn._flash = "flash", flash_kernel
    u3, d3 = average_velocity_jvp(sdpa, z, r, t, y, v)
    torch.testing.assert_close(d3, d2, rtol=1e-4, atol=1e-5)
    assert all((b.attn.backend, b.attn._flash) == ("flash", flash_kernel) for b in sdpa.blocks)


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------


def test_one_step_sampler_is_the_definition(rng):
    model = tiny_model().train()  # label dropout must not act during sampling, even in train mode
    noise, y = batch(rng)
    ones = torch.ones(6)
    z0 = sample_meanflow(model, y, noise, steps=1)
    with torch.no_grad():
        expected = noise - model.eval()(noise, ones, y, h=ones)  # z_0 = z_1 - u(z_1, r=0, t=1)
    torch.testing.assert_close(z0, expected, rtol=0, atol=0)
    # two steps: 1 -> 0.5 -> 0
    half = torch.full((6,), 0.5)
    with torch.no_grad():
        z_half = noise - 0.5 * model(noise, ones, y, h=half)
        expected2 = z_half - 0.5 * model(z_half, half, y, h=half)
    torch.testing.assert_close(sample_meanflow(model, y, noise, steps=2), expected2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sample_meanflow(model, y, noise, times=[1.0, 0.5, 0.0]), expected2,
                               rtol=1e-6, atol=1e-6)


def test_sampler_guidance_and_grids(rng):
    model = tiny_model().eval()
    noise, y = batch(rng)
    ones = torch.ones(6)
    with torch.no_grad():
        cond = model(noise, ones, y, h=ones)
        uncond = model(noise, ones, torch.full_like(y, 10), h=ones)
    guided = sample_meanflow(model, y, noise, cfg_scale=2.0)
    torch.testing.assert_close(guided, noise - (uncond + 2.0 * (cond - uncond)), rtol=1e-5, atol=1e-5)
    assert meanflow_times(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    for bad in ([1.0], [0.0, 1.0], [1.0, 1.0, 0.0], [1.5, 0.0]):
        with pytest.raises(ValueError, match="times"):
            meanflow_times(1, bad)
    with pytest.raises(ValueError, match="steps"):
        meanflow_times(0)


def test_velocity_fn_drives_the_sit_ode(rng):
    """A MeanFlow model as an instantaneous-velocity field in SiT's time: one Euler step of the
    SiT ODE from noise (s = 0) to data (s = 1) equals MeanFlow's z_0 = z_1 - u(z_1, 1, 1)."""
    from engine.sampling.integrators import sample_ode

    model = tiny_model().eval()
    noise, y = batch(rng)
    out = sample_ode(meanflow_velocity_fn(model, y), noise, method="euler", num_steps=2)
    ones = torch.ones(6)
    with torch.no_grad():
        expected = noise - model(noise, ones, y, h=torch.zeros(6))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------


def test_adaptive_weighting_values_and_gradient():
    err = torch.tensor([0.0, 0.01, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    w = adaptive_weighted(err, p=1.0, c=0.01)
    torch.testing.assert_close(w, torch.tensor([0.0, 0.5, 0.5 / 0.51, 3.0 / 3.01], dtype=torch.float64))
    w.sum().backward()  # the weight is stop-grad: d/d err = 1 / (err + c)^p
    torch.testing.assert_close(err.grad, 1.0 / (err.detach() + 0.01))
    err.grad = None
    adaptive_weighted(err, p=0.5, c=0.1).sum().backward()
    torch.testing.assert_close(err.grad, (err.detach() + 0.1) ** -0.5)
    assert adaptive_weighted(err, p=0.0, c=0.1) is err


def test_objective_loss_is_the_weighted_error(rng):
    """The objective's diffusion loss equals mean_i err_i / (err_i + c) with err the sum of squares
    of (u - u_tgt), recomputed here from the model and the target function."""
    model = tiny_model()
    x, y = batch(rng)
    cfg = MeanFlowConfig(adaptive_c=0.5)
    objective = MeanFlowObjective(config=cfg)
    t, r, noise, keep = objective.sample_inputs(model, x, torch.Generator().manual_seed(1))
    out = objective.compute(model, x, y, t, r, noise, keep=keep)
    y_in = torch.where(keep, y, 10)
    tt = t.view(-1, 1, 1, 1)
    z, v = (1 - tt) * x + tt * noise, noise - x
    u_tgt = meanflow_target(model, z, r, t, y_in, v)
    with torch.no_grad():
        u = model.eval()(z, t, y_in, h=t - r)
    err = ((u - u_tgt) ** 2).sum(dim=(1, 2, 3))
    torch.testing.assert_close(out["diffusion_loss"], (err / (err + 0.5)).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["mf_error"], err.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["v_error"], ((u - v) ** 2).sum(dim=(1, 2, 3)).mean(), rtol=1e-5, atol=1e-6)
    # the JVP skips rows promised to have r = t; the result is the same
    same = int(6 * cfg.r_equals_t)
    assert (t[:same] == r[:same]).all() and (t[same:] > r[same:]).all()
    out_s = objective.compute(model, x, y, t, r, noise, keep=keep, same_rows=same)
    torch.testing.assert_close(out_s["diffusion_loss"], out["diffusion_loss"], rtol=1e-5, atol=1e-6)
    out_all = objective.compute(model, x, y, t, t, noise, keep=keep, same_rows=6)  # no JVP at all
    torch.testing.assert_close(out_all["diffusion_loss"], objective.compute(model, x, y, t, t, noise, keep=keep)
                               ["diffusion_loss"], rtol=1e-5, atol=1e-6)
    # padded rows leave the mean
    valid = torch.tensor([True, True, False, True, False, True])
    out_v = objective.compute(model, x, y, t, r, noise, keep=keep, valid=valid)
    torch.testing.assert_close(out_v["diffusion_loss"], (err / (err + 0.5))[valid].mean(), rtol=1e-5, atol=1e-6)


def test_objective_trains_with_dispersive_term(rng):
    model = tiny_model(class_dropout_prob=0.1).train()
    x, y = batch(rng, n=8)
    objective = build_objective("meanflow", meanflow=MeanFlowConfig(),
                                dispersive=DispersiveConfig(lambda_=0.5, tau=1.0, blocks="all"))
    out = objective(model, x, y, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    assert set(out) >= {"loss", "diffusion_loss", "dispersive_total", "dispersive/block_0", "dispersive/block_1",
                        "mf_error", "v_error"}
    assert out["dispersive_total"] != 0
    torch.testing.assert_close(out["loss"].detach(), out["diffusion_loss"] + out["dispersive_total"])
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["blocks.0.attn.qkv.weight"].abs().sum() > 0 and grads["h_embedder.mlp.0.weight"].abs().sum() > 0
    # the dispersive term contributes its own gradient
    model.zero_grad()
    plain = build_objective("meanflow", meanflow=MeanFlowConfig())(model, x, y, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain["diffusion_loss"], out["diffusion_loss"])
    plain["loss"].backward()
    assert not torch.allclose(model.blocks[0].attn.qkv.weight.grad, grads["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_objective_under_bf16_autocast(rng, attention):
    model = tiny_model(attention=attention)
    x, y = batch(rng)
    objective = build_objective("meanflow", meanflow=MeanFlowConfig(omega=0.5, kappa=0.3), dispersive="release")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = objective(model, x.to(torch.bfloat16), y, generator=torch.Generator().manual_seed(0))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    ref = objective(model, x, y, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["diffusion_loss"], ref["diffusion_loss"], rtol=0.05, atol=0.02)


def test_objective_with_a_bf16_model(rng):
    """DeepSpeed's bf16 mode: bf16 weights, no autocast; the JVP runs in bf16, the loss in fp32."""
    model = tiny_model(dtype=torch.bfloat16)
    x, y = batch(rng)
    out = build_objective("meanflow")(model, x.to(torch.bfloat16), y, generator=torch.Generator().manual_seed(0))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("cfg", [MeanFlowConfig(), MeanFlowConfig(omega=2.0), MeanFlowConfig(kappa=0.5)])
def test_forward_equivalents_match_counted_flops(rng, cfg):
    """The MFU estimate against torch's FLOP counter (matmul FLOPs) on a batch of 8."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model(attention="sdpa")
    x, y = batch(rng, n=8)

    def count(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    forward = count(lambda: model(x, torch.rand(8), y, h=torch.zeros(8)))
    step = count(lambda: MeanFlowObjective(config=cfg)(model, x, y)["loss"].backward())
    assert step / forward == pytest.approx(cfg.forward_equivalents, rel=0.03)


def test_guided_velocity_formula(rng):
    model = tiny_model()
    z, y = batch(rng)
    v = torch.randn_like(z)
    t = torch.tensor([0.2, 0.35, 0.5, 0.79, 0.81, 0.95])
    keep = torch.tensor([True, True, False, True, True, True])
    cfg = MeanFlowConfig(omega=0.2, kappa=0.92, guidance_interval=(0.3, 0.8))
    v_g = guided_velocity(model, z, t, y, v, keep, cfg)
    with torch.no_grad():
        h0 = torch.zeros(6)
        u_c, u_u = model.eval()(z, t, y, h=h0), model(z, t, torch.full_like(y, 10), h=h0)
    expected = 0.2 * v + 0.92 * u_c + (1 - 0.2 - 0.92) * u_u
    guided_rows = torch.tensor([False, True, False, True, False, False])  # inside [0.3, 0.8] and kept
    torch.testing.assert_close(v_g[guided_rows], expected[guided_rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_g[~guided_rows], v[~guided_rows])
    # kappa = 0: v_uncond + omega (v - v_uncond), one forward
    v_g0 = guided_velocity(model, z, t, y, v, None, MeanFlowConfig(omega=3.0))
    torch.testing.assert_close(v_g0, u_u + 3.0 * (v - u_u), rtol=1e-5, atol=1e-5)
    assert guided_velocity(model, z, t, y, v, None, MeanFlowConfig()) is v
    with pytest.raises(ValueError, match="class_dropout_prob"):
        guided_velocity(tiny_model(class_dropout_prob=0.0), z, t, y, v, None, cfg)


def test_label_dropout_is_the_objectives_own(rng):
    """The model's random label dropout is off during every pass: with the same generator the
    loss does not depend on the global RNG, even for a model in train mode with dropout 0.5."""
    model = tiny_model(class_dropout_prob=0.5).train()
    x, y = batch(rng, n=16)
    objective = build_objective("meanflow", meanflow=MeanFlowConfig(omega=1.0, kappa=0.5))
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        results.append(objective(model, x, y, generator=torch.Generator().manual_seed(0))["loss"])
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    assert model.y_embedder.dropout_prob == 0.5  # restored


def test_label_drop_default_is_the_leading_r_equals_t_rows():
    """The official code's cond_drop (the default): Binomial(N, p) rows lose their label, always the
    first ones -- the r = t rows sample_times puts first -- so no r != t row (no JVP) is ever
    conditioned on the null class; over many draws the rate is p of the whole batch."""
    model = tiny_model(class_dropout_prob=0.1)
    objective = MeanFlowObjective()
    n, draws = 64, 200
    same = int(n * objective.config.r_equals_t)
    x = torch.zeros(n, 4, 8, 8)
    counts = []
    for seed in range(draws):
        t, r, _, keep = objective.sample_inputs(model, x, torch.Generator().manual_seed(seed))
        k = int((~keep).sum())
        assert (~keep).equal(torch.arange(n) < k)  # the leading k rows ...
        assert (t[~keep] == r[~keep]).all() and keep[same:].all()  # ... all r = t; r != t rows keep theirs
        counts.append(k)
    assert len(set(counts)) > 3  # a random count, not a fixed fraction
    assert sum(counts) / (draws * n) == pytest.approx(0.1, abs=0.01)
    assert objective.config.label_drop == "leading"


def test_label_drop_per_row_option():
    """label_drop="per_row": each row is dropped when its own uniform is below p, r != t rows
    included; the times, the noise and the uniforms are the default's draws (same count dropped)."""
    model = tiny_model(class_dropout_prob=0.1)
    objective = MeanFlowObjective(config=MeanFlowConfig(label_drop="per_row"))
    n = 4000
    x = torch.zeros(n, 4, 8, 8)
    t, r, noise, keep = objective.sample_inputs(model, x, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # the documented order: (t, r), noise, then N uniforms
    torch.randn(2, n, generator=g), torch.randn(x.shape, generator=g)
    assert keep.equal(torch.rand(n, generator=g) >= 0.1)
    t0, r0, noise0, keep0 = MeanFlowObjective().sample_inputs(model, x, torch.Generator().manual_seed(0))
    assert t0.equal(t) and r0.equal(r) and noise0.equal(noise) and int((~keep0).sum()) == int((~keep).sum())
    flow_map = t > r  # the 25% of rows with r != t
    assert (~keep).float().mean().item() == pytest.approx(0.1, abs=0.015)
    assert (~keep[flow_map]).float().mean().item() == pytest.approx(0.1, abs=0.03)


def test_guided_targets_use_the_dropped_labels(rng):
    """With the default dropping, fixed seed: the dropped rows are r = t rows with the null label and
    the unguided target v; kept rows inside the guidance interval get omega v + kappa u(.|y) +
    (1 - omega - kappa) u(.|null) with their true label y, also as the JVP tangent of the r != t
    rows, whose labels are all kept; rows outside the interval get v. The loss is recomputed here."""
    model = tiny_model(class_dropout_prob=0.5).eval()
    x, y = batch(rng, n=8)
    cfg = MeanFlowConfig(omega=0.2, kappa=0.92, guidance_interval=(0.0, 0.75), adaptive_c=0.5)
    objective = MeanFlowObjective(config=cfg)
    t, r, noise, keep = objective.sample_inputs(model, x, torch.Generator().manual_seed(16))
    same = int(8 * cfg.r_equals_t)  # rows 0..5 have r = t
    assert keep.tolist() == [False] * 4 + [True] * 4  # seed 16: four dropped, the first four
    assert (t[:same] == r[:same]).all() and (t[same:] > r[same:]).all()
    guided = keep & (t <= 0.75)
    assert guided[:same].any() and guided[same:].all() and (keep & ~guided).any()  # every case is present
    null = torch.full_like(y, 10)
    tt = t.view(-1, 1, 1, 1)
    z, v = (1 - tt) * x + tt * noise, noise - x
    with torch.no_grad():
        h0 = torch.zeros(8)
        u_c, u_u = model(z, t, y, h=h0), model(z, t, null, h=h0)
    v_g = torch.where(guided.view(-1, 1, 1, 1), 0.2 * v + 0.92 * u_c + (1 - 0.2 - 0.92) * u_u, v)
    y_in = torch.where(keep, y, null)
    got = guided_velocity(model, z, t, y_in, v, keep, cfg)
    torch.testing.assert_close(got[~keep], v[~keep], rtol=0, atol=0)  # dropped: unguided
    torch.testing.assert_close(got, v_g, rtol=1e-5, atol=1e-5)
    u_tgt = torch.cat([v_g[:same], meanflow_target(model, z[same:], r[same:], t[same:], y[same:], v_g[same:])])
    with torch.no_grad():
        u = model(z, t, y_in, h=t - r)
    err = ((u - u_tgt) ** 2).sum(dim=(1, 2, 3))
    for rows in (same, 0):  # with and without the promise that the first rows have r = t
        out = objective.compute(model, x, y, t, r, noise, keep=keep, same_rows=rows)
        torch.testing.assert_close(out["mf_error"], err.mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["diffusion_loss"], (err / (err + 0.5)).mean(), rtol=1e-5, atol=1e-6)


def test_sample_times_distribution():
    cfg = MeanFlowConfig()
    n = 40_000
    t, r = sample_times(n, cfg, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.shape == r.shape == (n,)
    assert (t >= r).all() and (t > 0).all() and (t < 1).all()
    same = int(n * 0.75)
    assert (t[:same] == r[:same]).all() and (t[same:] > r[same:]).all()
    # the unsorted pairs of the r != t rows are logit-normal(-0.4, 1.0)
    logits = torch.logit(torch.cat([t[same:], r[same:]]).double())
    assert abs(logits.mean().item() + 0.4) < 0.03 and abs(logits.std().item() - 1.0) < 0.03


def test_model_checks():
    x, y = torch.zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long)
    for bad in (dict(learn_sigma=True), dict(second_time_input=False)):
        with pytest.raises(ValueError, match="second_time_input=True, learn_sigma=False"):
            build_objective("meanflow")(tiny_model(**bad), x, y)
    with pytest.raises(ValueError, match="second_time_input=True, learn_sigma=False"):
        sample_meanflow(models.create_model("dit_s", **{**TINY, "second_time_input": False}), y, x)


def test_config_validation():
    for bad in (dict(time_std=0.0), dict(r_equals_t=1.5), dict(adaptive_c=0.0), dict(adaptive_p=-1.0),
                dict(kappa=1.0), dict(omega=0.0), dict(guidance_interval=(0.8, 0.2)), dict(reduction="max"),
                dict(sample_steps=0), dict(time_mean=math.nan), dict(label_drop="first")):
        with pytest.raises(ValueError):
            MeanFlowConfig(**bad)
    assert MeanFlowConfig(omega=0.2, kappa=0.92).effective_scale == pytest.approx(2.5)
    assert not MeanFlowConfig().guidance_active


def test_config_is_a_command_line_section():
    """The trainer can hold MeanFlowConfig as a TrainConfig section (flags --mf-*, JSON round trip)."""
    import argparse
    from dataclasses import dataclass

    from engine.config.flags import add_config_arguments, apply_overrides, config_from_dict, config_to_dict, \
        overrides_from_args, section

    @dataclass
    class Holder:
        meanflow: MeanFlowConfig = section(MeanFlowConfig, prefix="mf-")

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Holder)
    args = parser.parse_args(["--mf-omega", "0.2", "--mf-kappa", "0.92", "--mf-guidance-interval", "0.0", "0.75",
                              "--mf-reduction", "mean", "--mf-sample-steps", "2", "--mf-label-drop", "per_row"])
    cfg = apply_overrides(Holder(), overrides_from_args(args))
    assert cfg.meanflow == MeanFlowConfig(omega=0.2, kappa=0.92, guidance_interval=(0.0, 0.75), reduction="mean",
                                          sample_steps=2, label_drop="per_row")
    assert config_from_dict(Holder, config_to_dict(cfg)) == cfg
    with pytest.raises(SystemExit):  # a Literal field: argparse checks the choice
        parser.parse_args(["--mf-label-drop", "first"])
    # and the trainer's own config has the flag, with no change outside engine/objectives/meanflow.py
    from engine.training.config import TrainConfig

    train_parser = argparse.ArgumentParser()
    add_config_arguments(train_parser, TrainConfig)
    train_args = train_parser.parse_args(["--mf-label-drop", "per_row"])
    assert apply_overrides(TrainConfig(), overrides_from_args(train_args)).meanflow.label_drop == "per_row"
    assert TrainConfig().meanflow.label_drop == "leading"


def test_presets():
    """The recipes of engine/objectives/meanflow.py's source table: XL/2 is the 1-NFE recipe (omega 0.2, kappa
    0.92 on t in [0, 0.75]); [0.3, 0.8] belongs to XL/2+ (omega 1.0, kappa 0.5); lengths in epochs."""
    steps_per_epoch = 1_281_167 // 256
    xl = meanflow_preset("MeanFlow-XL/2")
    guidance = lambda m: (m.omega, m.kappa, m.guidance_interval)  # noqa: E731
    assert guidance(xl.meanflow) == (0.2, 0.92, (0.0, 0.75)) and xl.meanflow.effective_scale == pytest.approx(2.5)
    assert MEANFLOW_PRESETS == ("meanflow_b_4", "meanflow_xl_2", "meanflow_xl_2_plus")
    name, overrides, mf, train = meanflow_preset("meanflow_b_4")
    assert name == "sit_b_4" and overrides == {"second_time_input": True, "learn_sigma": False,
                                                "class_dropout_prob": 0.1}
    shared = (-0.4, 1.0, 0.75, 1.0, 0.01, "sum", "leading")
    fields = lambda m: (m.time_mean, m.time_std, m.r_equals_t, m.adaptive_p, m.adaptive_c, m.reduction,  # noqa: E731
                        m.label_drop)
    assert fields(mf) == shared
    assert guidance(mf) == (1.0, 0.5, (0.0, 1.0)) and mf.effective_scale == 2.0
    base_train = {"optim": {"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.0, "warmup_steps": 0},
                  "global_batch": 256, "ema_decay": 0.9999}
    assert train == {**base_train, "max_steps": 80 * steps_per_epoch}
    plus = meanflow_preset("MeanFlow-XL/2+")
    assert xl.model == plus.model == "sit_xl" and xl.model_overrides == plus.model_overrides == overrides
    assert guidance(plus.meanflow) == (1.0, 0.5, (0.3, 0.8)) and plus.meanflow.effective_scale == 2.0
    assert fields(xl.meanflow) == fields(plus.meanflow) == shared
    assert xl.train == {**base_train, "max_steps": 240 * steps_per_epoch}
    assert plus.train == {**base_train, "max_steps": 1000 * steps_per_epoch}
    assert meanflow_preset("meanflow_xl_2+") == plus
    train["optim"]["lr"] = 1.0  # a copy: the table is untouched
    assert meanflow_preset("meanflow_b_4").train["optim"]["lr"] == 1e-4
    cfg = models.get_config(name, **overrides)
    assert cfg.patch_size == 4 and cfg.second_time_input and not cfg.learn_sigma
    assert models.get_config(xl.model, **xl.model_overrides).patch_size == 2
    with pytest.raises(ValueError, match="meanflow_b_4"):
        meanflow_preset("meanflow_l_2")


# ---------------------------------------------------------------------------------------
# Under a DeepSpeed engine (one CPU process, in a subprocess: DeepSpeed sets global state)
# ---------------------------------------------------------------------------------------

_DEEPSPEED_SCRIPT = textwrap.dedent("""
    import copy, json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from engine.distributed import init_distributed
    from engine.objectives.build import build_objective
    from engine.objectives.meanflow import MeanFlowConfig
    from engine.sampling.meanflow import sample_meanflow
    from engine.objectives.dispersive import DispersiveConfig
    from tests.engine.objectives.test_meanflow import tiny_model
    import deepspeed

    init_distributed()
    results = {}
    for stage, bf16 in ((2, False), (3, False), (3, True)):
        name = f"zero{stage}" + ("_bf16" if bf16 else "")
        model = tiny_model(class_dropout_prob=0.1)
        plain = copy.deepcopy(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        ds = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9, "bf16": {"enabled": bf16}}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
        objective = build_objective("meanflow", meanflow=MeanFlowConfig(omega=1.0, kappa=0.5),
                                    dispersive=DispersiveConfig(lambda_=0.25, blocks="last"))
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(8, 4, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        valid = torch.ones(8, dtype=torch.bool)
        losses = []
        for step in range(3):  # the same draw each step: the loss must fall
            x_in = x.to(torch.bfloat16) if bf16 else x  # as the trainer hands it over
            out = objective(engine, x_in, y, valid=valid, generator=torch.Generator().manual_seed(0))
            if step == 0:
                ref = objective(plain, x, y, valid=valid, generator=torch.Generator().manual_seed(0))
                results[f"ref_{name}"] = float(ref["loss"].detach())
            engine.backward(out["loss"])
            engine.step()
            losses.append(float(out["loss"]))
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            z = sample_meanflow(engine.module.eval(), y, torch.randn(8, 4, 8, 8, generator=gen), steps=1)
        results[name] = losses
        results[f"sample_{name}"] = bool(torch.isfinite(z).all())
        results[f"disp_{name}"] = float(out["dispersive/block_1"])
    print("RESULT " + json.dumps(results))
""")


@pytest.mark.slow
def test_objective_through_a_deepspeed_engine(tmp_path):
    """objective(engine, x, y, valid) under ZeRO-2, ZeRO-3 and ZeRO-3 with bf16 weights: the first
    loss equals the plain module's, the stages agree step by step, and a 1-step sample is finite."""
    pytest.importorskip("deepspeed", reason="the DeepSpeed engine test needs deepspeed")
    script = tmp_path / "ds_meanflow.py"
    script.write_text(_DEEPSPEED_SCRIPT)
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "cache" / "torch_extensions"))
    proc = subprocess.run([sys.executable, str(script), str(REPO)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    for name in ("zero2", "zero3", "zero3_bf16"):
        losses = res[name]
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
        assert losses[0] == pytest.approx(res[f"ref_{name}"], rel=1e-5 if "bf16" not in name else 1e-3)
        assert res[f"sample_{name}"] and math.isfinite(res[f"disp_{name}"])
    assert res["zero2"] == pytest.approx(res["zero3"], rel=1e-4)
    assert res["zero3_bf16"] == pytest.approx(res["zero3"], rel=1e-3)
