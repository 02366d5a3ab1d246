"""Encode an ImageNet-style image folder into the latent dataset format.

    root/
      n01440764/xxx.JPEG      class directories, sorted by name -> label 0, 1, ...
      n01443537/yyy.JPEG

Images get ADM's center-crop preprocessing, go through a diffusers AutoencoderKL loaded
from a local directory (never downloaded), and latents = posterior sample (or mean)
times the scale factor (0.18215) are stored.

Work is split into fixed chunks of ``chunk_size`` consecutive images (in sorted file
order). Rank r of W encodes chunks r, r + W, r + 2W, ... into ``OUT.parts/`` (each chunk
file is written atomically, so a restarted run skips finished chunks); rank 0 then waits
for all chunks and merges them, in order, into the dataset at OUT. The result does not
depend on the number of ranks: the posterior noise is seeded per chunk.

``python -m engine.extract_latents`` is the command.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from engine.config.pinned import differing_settings, write_json_atomic
from engine.data.format import DEFAULT_SHARD_SIZE, LatentDatasetWriter
from engine.data.vae import SD_VAE_SCALE, encode, load_vae

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass
class ExtractConfig:
    images: Path
    """Image root with one sub-directory per class."""
    out: Path
    """Output dataset directory (must not exist unless overwrite)."""
    vae: Path
    """Local directory of a diffusers AutoencoderKL (config.json + weights), or of a
    pipeline with a vae/ sub-folder."""
    image_size: int = 256
    """Side of the square center crop fed to the VAE."""
    batch_size: int = 32
    """Images per VAE forward pass."""
    chunk_size: int = 1024
    """Images per resumable work unit (a multiple of batch_size keeps batches full)."""
    shard_size: int = DEFAULT_SHARD_SIZE
    """Samples per output shard."""
    use_mean: bool = False
    """Store the posterior mean instead of a sample."""
    flipped_copies: bool = False
    """Also encode each horizontally flipped image (dataset index 2k original, 2k+1 flipped)."""
    scale_factor: float = SD_VAE_SCALE
    """Multiplier applied to the latents before storing."""
    dtype: str = "float16"
    """Storage dtype: float16 or float32."""
    vae_dtype: str = "float32"
    """Dtype the VAE runs in (float16 VAEs can overflow; the writer rejects non-finite latents)."""
    device: str = "cpu"
    seed: int = 0
    """Seeds the posterior noise, per chunk."""
    rank: int = 0
    world_size: int = 1
    num_workers: int = 4
    """Image decoding worker processes."""
    merge_timeout: float = 7 * 24 * 3600.0
    """Seconds rank 0 waits for the other ranks' chunks before giving up."""
    keep_parts: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.images, self.out, self.vae = Path(self.images), Path(self.out), Path(self.vae)
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        for name in ("batch_size", "chunk_size", "shard_size", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must lie in [0, {self.world_size}), got {self.rank}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype!r}")
        if self.vae_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"vae_dtype must be float16, bfloat16 or float32, got {self.vae_dtype!r}")
        if not self.scale_factor > 0:
            raise ValueError(f"scale_factor must be > 0, got {self.scale_factor}")

    @property
    def parts_dir(self) -> Path:
        return self.out.parent / f"{self.out.name}.parts"


# --------------------------------------------------------------------------- images


def list_images(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names): class directories sorted by name, files sorted within."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root} does not exist or is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class sub-directories (expected root/<class>/<image>)")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        files.extend(found)
        labels.extend([label] * len(found))
    if not files:
        raise ValueError(f"{root}: no images with extensions {IMAGE_EXTENSIONS}")
    return files, labels, classes


def center_crop_arr(pil_image: Any, image_size: int) -> np.ndarray:
    """ADM center crop: (image_size, image_size, 3) uint8.

    Halve with BOX filtering while the short side is at least 2x the target (cheap and
    alias-free), resize the short side to image_size with BICUBIC, crop the center.
    """
    img = pil_image
    while min(img.size) >= 2 * image_size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    scale = image_size / min(img.size)
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), resample=Image.BICUBIC)
    arr = np.asarray(img.convert("RGB"))  # (h, w, 3)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def load_image(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """(3, S, S) float32 in [-1, 1]."""
    with Image.open(path) as im:
        arr = center_crop_arr(im.convert("RGB"), image_size)
    arr = np.array(arr)  # writable, contiguous copy (PIL's buffer is read-only)
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], image_size: int) -> None:
        self.files, self.image_size = files, image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            return load_image(self.files[i], self.image_size)
        except Exception as e:  # name the file: a bare PIL error does not
            raise RuntimeError(f"cannot load image {self.files[i]}: {e}") from e


# --------------------------------------------------------------------------- chunks


def _chunk_path(parts: Path, k: int) -> Path:
    return parts / f"chunk-{k:06d}.npz"


def _chunk_seed(seed: int, k: int) -> int:
    return int(np.random.SeedSequence([seed, k]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _chunk_ok(path: Path, expected: int) -> bool:
    """A chunk file exists and holds ``expected`` rows (files are renamed into place whole)."""
    if not path.is_file():
        return False
    try:
        with np.load(path) as z:
            return z["latents"].shape[0] == expected and z["labels"].shape == (expected,)
    except Exception:  # unreadable: treat as not done, it will be recomputed
        return False


def _write_chunk(path: Path, latents: np.ndarray, labels: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, latents=latents, labels=labels)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fingerprint(cfg: ExtractConfig, n_files: int, classes: list[str]) -> dict[str, Any]:
    """Settings that must match for chunks from an earlier run to be reused."""
    return {
        "images": str(cfg.images.absolute()), "n_files": n_files, "n_classes": len(classes),
        "vae": str(cfg.vae.absolute()), "image_size": cfg.image_size, "chunk_size": cfg.chunk_size,
        "use_mean": cfg.use_mean, "flipped_copies": cfg.flipped_copies,
        "scale_factor": cfg.scale_factor, "dtype": cfg.dtype, "vae_dtype": cfg.vae_dtype,
        "seed": cfg.seed,
    }


def _check_parts_dir(parts: Path, fingerprint: dict[str, Any]) -> None:
    parts.mkdir(parents=True, exist_ok=True)
    diff = differing_settings(parts / "settings.json", fingerprint)
    if diff:
        raise ValueError(f"{parts} holds chunks from a run with different settings {diff}; "
                         "delete it or restore those settings")
    if diff is None:
        write_json_atomic(parts / "settings.json", fingerprint)


def _batches_for(chunks: list[tuple[int, int, int]], batch_size: int) -> Iterator[list[int]]:
    # Batches never straddle a chunk, so each chunk completes at a batch boundary.
    for _, lo, hi in chunks:
        for s in range(lo, hi, batch_size):
            yield list(range(s, min(s + batch_size, hi)))


def extract(cfg: ExtractConfig) -> Path | None:
    """Run this rank's share; rank 0 also merges. Returns the dataset path on rank 0."""
    if cfg.out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{cfg.out} already exists (pass overwrite to replace it)")
    files, labels, classes = list_images(cfg.images)
    n = len(files)
    n_chunks = -(-n // cfg.chunk_size)
    parts = cfg.parts_dir
    _check_parts_dir(parts, _fingerprint(cfg, n, classes))
    copies = 2 if cfg.flipped_copies else 1

    mine = [(k, k * cfg.chunk_size, min((k + 1) * cfg.chunk_size, n))
            for k in range(cfg.rank, n_chunks, cfg.world_size)]
    todo = [c for c in mine if not _chunk_ok(_chunk_path(parts, c[0]), copies * (c[2] - c[1]))]
    done_images = sum(hi - lo for _, lo, hi in mine) - sum(hi - lo for _, lo, hi in todo)

    if todo:
        vae = load_vae(cfg.vae, cfg.device, getattr(torch, cfg.vae_dtype))
        images = torch.utils.data.DataLoader(
            _ImageFiles(files, cfg.image_size),
            batch_sampler=list(_batches_for(todo, cfg.batch_size)),
            num_workers=cfg.num_workers,
        )
        bar = tqdm(total=sum(hi - lo for _, lo, hi in mine), initial=done_images, unit="img",
                   desc=f"encode rank {cfg.rank}/{cfg.world_size}",
                   disable=not cfg.progress or cfg.rank != 0)
        batches = iter(images)
        for k, lo, hi in todo:
            gen = torch.Generator().manual_seed(_chunk_seed(cfg.seed, k))
            out = []
            for _ in range(lo, hi, cfg.batch_size):
                x = next(batches)  # (B, 3, S, S)
                z = encode(vae, x, scale_factor=cfg.scale_factor, use_mean=cfg.use_mean, generator=gen)
                if cfg.flipped_copies:
                    zf = encode(vae, x.flip(-1), scale_factor=cfg.scale_factor,
                                use_mean=cfg.use_mean, generator=gen)
                    z = torch.stack([z, zf], dim=1).flatten(0, 1)  # (2B, C, h, w): orig, flipped
                out.append(z)
                bar.update(x.shape[0])
            z = torch.cat(out).numpy().astype(cfg.dtype)
            if not np.isfinite(z).all():
                raise ValueError(f"chunk {k} (images {lo}..{hi - 1}, first {files[lo]}) produced "
                                 f"NaN/inf latents in {cfg.dtype}; try --vae-dtype float32")
            y = np.repeat(np.asarray(labels[lo:hi], dtype=np.int64), copies)
            _write_chunk(_chunk_path(parts, k), z, y)
        bar.close()

    if cfg.rank != 0:
        return None
    _wait_for_chunks(parts, n, cfg, copies)
    return _merge(cfg, parts, n, n_chunks, copies, classes)


def _wait_for_chunks(parts: Path, n: int, cfg: ExtractConfig, copies: int) -> None:
    deadline = time.monotonic() + cfg.merge_timeout
    while True:
        missing = [k for k in range(-(-n // cfg.chunk_size))
                   if not _chunk_ok(_chunk_path(parts, k),
                                    copies * (min((k + 1) * cfg.chunk_size, n) - k * cfg.chunk_size))]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{parts}: chunks {missing[:10]}{'...' if len(missing) > 10 else ''} "
                               f"still missing after {cfg.merge_timeout:.0f} s; rerun the ranks "
                               "that own them, then rerun rank 0 to merge")
        time.sleep(min(10.0, max(0.1, cfg.merge_timeout / 100)))


def _merge(cfg: ExtractConfig, parts: Path, n: int, n_chunks: int, copies: int,
           classes: list[str]) -> Path:
    writer = None
    kind = "posterior mean" if cfg.use_mean else "posterior sample"
    try:
        for k in range(n_chunks):
            with np.load(_chunk_path(parts, k)) as z:
                lat, lab = z["latents"], z["labels"]
            if writer is None:
                writer = LatentDatasetWriter(
                    cfg.out, shape=lat.shape[1:], num_classes=len(classes), dtype=cfg.dtype,
                    shard_size=cfg.shard_size, scale_factor=cfg.scale_factor, scale_applied=True,
                    flipped_copies=cfg.flipped_copies,
                    source=(f"{n} images from {cfg.images.absolute()} encoded by AutoencoderKL at "
                            f"{cfg.vae.absolute()} ({kind}, "
                            f"ADM center crop {cfg.image_size})"),
                    extra={"classes": classes, "image_size": cfg.image_size,
                           "use_mean": cfg.use_mean, "seed": cfg.seed,
                           "settings": {k: (str(v) if isinstance(v, Path) else v)
                                        for k, v in asdict(cfg).items()
                                        if k not in ("rank", "progress", "overwrite")}},
                    overwrite=cfg.overwrite,
                )
            writer.append(lat, lab)
        assert writer is not None
        out = writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if not cfg.keep_parts:
        shutil.rmtree(parts, ignore_errors=True)
    return out
