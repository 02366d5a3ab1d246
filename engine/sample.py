"""Sample class-conditional images from a SiT/DiT checkpoint: a PNG grid and an ADM .npz.

    python -m engine.sample --ckpt CKPT [--model sit_xl] [--vae VAE_DIR] --num-samples 50000 \\
        --sampler ode --method dopri5 --cfg-scale 1.5 --out samples/
    torchrun --nproc_per_node 8 -m engine.sample ...        (distributed, env://)

The library is engine/sampling/generate.py (``run_sample_job``; its docstring describes the
files written under --out: shards, manifest.json, samples_NxHxWx3.npz, grid.png). The sampler
and guidance flags are SamplerConfig's and Guidance's fields, the transport flags
TransportConfig's; only the flags given override the model's and the checkpoint's defaults.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
from typing import Any, Sequence

import models
from engine.config.flags import add_config_arguments, overrides_from_args
from engine.diffusion.transport import TransportConfig
from engine.sampling.generate import SampleJob, run_sample_job
from engine.sampling.guidance import Guidance
from engine.sampling.images import RENDER_MODES
from engine.sampling.samplers import SamplerConfig

TRANSPORT_ALIASES = {"transport-path": ("--path-type",), "transport-prediction": ("--prediction",),
                     "transport-train-eps": ("--train-eps",), "transport-sample-eps": ("--sample-eps",)}
"""The SiT release's sample.py spellings of the training flags' transport names."""


def _classes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated ints, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.sample", description=__doc__.split("\n\n")[0],
                                usage="%(prog)s --ckpt CKPT [options]  (-h lists them)",  # errors stay short
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    job = SampleJob
    p.add_argument("--ckpt", required=True, help="checkpoint file (this project's or a release's)")
    p.add_argument("--model", default=job.model, help="model name (e.g. sit_xl, 'SiT-XL/2'); default: "
                   "from the checkpoint's config or args")
    p.add_argument("--prefer", choices=["ema", "model"], default=job.prefer, help="which weights to load")
    p.add_argument("--out", default=job.out, help="output directory")
    p.add_argument("--num-samples", type=int, default=job.num_samples)
    p.add_argument("--batch-size", type=int, default=job.batch_size, help="samples per forward, per rank")
    p.add_argument("--shard-size", type=int, default=job.shard_size, help="samples per shard file")
    p.add_argument("--seed", type=int, default=job.seed)
    p.add_argument("--classes", type=_classes, default=job.classes,
                   help="comma-separated labels cycled over the samples; default: uniform random")
    add_config_arguments(p.add_argument_group("sampler"), SamplerConfig, dest="sampler")
    add_config_arguments(p.add_argument_group("classifier-free guidance"), Guidance, dest="guidance")
    transport = p.add_argument_group(
        "SiT transport", "default: what the checkpoint was trained with (this project's saved training "
        "config, else the release's args), else the defaults shown")
    add_config_arguments(transport, TransportConfig, prefix="transport-", dest="transport",
                         aliases=TRANSPORT_ALIASES)
    p.add_argument("--vae", default=job.vae, help="local diffusers AutoencoderKL directory (never downloaded)")
    p.add_argument("--latent-scale", type=float, default=job.latent_scale,
                   help="latents are divided by this before decoding")
    p.add_argument("--render", choices=RENDER_MODES, default=job.render,
                   help="without --vae: how latents map to pixels")
    p.add_argument("--grid-samples", type=int, default=job.grid_samples, help="images in grid.png")
    p.add_argument("--device", default=job.device, help="default: cuda (this rank's) if available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def _given(args: argparse.Namespace, dest: str) -> dict[str, Any]:
    """The fields of the config under ``dest`` whose flags the user gave."""
    return {path[0]: value for path, value in overrides_from_args(args, dest).items()}


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Run the command; returns the paths written ({"npz", "grid"} on rank 0, {} elsewhere)."""
    args = build_parser().parse_args(argv)
    job = SampleJob(ckpt=args.ckpt, model=args.model, prefer=args.prefer, out=args.out,
                    num_samples=args.num_samples, batch_size=args.batch_size, shard_size=args.shard_size,
                    seed=args.seed, classes=args.classes, vae=args.vae, latent_scale=args.latent_scale,
                    render=args.render, grid_samples=args.grid_samples, device=args.device,
                    progress=not args.no_progress)
    return run_sample_job(job, sampler=_given(args, "sampler"), guidance=Guidance(**_given(args, "guidance")),
                          transport=_given(args, "transport"))


def cli(argv: Sequence[str] | None = None) -> None:
    """``main`` for a person at a shell: a mistake (bad flag value, wrong or unrecognisable
    checkpoint, settings that clash with an existing --out) is one line on stderr and exit
    status 2, not a traceback."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, KeyError, models.CheckpointMismatchError) as err:
        print(f"python -m engine.sample: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
