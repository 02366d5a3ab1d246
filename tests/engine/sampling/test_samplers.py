"""Samplers: release parity, exact answers on Gaussian toy problems, guidance, bad input."""
from __future__ import annotations

import pytest
import torch

import models
from engine.diffusion.gaussian import DiffusionConfig
from engine.sampling.guidance import Guidance, guided_model_fn
from engine.sampling.integrators import LastStep, ODEMethod, sample_ddim, sample_ddpm, sample_ode, sample_sde
from engine.sampling.samplers import SamplerConfig, sample_latents
from engine.diffusion.transport import Transport, TransportConfig, expand_like
from tests.conftest import fixture_path

MU, S = 1.5, 0.5  # toy data: every element ~ N(MU, S^2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def sit(release_fixtures):
    cfg = {**release_fixtures["config"], "learn_sigma": False}
    model = models.create_model("sit_s", **cfg).eval()
    model.load_state_dict(release_fixtures["sit_nosigma_state_dict"])
    return model


def exact_sit_output(tr: Transport, prediction: str):
    """The ideal network for N(MU, S^2) data: exact velocity, noise or score."""
    def fn(x, t):
        c = tr.path.coefficients(expand_like(t, x))
        var = c.alpha**2 * S**2 + c.sigma**2
        centred = x - c.alpha * MU
        score = -centred / var
        velocity = c.d_alpha * (MU + c.alpha * S**2 / var * centred) + c.d_sigma * (c.sigma / var * centred)
        return {"velocity": velocity, "noise": -c.sigma * score, "score": score}[prediction]
    return fn


def exact_dit_eps(base_alphas_cumprod):
    table = torch.tensor(base_alphas_cumprod)

    def fn(x, t):  # t: original step indices
        a = table[t].to(x.dtype).view(-1, 1, 1, 1)  # (N, 1, 1, 1)
        return (1 - a).sqrt() / (a * S**2 + 1 - a) * (x - a.sqrt() * MU)
    return fn


# ---- release parity --------------------------------------------------------------------


@pytest.mark.parametrize("method,steps,key,tol", [
    ("euler", 10, "ode_euler_10_cfg4", 1e-5),
    ("midpoint", 6, "ode_midpoint_6_cfg4", 1e-5),
    ("dopri5", 10, "ode_dopri5_cfg4", 1e-4),
])
def test_ode_parity_with_release(sit, release_fixtures, method, steps, key, tol):
    f = release_fixtures
    # the release's layout: 4 rows, the last two with the null label, through forward_with_cfg
    fn = guided_model_fn(sit, f["ode_y"], Guidance(4.0), layout="release")
    out = sample_ode(fn, f["ode_noise"], method=method, num_steps=steps)
    assert rel_err(out, f[key]) <= tol
    # the paired layout (N samples, doubled inside) gives the same conditional half
    fn = guided_model_fn(sit, f["ode_y"][:2], Guidance(4.0))
    out = sample_ode(fn, f["ode_noise"][:2], method=method, num_steps=steps)
    assert rel_err(out, f[key][:2]) <= tol


@pytest.fixture(scope="module")
def sit_ode_reference() -> dict:
    return torch.load(fixture_path("sit_ode_reference.pt"), weights_only=True)


def smooth_field(x, t):
    """The analytic velocity field of sit_ode_reference.pt (tests/fixtures/README.md)."""
    tt = t.view(-1, *([1] * (x.dim() - 1)))
    return torch.sin(3 * x + 2 * tt) - 0.5 * x * torch.cos(tt)


@pytest.mark.parametrize("path,method,steps,reverse,key", [
    ("linear", "euler", 10, False, "field_linear_euler_10"),
    ("linear", "midpoint", 6, False, "field_linear_midpoint_6"),
    ("linear", "rk4", 5, False, "field_linear_rk4_5"),
    ("linear", "rk4", 11, False, "field_linear_rk4_11"),
    ("linear", "heun", 7, False, "field_linear_heun2_7"),  # SiT: --sampling-method heun2
    ("linear", "dopri5", 50, False, "field_linear_dopri5_50"),
    ("vp", "rk4", 9, False, "field_vp_rk4_9"),  # grid [0, 1 - 1e-3]
    ("vp", "euler", 10, False, "field_vp_euler_10"),
    ("linear", "rk4", 11, True, "field_linear_rk4_11_reverse"),
])
def test_ode_matches_sit_sampler_on_a_smooth_field(sit_ode_reference, path, method, steps, reverse, key):
    """SiT's own Sampler.sample_ode (torchdiffeq's solvers) on an analytic field: rk4 is
    torchdiffeq's 3/8-rule RK4 (classical RK4 is ~1.5e-3 away at 5 points)."""
    ref = sit_ode_reference
    out = sample_ode(smooth_field, ref["field_x0"], Transport(TransportConfig(path=path)), method=method,
                     num_steps=steps, reverse=reverse)
    torch.testing.assert_close(out, ref[key], rtol=0, atol=1e-6)


def test_rk4_matches_sit_sampler_on_the_fixture_model(sit, release_fixtures, sit_ode_reference):
    f = release_fixtures
    ref = sit_ode_reference["model_rk4_8_cfg4"]
    fn = guided_model_fn(sit, f["ode_y"], Guidance(4.0), layout="release")
    assert rel_err(sample_ode(fn, f["ode_noise"], method="rk4", num_steps=8), ref) <= 1e-6
    fn = guided_model_fn(sit, f["ode_y"][:2], Guidance(4.0))
    assert rel_err(sample_ode(fn, f["ode_noise"][:2], method="rk4", num_steps=8), ref[:2]) <= 1e-5


def test_ode_progress_bar_changes_nothing():
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(7))
    for method in ("euler", "rk4"):
        for reverse in (False, True):
            quiet = sample_ode(smooth_field, x, method=method, num_steps=6, reverse=reverse)
            shown = sample_ode(smooth_field, x, method=method, num_steps=6, reverse=reverse, progress=True)
            assert torch.equal(quiet, shown)


def test_ddim_parity_with_release(dit, release_fixtures):
    f = release_fixtures
    diffusion = DiffusionConfig().build("10")
    fn = guided_model_fn(dit, f["ode_y"], Guidance(4.0), layout="release")
    out = sample_ddim(fn, f["ode_noise"], diffusion, eta=0.0, clip_denoised=False)
    assert rel_err(out, f["ddim_10_cfg4"]) <= 1e-4
    # the same through the one-stop entry point (paired layout, default respacing str(steps))
    out = sample_latents(dit, f["ode_y"][:2], f["ode_noise"][:2], guidance=Guidance(4.0),
                         sampler=SamplerConfig(kind="ddim", num_steps=10))
    assert rel_err(out, f["ddim_10_cfg4"][:2]) <= 1e-4


# ---- Gaussian toy problems: analytic answers --------------------------------------------


def test_ode_lands_on_the_analytic_answer():
    """Linear path, exact velocity: the flow maps z to MU + S z."""
    z = torch.randn(64, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tr = Transport()
    target = MU + S * z
    out = sample_ode(exact_sit_output(tr, "velocity"), z, tr, method="dopri5", atol=1e-8, rtol=1e-8)
    assert (out - target).abs().max() < 1e-6
    errors = {}
    for method in ("euler", "midpoint", "heun", "rk4"):
        errors[method] = [(sample_ode(exact_sit_output(tr, "velocity"), z, tr, method=method, num_steps=n)
                           - target).abs().max().item() for n in (11, 21)]
    # convergence orders: halving the step divides the error by ~2 (Euler), ~4 or more (2nd order)
    assert 1.7 < errors["euler"][0] / errors["euler"][1] < 2.3
    assert errors["midpoint"][0] / errors["midpoint"][1] > 3.3
    assert errors["heun"][0] / errors["heun"][1] > 3.0
    assert errors["rk4"][1] < 1e-5 and errors["rk4"][1] < errors["midpoint"][1]


@pytest.mark.parametrize("path", ["linear", "gvp", "vp"])
@pytest.mark.parametrize("prediction", ["velocity", "noise", "score"])
def test_ode_every_path_and_prediction(path, prediction):
    """From noise at t0 the exact flow is affine: x(t1) = m1 + sqrt(V1 / V0) (z - m0)."""
    tr = Transport(TransportConfig(path=path, prediction=prediction))
    t0, t1 = tr.config.interval("ode")
    c0 = tr.path.coefficients(torch.tensor(t0, dtype=torch.float64))
    c1 = tr.path.coefficients(torch.tensor(t1, dtype=torch.float64))
    v0, v1 = c0.alpha**2 * S**2 + c0.sigma**2, c1.alpha**2 * S**2 + c1.sigma**2
    z = torch.randn(16, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = c1.alpha * MU + (v1 / v0).sqrt() * (z - c0.alpha * MU)
    out = sample_ode(exact_sit_output(tr, prediction), z, tr, method="dopri5", atol=1e-7, rtol=1e-7)
    assert (out - target).abs().max() < 1e-5


def test_ode_reverse_encodes_back_to_the_noise():
    tr = Transport()
    z = torch.randn(8, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fn = exact_sit_output(tr, "velocity")
    x = sample_ode(fn, z, tr, method="rk4", num_steps=101)
    back = sample_ode(fn, x, tr, method="rk4", num_steps=101, reverse=True)
    assert (back - z).abs().max() < 1e-5


@pytest.mark.parametrize("path,method,last", [
    ("linear", "euler", "mean"), ("linear", "heun", "none"), ("gvp", "euler", "tweedie"),
    ("vp", "euler", "euler"), ("linear", "heun", "mean"),
])
def test_sde_samples_have_the_data_moments(path, method, last):
    tr = Transport(TransportConfig(path=path))
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4000, 1, 1, 1, generator=g)
    out = sample_sde(exact_sit_output(tr, "velocity"), z, tr, method=method, num_steps=60,
                     last_step=last, generator=g)
    assert torch.isfinite(out).all()
    assert abs(out.mean().item() - MU) < 0.04
    assert abs(out.std().item() - S) < 0.04


def test_sde_is_reproducible_with_a_generator():
    tr = Transport()
    z = torch.randn(4, 1, 2, 2)
    run = lambda seed: sample_sde(exact_sit_output(tr, "velocity"), z, tr, num_steps=5,  # noqa: E731
                                  generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_ddpm_and_ddim_on_gaussian_data():
    base = DiffusionConfig(learn_sigma=False)
    fn = exact_dit_eps(base.build().alphas_cumprod)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(4000, 1, 1, 1, generator=g)
    out = sample_ddpm(fn, z, base.build("50"), generator=g)
    assert abs(out.mean().item() - MU) < 0.04 and abs(out.std().item() - S) < 0.04
    # DDIM (eta 0) is a first-order discretisation of the probability-flow map, which sends
    # x_T ~ N(sqrt(a_T) MU, V_T) to MU + S (x_T - sqrt(a_T) MU) / sqrt(V_T)
    a_T = float(base.build().alphas_cumprod[-1])
    x_T = z[:64].double()
    target = MU + S * (x_T - a_T**0.5 * MU) / (a_T * S**2 + 1 - a_T) ** 0.5
    errors = [(sample_ddim(fn, x_T, base.build(str(n))) - target).abs().max().item() for n in (100, 200, 1000)]
    assert 1.8 < errors[0] / errors[1] < 2.2
    assert errors[2] < 5e-3
    # DDIM with eta = 1 is ancestral sampling with the posterior variance: same noise, same path
    small = DiffusionConfig(learn_sigma=False, sigma_small=True).build("50")
    ddim = sample_ddim(fn, z[:256], small, eta=1.0, generator=torch.Generator().manual_seed(5))
    ddpm = sample_ddpm(fn, z[:256], small, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-4)


# ---- guidance --------------------------------------------------------------------------


def test_guidance_interval_and_channels(sit, release_fixtures):
    f = release_fixtures
    x, y = f["ode_noise"][:2], f["ode_y"][:2]
    t_in, t_out = torch.full((2,), 0.5), torch.full((2,), 0.9)
    calls = []
    # (forward_with_cfg calls forward directly, so count at the patch embedder)
    hook = sit.x_embedder.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        fn = guided_model_fn(sit, y, Guidance(4.0, interval=(0.2, 0.6)))
        inside, outside = fn(x, t_in), fn(x, t_out)
    finally:
        hook.remove()
    assert calls == [4, 2]  # the unconditional pass is skipped outside the interval
    with torch.no_grad():
        torch.testing.assert_close(outside, sit(x, t_out, y))
        cond = sit(x, t_in, y)
        uncond = sit(x, t_in, torch.full_like(y, 10))
        torch.testing.assert_close(inside[:, :3], (uncond + 4.0 * (cond - uncond))[:, :3])
        torch.testing.assert_close(inside[:, 3:], cond[:, 3:])  # release: 4th channel unguided
        every = guided_model_fn(sit, y, Guidance(4.0, channels="all"))(x, t_in)
        torch.testing.assert_close(every, uncond + 4.0 * (cond - uncond))


def test_guidance_needs_a_null_class():
    model = models.create_model("sit_s", input_size=4, in_channels=1, hidden_size=16, depth=1, num_heads=2,
                                num_classes=3, class_dropout_prob=0.0)
    assert model.y_embedder.embedding_table.num_embeddings == 3
    with pytest.raises(ValueError, match="needs a null class.*class_dropout_prob=0.0"):
        guided_model_fn(model, torch.tensor([0, 1]), Guidance(2.0))
    with pytest.raises(ValueError, match="null class"):
        sample_latents(model, torch.tensor([0]), torch.randn(1, 1, 4, 4), guidance=Guidance(1.5),
                       sampler=SamplerConfig(kind="ode", method="euler", num_steps=2))
    # scale 1 is plain conditional sampling and works
    fn = guided_model_fn(model, torch.tensor([0, 1]), Guidance(1.0))
    assert fn(torch.randn(2, 1, 4, 4), torch.rand(2)).shape == (2, 1, 4, 4)
    with_null = models.create_model("sit_s", input_size=4, in_channels=1, hidden_size=16, depth=1,
                                    num_heads=2, num_classes=3)
    assert Guidance(2.0).null_class(with_null.config) == 3 and Guidance(1.0).null_class(with_null.config) is None


def test_bad_guidance_settings():
    with pytest.raises(ValueError, match="'release', 'all' or an int"):
        Guidance(2.0, channels="first3")
    with pytest.raises(ValueError, match="t_lo <= t_hi"):
        Guidance(2.0, interval=(0.8, 0.2))


# ---- bad input -------------------------------------------------------------------------


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="unknown sampler 'euler'.*'ode', 'sde', 'ddpm', 'ddim'"):
        SamplerConfig(kind="euler")
    with pytest.raises(ValueError, match="unknown ODE method 'rk45'.*'euler', 'midpoint', 'heun', 'rk4', 'dopri5'"):
        SamplerConfig(kind="ode", method="rk45")
    with pytest.raises(ValueError, match="unknown SDE method 'milstein'.*'euler', 'heun'"):
        SamplerConfig(kind="sde", method="milstein")
    with pytest.raises(ValueError, match="unknown SDE last step 'median'"):
        SamplerConfig(kind="sde", last_step="median")
    with pytest.raises(ValueError, match="takes no method"):
        SamplerConfig(kind="ddim", method="euler")
    with pytest.raises(ValueError, match="unknown ODE method"):
        sample_ode(lambda x, t: x, torch.zeros(1, 1, 1, 1), method="rk45")
    with pytest.raises(ValueError, match="num_steps"):
        sample_ode(lambda x, t: x, torch.zeros(1, 1, 1, 1), method="euler", num_steps=1)
    assert SamplerConfig(kind="SDE", method="Heun", last_step=None).last_step is LastStep.NONE
    assert SamplerConfig().method is ODEMethod.DOPRI5


def test_default_steps_are_the_releases():
    """250 grid points / steps as the SiT and DiT sample scripts; MeanFlow one step."""
    for kind in ("ode", "sde", "ddpm", "ddim"):
        assert SamplerConfig.default_steps(kind) == 250
        assert SamplerConfig(kind=kind).num_steps == 250
    assert SamplerConfig.default_steps("meanflow") == SamplerConfig(kind="meanflow").num_steps == 1
    assert SamplerConfig(kind="ode", method="euler", num_steps=7).num_steps == 7
    assert SamplerConfig.default_for("sit").num_steps == SamplerConfig.default_for("dit").num_steps == 250
    with pytest.raises(ValueError, match="unknown sampler"):
        SamplerConfig.default_steps("euler")
    # the functions take the same defaults: 249 ODE Euler steps; 249 SDE steps + the last step
    calls = []
    fn = lambda x, t: calls.append(1) or -x  # noqa: E731
    sample_ode(fn, torch.zeros(1, 1, 1, 1), method="euler")
    assert len(calls) == 249
    calls.clear()
    sample_sde(fn, torch.zeros(1, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    assert len(calls) == 250


def test_sampler_must_fit_the_model_family(sit, dit):
    y, z = torch.tensor([1]), torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="'ddim' is for DIT models, but this is a SIT model"):
        sample_latents(sit, y, z, sampler=SamplerConfig(kind="ddim", num_steps=2))
    with pytest.raises(ValueError, match="'ode' is for SIT models"):
        sample_latents(dit, y, z, sampler=SamplerConfig(kind="ode", method="euler", num_steps=2))


@pytest.mark.parametrize("kind,method", [("ode", "heun"), ("sde", "euler"), ("sde", "heun"), ("ddpm", None)])
def test_every_sampler_runs_on_a_real_model(sit, dit, kind, method):
    model = dit if kind == "ddpm" else sit
    g = torch.Generator().manual_seed(0)
    out = sample_latents(model, torch.tensor([1, 2]), torch.randn(2, 4, 8, 8, generator=g),
                         sampler=SamplerConfig(kind=kind, method=method, num_steps=4),
                         guidance=Guidance(1.5, channels="all", interval=(0.0, 500.0)), generator=g)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
