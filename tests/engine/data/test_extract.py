"""Image folder -> latents through a tiny, randomly initialised diffusers AutoencoderKL."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is needed to build the test VAE")
from PIL import Image  # noqa: E402

from engine.data.extract import (  # noqa: E402
    ExtractConfig,
    center_crop_arr,
    extract,
    list_images,
    load_image,
)
from engine.data.format import open_latent_dataset  # noqa: E402
from engine.data.vae import load_vae  # noqa: E402
from engine.extract_latents import main  # noqa: E402

SIZE = 16  # image side; the 2-level VAE halves it once -> 8x8 latents
CLASSES = ["b_cls", "a_cls", "c_cls"]  # created out of order: labels follow sorted names


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), norm_num_groups=4, sample_size=SIZE,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """7 images of assorted sizes and formats in 3 class folders, plus a stray text file."""
    root = tmp_path_factory.mktemp("images") / "train"
    rng = np.random.default_rng(0)
    sizes = {"b_cls": [(40, 30), (16, 16)], "a_cls": [(20, 50), (64, 64), (33, 17)],
             "c_cls": [(24, 24), (70, 35)]}
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        for k, (w, h) in enumerate(sizes[cls]):
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            ext = ".JPEG" if k % 2 == 0 else ".png"
            img.save(root / cls / f"img{k}{ext}")
    (root / "a_cls" / "notes.txt").write_text("not an image")
    return root


def _cfg(image_root: Path, vae_dir: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(images=image_root, vae=vae_dir, out=out, image_size=SIZE, batch_size=2,
                chunk_size=3, num_workers=0, dtype="float32", progress=False)
    return ExtractConfig(**{**base, **kw})


def _reference(image_root: Path, vae_dir: Path, flip: bool = False) -> tuple[np.ndarray, list[int]]:
    """Posterior means of each preprocessed image, computed directly."""
    files, labels, _ = list_images(image_root)
    vae = load_vae(vae_dir)
    x = torch.stack([load_image(f, SIZE) for f in files])  # (7, 3, 16, 16)
    if flip:
        x = x.flip(-1)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean * 0.18215
    return z.numpy(), labels


def test_list_images_sorted_classes(image_root: Path) -> None:
    files, labels, classes = list_images(image_root)
    assert classes == ["a_cls", "b_cls", "c_cls"]
    assert labels == [0, 0, 0, 1, 1, 2, 2]
    assert [f.parent.name for f in files] == ["a_cls"] * 3 + ["b_cls"] * 2 + ["c_cls"] * 2
    assert all(f.suffix in (".JPEG", ".png") for f in files)


def test_center_crop_is_adm(tmp_path: Path) -> None:
    # Red channel = 6 * column. 40x20 -> one BOX halving (short side 20 >= 2 * 10) -> 20x10
    # where column c averages source columns 2c, 2c + 1 -> 12c + 3; then the center 10 columns.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[..., 0] = 6 * np.arange(40)
    out = center_crop_arr(Image.fromarray(arr), 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[3, :, 0], 12 * np.arange(5, 15) + 3)
    # Upscaling path (BICUBIC only): short side becomes the target, then the center crop.
    assert center_crop_arr(Image.fromarray(arr[:5, :9]), 10).shape == (10, 10, 3)
    # load_image: the same crop, channels first, uint8 mapped by v / 127.5 - 1.
    Image.fromarray(arr).save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", 10)
    assert x.shape == (3, 10, 10) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), out.transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-6)


def test_extract_posterior_mean(image_root: Path, vae_dir: Path, tmp_path: Path) -> None:
    out = extract(_cfg(image_root, vae_dir, tmp_path / "lat", use_mean=True))
    ds = open_latent_dataset(out)
    m = ds.manifest
    assert len(ds) == 7 and m.shape == (4, 8, 8) and m.num_classes == 3
    assert m.scale_factor == 0.18215 and m.scale_applied and not m.flipped_copies
    assert m.extra["classes"] == ["a_cls", "b_cls", "c_cls"]
    z_ref, labels = _reference(image_root, vae_dir)
    x, y = ds.get_batch(np.arange(7))
    np.testing.assert_allclose(x, z_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y, labels)
    assert not (tmp_path / "lat.parts").exists()  # work chunks removed after the merge


def test_extract_flipped_copies(image_root: Path, vae_dir: Path, tmp_path: Path) -> None:
    out = extract(_cfg(image_root, vae_dir, tmp_path / "lat", use_mean=True, flipped_copies=True,
                       dtype="float16"))
    ds = open_latent_dataset(out)
    assert len(ds) == 14 and ds.manifest.flipped_copies and ds.manifest.dtype == "float16"
    x, y = ds.get_batch(np.arange(14))
    z, labels = _reference(image_root, vae_dir)
    zf, _ = _reference(image_root, vae_dir, flip=True)
    np.testing.assert_allclose(x[0::2].astype(np.float32), z, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(x[1::2].astype(np.float32), zf, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(y, np.repeat(labels, 2))


def test_two_ranks_resume_and_match_one_rank(image_root: Path, vae_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Posterior samples (not means): the noise is seeded per chunk, so the result must
    # not depend on how many ranks did the work.
    single = open_latent_dataset(extract(_cfg(image_root, vae_dir, tmp_path / "one", seed=5)))
    out = tmp_path / "two"
    # Rank 0 first: it encodes chunks 0 and 2, then times out waiting for rank 1's chunk 1.
    with pytest.raises(TimeoutError, match=r"chunks \[1\] still missing"):
        extract(_cfg(image_root, vae_dir, out, seed=5, rank=0, world_size=2, merge_timeout=0.2))
    parts = tmp_path / "two.parts"
    assert sorted(p.name for p in parts.glob("chunk-*.npz")) == ["chunk-000000.npz", "chunk-000002.npz"]
    assert not out.exists()
    assert extract(_cfg(image_root, vae_dir, out, seed=5, rank=1, world_size=2)) is None
    # Rerun rank 0: its chunks are complete, so nothing is encoded again, only merged.
    import engine.data.extract as ex

    def no_encoding(*a, **k):
        raise AssertionError("a finished chunk was encoded again")

    monkeypatch.setattr(ex, "encode", no_encoding)
    merged = open_latent_dataset(extract(_cfg(image_root, vae_dir, out, seed=5, rank=0, world_size=2)))
    idx = np.arange(7)
    np.testing.assert_array_equal(merged.get_batch(idx)[0], single.get_batch(idx)[0])
    np.testing.assert_array_equal(merged.get_batch(idx)[1], single.get_batch(idx)[1])
    # A sample differs from the mean, so the posterior really was sampled.
    z_mean, _ = _reference(image_root, vae_dir)
    assert not np.allclose(single.get_batch(idx)[0], z_mean, atol=1e-4)


def test_changed_settings_do_not_mix_with_old_chunks(image_root: Path, vae_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "lat"
    with pytest.raises(TimeoutError):
        extract(_cfg(image_root, vae_dir, out, rank=0, world_size=2, merge_timeout=0.1))
    with pytest.raises(ValueError, match=r"different settings \['use_mean'\]"):
        extract(_cfg(image_root, vae_dir, out, rank=1, world_size=2, use_mean=True))


def test_missing_vae_is_a_clear_error(image_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_vae(tmp_path / "no-such-vae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(tmp_path / "empty")


def test_existing_output_refused(image_root: Path, vae_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "lat").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        extract(_cfg(image_root, vae_dir, tmp_path / "lat"))


def test_cli(image_root: Path, vae_dir: Path, tmp_path: Path) -> None:
    main(["--images", str(image_root), "--vae", str(vae_dir), "--out", str(tmp_path / "cli"),
          "--image-size", str(SIZE), "--batch-size", "4", "--num-workers", "0", "--device", "cpu",
          "--use-mean", "--no-progress", "--rank", "0", "--world-size", "1"])
    ds = open_latent_dataset(tmp_path / "cli")
    assert len(ds) == 7 and ds.manifest.dtype == "float16"
    assert os.listdir(tmp_path) == ["cli"]
