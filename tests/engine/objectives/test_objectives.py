"""Objectives: dispersive wiring, presets, masks, randomness, one model call, DiT parity."""
from __future__ import annotations

import pytest
import torch

import kernels
import models
from engine.diffusion.gaussian import DiffusionConfig
from engine.objectives.base import Objective
from engine.objectives.build import build_objective
from engine.objectives.dispersive import DispersiveConfig
from engine.objectives.dit import DiTObjective
from engine.objectives.sit import SiTObjective
from models import unwrap_model
from engine.diffusion.transport import TransportConfig


def tiny(family: str = "sit", depth: int = 4, **kw) -> torch.nn.Module:
    cfg = dict(input_size=8, in_channels=2, hidden_size=32, depth=depth, num_heads=2, num_classes=5)
    model = models.create_model(f"{family}_s", **{**cfg, **kw})
    # release init zeroes adaLN and the final layer; randomise so outputs and taps depend on input
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    return model


@pytest.fixture(scope="module")
def sit(release_fixtures):
    model = models.create_model("sit_s", **release_fixtures["config"]).eval()
    model.load_state_dict(release_fixtures["sit_state_dict"])
    return model


# ---- DispersiveConfig ------------------------------------------------------------------


def test_presets():
    paper, release, none = (DispersiveConfig.preset(n) for n in ("paper", "release", "none"))
    assert (paper.lambda_, paper.tau, paper.blocks) == (0.5, 0.5, "paper")
    assert (release.lambda_, release.tau, release.blocks) == (0.25, 1.0, "last")
    for cfg in (paper, release):
        assert cfg.variant == "infonce_l2" and cfg.normalize_by_dim and cfg.scope == "local" and cfg.enabled
    assert not none.enabled
    # paper: output of block num_layers // 4 counted from 1
    assert paper.resolve(12) == [(2, 1.0)] and paper.resolve(28) == [(6, 1.0)]
    assert release.resolve(28) == [(27, 1.0)]
    assert DispersiveConfig.preset("release", tau=0.5).tau == 0.5
    with pytest.raises(ValueError, match="'paper', 'release', 'none'"):
        DispersiveConfig.preset("jax")


@pytest.mark.parametrize("kwargs,match", [
    (dict(tau=0.0), r"DispersiveConfig.tau must be a finite number > 0, got 0.0"),
    (dict(tau=-1.0), r"DispersiveConfig.tau must be a finite number > 0, got -1.0"),
    (dict(lambda_=-0.1), r"DispersiveConfig.lambda_ must be a finite number >= 0, got -0.1"),
    (dict(lambda_=float("nan")), r"DispersiveConfig.lambda_ must be a finite number >= 0, got nan"),
    (dict(variant="infonce"), r"DispersiveConfig.variant must be one of 'infonce_l2', .*got 'infonce'"),
    (dict(scope="world"), r"DispersiveConfig.scope must be one of 'local', 'global', got 'world'"),
    (dict(backend="cuda"), r"DispersiveConfig.backend must be one of 'auto', 'triton', 'torch', 'reference'"),
    (dict(blocks="first"), r"DispersiveConfig.blocks must be one of 'last', 'all', 'paper', got 'first'"),
    (dict(blocks=[]), "non-empty list"),
    (dict(blocks=[1, 2], block_weights=(1.0,)), r"one weight per block \(2 for \(1, 2\)\)"),
    (dict(block_weights=(-1.0,)), ">= 0"),
    (dict(variant="infonce_cosine", scale_invariant=True),
     r"DispersiveConfig.scale_invariant must be False for variant 'infonce_cosine': .*infonce_l2 and hinge only; "
     r"infonce_cosine is scale-invariant already .*got True"),
    (dict(variant="covariance", scale_invariant=True),
     r"DispersiveConfig.scale_invariant must be False for variant 'covariance': .*got True"),
    (dict(scale_invariant=1), r"DispersiveConfig.scale_invariant must be a bool, got 1"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DispersiveConfig(**{"lambda_": 0.5, **kwargs})


def test_scale_invariant_flag_parses_through_the_trainer_flags():
    """The bool field gives --disp-scale-invariant / --no-disp-scale-invariant (generated from the
    config fields); a refused combination fails at parse time with the config's message."""
    from engine.train import parse

    assert parse(["--disp-scale-invariant"]).dispersive.scale_invariant is True
    assert parse(["--disp-preset", "paper", "--disp-scale-invariant", "--disp-variant", "hinge"]).dispersive == \
        DispersiveConfig.preset("paper", scale_invariant=True, variant="hinge")
    assert parse(["--disp-scale-invariant", "--no-disp-scale-invariant"]).dispersive.scale_invariant is False
    assert parse([]).dispersive.scale_invariant is False
    with pytest.raises(SystemExit):
        parse(["--disp-variant", "infonce_cosine", "--disp-scale-invariant"])


def test_block_resolution_and_default_weights():
    cfg = DispersiveConfig(lambda_=1.0, blocks="all")
    assert cfg.resolve(4) == [(i, 0.25) for i in range(4)]
    cfg = DispersiveConfig(lambda_=1.0, blocks=[0, -1], block_weights=[2.0, 1.0])
    assert cfg.blocks == (0, -1) and cfg.resolve(4) == [(0, 2.0), (3, 1.0)]
    with pytest.raises(ValueError, match="3 block_weights for 4 blocks"):
        DispersiveConfig(lambda_=1.0, blocks="all", block_weights=(1, 1, 1)).resolve(4)


# ---- SiT objective ---------------------------------------------------------------------


def test_output_keys_and_sum():
    obj = build_objective("sit", dispersive=DispersiveConfig(lambda_=0.5, blocks=[1, 3], block_weights=(1.0, 2.0)))
    assert isinstance(obj, Objective) and obj.family == "sit"
    model = tiny()
    x, y = torch.randn(6, 2, 8, 8), torch.randint(0, 5, (6,))
    out = obj(model, x, y, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "diffusion_loss", "dispersive_total", "dispersive/block_1", "dispersive/block_3"}
    assert out["loss"].requires_grad and out["loss"].dim() == 0
    for k in set(out) - {"loss"}:
        assert not out[k].requires_grad
    expected_total = 0.5 * (1.0 * out["dispersive/block_1"] + 2.0 * out["dispersive/block_3"])
    torch.testing.assert_close(out["dispersive_total"], expected_total)
    torch.testing.assert_close(out["loss"].detach(), out["diffusion_loss"] + out["dispersive_total"])
    # each block's value is kernels.dispersive_loss of that block's output, N samples flattened
    assert -torch.log(torch.tensor(6.0)) <= out["dispersive/block_1"] <= 0


def test_dispersive_matches_release_value_on_fixture(sit, release_fixtures):
    """Feed x_t == fixture x (data x / t, zero noise): the last-block term is the release's."""
    f = release_fixtures
    obj = SiTObjective(dispersive=DispersiveConfig.preset("release"))
    t = f["t"]
    x_data = f["x"] / t.view(-1, 1, 1, 1)
    out = obj.compute(sit, x_data, f["y"], t, torch.zeros_like(x_data))
    torch.testing.assert_close(out["dispersive/block_2"], f["disp_loss_last_block"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["dispersive_total"], 0.25 * f["disp_loss_last_block"], rtol=1e-5, atol=1e-6)


def test_model_is_called_once_with_the_right_taps():
    model = tiny()
    seen = []
    orig = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("return_hidden"))
        return orig(*args, **kwargs)

    model.forward = spy
    x, y = torch.randn(4, 2, 8, 8), torch.randint(0, 5, (4,))
    SiTObjective(dispersive=DispersiveConfig.preset("paper"))(model, x, y)
    DiTObjective(dispersive=DispersiveConfig.preset("none"), diffusion=DiffusionConfig(learn_sigma=False))(
        tiny("dit", learn_sigma=False), x, y)
    assert seen == [[0]]  # depth 4: paper block = 4 // 4 = block 1 from 1 = index 0


def test_off_means_no_taps_and_zero_total():
    out = build_objective("sit", dispersive="none")(tiny(), torch.randn(3, 2, 8, 8), torch.tensor([0, 1, 2]))
    assert out["dispersive_total"].item() == 0.0
    assert not any(k.startswith("dispersive/") for k in out)
    torch.testing.assert_close(out["loss"].detach(), out["diffusion_loss"])


def test_dispersive_gradient_reaches_the_blocks():
    model = tiny()
    x, y = torch.randn(4, 2, 8, 8), torch.randint(0, 5, (4,))
    grads = []
    for lam in (0.0, 1.0):
        model.zero_grad()
        obj = SiTObjective(dispersive=DispersiveConfig(lambda_=lam, blocks="last"))
        obj(model, x, y, generator=torch.Generator().manual_seed(0))["loss"].backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_valid_mask():
    model = tiny().eval()
    obj = SiTObjective(dispersive=DispersiveConfig.preset("release"))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 2, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)
    t, noise = torch.rand(4, generator=g), torch.randn(4, 2, 8, 8, generator=g)
    masked = obj.compute(model, x, y, t, noise, valid=torch.tensor([True, True, False, False]))
    first_two = obj.compute(model, x[:2], y[:2], t[:2], noise[:2])
    torch.testing.assert_close(masked["diffusion_loss"], first_two["diffusion_loss"])
    # the dispersive term uses all rows (documented), so it differs from the 2-row batch
    assert masked["dispersive/block_3"] != first_two["dispersive/block_3"]
    nothing = obj.compute(model, x, y, t, noise, valid=torch.zeros(4, dtype=torch.bool))
    assert nothing["diffusion_loss"].item() == 0.0
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        obj.compute(model, x, y, t, noise, valid=torch.ones(4))


def test_randomness_follows_the_generator():
    # eval mode: in training the model's own label dropout draws from the global RNG
    model = tiny().eval()
    obj = SiTObjective(dispersive=DispersiveConfig.preset("release"))
    x, y = torch.randn(4, 2, 8, 8), torch.randint(0, 5, (4,))
    a = obj(model, x, y, generator=torch.Generator().manual_seed(7))
    b = obj(model, x, y, generator=torch.Generator().manual_seed(7))
    c = obj(model, x, y, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a["loss"], b["loss"]) and not torch.equal(a["loss"], c["loss"])
    torch.manual_seed(3)
    d = obj(model, x, y)
    torch.manual_seed(3)
    e = obj(model, x, y)
    assert torch.equal(d["loss"], e["loss"])


@pytest.mark.parametrize("path,prediction,weight", [
    ("linear", "velocity", "none"), ("gvp", "noise", "velocity"), ("vp", "score", "likelihood"),
])
def test_every_transport_trains(path, prediction, weight):
    obj = SiTObjective(transport=TransportConfig(path=path, prediction=prediction, loss_weight=weight),
                       dispersive=DispersiveConfig.preset("release"))
    out = obj(tiny(), torch.randn(4, 2, 8, 8), torch.randint(0, 5, (4,)), generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


# ---- DiT objective ---------------------------------------------------------------------


def test_dit_parity_and_extras(dit, release_fixtures):
    f = release_fixtures
    obj = build_objective("dit", dispersive=DispersiveConfig.preset("release"))
    out = obj.compute(dit, f["x"], f["y"], f["ddpm_t"], f["ddpm_noise"])
    torch.testing.assert_close(out["diffusion_loss"], f["ddpm_loss"].mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out["mse"], f["ddpm_mse"].mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out["vb"], f["ddpm_vb"].mean(), rtol=1e-5, atol=0)
    assert "dispersive/block_2" in out
    valid = torch.tensor([True, False, True, False])
    masked = obj.compute(dit, f["x"], f["y"], f["ddpm_t"], f["ddpm_noise"], valid=valid)
    torch.testing.assert_close(masked["diffusion_loss"], f["ddpm_loss"][valid].mean(), rtol=1e-5, atol=0)


def test_dit_random_steps_and_backward():
    obj = DiTObjective(dispersive=DispersiveConfig(lambda_=0.5, blocks="all"))
    model = tiny("dit")
    out = obj(model, torch.randn(4, 2, 8, 8), torch.randint(0, 5, (4,)), generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert {f"dispersive/block_{i}" for i in range(4)} <= set(out)
    assert model.final_layer.linear.weight.grad is not None


# ---- factory, wrappers, scope ------------------------------------------------------------


def test_build_objective_errors():
    with pytest.raises(ValueError, match="unknown objective family 'edm'.*'sit', 'dit', 'meanflow'"):
        build_objective("edm")
    with pytest.raises(ValueError, match="diffusion= is not a setting of the sit objective; it takes transport="):
        build_objective("sit", diffusion=DiffusionConfig())
    with pytest.raises(ValueError, match="transport= is not a setting of the dit objective; it takes diffusion="):
        build_objective("dit", transport=TransportConfig())


def test_wrapped_models_are_unwrapped():
    class Wrapper(torch.nn.Module):  # stands in for DDP / DeepSpeed's engine
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    model = tiny()
    assert unwrap_model(Wrapper(Wrapper(model))) is model
    out = SiTObjective(dispersive=DispersiveConfig.preset("release"))(
        Wrapper(model), torch.randn(2, 2, 8, 8), torch.tensor([0, 1]))
    assert "dispersive/block_3" in out


def test_scope_is_passed_only_when_global(monkeypatch):
    calls = []

    def fake(zs, **kwargs):
        calls.append(kwargs)
        return torch.stack([z.float().pow(2).mean() for z in zs])

    monkeypatch.setattr(kernels, "dispersive_loss_groups", fake)
    model = tiny()
    x, y = torch.randn(2, 2, 8, 8), torch.tensor([0, 1])
    SiTObjective(dispersive=DispersiveConfig.preset("release"))(model, x, y)
    assert "scope" not in calls[-1] and calls[-1]["tau"] == 1.0
    SiTObjective(dispersive=DispersiveConfig.preset("release", scope="global"))(model, x, y)
    assert calls[-1]["scope"] == "global"
    assert "scale_invariant" not in calls[-1]
    SiTObjective(dispersive=DispersiveConfig.preset("release", scale_invariant=True))(model, x, y)
    assert calls[-1]["scale_invariant"] is True


def test_scale_invariant_term_ignores_the_scale_of_the_block_output():
    """The objective's term with scale_invariant: the same values for hidden states scaled by c."""
    from engine.objectives.dispersive import dispersive_terms

    cfg = DispersiveConfig(lambda_=0.5, blocks=(0, 1), variant="hinge", scale_invariant=True)
    hidden = [torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    total, logs = dispersive_terms(hidden, cfg.resolve(2), cfg)
    scaled, logs_scaled = dispersive_terms([h * 50.0 for h in hidden], cfg.resolve(2), cfg)
    torch.testing.assert_close(scaled, total, rtol=1e-6, atol=0.0)
    for key in logs:
        torch.testing.assert_close(logs_scaled[key], logs[key], rtol=1e-6, atol=0.0)


def test_sit_objective_refuses_a_dit_model():
    with pytest.raises(ValueError, match="SiT objective needs a SiT model"):
        SiTObjective()(tiny("dit"), torch.randn(2, 2, 8, 8), torch.tensor([0, 1]))
