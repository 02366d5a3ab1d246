"""Slower model tests: torch.compile parity and a real SiT-XL/2 step on CPU."""

from __future__ import annotations

import os
import resource

import pytest
import torch

import models
from tests.conftest import REPO



def test_compile_fullgraph_matches_eager(monkeypatch):
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(REPO / "build" / "cache" / "inductor"))
    torch.manual_seed(0)
    model = models.create_model("sit_s", input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    for p in model.parameters():  # the release init zeroes the output; use non-trivial weights
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    model.eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 10])

    def step(m):
        m.zero_grad(set_to_none=True)
        out, hidden = m(x, t, y, return_hidden="all")
        (out.square().mean() + hidden[0].square().mean()).backward()
        return out.detach(), [h.detach() for h in hidden], m.blocks[0].attn.qkv.weight.grad.clone()

    eager = step(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
    got = step(compiled)
    torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], eager[2], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sit_xl2_forward_backward_bf16_cpu():
    """The real SiT-XL/2 (675M params) at batch 1, bf16 autocast: one training step's forward
    and backward run, produce finite gradients, and stay far below 24 GB (about 6 GB)."""
    torch.manual_seed(0)
    model = models.create_model("SiT-XL/2").train()
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    # Give the zero-initialised adaLN and output layers some weight so gradients reach every block.
    with torch.no_grad():
        for block in model.blocks:
            torch.nn.init.normal_(block.adaLN_modulation[1].weight, std=0.02)
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)
    x, t, y = torch.randn(1, 4, 32, 32), torch.rand(1), torch.tensor([207])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, hidden = model(x, t, y, return_hidden="paper")
    assert out.shape == (1, 4, 32, 32) and out.dtype == torch.bfloat16
    assert hidden[0].shape == (1, 256, 1152)
    loss = out.float().square().mean() + hidden[0].float().square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    for name in ("x_embedder.proj.weight", "blocks.0.attn.qkv.weight", "blocks.27.mlp.fc2.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert model.pos_embed.grad is None
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB
    assert peak_gb < 16, f"peak RSS {peak_gb:.1f} GB"
