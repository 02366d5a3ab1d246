"""Sampling images from a model (``sample_images``) and whole sampling jobs (``run_sample_job``,
what ``python -m engine.sample`` runs).

A job's outputs under ``SampleJob.out``:
  shards/shard_{i:05d}_n{count}.npz  uint8 images and labels of shard i (shard_size samples
                                     each); rank r makes shards i = r, r + W, ... Files are
                                     renamed into place whole, so a shard that exists is done
                                     and a resumed run skips it. Each shard has its own seed
                                     (from the job's seed and i), so results do not depend on
                                     the number of ranks.
  samples_{N}x{H}x{W}x3.npz          all N images, ``arr_0`` (N, H, W, 3) uint8 as ADM's
                                     evaluator reads it, plus ``labels``; written by rank 0
  grid.png                           the first grid_samples images
  manifest.json                      the settings; a resumed run must match them (except
                                     num_samples, which may grow)

Checkpoints: this project's or a release's; EMA weights are used when present (``prefer``
"model" for the raw ones). SiT transports (path, prediction, eps) come from the checkpoint
(``TransportConfig.of_checkpoint``) unless given. Without a VAE the latents are rendered
directly (see ``engine.sampling.images.render_latents``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import models
from engine.config.pinned import differing_settings, write_json_atomic
from engine.config.checks import fail, integer, number, one_of
from engine.data.vae import SD_VAE_SCALE, decode, load_vae
from engine.diffusion.gaussian import DiffusionConfig
from engine.diffusion.transport import TransportConfig
from engine.distributed import EnvGroup
from engine.sampling.guidance import Guidance
from engine.sampling.images import RENDER_MODES, make_grid, render_latents, save_npz, save_png, to_uint8
from engine.sampling.samplers import SamplerConfig, sample_latents


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
    if guidance is not None:
        guidance.null_class(cfg)  # fail before any work when the model has no null class
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


@dataclass(frozen=True)
class SampleJob:
    """What to sample and where to: everything of a sampling job but the sampler, guidance and
    transport settings (``run_sample_job`` takes those)."""

    ckpt: str
    """Checkpoint file (this project's or a release's)."""
    model: str | None = None
    """Model name (e.g. sit_xl, 'SiT-XL/2'); None: from the checkpoint's config or args."""
    prefer: Literal["ema", "model"] = "ema"
    """Which weights to load."""
    out: str = "samples"
    """Output directory."""
    num_samples: int = 64
    batch_size: int = 32
    """Samples per forward, per rank."""
    shard_size: int = 1000
    """Samples per shard file."""
    seed: int = 0
    classes: tuple[int, ...] | None = None
    """Labels cycled over the samples; None: uniform random."""
    vae: str | None = None
    """Local diffusers AutoencoderKL directory (never downloaded); None: render the latents."""
    latent_scale: float = SD_VAE_SCALE
    """Latents are divided by this before decoding."""
    render: str = "signed"
    """Without a VAE: how latents map to pixels (``RENDER_MODES``)."""
    grid_samples: int = 64
    """Images in grid.png (at least 1)."""
    device: str | None = None
    """None: this rank's CUDA device if there is one, else the CPU."""
    progress: bool = True

    def __post_init__(self) -> None:
        one_of("SampleJob", "prefer", self.prefer, ("ema", "model"))
        for name in ("num_samples", "batch_size", "shard_size"):
            integer("SampleJob", name, getattr(self, name), low=1)
        integer("SampleJob", "seed", self.seed, low=0)
        integer("SampleJob", "grid_samples", self.grid_samples)
        number("SampleJob", "latent_scale", self.latent_scale, low=0, low_open=True)
        one_of("SampleJob", "render", self.render, RENDER_MODES)
        if self.classes is not None:
            classes = tuple(self.classes)
            if not classes or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in classes):
                raise fail("SampleJob", "classes", "None or a non-empty sequence of labels >= 0", self.classes)
            object.__setattr__(self, "classes", classes)

    def check_classes(self, num_classes: int) -> None:
        if self.classes is not None and max(self.classes) >= num_classes:
            raise fail("SampleJob", "classes", f"labels in [0, {num_classes - 1}]", self.classes)


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


def _write_manifest(out: Path, manifest: dict[str, Any], group: EnvGroup) -> None:
    """Refuses an --out made with other settings; rank 0 writes the manifest of a new one."""
    path = out / "manifest.json"
    # Every rank checks (so none waits forever on a rank that failed); rank 0 writes.
    diff = differing_settings(path, manifest)
    if diff:
        raise ValueError(f"{out} holds samples made with other settings ({', '.join(diff)} "
                         "differ): use another --out or remove it")
    if diff is None and group.rank == 0:
        (out / "shards").mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, manifest)
    group.barrier()


def run_sample_job(job: SampleJob, *, sampler: SamplerConfig | Mapping[str, Any] | None = None,
                   guidance: Guidance | None = None, transport: TransportConfig | Mapping[str, Any] | None = None,
                   ) -> dict[str, Path]:
    """Run a sampling job on this process's rank (one process, or torchrun's env:// group).

    ``sampler``: a config, or the fields chosen (the rest follow the model:
    ``SamplerConfig.for_model``); ``transport``: a config, or the fields chosen (the rest come
    from the checkpoint: ``TransportConfig.of_checkpoint``). Returns the paths written
    ({"npz", "grid"} on rank 0, {} elsewhere).
    """
    guidance = guidance or Guidance()
    group = EnvGroup()
    try:
        device = torch.device(job.device) if job.device is not None else group.device()
        ckpt = models.load_checkpoint_file(job.ckpt)
        model_cfg, origin = models.checkpoint_config(ckpt, job.model, job.ckpt)
        model = models.load_model(ckpt, prefer=job.prefer, config=model_cfg).to(device).eval()
        cfg = model.config
        if not isinstance(sampler, SamplerConfig):
            sampler = SamplerConfig.for_model(cfg, **(sampler or {}))
        sampler.check_model(cfg)
        guidance.null_class(cfg)
        if cfg.family == "sit" and not isinstance(transport, TransportConfig):
            transport = TransportConfig.of_checkpoint(ckpt, **(transport or {}))
        elif cfg.family != "sit":
            transport = None
        if group.rank == 0:
            described = f"; transport {transport.path.value}/{transport.prediction.value}" if transport else ""
            print(f"model: {origin}{described}", flush=True)
        job.check_classes(cfg.num_classes)
        vae = load_vae(job.vae, device) if job.vae else None

        out = Path(job.out)
        shard_dir = out / "shards"
        _write_manifest(out, _jsonable({
            "ckpt": str(Path(job.ckpt).absolute()), "model": asdict(cfg), "prefer": job.prefer,
            "sampler": asdict(sampler), "guidance": asdict(guidance),
            "transport": asdict(transport) if transport else None, "classes": job.classes,
            "seed": job.seed, "shard_size": job.shard_size, "batch_size": job.batch_size,
            "vae": str(Path(job.vae).absolute()) if job.vae else None,
            "latent_scale": job.latent_scale if job.vae else None,
            "render": None if job.vae else job.render,
        }), group)
        shard_dir.mkdir(parents=True, exist_ok=True)

        n_shards = math.ceil(job.num_samples / job.shard_size)
        counts = [min(job.shard_size, job.num_samples - i * job.shard_size) for i in range(n_shards)]
        mine = [i for i in range(group.rank, n_shards, group.world)
                if not _shard_path(shard_dir, i, counts[i]).exists()]
        bar = None
        if group.rank == 0 and job.progress:
            bar = tqdm(total=sum(counts[i] for i in mine), desc=f"sampling (rank 0 of {group.world})", unit="img")
        for i in mine:
            gen = torch.Generator().manual_seed(_shard_seed(job.seed, i))
            first = i * job.shard_size
            if job.classes is None:
                labels = torch.randint(0, cfg.num_classes, (counts[i],), generator=gen)
            else:
                labels = torch.tensor([job.classes[(first + j) % len(job.classes)] for j in range(counts[i])])
            parts = []
            for start in range(0, counts[i], job.batch_size):
                y = labels[start:start + job.batch_size]
                parts.append(sample_images(model, y, sampler=sampler, guidance=guidance, transport=transport,
                                           vae=vae, latent_scale=job.latent_scale, render=job.render,
                                           generator=gen))
                if bar is not None:
                    bar.update(len(y))
            save_npz(_shard_path(shard_dir, i, counts[i]), np.concatenate(parts), labels.numpy())
        if bar is not None:
            bar.close()
        group.barrier()

        if group.rank != 0:
            return {}
        images, labels_all = [], []
        for i in range(n_shards):
            with np.load(_shard_path(shard_dir, i, counts[i])) as z:
                images.append(z["arr_0"])
                labels_all.append(z["labels"])
        arr = np.concatenate(images)
        _, h, w, _ = arr.shape
        npz = save_npz(out / f"samples_{job.num_samples}x{h}x{w}x3.npz", arr, np.concatenate(labels_all))
        grid = save_png(make_grid(arr[: max(1, job.grid_samples)]), out / "grid.png")
        print(f"wrote {npz} ({arr.shape[0]} images) and {grid}")
        return {"npz": npz, "grid": grid}
    finally:
        group.close()


__all__ = ["SampleJob", "run_sample_job", "sample_images"]
