"""Tests of the SiT/DiT backbones: release parity, registry, taps, attention, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import models
import models.dit as dit_module
from models.dit import LabelEmbedder, timestep_embedding
from tests.conftest import fixture_path

RTOL, ATOL = 1e-5, 1e-6


# ---------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------




@pytest.fixture(scope="module")
def ref(release_fixtures) -> dict:
    return release_fixtures


def tiny(ref: dict, family: str = "sit", state: str | None = None, **overrides) -> models.DiffusionTransformer:
    """The fixtures' tiny model (depth 3, hidden 64, 10 classes) with the release weights."""
    model = models.create_model(f"{family}_s", **{**ref["config"], **overrides})
    key = state or f"{family}_state_dict"
    model.load_state_dict(ref[key], strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------
# Parity with the releases
# ---------------------------------------------------------------------------------------


def test_state_dict_keys_and_shapes_match_release_xl():
    lines = fixture_path("sit_xl_2_state_dict_keys.txt").read_text().splitlines()
    expected = {}
    for line in lines:
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split()
        expected[name] = tuple(int(s) for s in shape.split("x"))
    with torch.device("meta"):
        model = models.create_model("SiT-XL/2")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected)  # same names, same order
    assert got == expected


def test_pos_embed_is_fixed_release_table(ref):
    model = models.create_model("sit_s", **ref["config"])
    assert isinstance(model.pos_embed, torch.nn.Parameter)
    assert not model.pos_embed.requires_grad
    # The table is built, not learnt: it must equal the one stored in the release state_dict.
    torch.testing.assert_close(model.pos_embed, ref["sit_state_dict"]["pos_embed"], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sit", "dit"])
def test_strict_loading_of_release_state_dicts(ref, family):
    model = models.create_model(f"{family}_s", **ref["config"])
    result = model.load_state_dict(ref[f"{family}_state_dict"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_sit_forward_matches_release(ref):
    model = tiny(ref)
    with torch.no_grad():
        out = model(ref["x"], ref["t"], ref["y"])
    assert out.shape == (4, 4, 8, 8)  # learn_sigma half dropped
    torch.testing.assert_close(out, ref["sit_out"], rtol=RTOL, atol=ATOL)


def test_sit_block_outputs_match_release(ref):
    model = tiny(ref)
    with torch.no_grad():
        out, hidden = model(ref["x"], ref["t"], ref["y"], return_hidden="all")
    assert len(hidden) == 3 and all(h.shape == (4, 16, 64) for h in hidden)
    torch.testing.assert_close(torch.stack(hidden), ref["sit_acts"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out, ref["sit_out"], rtol=RTOL, atol=ATOL)


def test_sit_cfg_matches_release_three_channel_convention(ref):
    model = tiny(ref)
    x, t, y = ref["sit_cfg_in"]
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=1.5)
        cond = model(x[:2], t[:2], y[:2])
        uncond = model(x[:2], t[2:], y[2:])
    torch.testing.assert_close(out, ref["sit_out_cfg_1p5"], rtol=RTOL, atol=ATOL)
    # Channels 0-2 are guided; channel 3 is each row's own prediction (cond rows, then uncond).
    torch.testing.assert_close(out[:2, :3], uncond[:, :3] + 1.5 * (cond[:, :3] - uncond[:, :3]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:2, 3], cond[:, 3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2:, 3], uncond[:, 3], rtol=1e-5, atol=1e-5)


def test_cfg_all_channels_and_channel_count(ref):
    model = tiny(ref)
    x, t, y = ref["sit_cfg_in"]
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=1.5, guidance_channels="all")
        cond, uncond = model(x[:2], t[:2], y[:2]), model(x[:2], t[2:], y[2:])
    guided = uncond + 1.5 * (cond - uncond)
    torch.testing.assert_close(out, torch.cat([guided, guided]), rtol=1e-5, atol=1e-5)
    # first 3 channels identical to the release default, the 4th now guided too
    torch.testing.assert_close(out[:, :3], ref["sit_out_cfg_1p5"][:, :3], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:, 3], ref["sit_out_cfg_1p5"][:, 3])
    with pytest.raises(ValueError, match="even batch"):
        model.forward_with_cfg(x[:3], t[:3], y[:3], 1.5)
    with pytest.raises(ValueError, match="guidance_channels"):
        model.forward_with_cfg(x, t, y, 1.5, guidance_channels="some")
    with pytest.raises(ValueError, match="guidance_channels"):
        model.forward_with_cfg(x, t, y, 1.5, guidance_channels=5)


def test_dit_forward_matches_release(ref):
    model = tiny(ref, family="dit")
    with torch.no_grad():
        out = model(ref["x"], ref["dit_t"], ref["y"])
    assert out.shape == (4, 8, 8, 8)  # DiT keeps the learned-sigma half
    torch.testing.assert_close(out, ref["dit_out"], rtol=RTOL, atol=ATOL)
    with torch.no_grad():  # DiT guidance: 3 channels guided, 5 passed through
        cfg_out = model.forward_with_cfg(*ref["sit_cfg_in"], cfg_scale=2.0)
    assert cfg_out.shape == (4, 8, 8, 8)


def test_time_input_forms(ref):
    """A 0-d time broadcasts over the batch; DiT accepts integer DDPM steps as well as floats."""
    sit, dit = tiny(ref), tiny(ref, family="dit")
    x, y = ref["x"], ref["y"]
    with torch.no_grad():
        torch.testing.assert_close(sit(x, torch.tensor(0.3), y), sit(x, torch.full((4,), 0.3), y), rtol=0, atol=0)
        steps = ref["ddpm_t"]
        torch.testing.assert_close(dit(x, steps, y), dit(x, steps.float(), y), rtol=0, atol=0)


def test_sit_without_learned_sigma_loads_release(ref):
    model = tiny(ref, learn_sigma=False, state="sit_nosigma_state_dict")
    assert model.final_layer.linear.out_features == 2 * 2 * 4
    with torch.no_grad():
        assert model(ref["x"], ref["t"], ref["y"]).shape == (4, 4, 8, 8)


def test_timestep_embedding_layout():
    t = torch.tensor([0.0, 0.5, 999.0])
    emb = timestep_embedding(t, 256)
    assert emb.shape == (3, 256) and emb.dtype == torch.float32
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128) / 128)
    torch.testing.assert_close(emb[:, :128], torch.cos(t[:, None] * freqs))  # cos first
    torch.testing.assert_close(emb[:, 128:], torch.sin(t[:, None] * freqs))
    assert timestep_embedding(t, 7).shape == (3, 7)  # odd width padded with a zero
    # bf16 input times are upcast before the phases are formed
    assert timestep_embedding(t.bfloat16(), 8).dtype == torch.float32


# ---------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------


def test_release_initialisation():
    torch.manual_seed(0)
    model = models.create_model("sit_s", input_size=8, depth=2)
    for block in model.blocks:  # adaLN-Zero
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0
        assert torch.count_nonzero(block.adaLN_modulation[1].bias) == 0
    fl = model.final_layer
    for p in (fl.linear.weight, fl.linear.bias, fl.adaLN_modulation[1].weight, fl.adaLN_modulation[1].bias):
        assert torch.count_nonzero(p) == 0
    # xavier-uniform bound sqrt(6 / (fan_in + fan_out)), zero bias
    qkv = model.blocks[0].attn.qkv
    bound = math.sqrt(6 / (384 + 3 * 384))
    assert qkv.weight.abs().max() <= bound and qkv.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(qkv.bias) == 0
    w = model.x_embedder.proj.weight  # like a linear over C*p*p inputs
    assert w.abs().max() <= math.sqrt(6 / (4 * 2 * 2 + 384))
    for p in (model.y_embedder.embedding_table.weight, model.t_embedder.mlp[0].weight, model.t_embedder.mlp[2].weight):
        assert abs(p.std().item() - 0.02) < 0.002
    # zero-initialised output: the model starts by predicting 0
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.count_nonzero(model(x, torch.rand(2), torch.tensor([1, 2]))) == 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "pos_embed" not in trainable and "x_embedder.proj.weight" in trainable


# ---------------------------------------------------------------------------------------
# Label dropout (classifier-free guidance training)
# ---------------------------------------------------------------------------------------


def test_label_dropout_only_in_training(ref):
    model = tiny(ref)
    x, t, y = ref["x"], ref["t"], ref["y"]
    null = torch.full_like(y, 10)
    with torch.no_grad():
        eval_out = model(x, t, y)
        torch.testing.assert_close(model(x, t, y), eval_out, rtol=0, atol=0)  # eval: deterministic
        null_out = model(x, t, null)
    assert not torch.allclose(eval_out, null_out)

    always = tiny(ref, class_dropout_prob=1.0).train()  # every label dropped in training
    with torch.no_grad():
        torch.testing.assert_close(always(x, t, y), null_out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(always.eval()(x, t, y), eval_out, rtol=1e-6, atol=1e-6)


def test_label_embedder_token_drop():
    torch.manual_seed(0)
    emb = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.5)
    assert emb.embedding_table.num_embeddings == 11  # + null class
    labels = torch.tensor([1, 2, 3, 4])
    forced = emb(labels, train=False, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    table = emb.embedding_table.weight
    torch.testing.assert_close(forced, table[torch.tensor([10, 2, 10, 4])])
    torch.testing.assert_close(emb(labels, train=False), table[labels])  # no random drop in eval
    dropped = emb.token_drop(torch.zeros(4000, dtype=torch.long))
    assert set(dropped.unique().tolist()) == {0, 10}
    assert 0.45 < (dropped == 10).float().mean().item() < 0.55

    no_cfg = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.0)
    assert no_cfg.embedding_table.num_embeddings == 10  # no null row without dropout
    torch.testing.assert_close(no_cfg(labels, train=True), no_cfg.embedding_table.weight[labels])
    with pytest.raises(ValueError, match="class_dropout_prob"):
        no_cfg(labels, train=False, force_drop_ids=torch.ones(4))


# ---------------------------------------------------------------------------------------
# Registry and config
# ---------------------------------------------------------------------------------------

PARAM_COUNTS = {"s": 32_963_360, "b": 130_512_416, "l": 458_102_816, "xl": 675_129_632}


@pytest.mark.parametrize("family", ["sit", "dit"])
@pytest.mark.parametrize("size", list(PARAM_COUNTS))
def test_parameter_counts_on_meta(family, size):
    with torch.device("meta"):
        model = models.create_model(f"{family}_{size}")
    assert model.pos_embed.is_meta
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[size]


def test_registry_names_and_aliases():
    names = models.list_models()
    assert len(names) == 24 and "sit_xl" in names and "sit_xl_4" in names and "dit_s_8" in names
    assert "sit_xl_2" not in names  # patch 2 is the plain name
    for alias, canonical in [("SiT-XL/2", "sit_xl"), ("sit_xl_2", "sit_xl"), ("DiT-B/4", "dit_b_4"),
                             ("dit-s/8", "dit_s_8"), ("SIT_L", "sit_l")]:
        assert models.resolve_name(alias) == canonical
    cfg = models.get_config("DiT-B/4")
    assert (cfg.family, cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == ("dit", 12, 768, 12, 4)
    cfg = models.get_config("sit_l")
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (24, 1024, 16, 2)
    assert (cfg.input_size, cfg.in_channels, cfg.mlp_ratio, cfg.class_dropout_prob, cfg.num_classes,
            cfg.learn_sigma) == (32, 4, 4.0, 0.1, 1000, True)
    with torch.device("meta"):
        model = models.create_model("sit_s_8", input_size=16, num_classes=7, attention="sdpa")
    assert isinstance(model.config, models.ModelConfig)
    assert (model.config.patch_size, model.config.num_tokens, model.config.num_classes) == (8, 4, 7)
    assert model.y_embedder.embedding_table.num_embeddings == 8


def test_registry_errors():
    with pytest.raises(ValueError, match="sit_xl.*dit_s_8|Valid names"):
        models.create_model("sit_xxl")
    with pytest.raises(ValueError) as info:
        models.create_model("SiT-XL/3")
    assert "sit_xl_4" in str(info.value)
    with pytest.raises(TypeError, match="hiden_size"):
        models.create_model("sit_s", hiden_size=10)
    with pytest.raises(TypeError, match="family"):
        models.create_model("sit_s", family="dit")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        models.create_model("sit_s", hidden_size=400, num_heads=6)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        models.create_model("sit_s_4", input_size=30)
    with pytest.raises(ValueError, match="attention"):
        models.create_model("sit_s", attention="fast")
    with pytest.raises(ValueError, match="class_dropout_prob"):
        models.create_model("sit_s", class_dropout_prob=1.5)
    with pytest.raises(TypeError, match="learn_sigma"):
        models.create_model("sit_s", learn_sigma="yes")


# ---------------------------------------------------------------------------------------
# Representation taps
# ---------------------------------------------------------------------------------------


def test_resolve_blocks():
    assert models.resolve_blocks("last", 12) == [11]
    assert models.resolve_blocks("all", 3) == [0, 1, 2]
    assert models.resolve_blocks("paper", 28) == [6]  # block 28 // 4 = 7, counted from 1
    assert models.resolve_blocks("paper", 12) == [2]
    assert models.resolve_blocks([5, 0, -1], 12) == [5, 0, 11]
    assert models.resolve_blocks(4, 12) == [4]
    assert models.resolve_blocks(None, 12) == []
    with pytest.raises(ValueError, match="out of range"):
        models.resolve_blocks([12], 12)
    with pytest.raises(ValueError, match="out of range"):
        models.resolve_blocks([-13], 12)
    with pytest.raises(ValueError, match="unknown block selection"):
        models.resolve_blocks("first", 12)
    with pytest.raises(ValueError, match="depth 3"):
        models.resolve_blocks("paper", 3)
    with pytest.raises(TypeError):
        models.resolve_blocks([1.0], 12)
    with pytest.raises(TypeError):
        models.resolve_blocks(True, 12)


def test_return_hidden_variants(ref):
    model = tiny(ref)
    x, t, y = ref["x"], ref["t"], ref["y"]
    acts = ref["sit_acts"]
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o)) for b in model.blocks]
    with torch.no_grad():
        plain = model(x, t, y)
        seen.clear()
        out, hidden = model(x, t, y, return_hidden=[2, 0])
    for hook in hooks:
        hook.remove()
    assert isinstance(hidden, list) and len(hidden) == 2
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # same prediction, one forward
    torch.testing.assert_close(hidden[0], acts[2], rtol=RTOL, atol=ATOL)  # in the order asked
    torch.testing.assert_close(hidden[1], acts[0], rtol=RTOL, atol=ATOL)
    assert hidden[0] is seen[2] and hidden[1] is seen[0]  # the block outputs themselves, no copies
    with torch.no_grad():
        _, last = model(x, t, y, return_hidden="last")
        _, neg = model(x, t, y, return_hidden=-1)
        _, none = model(x, t, y, return_hidden=[])
    torch.testing.assert_close(last[0], acts[-1], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(neg[0], acts[-1], rtol=RTOL, atol=ATOL)
    assert none == []
    with pytest.raises(ValueError, match="out of range"):
        model(x, t, y, return_hidden=[3])

    deeper = models.create_model("sit_s", **{**ref["config"], "depth": 8})
    with torch.no_grad():
        _, paper = deeper(x, t, y, return_hidden="paper")
        _, every = deeper(x, t, y, return_hidden="all")
    assert len(paper) == 1 and torch.equal(paper[0], every[1])  # block 8 // 4 = 2 -> index 1


def test_hidden_taps_carry_gradients(ref):
    model = tiny(ref)
    _, hidden = model(ref["x"], ref["t"], ref["y"], return_hidden="last")
    hidden[0].pow(2).mean().backward()
    assert model.blocks[2].mlp.fc2.weight.grad is not None
    assert model.final_layer.linear.weight.grad is None  # the tap sits before the final layer


# ---------------------------------------------------------------------------------------
# Second time input (MeanFlow)
# ---------------------------------------------------------------------------------------


def test_second_time_input(ref):
    x, t, y = ref["x"], ref["t"], ref["y"]
    base = tiny(ref)
    assert not any(k.startswith("h_embedder") for k in base.state_dict())
    with pytest.raises(ValueError, match="second_time_input=False"):
        base(x, t, y, h=t)

    model = models.create_model("sit_s", **ref["config"], second_time_input=True).eval()
    extra = set(model.state_dict()) - set(base.state_dict())
    assert extra == {"h_embedder.mlp.0.weight", "h_embedder.mlp.0.bias", "h_embedder.mlp.2.weight", "h_embedder.mlp.2.bias"}
    model.load_state_dict(ref["sit_state_dict"], strict=False)
    with pytest.raises(ValueError, match="pass h"):
        model(x, t, y)
    # c = t_emb + h_emb + y_emb: zero the h embedder's output layer and the model is the base model
    torch.nn.init.zeros_(model.h_embedder.mlp[2].weight)
    torch.nn.init.zeros_(model.h_embedder.mlp[2].bias)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y, h=torch.rand(4)), ref["sit_out"], rtol=RTOL, atol=ATOL)
        torch.nn.init.normal_(model.h_embedder.mlp[2].weight, std=0.05)
        c_expected = base.t_embedder(t) + model.h_embedder(t - 0.1) + base.y_embedder(y, False)
        seen = {}
        hook = model.blocks[0].adaLN_modulation.register_forward_hook(lambda m, i, o: seen.update(c=i[0]))
        out_a = model(x, t, y, h=t - 0.1)
        hook.remove()
        out_b = model(x, t, y, h=t)
    torch.testing.assert_close(seen["c"], c_expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out_a, out_b)  # h reaches the output
    assert models.flops_per_sample(model) > models.flops_per_sample(base)


# ---------------------------------------------------------------------------------------
# Attention back ends, mixed precision, activation checkpointing
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_attention_backends_match_release(ref, backend):
    model = tiny(ref, attention=backend)
    with torch.no_grad():
        torch.testing.assert_close(model(ref["x"], ref["t"], ref["y"]), ref["sit_out"], rtol=1e-5, atol=2e-6)


def test_default_path_uses_sdpa_on_cpu(ref, monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    model = tiny(ref)  # attention="auto"; CPU fp32 tensors never take the flash path
    with torch.no_grad():
        out = model(ref["x"], ref["t"], ref["y"])
    assert calls == [torch.Size([4, 4, 16, 16])] * 3  # (N, H, T, Dh), once per block
    torch.testing.assert_close(out, ref["sit_out"], rtol=RTOL, atol=ATOL)


def test_flash_dispatch_layout_with_stand_in(ref, monkeypatch):
    """The flash branch hands (N, T, H, Dh) tensors to flash_attn_func and reads the same back.

    Runs everywhere: a stand-in with flash_attn_func's calling convention replaces the real
    kernel, and the CUDA/half check is forced true, so the reshapes around it are exercised.
    """
    calls = []

    def stand_in(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append(q.shape)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    model = tiny(ref)
    for block in model.blocks:
        block.attn._flash = stand_in
    monkeypatch.setattr(dit_module, "flash_supported", lambda q: True)
    with torch.no_grad():
        out = model(ref["x"], ref["t"], ref["y"])
    assert calls == [torch.Size([4, 16, 4, 16])] * 3  # (N, T, H, Dh)
    torch.testing.assert_close(out, ref["sit_out"], rtol=RTOL, atol=ATOL)


@pytest.mark.skipif(models.flash_attn_available(), reason="flash_attn is installed; this checks the error without it")
def test_flash_backend_requires_flash_attn():
    with pytest.raises(ImportError, match="flash_attn"):
        models.create_model("sit_s", input_size=8, depth=1, attention="flash")


@pytest.mark.skipif(
    not (models.flash_attn_available() and torch.cuda.is_available()),
    reason="flash_attn is not importable or no CUDA device (optional dependency, CUDA only); "
    "the dispatch itself is covered by test_flash_dispatch_layout_with_stand_in",
)
def test_flash_attn_matches_sdpa_on_cuda():
    torch.manual_seed(0)
    flash = models.create_model("sit_s", input_size=16, depth=2, attention="flash").cuda().eval()
    sdpa = models.create_model("sit_s", input_size=16, depth=2, attention="sdpa").cuda().eval()
    for p in flash.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    sdpa.load_state_dict(flash.state_dict())
    x, t, y = torch.randn(4, 4, 16, 16, device="cuda"), torch.rand(4, device="cuda"), torch.arange(4, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref_out = sdpa(x, t, y)
        out = flash(x, t, y)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=2e-2, atol=2e-2)
    flash.cpu()
    with pytest.raises(RuntimeError, match="CUDA fp16/bf16"):  # fp32 CPU tensors cannot use it
        flash(x.cpu(), t.cpu(), y.cpu())


def test_bf16_autocast_keeps_norms_and_residual_in_fp32(ref):
    model = tiny(ref)
    x, t, y = ref["x"], ref["t"], ref["y"]
    seen = {}
    hook = model.blocks[1].norm1.register_forward_hook(lambda m, i, o: seen.update(norm=o.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, hidden = model(x, t, y, return_hidden="last")
    hook.remove()
    assert seen["norm"] == torch.float32 and hidden[0].dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref["sit_out"], rtol=0.05, atol=0.05)
    # a model cast to bf16 also runs (fp32 timestep features are cast to the weights' dtype)
    with torch.no_grad():
        out16 = model.to(torch.bfloat16)(x.bfloat16(), t, y)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), ref["sit_out"], rtol=0.05, atol=0.05)


def test_gradient_checkpointing_same_gradients(ref, monkeypatch):
    def run(model):
        x = ref["x"].clone().requires_grad_(True)
        out, hidden = model(x, ref["t"], ref["y"], return_hidden=[0, 2])
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + hidden[0].square().mean()
        loss.backward()
        return x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain = tiny(ref)  # eval mode: no random label dropout, so the two runs see equal inputs
    ckpt = tiny(ref, grad_checkpointing=True)
    calls = []
    real = dit_module.checkpoint
    monkeypatch.setattr(dit_module, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    gx_ref, grads_ref = run(plain)
    assert calls == []
    gx, grads = run(ckpt)
    assert calls == [{"use_reentrant": False}] * 3  # every block recomputed, non-reentrant
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-7)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # no recompute bookkeeping without grad
        calls.clear()
        ckpt(ref["x"], ref["t"], ref["y"])
    assert calls == []
    plain.set_grad_checkpointing(True)
    assert plain.config.grad_checkpointing


# ---------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------

# The papers' "GFLOPs" per 256x256 image (anchors.md) are multiply-accumulates.
PAPER_GMACS = {"s": 6.1, "b": 23.0, "l": 81.0, "xl": 118.6}


@pytest.mark.parametrize("size", list(PAPER_GMACS))
def test_flops_against_papers(size):
    cfg = models.get_config(f"sit_{size}")
    macs = models.macs_per_sample(cfg)
    assert abs(macs / 1e9 - PAPER_GMACS[size]) / PAPER_GMACS[size] < 0.02
    assert models.flops_per_sample(cfg) == 2 * macs
    assert models.flops_per_sample(cfg, backward=True) == 3 * 2 * macs
    if size == "xl":
        assert abs(models.flops_per_sample(cfg) / 1e9 - 237.2) < 0.5  # 2 x 118.6


def test_flops_formula_matches_torch_flop_counter(ref):
    from torch.utils.flop_counter import FlopCounterMode

    for overrides in ({}, {"second_time_input": True, "learn_sigma": False, "patch_size": 4}):
        model = models.create_model("sit_s", **{**ref["config"], "attention": "math", **overrides}).eval()
        h = {"h": ref["t"]} if overrides else {}
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(ref["x"], ref["t"], ref["y"], **h)
        assert counter.get_total_flops() == 4 * models.flops_per_sample(model)
    assert models.flops_per_sample(torch.compile(model)) == models.flops_per_sample(model.config)
    with pytest.raises(TypeError):
        models.flops_per_sample("sit_xl")
