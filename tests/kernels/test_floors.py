"""The floor of each variant and the off-diagonal softmax share, against the float64 reference."""
from __future__ import annotations

import math

import pytest
import torch

from kernels import dispersive_floor, off_diagonal_share, reference_dispersive_loss


def _simplex(n: int, d: int) -> torch.Tensor:
    """n unit rows with every pairwise cosine -1/(n-1) (a centred identity, normalised), in d >= n dims."""
    e = torch.eye(n, dtype=torch.float64) - (1.0 / n if n > 1 else 0.0)  # one row: any unit vector
    return torch.nn.functional.pad(e / e.norm(dim=1, keepdim=True), (0, d - n))


@pytest.mark.parametrize("n", [1, 2, 7, 32])
def test_floors_are_reached_by_spread_rows_and_never_crossed(n, rng):
    far = torch.randn(n, 33, generator=rng, dtype=torch.float64) * 1e3   # distances / D ~ 2e6
    loose = torch.randn(n, 33, generator=rng, dtype=torch.float64)
    for variant in ("infonce_l2", "hinge"):
        floor = dispersive_floor(variant, n, tau=0.7, margin=1.3)
        at_floor = reference_dispersive_loss(far, variant, tau=0.7, margin=1.3)
        assert float(at_floor) == pytest.approx(floor, abs=1e-9)
        assert float(reference_dispersive_loss(loose, variant, tau=0.7, margin=1.3)) >= floor - 1e-12
    cosine = dispersive_floor("infonce_cosine", n, tau=0.5)
    assert float(reference_dispersive_loss(_simplex(n, n + 3), "infonce_cosine", tau=0.5)) == pytest.approx(cosine)
    assert float(reference_dispersive_loss(loose, "infonce_cosine", tau=0.5)) >= cosine - 1e-12
    assert dispersive_floor("covariance", n) == 0.0 <= float(reference_dispersive_loss(loose, "covariance"))
    assert dispersive_floor("infonce_l2", n) == -math.log(n)


@pytest.mark.parametrize("variant", ["infonce_l2", "infonce_cosine"])
def test_off_diagonal_share_is_the_softmax_weight_off_the_diagonal(variant, rng):
    n, tau = 9, 0.8
    z = torch.randn(n, 21, generator=rng, dtype=torch.float64)
    if variant == "infonce_l2":
        logits = -torch.cdist(z, z).square() / z.shape[1] / tau
    else:
        zn = torch.nn.functional.normalize(z, dim=1)
        logits = zn @ zn.T / tau
    p = torch.softmax(logits.flatten(), 0).reshape(n, n)
    share = off_diagonal_share(variant, reference_dispersive_loss(z, variant, tau=tau), n, tau)
    assert float(share) == pytest.approx(1.0 - float(p.diagonal().sum()), rel=1e-10)
    assert off_diagonal_share("hinge", torch.tensor(0.0), n) is None


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown dispersive-loss variant"):
        dispersive_floor("l2", 4)
