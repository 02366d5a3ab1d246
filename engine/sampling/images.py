"""Turning sampled latents into images: direct rendering, PNG grids, ADM .npz (decoding: ``engine.data.vae``).

Pixel convention: decoded images live in [-1, 1] and become uint8 as
``clamp(127.5 x + 128, 0, 255)`` truncated (the releases' mapping), laid out N x H x W x 3.

Without a VAE (latent-space toy data such as the 1-channel 16x16 digits) latents are shown
directly (``render_latents``): 1 or 2 channels -> the first channel as greyscale, 3 -> RGB,
4 or more -> the first 3 channels as RGB. ``mode="signed"`` maps [-1, 1] to [0, 255] and
clips (right for data stored in [-1, 1], like the digits); ``mode="minmax"`` stretches each
image's own min..max to 0..255 (for unbounded latents such as SD-VAE ones).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

RenderMode = Literal["signed", "minmax"]
RENDER_MODES: tuple[str, ...] = ("signed", "minmax")


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8 (values outside are clipped)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    pixels = torch.clamp(127.5 * images.float() + 128.0, 0, 255)
    return pixels.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def render_latents(latents: Tensor, mode: RenderMode = "signed") -> np.ndarray:
    """Latents (N, C, H, W) shown as images without a decoder -> (N, H, W, 3) uint8."""
    if mode not in RENDER_MODES:
        raise ValueError(f"unknown render mode {mode!r}; valid: {', '.join(RENDER_MODES)}")
    if latents.dim() != 4:
        raise ValueError(f"expected latents of shape (N, C, H, W), got {tuple(latents.shape)}")
    x = latents.detach().float()
    x = x[:, :1].expand(-1, 3, -1, -1) if x.shape[1] < 3 else x[:, :3]  # (N, 3, H, W)
    if mode == "minmax":
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp(min=1e-12) * 2 - 1  # each image to [-1, 1]
    return to_uint8(x)


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2,
              pad_value: int = 255) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*(H+p)+p, nrow*(W+p)+p, 3) image; nrow defaults to ~sqrt(N)."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    cols = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), pad_value, np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top:top + h, left:left + w] = images[k]
    return grid


def save_png(image: np.ndarray, path: str | os.PathLike, min_side: int = 256) -> Path:
    """Write an (H, W, 3) uint8 image; tiny images are enlarged (nearest) to ``min_side``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(image)
    short = min(img.size)
    if short < min_side:  # a 16x16-per-sample grid is unreadable at 1:1
        factor = int(np.ceil(min_side / short))
        img = img.resize((img.width * factor, img.height * factor), Image.NEAREST)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """ADM evaluation layout: ``arr_0`` = (N, H, W, 3) uint8 (plus ``labels`` if given).

    Written to a temporary name and renamed, so a file that exists is complete.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"ADM .npz needs uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "labels": np.asarray(labels)}
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
