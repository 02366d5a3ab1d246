"""DiT Gaussian diffusion: schedule, respacing, likelihood terms, release loss parity."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import models
from engine.diffusion.gaussian import (DiffusionConfig, GaussianDiffusion, VarianceType,
                              discretized_gaussian_log_likelihood, normal_kl, space_timesteps)
from tests.conftest import fixture_path


@pytest.fixture(scope="module")
def dit(release_fixtures):
    model = models.create_model("dit_s", **release_fixtures["config"]).eval()
    model.load_state_dict(release_fixtures["dit_state_dict"])
    return model


def test_linear_schedule():
    d = DiffusionConfig().build()
    assert d.num_timesteps == 1000
    assert d.betas[0] == pytest.approx(1e-4) and d.betas[-1] == pytest.approx(0.02)
    assert d.betas.dtype == np.float64
    assert np.all(np.diff(d.alphas_cumprod) < 0)
    # posterior variance formula at one step
    t = 500
    expected = d.betas[t] * (1 - d.alphas_cumprod[t - 1]) / (1 - d.alphas_cumprod[t])
    assert d.posterior_variance[t] == pytest.approx(expected)


def test_cosine_schedule_is_valid():
    d = DiffusionConfig(schedule="cosine").build()
    assert (d.betas > 0).all() and (d.betas <= 0.999).all()
    with pytest.raises(ValueError, match="'linear', 'cosine'"):
        DiffusionConfig(schedule="quadratic")


@pytest.mark.parametrize("spec,expected", [
    ("10", [round(i * 999 / 9) for i in range(10)]),
    (10, [round(i * 999 / 9) for i in range(10)]),
    ("ddim10", list(range(0, 1000, 100))),
    ("1000", list(range(1000))),
    ("2,3", [0, 499, 500, 750, 999]),
])
def test_space_timesteps(spec, expected):
    assert space_timesteps(1000, spec) == expected


@pytest.mark.parametrize("spec", ["abc", "0", "ddim999", "600,600,600", "ddim1", "ddimx"])
def test_bad_respacing(spec):
    with pytest.raises(ValueError):
        space_timesteps(1000, spec)


@pytest.fixture(scope="module")
def dit_respacing() -> dict:
    """DiT's space_timesteps outputs (tests/fixtures/README.md says how they were made)."""
    return json.loads(fixture_path("dit_respacing.json").read_text())


def _mask_steps(hex_mask: str) -> list[int]:
    bits = int(hex_mask, 16)
    return [i for i in range(bits.bit_length()) if bits >> i & 1]


def test_respacing_equals_dit_for_every_step_count(dit_respacing):
    """DiT sums the fractional stride (0, d, d + d, ...) before rounding: 278 of the counts
    1..1000 keep other steps than round(j * d) (21 steps: 499, not 500)."""
    T = dit_respacing["num_timesteps"]
    differ = {k: (space_timesteps(T, k), _mask_steps(m)) for k, m in dit_respacing["counts"].items()}
    differ = {k: v for k, v in differ.items() if v[0] != v[1]}
    assert len(dit_respacing["counts"]) == 1000
    assert not differ, f"{len(differ)} counts keep other steps than DiT, first {sorted(differ, key=int)[:10]}"
    assert 499 in space_timesteps(T, 21) and 500 not in space_timesteps(T, 21)


def test_ddim_respacing_equals_dit(dit_respacing):
    T = dit_respacing["num_timesteps"]
    accepted = {k: v for k, v in dit_respacing["ddim"].items() if v is not None}
    assert len(accepted) == 62
    for k, steps in dit_respacing["ddim"].items():
        if steps is None:  # no stride in 1..T-1 that DiT tries gives exactly K steps
            with pytest.raises(ValueError, match=f"no integer stride in 1..{T - 1} keeps exactly {k} of"):
                space_timesteps(T, f"ddim{k}")
        else:
            assert space_timesteps(T, f"ddim{k}") == steps, k
    with pytest.raises(ValueError, match="'ddim999'.*nearest that exist: ddim500 or ddim1000"):
        space_timesteps(T, "ddim999")


def test_section_respacing_equals_dit(dit_respacing):
    for case in dit_respacing["sections"]:
        T, spec, steps = case["num_timesteps"], case["spec"], case["steps"]
        if steps is None:  # a section holds fewer steps than asked for
            with pytest.raises(ValueError, match="cannot take"):
                space_timesteps(T, spec)
        else:
            assert space_timesteps(T, spec) == steps, (T, spec)
            assert space_timesteps(T, [int(c) for c in spec.split(",")]) == steps


@pytest.mark.parametrize("count", [25, 21])
def test_respacing_keeps_alphas_cumprod(dit_respacing, count):
    base = DiffusionConfig().build()
    spaced = DiffusionConfig().build(str(count))
    keep = space_timesteps(1000, str(count))
    assert keep == _mask_steps(dit_respacing["counts"][str(count)])
    assert spaced.num_timesteps == count and spaced.timestep_map == keep
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[keep], rtol=1e-12)
    t = torch.tensor([0, count - 1])
    assert spaced.model_time(t).tolist() == [keep[0], keep[-1]]


def test_q_sample_and_eps_round_trip(rng):
    d = DiffusionConfig().build()
    x0, noise = torch.randn(3, 4, 2, 2, generator=rng), torch.randn(3, 4, 2, 2, generator=rng)
    t = torch.tensor([0, 400, 999])
    x_t = d.q_sample(x0, t, noise)
    a = torch.tensor(d.alphas_cumprod[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    torch.testing.assert_close(d.predict_xstart(x_t, t, noise), x0, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(d.predict_eps(x_t, t, x0), noise, rtol=1e-4, atol=2e-4)


def test_normal_kl_matches_torch_distributions(rng):
    m1, m2 = torch.randn(5, generator=rng, dtype=torch.float64), torch.randn(5, generator=rng, dtype=torch.float64)
    lv1, lv2 = torch.randn(5, generator=rng, dtype=torch.float64), torch.randn(5, generator=rng, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-12


def test_discretized_likelihood_is_a_distribution_over_256_bins():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)  # the 256 pixel values
    for mean, log_scale in [(0.0, math.log(0.3)), (0.8, math.log(0.05)), (-0.95, math.log(0.5))]:
        logp = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean),
                                                   torch.full_like(bins, log_scale))
        # the tanh approximation of the normal CDF is good to ~1e-3
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=2e-3)


def test_release_loss_parity(dit, release_fixtures):
    """Per-sample loss, mse and vb of the release for the fixture DiT, to 1e-5 relative."""
    f = release_fixtures
    d = DiffusionConfig().build()
    x_t = d.q_sample(f["x"], f["ddpm_t"], f["ddpm_noise"])
    with torch.no_grad():
        out = dit(x_t, d.model_time(f["ddpm_t"]), f["y"])
    terms = d.loss_terms(out, f["x"], x_t, f["ddpm_t"], f["ddpm_noise"])
    for key in ("loss", "mse", "vb"):
        torch.testing.assert_close(terms[key], f[f"ddpm_{key}"], rtol=1e-5, atol=0)


def test_vb_uses_decoder_nll_at_t0(dit, release_fixtures):
    f = release_fixtures
    d = DiffusionConfig().build()
    t = torch.tensor([0, 0, 5, 5])
    x_t = d.q_sample(f["x"], t, f["ddpm_noise"])
    with torch.no_grad():
        out = dit(x_t, t, f["y"])
    vb = d.vb_terms_bpd(out, f["x"], x_t, t)
    p = d.p_mean_variance(out, x_t, t)
    nll = -discretized_gaussian_log_likelihood(f["x"], p["mean"], 0.5 * p["log_variance"])
    torch.testing.assert_close(vb[:2], nll.mean(dim=(1, 2, 3))[:2] / math.log(2))
    assert (vb > 0).all()


def test_frozen_mean_trains_only_the_variance(rng):
    d = DiffusionConfig().build()
    x0, noise = torch.randn(2, 4, 4, 4, generator=rng), torch.randn(2, 4, 4, 4, generator=rng)
    t = torch.tensor([3, 700])
    x_t = d.q_sample(x0, t, noise)
    out = torch.randn(2, 8, 4, 4, generator=rng).requires_grad_(True)
    terms = d.loss_terms(out, x0, x_t, t, noise)
    (grad,) = torch.autograd.grad(terms["vb"].sum(), out)
    assert grad[:, :4].abs().max() == 0  # no gradient into eps from vb
    assert grad[:, 4:].abs().max() > 0
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert grad_mse[:, 4:].abs().max() == 0


def test_learned_range_needs_twice_the_channels():
    d = DiffusionConfig().build()
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="learn_sigma=True"):
        d.p_mean_variance(torch.zeros(1, 4, 2, 2), x, torch.tensor([3]))


def test_fixed_variances():
    small = DiffusionConfig(learn_sigma=False, sigma_small=True).build()
    large = DiffusionConfig(learn_sigma=False).build()
    assert small.variance_type is VarianceType.FIXED_SMALL and large.variance_type is VarianceType.FIXED_LARGE
    x = torch.zeros(1, 1, 1, 1)
    t = torch.tensor([500])
    lv_small = small.p_mean_variance(torch.zeros(1, 1, 1, 1), x, t)["log_variance"]
    lv_large = large.p_mean_variance(torch.zeros(1, 1, 1, 1), x, t)["log_variance"]
    assert lv_small.item() == pytest.approx(math.log(small.posterior_variance[500]), rel=1e-5)
    assert lv_large.item() == pytest.approx(math.log(large.betas[500]), rel=1e-5)
    terms = large.loss_terms(torch.zeros(1, 1, 1, 1), x, x, t, torch.ones(1, 1, 1, 1))
    assert set(terms) == {"loss", "mse"}


def test_bad_betas():
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(np.array([0.0, 0.1]))
    with pytest.raises(ValueError, match="variance type"):
        GaussianDiffusion(np.array([0.1, 0.2]), "learned")
