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
    with pytest.raises(ValueError, match="match no registry size.*pass the model name"):
        models.load_model(path)  # depth 3 / hidden 64 is no registry size: nothing to guess


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


# ---- recognising a bare state_dict from its shapes -----------------------------------


def _meta_state_dict(name: str, **kw) -> dict[str, torch.Tensor]:
    with torch.device("meta"):  # shapes only: an XL model without allocating it
        return models.create_model(name, **kw).state_dict()


@pytest.mark.parametrize("filename, name, kw", [
    ("SiT-XL-2-256.pt", "sit_xl", {}),                                  # the SiT release's file
    ("DiT-XL-2-256x256.pt", "dit_xl", {}),                              # the DiT release's file
    ("DiT-XL-2-512x512.pt", "dit_xl", {"input_size": 64}),
    ("my_sit_b_4_run.pt", "sit_b_4", {"learn_sigma": False, "num_classes": 100}),
    ("dit-l-8.pt", "dit_l_8", {"in_channels": 8, "mlp_ratio": 2.0}),
])
def test_bare_state_dict_is_recognised_from_its_shapes(filename, name, kw):
    config, how = models.infer_config(_meta_state_dict(name, **kw), filename)
    assert config == models.get_config(name, **kw)
    assert models.release_name(name) in how and "recognised from the state_dict's shapes" in how


def test_meanflow_weights_are_a_sit_whatever_the_file_name():
    config, how = models.infer_config(_meta_state_dict("sit_b_4", second_time_input=True, learn_sigma=False),
                                      "checkpoint.pt")
    assert config == models.get_config("sit_b_4", second_time_input=True, learn_sigma=False)
    assert "h_embedder" in how


def test_unrecognisable_shapes_list_the_candidates():
    with pytest.raises(ValueError, match="fit sit_xl or dit_xl.*--model sit_xl or --model dit_xl"):
        models.infer_config(_meta_state_dict("sit_xl"), "ema_weights.pt")  # the name does not say
    with pytest.raises(ValueError, match="match no registry size: s .* xl \\(depth 28, hidden 1152\\)"):
        models.infer_config(_meta_state_dict("sit_xl", depth=20), "SiT.pt")
    with pytest.raises(ValueError, match="cannot recognise a SiT/DiT"):
        models.infer_config({"weight": torch.zeros(2)})


def test_load_model_of_a_bare_release_file_without_a_name(tmp_path):
    model = models.create_model("sit_s", input_size=8, num_classes=10)
    path = tmp_path / "SiT-S-2-64.pt"
    torch.save(model.state_dict(), path)  # a bare EMA state_dict, as the SiT release ships
    loaded = models.load_model(path)
    assert loaded.config == model.config
    with pytest.raises(TypeError, match="either config= or name="):
        models.load_model(path, "sit_s", config=model.config)
