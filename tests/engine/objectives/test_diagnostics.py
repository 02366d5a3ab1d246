"""The dispersive term's diagnostics (gap, off-diagonal share, block RMS) and the saturation warning."""
from __future__ import annotations

import math

import pytest
import torch

import kernels
from engine.objectives.build import build_objective
from engine.objectives.dispersive import DispersiveConfig
from engine.training.saturation import SaturationWatch
from tests.engine.objectives.test_objectives import tiny


@pytest.mark.parametrize("family, variant, scale_invariant", [
    ("sit", "infonce_l2", False), ("dit", "infonce_cosine", False), ("sit", "hinge", False),
    ("sit", "covariance", False), ("sit", "infonce_l2", True), ("dit", "hinge", True)])
def test_diagnostics_per_block_on_request_only(family, variant, scale_invariant):
    model = tiny(family).eval()  # no random label dropout: the two calls see the same labels
    cfg = DispersiveConfig(lambda_=0.5, tau=0.7, blocks=(0, 2), variant=variant, scale_invariant=scale_invariant)
    objective = build_objective(family, dispersive=cfg)
    x, y = torch.randn(6, 2, 8, 8), torch.randint(0, 5, (6,))
    hidden = {}
    hooks = [model.blocks[i].register_forward_hook(lambda m, a, o, i=i: hidden.__setitem__(i, o.detach()))
             for i in (0, 2)]
    out = objective(model, x, y, generator=torch.Generator().manual_seed(3), diagnostics=True)
    for hook in hooks:
        hook.remove()
    plain = objective(model, x, y, generator=torch.Generator().manual_seed(3))
    assert not any(k.endswith(("/gap", "/rms", "/off_diagonal")) for k in plain)
    assert torch.equal(plain["loss"], out["loss"])  # asking for diagnostics changes nothing else
    floor = kernels.dispersive_floor(variant, 6, tau=0.7, margin=cfg.margin, scale_invariant=scale_invariant)
    for b in (0, 2):
        value = out[f"dispersive/block_{b}"]
        torch.testing.assert_close(out[f"dispersive/block_{b}/gap"], value - floor)
        h = hidden[b]
        torch.testing.assert_close(out[f"dispersive/block_{b}/rms"], h.square().mean().sqrt())
        if variant.startswith("infonce"):
            share = out[f"dispersive/block_{b}/off_diagonal"]
            assert 0.0 < float(share) < 1.0
            torch.testing.assert_close(share, kernels.off_diagonal_share(variant, value, 6, 0.7))
        else:
            assert f"dispersive/block_{b}/off_diagonal" not in out
        assert float(out[f"dispersive/block_{b}/gap"]) >= -1e-6


def test_saturation_warns_once_after_three_windows_at_the_floor():
    watch = SaturationWatch()
    near = {"dispersive/block_1/gap": 2e-4, "dispersive/block_3/gap": 5e-4, "diffusion_loss": 1.0}
    assert watch.update(near) is None and watch.update(near) is None
    assert watch.update({**near, "dispersive/block_3/gap": 0.2}) is None   # one block still acting: reset
    assert watch.update(near) is None and watch.update(near) is None
    message = watch.update(near)
    assert message and "3 log windows" in message and "block_1 0.0002" in message and "--disp-tau" in message
    assert watch.update(near) is None  # once per run
    assert SaturationWatch().update({"diffusion_loss": 1.0}) is None  # regularizer off: nothing to say


def test_scale_invariant_gap_is_to_the_scale_invariant_floor():
    """The gap of the scale-invariant term is to its own floor (a regular simplex), not to -log N
    (which it cannot reach): 0 at the simplex, and the off-diagonal share still the softmax's."""
    from engine.objectives.dispersive import dispersive_terms

    n = 6
    cfg = DispersiveConfig(lambda_=1.0, tau=0.7, blocks=0, scale_invariant=True)
    simplex = torch.eye(n).reshape(n, 2, 3) * 3.0   # every pair at the same distance
    _, logs = dispersive_terms([simplex], cfg.resolve(1), cfg, diagnostics=True)
    assert float(logs["dispersive/block_0/gap"]) == pytest.approx(0.0, abs=1e-6)
    expected = math.log((1 + (n - 1) * math.exp(-1 / 0.7)) / n)
    assert float(logs["dispersive/block_0"]) == pytest.approx(expected, abs=1e-6)
    # all n(n - 1) off-diagonal logits at -1/tau, the n diagonal ones at 0
    share = (n - 1) * math.exp(-1 / 0.7) / (1 + (n - 1) * math.exp(-1 / 0.7))
    assert float(logs["dispersive/block_0/off_diagonal"]) == pytest.approx(share, rel=1e-5)


def test_floor_of_the_release_setting_is_minus_log_n():
    assert kernels.dispersive_floor("infonce_l2", 32) == pytest.approx(-math.log(32))
