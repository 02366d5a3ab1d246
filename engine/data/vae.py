"""The SD-VAE: its latent scale, loading a local diffusers AutoencoderKL, encoding, decoding.

One owner for the VAE facts the extraction (``engine.data.extract``), the sample command
and the trainer's grids share. Nothing here downloads: a VAE is always a local directory.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# SD-VAE latents are multiplied by this before training and divided by it before decoding
# (the DiT/SiT releases' 0.18215).
SD_VAE_SCALE = 0.18215


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32):
    """AutoencoderKL from a local directory only (local_files_only=True: never downloads)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"VAE directory {path} does not exist; pass a local diffusers AutoencoderKL "
            "directory (this tool never downloads weights)")
    subfolder = None
    if not (path / "config.json").is_file():
        if (path / "vae" / "config.json").is_file():
            subfolder = "vae"  # a full diffusers pipeline directory
        else:
            raise FileNotFoundError(f"{path}: no config.json (nor vae/config.json); not a "
                                    "diffusers AutoencoderKL directory")
    from diffusers import AutoencoderKL  # optional dependency (the vae extra), and slow to import

    vae = AutoencoderKL.from_pretrained(str(path), subfolder=subfolder, local_files_only=True,
                                        torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


@torch.inference_mode()
def encode(vae: Any, x: torch.Tensor, *, scale_factor: float, use_mean: bool,
           generator: torch.Generator | None) -> torch.Tensor:
    """x (B, 3, S, S) in [-1, 1] -> scaled latents (B, C, S/f, S/f) float32 on the CPU."""
    param = next(vae.parameters())
    dist = vae.encode(x.to(param.device, param.dtype)).latent_dist
    z = dist.mean if use_mean else dist.sample(generator=generator)
    return (z.float() * scale_factor).cpu()


@torch.no_grad()
def decode(vae: Any, latents: Tensor, scale_factor: float = SD_VAE_SCALE) -> Tensor:
    """Latents (N, C, h, w) as trained (scaled by ``scale_factor``) -> images (N, 3, H, W) in [-1, 1]."""
    param = next(vae.parameters())
    return vae.decode(latents.to(param.device, param.dtype) / scale_factor).sample
