"""Built-in datasets in the latent format: scikit-learn's digits, and synthetic latents.

Digits: sklearn.datasets.load_digits ships 1,797 greyscale 8x8 images of the digits 0-9
inside the package (no download). Pixel values are integers 0..16; we map them to
[-1, 1] with v / 8 - 1 and upsample to size x size with bilinear interpolation
(torch.nn.functional.interpolate, align_corners=False, no antialiasing). Bilinear
interpolation takes convex combinations, so values stay within [-1, 1]. The result is
stored as (1, size, size) float32 "latents" with scale_factor 1.0 (pixels, not VAE
latents), so a tiny SiT can train on it end to end on a CPU.

``python -m engine.digits OUT_DIR`` writes the digits dataset.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.config.paths import DATA_CACHE
from engine.data.format import MANIFEST_NAME, LatentDatasetError, LatentDatasetWriter, open_latent_dataset

DIGITS_SOURCE = "sklearn.datasets.load_digits"
BUILT_IN: tuple[str, ...] = ("digits", "synthetic")


def check_dataset(data: str) -> None:
    """FileNotFoundError unless ``data`` names a built-in dataset or a latent dataset folder."""
    if data not in BUILT_IN and not (Path(data) / MANIFEST_NAME).exists():
        raise FileNotFoundError(f"--data {data}: no latent dataset there (no {MANIFEST_NAME}); pass "
                                "'digits', 'synthetic' or a folder written by python -m engine.extract_latents")


def dataset_path(data: str, *, synthetic_samples: int, synthetic_shape: tuple[int, int, int],
                 synthetic_classes: int, write: bool) -> Path:
    """The folder of ``data``; a built-in one is generated there first when ``write`` (one
    process does it: the others wait at a barrier and then read it)."""
    check_dataset(data)
    if data not in BUILT_IN:
        return Path(data)
    if data == "digits":
        path = DATA_CACHE / "digits16"
        if write:
            make_digits_dataset(path)
        return path
    c, h, w = synthetic_shape
    path = DATA_CACHE / f"synthetic-{synthetic_samples}-{c}x{h}x{w}-{synthetic_classes}"
    if write and not (path / MANIFEST_NAME).exists():
        make_synthetic_dataset(path, synthetic_samples, shape=synthetic_shape, num_classes=synthetic_classes,
                               seed=0)
    return path


def digits_arrays(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 1, size, size) float32 in [-1, 1], labels (1797,) int64)."""
    from sklearn.datasets import load_digits  # lazy: scikit-learn (with scipy) takes ~1 s to import

    if size < 8:
        raise ValueError(f"size must be >= 8 (the source images are 8x8), got {size}")
    digits = load_digits()
    x = digits.images.astype(np.float32) / 8.0 - 1.0  # (1797, 8, 8), 0..16 -> [-1, 1]
    x = torch.from_numpy(x)[:, None]  # (1797, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.numpy().astype(np.float32), digits.target.astype(np.int64)


def make_digits_dataset(path: str | os.PathLike, size: int = 16, overwrite: bool = False) -> Path:
    """Write the digits dataset at ``path`` (idempotent) and return the path.

    An existing complete digits dataset of the same size is reused; anything else at
    ``path`` raises unless ``overwrite``.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        try:
            m = open_latent_dataset(path).manifest
        except LatentDatasetError as e:
            raise LatentDatasetError(
                f"{path} exists but is not a valid latent dataset ({e}); pass overwrite=True"
            ) from e
        if m.extra.get("builtin") != "digits" or m.shape != (1, size, size):
            raise LatentDatasetError(
                f"{path} holds a different dataset (source {m.source!r}, shape {m.shape}); "
                "pass overwrite=True to replace it"
            )
        return path
    x, y = digits_arrays(size)
    with LatentDatasetWriter(
        path, shape=x.shape[1:], num_classes=10, dtype="float32", shard_size=len(x),
        scale_factor=1.0, scale_applied=True, flipped_copies=False,
        source=(f"{DIGITS_SOURCE}: 1797 8x8 digits, bilinear-upsampled to {size}x{size}, "
                "pixels v in 0..16 mapped to v/8 - 1"),
        extra={"builtin": "digits", "size": size, "value_range": [-1.0, 1.0]},
        overwrite=overwrite,
    ) as w:
        w.append(x, y)
    return path


def make_synthetic_dataset(
    path: str | os.PathLike,
    n: int,
    shape: tuple[int, int, int] = (4, 32, 32),
    num_classes: int = 1000,
    seed: int = 0,
    dtype: str = "float16",
    shard_size: int = 16384,
    overwrite: bool = False,
) -> Path:
    """Standard-normal latents with uniform random labels, for throughput tests."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    with LatentDatasetWriter(
        path, shape=shape, num_classes=num_classes, dtype=dtype, shard_size=shard_size,
        scale_factor=1.0, scale_applied=True,
        source=f"synthetic: standard normal, seed {seed}", extra={"builtin": "synthetic"},
        overwrite=overwrite,
    ) as w:
        chunk = 4096  # bounded memory for large n
        for start in range(0, n, chunk):
            b = min(chunk, n - start)
            w.append(rng.standard_normal((b, *shape), dtype=np.float32),
                     rng.integers(0, num_classes, size=b))
    return w.path
