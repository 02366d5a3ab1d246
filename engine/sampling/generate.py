"""Sample class-conditional images from a SiT/DiT checkpoint: a PNG grid and an ADM .npz.

    python -m engine.sample --ckpt CKPT [--model sit_xl] [--vae VAE_DIR] --num-samples 50000 \\
        --sampler ode --method dopri5 --cfg-scale 1.5 --out samples/
    torchrun --nproc_per_node 8 -m engine.sample ...        (distributed, env://)

Checkpoints: this project's or a release's; EMA weights are used when present
(``--prefer model`` for the raw ones). SiT transports (path, prediction, eps) come from the
release's training args when the checkpoint has them; ``--path-type`` etc. override.

Outputs under --out:
  shards/shard_{i:05d}_n{count}.npz  uint8 images and labels of shard i (shard_size samples
                                     each); rank r makes shards i = r, r + W, ... Files are
                                     renamed into place whole, so a shard that exists is done
                                     and a resumed run skips it. Each shard has its own seed
                                     (from --seed and i), so results do not depend on the
                                     number of ranks.
  samples_{N}x{H}x{W}x3.npz          all N images, ``arr_0`` (N, H, W, 3) uint8 as ADM's
                                     evaluator reads it, plus ``labels``; written by rank 0
  grid.png                           the first --grid-samples images
  manifest.json                      the settings; a resumed run must match them (except
                                     --num-samples, which may grow)

Without --vae the latents are rendered directly (see ``engine.sampling.images.render_latents``).
"""

from __future__ import annotations

import sys
from pathlib import Path


import argparse
import json
import math
import os
from dataclasses import asdict
from enum import Enum
from typing import Any, Sequence

import numpy as np
import torch

import models
from engine.config.flags import add_config_arguments, overrides_from_args
from engine.diffusion.gaussian import DiffusionConfig
from engine.data.vae import SD_VAE_SCALE, decode, load_vae
from engine.sampling.images import RENDER_MODES, make_grid, render_latents, save_npz, save_png, to_uint8
from engine.sampling.samplers import (Guidance, LastStep, ODEMethod, SamplerConfig, SamplerKind, SDEMethod, null_label,
                             sample_latents)
from engine.diffusion.transport import DiffusionForm, TransportConfig


# ---------------------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------------------


def sample_images(
    model: torch.nn.Module,
    labels: torch.Tensor | Sequence[int],
    *,
    sampler: SamplerConfig | None = None,
    guidance: Guidance | None = None,
    transport: TransportConfig | None = None,
    diffusion: DiffusionConfig | None = None,
    vae: Any = None,
    latent_scale: float = SD_VAE_SCALE,
    render: str = "signed",
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Sample one image per label and return them as (N, H, W, 3) uint8.

    Noise (and SDE/DDPM noise) comes from ``generator``, else a CPU generator seeded with
    ``seed``, else the global RNG; it is drawn batch by batch on the generator's device. With
    ``vae`` the latents are divided by ``latent_scale`` and decoded; without, they are
    rendered directly (``render``: "signed" or "minmax"). The model runs in eval mode and
    gets its previous mode back afterwards.
    """
    inner = models.unwrap_model(model)
    cfg = inner.config
    device = next(inner.parameters()).device
    y_all = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if y_all.numel() == 0:
        raise ValueError("sample_images needs at least one label")
    if guidance is not None and guidance.active:
        null_label(model)  # fail before any work when the model has no null class
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    step = batch_size or y_all.numel()
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, y_all.numel(), step):
            y = y_all[start:start + step].to(device)
            gen_device = generator.device if generator is not None else device
            noise = torch.randn((y.numel(), *shape), generator=generator, device=gen_device).to(device)
            z = sample_latents(model, y, noise, sampler=sampler, guidance=guidance, transport=transport,
                               diffusion=diffusion, generator=generator, progress=progress)
            out.append(to_uint8(decode(vae, z, latent_scale)) if vae is not None else render_latents(z, render))
    finally:
        model.train(was_training)
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def _names(enum_cls: type[Enum]) -> list[str]:
    return [m.value for m in enum_cls]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file (this project's or a release's)")
    p.add_argument("--model", default=None, help="model name (e.g. sit_xl, 'SiT-XL/2'); default: "
                   "from the checkpoint's config or args")
    p.add_argument("--prefer", choices=["ema", "model"], default="ema", help="which weights to load")
    p.add_argument("--out", default="samples", help="output directory")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="samples per forward, per rank")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", default=None,
                   help="comma-separated labels cycled over the samples; default: uniform random")
    # sampler
    p.add_argument("--sampler", default=None, help=f"one of {_names(SamplerKind)}; default: ode "
                   "(dopri5) for SiT, ddpm (250 steps) for DiT")
    p.add_argument("--method", default=None, help=f"ODE: {_names(ODEMethod)}; SDE: {_names(SDEMethod)}")
    p.add_argument("--num-steps", type=int, default=None,
                   help="SiT ODE/SDE: grid points (default 250, as the SiT release; dopri5 adapts its own "
                   "steps); DiT: respaced steps (default 250); MeanFlow: network evaluations (default 1)")
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--diffusion-form", default="sigma", help=f"SDE: {_names(DiffusionForm)}")
    p.add_argument("--diffusion-norm", type=float, default=1.0)
    p.add_argument("--last-step", default="mean", help=f"SDE: {_names(LastStep)}")
    p.add_argument("--last-step-size", type=float, default=0.04)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--respacing", default=None, help="DiT timestep respacing ('K', 'K1,K2', 'ddimK')")
    p.add_argument("--clip-denoised", action="store_true", help="DiT: clamp x0 predictions to [-1, 1]")
    # guidance
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--guidance-channels", default="release",
                   help="'release' (first 3 channels, the releases' default), 'all', or an int")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("T_LO", "T_HI"),
                   help="guide only for t in [T_LO, T_HI] (SiT flow time; DiT step index)")
    # SiT transport: the training flags' spelling (and the release's sample.py spelling)
    transport = p.add_argument_group(
        "SiT transport", "default: what the checkpoint was trained with (this project's saved training "
        "config, else the release's args), else the defaults shown")
    add_config_arguments(transport, TransportConfig, prefix="transport-", dest="transport",
                         aliases={"transport-path": ("--path-type",), "transport-prediction": ("--prediction",),
                                  "transport-train-eps": ("--train-eps",),
                                  "transport-sample-eps": ("--sample-eps",)})
    # decoding
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL directory (never downloaded)")
    p.add_argument("--latent-scale", type=float, default=SD_VAE_SCALE,
                   help="latents are divided by this before decoding")
    p.add_argument("--render", choices=RENDER_MODES, default="signed",
                   help="without --vae: how latents map to pixels")
    p.add_argument("--grid-samples", type=int, default=64, help="images in grid.png")
    p.add_argument("--device", default=None, help="default: cuda (this rank's) if available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _shard_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _shard_path(folder: Path, index: int, count: int) -> Path:
    return folder / f"shard_{index:05d}_n{count}.npz"


class _Dist:
    """torch.distributed when WORLD_SIZE > 1 (env://), a no-op single process otherwise."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.started = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                backend = "nccl" if torch.cuda.is_available() else "gloo"
                dist.init_process_group(backend, init_method="env://")
                self.started = True

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _parse_classes(text: str | None, num_classes: int) -> list[int] | None:
    if text is None:
        return None
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--classes must be comma-separated ints, got {text!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise ValueError(f"--classes must be labels in [0, {num_classes - 1}], got {text!r}")
    return classes


def _guidance_channels(text: str) -> Any:
    return int(text) if text.strip().isdigit() else text


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Run the CLI; returns the paths written ({"npz", "grid"} on rank 0, {} elsewhere)."""
    args = build_parser().parse_args(argv)
    for name in ("num_samples", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    dist = _Dist()
    try:
        if args.device is not None:
            device = torch.device(args.device)
        elif torch.cuda.is_available():
            device = torch.device("cuda", dist.local_rank)
        else:
            device = torch.device("cpu")

        ckpt = models.load_checkpoint_file(args.ckpt)
        model_cfg, origin = models.checkpoint_config(ckpt, args.model, args.ckpt)
        model = models.load_model(ckpt, prefer=args.prefer, config=model_cfg).to(device).eval()
        cfg = model.config
        family = cfg.family

        kind = args.sampler or ("meanflow" if cfg.second_time_input else SamplerConfig.default_for(family).kind)
        sampler = SamplerConfig(  # num_steps None: the sampler's own default (SamplerConfig.default_steps)
            kind=kind, method=args.method, num_steps=args.num_steps, atol=args.atol, rtol=args.rtol,
            diffusion_form=args.diffusion_form, diffusion_norm=args.diffusion_norm,
            last_step=args.last_step, last_step_size=args.last_step_size, eta=args.eta,
            clip_denoised=args.clip_denoised, respacing=args.respacing)
        if sampler.family != family:
            raise ValueError(f"--sampler {sampler.kind.value} is for {sampler.family.upper()} models; "
                             f"this checkpoint holds a {family.upper()} model")
        guidance = Guidance(scale=args.cfg_scale, channels=_guidance_channels(args.guidance_channels),
                            interval=tuple(args.guidance_interval) if args.guidance_interval else None)
        if guidance.active:
            null_label(model)
        transport = None
        if family == "sit":
            flags = {path[0]: value for path, value in overrides_from_args(args, "transport").items()}
            transport = TransportConfig.of_checkpoint(ckpt, **flags)
        if dist.rank == 0:
            described = f"; transport {transport.path.value}/{transport.prediction.value}" if transport else ""
            print(f"model: {origin}{described}", flush=True)
        classes = _parse_classes(args.classes, cfg.num_classes)
        vae = load_vae(args.vae, device) if args.vae else None

        out = Path(args.out)
        shard_dir = out / "shards"
        manifest = _jsonable({
            "ckpt": str(Path(args.ckpt).absolute()), "model": asdict(cfg), "prefer": args.prefer,
            "sampler": asdict(sampler), "guidance": asdict(guidance),
            "transport": asdict(transport) if transport else None, "classes": classes,
            "seed": args.seed, "shard_size": args.shard_size, "batch_size": args.batch_size,
            "vae": str(Path(args.vae).absolute()) if args.vae else None,
            "latent_scale": args.latent_scale if args.vae else None,
            "render": None if args.vae else args.render,
        })
        manifest_path = out / "manifest.json"
        # Every rank checks (so none waits forever on a rank that failed); rank 0 writes.
        if manifest_path.exists():
            old = json.loads(manifest_path.read_text())
            if old != manifest:
                diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
                raise ValueError(f"{out} holds samples made with other settings ({', '.join(diff)} "
                                 "differ): use another --out or remove it")
        elif dist.rank == 0:
            shard_dir.mkdir(parents=True, exist_ok=True)
            tmp = manifest_path.with_name(f".manifest.json.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(manifest, indent=2))
            os.replace(tmp, manifest_path)  # whole or absent, never half-written
        dist.barrier()
        shard_dir.mkdir(parents=True, exist_ok=True)

        n_total = args.num_samples
        n_shards = math.ceil(n_total / args.shard_size)
        counts = [min(args.shard_size, n_total - i * args.shard_size) for i in range(n_shards)]
        mine = [i for i in range(dist.rank, n_shards, dist.world)
                if not _shard_path(shard_dir, i, counts[i]).exists()]
        bar = None
        if dist.rank == 0 and not args.no_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(counts[i] for i in mine), desc=f"sampling (rank 0 of {dist.world})",
                       unit="img")
        for i in mine:
            gen = torch.Generator().manual_seed(_shard_seed(args.seed, i))
            first = i * args.shard_size
            if classes is None:
                labels = torch.randint(0, cfg.num_classes, (counts[i],), generator=gen)
            else:
                labels = torch.tensor([classes[(first + j) % len(classes)] for j in range(counts[i])])
            parts = []
            for start in range(0, counts[i], args.batch_size):
                y = labels[start:start + args.batch_size]
                parts.append(sample_images(model, y, sampler=sampler, guidance=guidance, transport=transport,
                                           vae=vae, latent_scale=args.latent_scale, render=args.render,
                                           generator=gen))
                if bar is not None:
                    bar.update(len(y))
            save_npz(_shard_path(shard_dir, i, counts[i]), np.concatenate(parts), labels.numpy())
        if bar is not None:
            bar.close()
        dist.barrier()

        if dist.rank != 0:
            return {}
        images, labels_all = [], []
        for i in range(n_shards):
            with np.load(_shard_path(shard_dir, i, counts[i])) as z:
                images.append(z["arr_0"])
                labels_all.append(z["labels"])
        arr = np.concatenate(images)
        _, h, w, _ = arr.shape
        npz = save_npz(out / f"samples_{n_total}x{h}x{w}x3.npz", arr, np.concatenate(labels_all))
        grid = save_png(make_grid(arr[: max(1, args.grid_samples)]), out / "grid.png")
        print(f"wrote {npz} ({arr.shape[0]} images) and {grid}")
        return {"npz": npz, "grid": grid}
    finally:
        dist.close()


def cli(argv: Sequence[str] | None = None) -> None:
    """``main`` for a person at a shell: a mistake (bad flag value, wrong or unrecognisable
    checkpoint, settings that clash with an existing --out) is one line on stderr and exit
    status 2, not a traceback."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, KeyError, models.CheckpointMismatchError) as err:
        print(f"python -m engine.sample: error: {err}", file=sys.stderr)
        sys.exit(2)
