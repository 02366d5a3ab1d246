"""SiT transport: path coefficients, eps rules, training targets, prediction conversions."""
from __future__ import annotations

import math

import pytest
import torch

from engine.config.checks import parse_choice
from engine.diffusion.transport import (CheckMode, DiffusionForm, LossWeight, PathType, Prediction, Transport,
                                        TransportConfig, expand_like)

PATHS = ["linear", "gvp", "vp"]
PREDICTIONS = ["velocity", "noise", "score"]


def gaussian_truth(transport: Transport, x: torch.Tensor, t: torch.Tensor, mu: float, s: float) -> dict:
    """Exact velocity, score and noise prediction when the data are N(mu, s^2) per element."""
    c = transport.path.coefficients(expand_like(t, x))
    var = c.alpha**2 * s**2 + c.sigma**2  # Var(x_t)
    centred = x - c.alpha * mu
    score = -centred / var
    # E[x_data | x_t] and E[noise | x_t] of the jointly Gaussian pair
    data_mean = mu + c.alpha * s**2 / var * centred
    noise_mean = c.sigma / var * centred
    return {"score": score, "noise": noise_mean, "velocity": c.d_alpha * data_mean + c.d_sigma * noise_mean}


# ---- parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize("spelling,expected", [("Linear", PathType.LINEAR), ("GVP", PathType.GVP),
                                               ("vp", PathType.VP), (PathType.GVP, PathType.GVP)])
def test_release_spellings_parse(spelling, expected):
    assert TransportConfig(path=spelling).path is expected


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="unknown path 'linaer'.*'linear', 'gvp', 'vp'"):
        TransportConfig(path="linaer")
    with pytest.raises(ValueError, match="'velocity', 'noise', 'score'"):
        TransportConfig(prediction="eps")
    with pytest.raises(ValueError, match="'none', 'velocity', 'likelihood'"):
        TransportConfig(prediction="noise", loss_weight="elbo")
    # the release's misspelt key must not be accepted silently
    with pytest.raises(ValueError, match="increasing-decreasing"):
        parse_choice(DiffusionForm, "inccreasing-decreasing", "diffusion form")


def test_velocity_with_loss_weight_is_refused():
    with pytest.raises(ValueError, match="only applies to noise/score"):
        TransportConfig(prediction="velocity", loss_weight="likelihood")
    assert TransportConfig(prediction="noise", loss_weight=None).loss_weight is LossWeight.NONE


def test_bad_eps_values():
    with pytest.raises(ValueError, match="train_eps"):
        TransportConfig(train_eps=-1e-3)
    with pytest.raises(ValueError, match="sample_eps"):
        TransportConfig(sample_eps=0.7)


# ---- path coefficients -----------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_derivatives_match_finite_differences(path):
    p = TransportConfig(path=path).build_path()
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    h = 1e-6
    c, up, down = p.coefficients(t), p.coefficients(t + h), p.coefficients(t - h)
    torch.testing.assert_close(c.d_alpha, (up.alpha - down.alpha) / (2 * h), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c.d_sigma, (up.sigma - down.sigma) / (2 * h), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p.d_log_alpha(t), c.d_alpha / c.alpha, rtol=1e-10, atol=0)
    torch.testing.assert_close(p.drift_variance(t),
                               c.d_alpha / c.alpha * c.sigma**2 - c.sigma * c.d_sigma, rtol=1e-10, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_path_ends(path):
    p = TransportConfig(path=path).build_path()
    c = p.coefficients(torch.tensor([0.0, 1.0 - 1e-12], dtype=torch.float64))
    assert c.alpha[1] == pytest.approx(1.0, abs=1e-6)  # t = 1 is data
    assert c.sigma[1] == pytest.approx(0.0, abs=2e-5)
    if path == "vp":
        # the VP path never reaches pure noise: alpha_0 = exp(-(20 - 0.1)/4 - 0.05)
        assert c.alpha[0] == pytest.approx(math.exp(-19.9 / 4 - 0.05), rel=1e-9)
        assert c.alpha[0] ** 2 + c.sigma[0] ** 2 == pytest.approx(1.0)
    else:
        assert c.alpha[0] == 0.0 and c.sigma[0] == 1.0


def test_linear_path_values():
    p = TransportConfig().build_path()
    t = torch.tensor([0.25])
    c = p.coefficients(t)
    assert (c.alpha.item(), c.d_alpha.item(), c.sigma.item(), c.d_sigma.item()) == (0.25, 1.0, 0.75, -1.0)


def test_gvp_and_vp_preserve_variance():
    t = torch.linspace(0.01, 0.99, 11, dtype=torch.float64)
    for path in ("gvp", "vp"):
        c = TransportConfig(path=path).build_path().coefficients(t)
        torch.testing.assert_close(c.alpha**2 + c.sigma**2, torch.ones_like(t))


# ---- eps rules -------------------------------------------------------------------------


@pytest.mark.parametrize("path,prediction,train,ode", [
    ("linear", "velocity", (0.0, 1.0), (0.0, 1.0)),
    ("gvp", "velocity", (0.0, 1.0), (0.0, 1.0)),
    ("linear", "noise", (1e-3, 1 - 1e-3), (1e-3, 1 - 1e-3)),
    ("gvp", "score", (1e-3, 1 - 1e-3), (1e-3, 1 - 1e-3)),
    ("vp", "velocity", (0.0, 1 - 1e-5), (0.0, 1 - 1e-3)),
    ("vp", "noise", (0.0, 1 - 1e-5), (0.0, 1 - 1e-3)),
])
def test_release_eps_rules(path, prediction, train, ode):
    cfg = TransportConfig(path=path, prediction=prediction)
    assert cfg.interval("train") == pytest.approx(train)
    assert cfg.interval(CheckMode.ODE) == pytest.approx(ode)


def test_sde_interval_rules():
    cfg = TransportConfig()  # linear velocity: eps 0
    assert cfg.interval("sde", diffusion_form="sigma", last_step_size=0.04) == pytest.approx((0.0, 0.96))
    assert cfg.interval("sde", diffusion_form="sigma", last_step_size=0.0) == pytest.approx((0.0, 1.0))
    # SBDM's coefficient has 1/alpha: start at eps (an explicit one here, since velocity's is 0)
    cfg = TransportConfig(sample_eps=1e-2)
    assert cfg.interval("sde", diffusion_form="SBDM", last_step_size=0.04) == pytest.approx((1e-2, 0.96))
    cfg = TransportConfig(path="vp")
    assert cfg.interval("sde", last_step_size=0.04) == pytest.approx((0.0, 0.96))


def test_explicit_eps_wins():
    cfg = TransportConfig(prediction="noise", train_eps=0.01, sample_eps=0.02)
    assert cfg.interval("train") == pytest.approx((0.01, 0.99))
    assert cfg.interval("ode") == pytest.approx((0.02, 0.98))


def test_sampled_times_stay_in_interval_and_follow_generator():
    tr = Transport(TransportConfig(prediction="score"))
    t = tr.sample_time(10_000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 1e-3 and t.max() <= 1 - 1e-3
    assert abs(t.mean().item() - 0.5) < 0.02
    again = tr.sample_time(10_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


# ---- training targets ------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_interpolant_and_velocity_target(path, rng):
    tr = Transport(TransportConfig(path=path))
    x1, x0 = torch.randn(3, 2, 4, 4, generator=rng), torch.randn(3, 2, 4, 4, generator=rng)
    t = torch.tensor([0.2, 0.5, 0.9])
    x_t, u_t = tr.interpolate(t, x0, x1)
    c = tr.path.coefficients(t.view(-1, 1, 1, 1))
    torch.testing.assert_close(x_t, c.alpha * x1 + c.sigma * x0)
    # u_t is d/dt of the path at fixed endpoints
    h = 1e-3
    fwd, _ = tr.interpolate(t + h, x0, x1)
    back, _ = tr.interpolate(t - h, x0, x1)
    torch.testing.assert_close(u_t, (fwd - back) / (2 * h), rtol=2e-3, atol=2e-3)


def test_linear_release_convention(rng):
    tr = Transport()
    x1, x0 = torch.randn(2, 4, 8, 8, generator=rng), torch.randn(2, 4, 8, 8, generator=rng)
    t = torch.tensor([0.3, 0.8])
    x_t, u_t = tr.interpolate(t, x0, x1)
    torch.testing.assert_close(x_t, t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0)
    torch.testing.assert_close(u_t, x1 - x0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_perfect_prediction_has_zero_loss(path, prediction, rng):
    weight = "none" if prediction == "velocity" else "likelihood"
    tr = Transport(TransportConfig(path=path, prediction=prediction, loss_weight=weight))
    x1, x0 = torch.randn(3, 2, 4, 4, generator=rng), torch.randn(3, 2, 4, 4, generator=rng)
    t = torch.tensor([0.2, 0.5, 0.9])
    x_t, u_t = tr.interpolate(t, x0, x1)
    sigma = tr.path.coefficients(t.view(-1, 1, 1, 1)).sigma
    perfect = {"velocity": u_t, "noise": x0, "score": -x0 / sigma}[prediction]
    assert tr.loss_per_sample(perfect, t, x0, x_t, u_t).abs().max() < 1e-10
    assert (tr.loss_per_sample(perfect + 0.1, t, x0, x_t, u_t) > 0).all()


@pytest.mark.parametrize("weight", ["none", "velocity", "likelihood"])
def test_loss_weights(weight, rng):
    tr = Transport(TransportConfig(path="gvp", prediction="noise", loss_weight=weight))
    x1, x0 = torch.randn(2, 1, 2, 2, generator=rng), torch.randn(2, 1, 2, 2, generator=rng)
    t = torch.tensor([0.3, 0.7])
    x_t, u_t = tr.interpolate(t, x0, x1)
    pred = x0 + 1.0  # squared error exactly 1 everywhere
    loss = tr.loss_per_sample(pred, t, x0, x_t, u_t)
    w = tr.path.drift_variance(t)
    sigma = tr.path.coefficients(t).sigma
    expected = {"none": torch.ones(2), "velocity": (w / sigma) ** 2, "likelihood": w / sigma**2}[weight]
    torch.testing.assert_close(loss, expected)


def test_wrong_output_shape_is_explained():
    tr = Transport()
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="does not match the input"):
        tr.loss_per_sample(torch.zeros(2, 8, 8, 8), torch.rand(2), x, x, x)


# ---- conversions between predictions ---------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_conversions_on_gaussian_data(path, prediction, rng):
    """Each exact prediction, read as a velocity or a score, gives the exact field."""
    mu, s = 0.7, 0.4
    tr = Transport(TransportConfig(path=path, prediction=prediction))
    x = torch.randn(4, 1, 3, 3, generator=rng, dtype=torch.float64)
    t = torch.tensor([0.1, 0.4, 0.6, 0.95], dtype=torch.float64)
    truth = gaussian_truth(tr, x, t, mu, s)
    out = truth[prediction]
    torch.testing.assert_close(tr.velocity(out, x, t), truth["velocity"])
    torch.testing.assert_close(tr.score(out, x, t), truth["score"])


def test_score_from_velocity_is_finite_at_t0():
    tr = Transport()  # linear velocity: alpha = 0 at t = 0
    x = torch.randn(2, 1, 2, 2)
    s = tr.score(torch.randn(2, 1, 2, 2), x, torch.zeros(2))
    torch.testing.assert_close(s, -x)  # p_0 = N(0, 1)


@pytest.mark.parametrize("form", list(DiffusionForm))
def test_diffusion_forms(form):
    tr = Transport()
    x = torch.zeros(3, 1, 1, 1)
    t = torch.tensor([0.25, 0.5, 0.75])
    w = tr.diffusion_coefficient(x, t, form, norm=2.0).reshape(-1)
    expected = {
        DiffusionForm.CONSTANT: torch.full((3,), 2.0),
        DiffusionForm.SBDM: 2.0 * tr.path.drift_variance(t),
        DiffusionForm.SIGMA: 2.0 * (1 - t),
        DiffusionForm.LINEAR: 2.0 * (1 - t),
        DiffusionForm.DECREASING: 0.25 * (2.0 * torch.cos(torch.pi * t) + 1) ** 2,
        DiffusionForm.INCREASING_DECREASING: 2.0 * torch.sin(torch.pi * t) ** 2,
    }[form]
    torch.testing.assert_close(w, expected)
    assert Prediction("noise") is Prediction.NOISE  # the enums are plain value enums
