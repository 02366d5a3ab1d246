"""Checkpoint loading: bare state_dicts, the releases' layout, this project's layout, errors."""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch

import models

TINY = dict(input_size=8, hidden_size=64, depth=3, num_heads=4, num_classes=10)


@pytest.fixture(scope="module")
def ref(release_fixtures) -> dict:
    return release_fixtures


def release_args(**extra) -> argparse.Namespace:
    """Training args as the releases pickle them (an argparse.Namespace)."""
    return argparse.Namespace(model="SiT-S/2", image_size=64, num_classes=10, global_batch_size=256,
                              path_type="Linear", prediction="velocity", **extra)


def perturbed(state_dict: dict, delta: float) -> dict:
    return {k: (v if k == "pos_embed" else v + delta) for k, v in state_dict.items()}


def sit_output(model, ref) -> torch.Tensor:
    with torch.no_grad():
        return model(ref["x"], ref["t"], ref["y"])


def test_bare_state_dict_file(ref, tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(ref["sit_state_dict"], path)
    sd = models.load_state_dict_from_checkpoint(path)
    assert sd.keys() == ref["sit_state_dict"].keys()
    model = models.load_model(path, "sit_s", **TINY)
    assert not model.training
    torch.testing.assert_close(sit_output(model, ref), ref["sit_out"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pass name="):
        models.load_model(path)


def test_release_layout_with_namespace_args(ref, tmp_path):
    ema = ref["sit_state_dict"]
    raw = perturbed(ema, 0.01)
    model = models.create_model("sit_s", **TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(ref["x"], ref["t"], ref["y"]).sum().backward()
    opt.step()
    path = tmp_path / "0050000.pt"
    torch.save({"model": raw, "ema": ema, "opt": opt.state_dict(), "args": release_args()}, path)

    # Plain weights_only loading rejects the Namespace; ours allow-lists it.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(models.load_checkpoint_file(path)["args"], argparse.Namespace)

    sd = models.load_state_dict_from_checkpoint(path)  # EMA by default
    torch.testing.assert_close(sd["blocks.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])
    sd = models.load_state_dict_from_checkpoint(path, prefer="model")
    torch.testing.assert_close(sd["blocks.0.attn.qkv.weight"], raw["blocks.0.attn.qkv.weight"])

    # args.model = "SiT-S/2", image_size 64 -> input_size 8, num_classes 10; width from overrides
    model = models.load_model(path, hidden_size=64, depth=3, num_heads=4)
    assert model.config.input_size == 8 and model.config.num_classes == 10
    torch.testing.assert_close(sit_output(model, ref), ref["sit_out"], rtol=1e-5, atol=1e-6)
    raw_model = models.load_model(path, "sit_s", prefer="model", hidden_size=64, depth=3, num_heads=4)
    assert not torch.allclose(sit_output(raw_model, ref), ref["sit_out"])


def test_project_layout_with_prefixes_and_config(ref, tmp_path):
    ema = ref["sit_state_dict"]
    config = models.get_config("sit_s", **TINY)
    ckpt = {
        "model": {f"module.{k}": v for k, v in perturbed(ema, 0.02).items()},  # DDP / DeepSpeed
        "ema": {f"_orig_mod.{k}": v for k, v in ema.items()},  # torch.compile
        "opt": {},
        "args": {"model": "sit_s"},
        "config": config.to_dict(),
        "step": 1234,
    }
    path = tmp_path / "step_0001234.pt"
    torch.save(ckpt, path)
    sd = models.load_state_dict_from_checkpoint(path)
    assert sd.keys() == ema.keys()
    model = models.load_model(path)  # architecture from the saved config
    assert model.config == config
    torch.testing.assert_close(sit_output(model, ref), ref["sit_out"], rtol=1e-5, atol=1e-6)
    sd = models.load_state_dict_from_checkpoint(ckpt, prefer="model")  # an in-memory dict works too
    torch.testing.assert_close(sd["pos_embed"], ema["pos_embed"])
    assert not torch.equal(sd["y_embedder.embedding_table.weight"], ema["y_embedder.embedding_table.weight"])
    stacked = {f"_orig_mod.module.{k}": v for k, v in ema.items()}
    assert models.load_state_dict_from_checkpoint(stacked).keys() == ema.keys()


def test_missing_ema_falls_back_with_warning(ref):
    with pytest.warns(UserWarning, match="no 'ema'"):
        sd = models.load_state_dict_from_checkpoint({"model": ref["sit_state_dict"], "args": None})
    assert sd.keys() == ref["sit_state_dict"].keys()
    with pytest.raises(ValueError, match="prefer"):
        models.load_state_dict_from_checkpoint(ref["sit_state_dict"], prefer="best")
    with pytest.raises(KeyError, match="no state_dict"):
        models.load_state_dict_from_checkpoint({"opt": {}, "step": 3})


def test_mismatch_errors_name_the_keys(ref, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": ref["sit_state_dict"], "ema": ref["sit_state_dict"]}, path)
    with pytest.raises(models.CheckpointMismatchError) as info:
        models.load_model(path, "sit_s", **{**TINY, "depth": 2})
    msg = str(info.value)
    assert "unexpected keys (10)" in msg and "blocks.2.attn.qkv.weight" in msg and "depth" in msg

    with pytest.raises(models.CheckpointMismatchError) as info:
        models.load_model(path, "sit_s", **{**TINY, "num_classes": 20})
    msg = str(info.value)
    assert "mis-shaped keys (1)" in msg
    assert "y_embedder.embedding_table.weight: checkpoint (11, 64) vs model (21, 64)" in msg

    with pytest.raises(models.CheckpointMismatchError) as info:
        models.load_model(path, "sit_s", **TINY, second_time_input=True)
    msg = str(info.value)
    assert "missing keys (4)" in msg and "h_embedder.mlp.0.weight" in msg and "second_time_input" in msg

    with pytest.raises(models.CheckpointMismatchError, match="learn_sigma"):
        models.load_model(path, "sit_s", **TINY, learn_sigma=False)

    model = models.create_model("sit_s", **TINY)
    assert models.describe_mismatch(model, ref["sit_state_dict"]) is None
    models.load_weights(model, ref["sit_state_dict"])
