"""engine.sample: the CLI on tiny checkpoints (PNG, ADM .npz, shards, resume, ranks) and
the image helpers."""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from engine.sampling.images import make_grid, render_latents, save_npz, to_uint8
from engine.config.flags import config_to_dict
from engine.training.config import TrainConfig
from engine.sample import main
from engine.sampling.generate import sample_images
from engine.sampling.guidance import Guidance
from engine.sampling.samplers import SamplerConfig
from engine.diffusion.transport import LossWeight, PathType, Prediction, TransportConfig
from tests.conftest import REPO

TINY = dict(input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def tiny(family: str = "sit", **kw) -> torch.nn.Module:
    model = models.create_model(f"{family}_s", **{**TINY, **kw})
    with torch.no_grad():  # non-zero outputs (the release init zeroes the final layer)
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    return model


def save_ckpt(path: Path, model: torch.nn.Module, **extra) -> Path:
    sd = model.state_dict()
    torch.save({"model": sd, "ema": sd, "config": model.config.to_dict(), **extra}, path)
    return path


@pytest.fixture
def sit_ckpt(tmp_path) -> Path:
    return save_ckpt(tmp_path / "sit.pt", tiny())


def run(ckpt: Path, out: Path, *extra: str) -> dict:
    return main(["--ckpt", str(ckpt), "--out", str(out), "--no-progress", "--sampler", "ode",
                 "--method", "euler", "--num-steps", "3", *extra])


def shard_times(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "shards").glob("*.npz"))}


# ---- the CLI ---------------------------------------------------------------------------


def test_writes_png_and_npz_and_resumes(sit_ckpt, tmp_path):
    out = tmp_path / "out"
    paths = run(sit_ckpt, out, "--num-samples", "10", "--batch-size", "3", "--shard-size", "4",
                "--cfg-scale", "2.0")
    with np.load(paths["npz"]) as z:
        images, labels = z["arr_0"], z["labels"]
    assert paths["npz"].name == "samples_10x8x8x3.npz"
    assert images.shape == (10, 8, 8, 3) and images.dtype == np.uint8
    assert labels.shape == (10,) and labels.min() >= 0 and labels.max() < 10
    assert images.std() > 0  # not a blank render
    # 1-channel latents render as greyscale
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all()
    from PIL import Image

    with Image.open(paths["grid"]) as grid:
        assert grid.mode == "RGB" and min(grid.size) >= 256  # small grids are enlarged to be seen
    first = shard_times(out)
    assert list(first) == ["shard_00000_n4.npz", "shard_00001_n4.npz", "shard_00002_n2.npz"]

    # resume: only the missing shard is sampled again, and with the same numbers
    (out / "shards" / "shard_00001_n4.npz").unlink()
    paths = run(sit_ckpt, out, "--num-samples", "10", "--batch-size", "3", "--shard-size", "4",
                "--cfg-scale", "2.0")
    again = shard_times(out)
    assert again["shard_00000_n4.npz"] == first["shard_00000_n4.npz"]
    assert again["shard_00002_n2.npz"] == first["shard_00002_n2.npz"]
    with np.load(paths["npz"]) as z:
        assert np.array_equal(z["arr_0"], images)

    # more samples later: done shards are kept, the short last shard is redone full size
    paths = run(sit_ckpt, out, "--num-samples", "12", "--batch-size", "3", "--shard-size", "4",
                "--cfg-scale", "2.0")
    more = shard_times(out)
    assert more["shard_00000_n4.npz"] == first["shard_00000_n4.npz"] and "shard_00002_n4.npz" in more
    with np.load(paths["npz"]) as z:
        assert z["arr_0"].shape == (12, 8, 8, 3) and np.array_equal(z["arr_0"][:8], images[:8])


def test_other_settings_in_the_same_folder_are_refused(sit_ckpt, tmp_path):
    out = tmp_path / "out"
    run(sit_ckpt, out, "--num-samples", "2")
    with pytest.raises(ValueError, match="other settings.*seed"):
        run(sit_ckpt, out, "--num-samples", "2", "--seed", "1")


def test_fixed_classes_and_dit_ddim(tmp_path):
    ckpt = save_ckpt(tmp_path / "dit.pt", tiny("dit"))
    paths = main(["--ckpt", str(ckpt), "--out", str(tmp_path / "o"), "--no-progress", "--sampler", "ddim",
                  "--num-steps", "4", "--num-samples", "5", "--classes", "3,7", "--cfg-scale", "1.5",
                  "--guidance-channels", "all", "--render", "minmax"])
    with np.load(paths["npz"]) as z:
        assert z["labels"].tolist() == [3, 7, 3, 7, 3] and z["arr_0"].shape == (5, 8, 8, 3)
    with pytest.raises(ValueError, match="sampler 'ode' is for SIT models, but this is a DIT model"):
        main(["--ckpt", str(ckpt), "--out", str(tmp_path / "p"), "--sampler", "ode"])
    with pytest.raises(ValueError, match=r"SampleJob.classes must be labels in \[0, 9\], got \(3, 12\)"):
        main(["--ckpt", str(ckpt), "--out", str(tmp_path / "q"), "--classes", "3,12"])


def test_guidance_without_null_class_is_refused(tmp_path):
    ckpt = save_ckpt(tmp_path / "nonull.pt", tiny(class_dropout_prob=0.0))
    with pytest.raises(ValueError, match="needs a null class"):
        run(ckpt, tmp_path / "o", "--cfg-scale", "4")


def test_wrong_architecture_names_the_keys(tmp_path):
    ckpt = tmp_path / "bare.pt"
    torch.save(tiny().state_dict(), ckpt)  # a bare state_dict of a 2-block, 32-wide model
    with pytest.raises(models.CheckpointMismatchError) as err:
        run(ckpt, tmp_path / "o", "--model", "sit_s")  # 12 blocks, 384 wide
    message = str(err.value)
    assert "missing keys" in message and "blocks.2.attn.qkv.weight" in message
    assert "mis-shaped keys" in message and "pos_embed" in message


def test_bare_release_file_needs_no_model_flag(tmp_path, capsys):
    """The release ships SiT-XL-2-256.pt as a bare EMA state_dict: the command tells the model
    from the shapes and the file name, and says what it found."""
    path = tmp_path / "SiT-S-2-64.pt"
    torch.save(models.create_model("sit_s", input_size=8, num_classes=10).state_dict(), path)
    run(path, tmp_path / "o", "--num-samples", "1", "--num-steps", "2")
    assert "model: SiT-S/2 recognised from the state_dict's shapes (depth 12, hidden 384" in capsys.readouterr().out
    anonymous = tmp_path / "weights.pt"
    torch.save(torch.load(path, weights_only=True), anonymous)
    with pytest.raises(ValueError, match="fit sit_s or dit_s"):
        run(anonymous, tmp_path / "o2", "--num-samples", "1")


@pytest.mark.parametrize("sampler, method, steps", [("sde", "euler", 250), ("ode", "euler", 250),
                                                   ("ode", "rk4", 250), ("ddpm", None, 250)])
def test_default_steps_are_the_releases(tmp_path, sampler, method, steps):
    family = "dit" if sampler == "ddpm" else "sit"
    ckpt = save_ckpt(tmp_path / f"{family}.pt", tiny(family))
    extra = ["--method", method] if method else []
    main(["--ckpt", str(ckpt), "--out", str(tmp_path / "o"), "--no-progress", "--num-samples", "1",
          "--sampler", sampler, *extra])
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["sampler"]["num_steps"] == steps


def test_unknown_sampler_name(sit_ckpt, tmp_path, capsys):
    for flag, name in (("--sampler", "heun"), ("--method", "rk45"), ("--last-step", "median")):
        with pytest.raises(SystemExit) as err:
            main(["--ckpt", str(sit_ckpt), "--out", str(tmp_path / "o"), flag, name])
        assert err.value.code == 2
        assert f"argument {flag}: '{name}' is not one of: " in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown SDE method 'rk4'.*'euler', 'heun'"):  # an ODE method for the SDE
        main(["--ckpt", str(sit_ckpt), "--out", str(tmp_path / "o"), "--sampler", "sde", "--method", "rk4"])


def test_sampler_and_guidance_flags_are_the_configs_fields(sit_ckpt, tmp_path, capsys):
    """Only the flags given override: the kind follows the model, the steps and the method the kind."""
    main(["--ckpt", str(sit_ckpt), "--out", str(tmp_path / "a"), "--no-progress", "--num-samples", "1",
          "--sampler", "SDE", "--method", "Heun", "--num-steps", "3", "--last-step", "tweedie",
          "--cfg-scale", "2", "--guidance-channels", "1", "--guidance-interval", "0.1", "0.9"])
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["sampler"] == config_to_dict(SamplerConfig(kind="sde", method="heun", num_steps=3,
                                                               last_step="tweedie"))
    assert manifest["guidance"] == {"scale": 2.0, "channels": 1, "interval": [0.1, 0.9]}
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines where it likes
    for shown in ("{euler,midpoint,heun,rk4,dopri5}", "{ode,sde,ddpm,ddim,meanflow}", "{none,mean,tweedie,euler}",
                  "--clip-denoised", "--cfg-scale", "--guidance-channels", "--guidance-interval",
                  "default: the model's"):
        assert shown in text, shown


def test_transport_comes_from_release_args_unless_overridden():
    ckpt = {"args": argparse.Namespace(path_type="GVP", prediction="noise", train_eps=None, sample_eps=None)}
    cfg = TransportConfig.of_checkpoint(ckpt)
    assert cfg.path is PathType.GVP and cfg.prediction is Prediction.NOISE
    cfg = TransportConfig.of_checkpoint(ckpt, path="linear", prediction="velocity")
    assert cfg.path is PathType.LINEAR and cfg.prediction is Prediction.VELOCITY


def _project_args(**transport) -> dict:
    """The ``args`` the trainer writes into its release-format checkpoints."""
    return {"model": "SiT-S/2", "train_config": config_to_dict(TrainConfig(transport=TransportConfig(**transport)))}


def test_transport_reader_order_flags_saved_config_release_args_defaults():
    saved = _project_args(path="vp", prediction="noise", loss_weight="likelihood", sample_eps=0.002)
    # this project's saved config beats the release's keys in the same args
    ckpt = {"args": {**saved, "path_type": "GVP", "prediction": "score"}}
    cfg = TransportConfig.of_checkpoint(ckpt)
    assert (cfg.path, cfg.prediction, cfg.loss_weight, cfg.sample_eps) == (
        PathType.VP, Prediction.NOISE, LossWeight.LIKELIHOOD, 0.002)
    # flags beat both; asking for velocity drops the saved noise run's loss weight
    cfg = TransportConfig.of_checkpoint(ckpt, path="gvp", prediction="velocity", sample_eps=None)
    assert (cfg.path, cfg.prediction, cfg.loss_weight, cfg.sample_eps) == (
        PathType.GVP, Prediction.VELOCITY, LossWeight.NONE, 0.002)
    # nothing recorded: the defaults
    assert TransportConfig.of_checkpoint({"model": {}}) == TransportConfig()
    assert TransportConfig.of_checkpoint({"args": argparse.Namespace(model="SiT-XL/2")}) == TransportConfig()
    with pytest.raises(TypeError, match="unknown TransportConfig field"):
        TransportConfig.of_checkpoint({}, path_type="gvp")


def test_project_checkpoint_samples_with_its_trained_transport(tmp_path):
    """A GVP/noise run of this trainer, sampled with no transport flags == asking for it explicitly."""
    ckpt = save_ckpt(tmp_path / "gvp.pt", tiny(), args=_project_args(path="gvp", prediction="noise"))
    common = ("--num-samples", "4", "--seed", "3", "--render", "minmax")

    def images(out: str, *flags: str) -> np.ndarray:
        with np.load(run(ckpt, tmp_path / out, *common, *flags)["npz"]) as z:
            return z["arr_0"]

    implicit = images("implicit")
    explicit = images("explicit", "--transport-path", "gvp", "--transport-prediction", "noise")
    linear = images("linear", "--transport-path", "linear", "--transport-prediction", "velocity")
    np.testing.assert_array_equal(implicit, explicit)
    assert not np.array_equal(implicit, linear)
    manifest = (tmp_path / "implicit" / "manifest.json").read_text()
    assert '"path": "gvp"' in manifest and '"prediction": "noise"' in manifest


def test_transport_flags_are_spelt_like_training_and_accept_release_spellings(tmp_path, capsys):
    ckpt = save_ckpt(tmp_path / "sit.pt", tiny())
    run(ckpt, tmp_path / "a", "--num-samples", "1", "--transport-path", "gvp", "--transport-sample-eps", "0.01")
    run(ckpt, tmp_path / "b", "--num-samples", "1", "--path-type", "GVP", "--sample-eps", "0.01")
    assert (tmp_path / "a" / "manifest.json").read_text().replace("/a/", "/b/") == \
        (tmp_path / "b" / "manifest.json").read_text()
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--transport-path", "--transport-prediction", "--transport-sample-eps", "--path-type"):
        assert flag in text, flag


def test_vae_decoding(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="VAE decoding needs the optional diffusers package")
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2,
                                  block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    vae.save_pretrained(tmp_path / "vae")  # a local directory: nothing is downloaded
    ckpt = save_ckpt(tmp_path / "sit4.pt", tiny(in_channels=4))
    paths = run(ckpt, tmp_path / "o", "--num-samples", "3", "--vae", str(tmp_path / "vae"))
    with np.load(paths["npz"]) as z:
        assert z["arr_0"].shape == (3, 16, 16, 3) and z["arr_0"].dtype == np.uint8  # 8x8 latents, x2 decoder


def test_script_and_module_entry_points(sit_ckpt, tmp_path):
    common = ["--ckpt", str(sit_ckpt), "--num-samples", "2", "--sampler", "sde", "--num-steps", "3",
              "--no-progress"]
    env = {**os.environ, "PYTHONPATH": ""}
    for entry in (["engine/sample.py"], ["-m", "engine.sample"]):
        out = tmp_path / entry[-1].replace("/", "_")
        proc = subprocess.run([sys.executable, *entry, *common, "--out", str(out)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert (out / "grid.png").is_file() and (out / "samples_2x8x8x3.npz").is_file()


def test_user_mistakes_are_one_line_not_a_traceback(tmp_path):
    anonymous = tmp_path / "weights.pt"
    torch.save(models.create_model("sit_s", input_size=8, num_classes=10).state_dict(), anonymous)
    for extra, message in ((["--ckpt", str(anonymous)], "fit sit_s or dit_s"),
                           (["--ckpt", str(tmp_path / "missing.pt")], "No such file"),
                           (["--ckpt", str(anonymous), "--model", "sit_s", "--num-samples", "0"],
                            "SampleJob.num_samples must be an int >= 1, got 0")):
        proc = subprocess.run([sys.executable, "-m", "engine.sample", *extra, "--out", str(tmp_path / "o")],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr
        assert proc.stderr.startswith("python -m engine.sample: error: ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_match_one(sit_ckpt, tmp_path):
    """Two gloo ranks split the shards; rank 0 merges; the result equals a 1-process run."""
    args = ["--ckpt", str(sit_ckpt), "--num-samples", "7", "--shard-size", "2", "--batch-size", "2",
            "--sampler", "ode", "--method", "euler", "--num-steps", "3", "--no-progress"]
    one = run(sit_ckpt, tmp_path / "one", *args[2:])
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": "",
               "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, "-m", "engine.sample", *args, "--out",
                                       str(tmp_path / "two")], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    with np.load(one["npz"]) as a, np.load(tmp_path / "two" / "samples_7x8x8x3.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])


# ---- Python API and image helpers ------------------------------------------------------


def test_sample_images_api():
    model = tiny().train()
    kwargs = dict(sampler=SamplerConfig(kind="ode", method="euler", num_steps=3), guidance=Guidance(1.5),
                  batch_size=2, seed=0)
    a = sample_images(model, [1, 2, 3], **kwargs)
    assert a.shape == (3, 8, 8, 3) and a.dtype == np.uint8
    assert model.training  # mode restored
    assert np.array_equal(a, sample_images(model, torch.tensor([1, 2, 3]), **kwargs))
    with pytest.raises(ValueError, match="at least one label"):
        sample_images(model, [])


def test_render_latents():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2)
    gray = render_latents(x)
    assert gray.shape == (1, 2, 2, 3) and gray[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
    assert (gray[..., 0] == gray[..., 2]).all()
    span = render_latents(x, "minmax")
    assert span.min() == 0 and span.max() == 255
    four = torch.stack([torch.full((2, 2), v) for v in (-1.0, 0.0, 1.0, 0.5)]).unsqueeze(0)  # (1, 4, 2, 2)
    rgb = render_latents(four)
    assert rgb[0, 0, 0].tolist() == [0, 128, 255]  # first 3 channels as R, G, B
    with pytest.raises(ValueError, match="render mode"):
        render_latents(x, "sigmoid")


def test_uint8_mapping_and_grid(tmp_path):
    img = to_uint8(torch.tensor([-1.0, 1.0, 0.0]).view(1, 3, 1, 1))
    assert img.tolist() == [[[[0, 255, 128]]]]
    grid = make_grid(np.zeros((5, 4, 4, 3), np.uint8), padding=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)  # 5 images: 3 columns, 2 rows
    with pytest.raises(ValueError, match="uint8"):
        save_npz(tmp_path / "x.npz", np.zeros((1, 4, 4, 3), np.float32))
