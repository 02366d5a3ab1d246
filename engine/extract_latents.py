"""Encode an ImageNet-style image folder into VAE latents (the latent dataset format).

    python -m engine.extract_latents --images /data/imagenet/train --vae /models/sd-vae-ft-ema \\
        --out /data/latents/in256 --image-size 256
    torchrun --nproc-per-node 8 -m engine.extract_latents ...   (rank/world from the env)

How the work is split, resumed and merged: engine/data/extract.py.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from engine.data.extract import ExtractConfig, extract
from engine.data.format import DEFAULT_SHARD_SIZE
from engine.data.vae import SD_VAE_SCALE


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Encode an image folder into VAE latents (latent dataset format).")
    p.add_argument("--images", type=Path, required=True, help="root with one sub-directory per class")
    p.add_argument("--vae", type=Path, required=True, help="local diffusers AutoencoderKL directory")
    p.add_argument("--out", type=Path, required=True, help="output dataset directory")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    p.add_argument("--use-mean", action="store_true", help="store the posterior mean, not a sample")
    p.add_argument("--flipped-copies", action="store_true", help="also store each mirrored image")
    p.add_argument("--scale-factor", type=float, default=SD_VAE_SCALE)
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--vae-dtype", choices=("float16", "bfloat16", "float32"), default="float32")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--merge-timeout", type=float, default=7 * 24 * 3600.0)
    p.add_argument("--keep-parts", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    device = a.device
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    cfg = ExtractConfig(
        images=a.images, out=a.out, vae=a.vae, image_size=a.image_size, batch_size=a.batch_size,
        chunk_size=a.chunk_size, shard_size=a.shard_size, use_mean=a.use_mean,
        flipped_copies=a.flipped_copies, scale_factor=a.scale_factor, dtype=a.dtype,
        vae_dtype=a.vae_dtype, device=device, seed=a.seed, rank=a.rank, world_size=a.world_size,
        num_workers=a.num_workers, merge_timeout=a.merge_timeout, keep_parts=a.keep_parts,
        overwrite=a.overwrite, progress=not a.no_progress,
    )
    out = extract(cfg)
    if out is not None:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
