"""On-disk latent dataset: writer, memory-mapped reader and validation.

A dataset is one directory (the full description is in engine/data/DATA.md):

    manifest.json          written last; its presence means "complete"
    latents-00000.npy      (n_0, C, H, W) float16 or float32
    labels-00000.npy       (n_0,) int64
    latents-00001.npy ...

Plain sharded ``.npy`` files because they memory-map with no decoding step: a batch
is a fancy-index gather from the page cache, which keeps the loaders cheap on CPU.
Writes are atomic at the directory level: shards and the manifest go into a hidden
temporary directory beside the target, which is renamed onto the final name with
``os.replace`` only once everything is on disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engine.data.vae import SD_VAE_SCALE

FORMAT_NAME = "dispersive-latents"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SUPPORTED_DTYPES = ("float16", "float32")
DEFAULT_SHARD_SIZE = 16384  # 16384 x 4x32x32 fp16 = 128 MiB per shard

# get_batch switches from a row-by-row copy to one np.take per shard at this many rows
# per shard touched (measured crossover ~4-8 for 8 KiB rows).
_ROWS_PER_SHARD_FOR_TAKE = 8
_SHARD_RE = re.compile(r"^(latents|labels)-\d{5}\.npy$")


class LatentDatasetError(ValueError):
    """A latent dataset on disk is incomplete, corrupt or inconsistent."""


def latents_name(shard: int) -> str:
    return f"latents-{shard:05d}.npy"


def labels_name(shard: int) -> str:
    return f"labels-{shard:05d}.npy"


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ShardInfo:
    latents: str
    """File name of the (count, C, H, W) latent array, relative to the dataset directory."""
    labels: str
    """File name of the (count,) int64 label array."""
    count: int
    """Number of samples in this shard."""


@dataclass(frozen=True)
class LatentManifest:
    shape: tuple[int, int, int]
    """Per-sample latent shape (C, H, W)."""
    dtype: str
    """Storage dtype of the latents: "float16" or "float32"."""
    shards: tuple[ShardInfo, ...]
    """Shards in dataset order; global index i runs through them back to back."""
    total: int
    """Total number of samples (sum of shard counts)."""
    num_classes: int
    """Labels lie in [0, num_classes)."""
    scale_factor: float = SD_VAE_SCALE
    """VAE latent scale factor (1.0 for data that is not VAE latents)."""
    scale_applied: bool = True
    """True when the stored latents are already multiplied by scale_factor."""
    flipped_copies: bool = False
    """True when each image is stored twice: index 2k original, 2k+1 its mirrored image."""
    source: str = ""
    """Free-text description of where the data came from."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form JSON metadata (class names, image size, VAE path, ...)."""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d = {"format": FORMAT_NAME, **d}
        d["shape"] = list(self.shape)
        d["shards"] = [asdict(s) for s in self.shards]
        return json.dumps(d, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: Any, where: Path) -> "LatentManifest":
        """Parse and check a decoded manifest; ``where`` names the file in errors."""

        def bad(msg: str) -> LatentDatasetError:
            return LatentDatasetError(f"{where}: {msg}")

        if not isinstance(d, dict):
            raise bad("manifest must be a JSON object")
        if d.get("format") != FORMAT_NAME:
            raise bad(f"'format' is {d.get('format')!r}, expected {FORMAT_NAME!r}")
        version = d.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise bad(f"'format_version' must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise bad(f"format_version {version} is newer than this reader ({FORMAT_VERSION})")
        required = ("shape", "dtype", "shards", "total", "num_classes", "scale_factor",
                    "scale_applied", "flipped_copies")
        missing = [k for k in required if k not in d]
        if missing:
            raise bad(f"manifest lacks keys {missing}")

        shape = d["shape"]
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(_is_int(s) and s > 0 for s in shape)):
            raise bad(f"'shape' must be three positive integers [C, H, W], got {shape!r}")
        if d["dtype"] not in SUPPORTED_DTYPES:
            raise bad(f"'dtype' must be one of {SUPPORTED_DTYPES}, got {d['dtype']!r}")
        if not _is_int(d["num_classes"]) or d["num_classes"] < 1:
            raise bad(f"'num_classes' must be a positive integer, got {d['num_classes']!r}")
        if not isinstance(d["scale_factor"], (int, float)) or not d["scale_factor"] > 0:
            raise bad(f"'scale_factor' must be a positive number, got {d['scale_factor']!r}")
        for key in ("scale_applied", "flipped_copies"):
            if not isinstance(d[key], bool):
                raise bad(f"'{key}' must be true or false, got {d[key]!r}")

        raw_shards = d["shards"]
        if not isinstance(raw_shards, list) or not raw_shards:
            raise bad("'shards' must be a non-empty list")
        shards = []
        for i, s in enumerate(raw_shards):
            if not isinstance(s, dict) or set(s) != {"latents", "labels", "count"}:
                raise bad(f"shard {i} must be an object with keys latents, labels, count")
            for key in ("latents", "labels"):
                if not isinstance(s[key], str) or not _SHARD_RE.match(s[key]):
                    raise bad(f"shard {i}: bad file name {s[key]!r}")
            if not _is_int(s["count"]) or s["count"] < 1:
                raise bad(f"shard {i}: 'count' must be a positive integer, got {s['count']!r}")
            shards.append(ShardInfo(s["latents"], s["labels"], int(s["count"])))
        total = sum(s.count for s in shards)
        if d["total"] != total:
            raise bad(f"'total' is {d['total']!r} but the shard counts sum to {total}")

        extra = d.get("extra", {})
        if not isinstance(extra, dict):
            raise bad("'extra' must be a JSON object")
        return cls(
            shape=(int(shape[0]), int(shape[1]), int(shape[2])),
            dtype=d["dtype"],
            shards=tuple(shards),
            total=total,
            num_classes=int(d["num_classes"]),
            scale_factor=float(d["scale_factor"]),
            scale_applied=d["scale_applied"],
            flipped_copies=d["flipped_copies"],
            source=str(d.get("source", "")),
            extra=extra,
            format_version=version,
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_manifest(path: str | os.PathLike) -> LatentManifest:
    """Read and check ``path/manifest.json`` (does not look at the shards)."""
    root = Path(path)
    if not root.is_dir():
        raise LatentDatasetError(f"{root}: latent dataset directory does not exist")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise LatentDatasetError(
            f"{mpath}: missing manifest - the dataset is incomplete (a writer did not finish)"
        )
    try:
        d = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LatentDatasetError(f"{mpath}: not valid JSON ({e})") from e
    return LatentManifest.from_dict(d, mpath)


# --------------------------------------------------------------------------- writer


def _as_numpy(a: Any) -> np.ndarray:
    # Accept torch tensors without importing torch here.
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _save_npy_synced(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())  # data on disk before the directory rename publishes it


class LatentDatasetWriter:
    """Write a latent dataset atomically, shard by shard.

    Use as a context manager: on a clean exit the dataset is published at ``path``;
    if the block raises, the temporary directory is deleted and ``path`` is untouched.

        with LatentDatasetWriter(out, shape=(4, 32, 32), num_classes=1000) as w:
            for x, y in batches:      # x (B, 4, 32, 32), y (B,)
                w.append(x, y)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        shape: Sequence[int],
        num_classes: int,
        dtype: str = "float16",
        shard_size: int = DEFAULT_SHARD_SIZE,
        scale_factor: float = SD_VAE_SCALE,
        scale_applied: bool = True,
        flipped_copies: bool = False,
        source: str = "",
        extra: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path).absolute()
        if len(shape) != 3 or not all(int(s) == s and s > 0 for s in shape):
            raise ValueError(f"shape must be three positive integers (C, H, W), got {shape!r}")
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if not scale_factor > 0:
            raise ValueError(f"scale_factor must be > 0, got {scale_factor}")
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} already exists (pass overwrite=True to replace it)")
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.num_classes = int(num_classes)
        self.shard_size = int(shard_size)
        self.overwrite = overwrite
        self._meta = dict(
            scale_factor=float(scale_factor), scale_applied=bool(scale_applied),
            flipped_copies=bool(flipped_copies), source=source, extra=dict(extra or {}),
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Same parent directory, so the final os.replace is a rename within one filesystem.
        self._tmp: Path | None = Path(
            tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent)
        )
        self._buf_x: list[np.ndarray] = []
        self._buf_y: list[np.ndarray] = []
        self._buffered = 0
        self._shards: list[ShardInfo] = []
        self._published = False
        self.count = 0

    # The context manager publishes on success and cleans up on failure.
    def __enter__(self) -> "LatentDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def append(self, latents: Any, labels: Any) -> None:
        """Add a batch: latents (B, C, H, W), labels (B,) integers in [0, num_classes)."""
        if self._tmp is None:
            raise RuntimeError("writer is already closed")
        x = _as_numpy(latents)
        y = _as_numpy(labels)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"latents must have shape (B, {', '.join(map(str, self.shape))}), "
                             f"got {tuple(x.shape)}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        if not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"labels must be integers, got dtype {y.dtype}")
        if y.size and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), "
                             f"got range [{y.min()}, {y.max()}]")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"latents must be floating point, got dtype {x.dtype}")
        with np.errstate(over="ignore"):  # reported below as a clear error instead
            # Always a copy: rows wait in the buffer, and the caller may reuse its array.
            x = x.astype(self.dtype, copy=True)
        # Checked after the cast: float32 values beyond 65504 become inf in float16.
        if not np.isfinite(x).all():
            raise ValueError(f"latents contain NaN or inf after casting to {self.dtype}")
        start = 0
        while start < x.shape[0]:
            take = min(self.shard_size - self._buffered, x.shape[0] - start)
            self._buf_x.append(x[start:start + take])
            self._buf_y.append(y[start:start + take].astype(np.int64))
            self._buffered += take
            start += take
            if self._buffered == self.shard_size:
                self._flush()
        self.count += x.shape[0]

    def _flush(self) -> None:
        if not self._buffered:
            return
        assert self._tmp is not None
        i = len(self._shards)
        x = np.concatenate(self._buf_x)  # (n, C, H, W)
        y = np.concatenate(self._buf_y)  # (n,)
        _save_npy_synced(self._tmp / latents_name(i), x)
        _save_npy_synced(self._tmp / labels_name(i), y)
        self._shards.append(ShardInfo(latents_name(i), labels_name(i), int(x.shape[0])))
        self._buf_x, self._buf_y, self._buffered = [], [], 0

    def close(self) -> Path:
        """Write the last shard and the manifest, then publish the directory at ``path``."""
        if self._tmp is None:
            if self._published:
                return self.path
            raise RuntimeError(f"{self.path}: writer was aborted; nothing was written")
        try:
            if self.count == 0:
                raise ValueError(f"{self.path}: refusing to write an empty latent dataset")
            self._flush()
            manifest = LatentManifest(
                shape=self.shape, dtype=self.dtype, shards=tuple(self._shards),  # type: ignore[arg-type]
                total=self.count, num_classes=self.num_classes, **self._meta,
            )
            mpath = self._tmp / MANIFEST_NAME
            with open(mpath, "w") as f:
                f.write(manifest.to_json())
                f.flush()
                os.fsync(f.fileno())
            self._publish()
        except BaseException:
            self.abort()
            raise
        return self.path

    def _publish(self) -> None:
        assert self._tmp is not None
        old: Path | None = None
        if self.path.exists():
            if not self.overwrite:
                raise FileExistsError(f"{self.path} appeared while writing; not replacing it")
            # os.replace cannot overwrite a non-empty directory: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old-", dir=self.path.parent))
            os.replace(self.path, old / "data")
        os.replace(self._tmp, self.path)
        self._tmp = None
        self._published = True
        _fsync_dir(self.path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Discard everything written so far; ``path`` is left as it was."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._buf_x, self._buf_y, self._buffered = [], [], 0


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_latent_dataset(path: str | os.PathLike, latents: Any, labels: Any, **kwargs: Any) -> Path:
    """Write whole arrays in one call (convenience over LatentDatasetWriter)."""
    x = _as_numpy(latents)
    kwargs.setdefault("dtype", "float16" if x.dtype == np.float16 else "float32")
    with LatentDatasetWriter(path, shape=x.shape[1:], **kwargs) as w:
        w.append(x, labels)
    return w.path


# --------------------------------------------------------------------------- reader


def _open_npy(path: Path, *, mmap: bool) -> np.ndarray:
    """Open one .npy file after checking its header against the file size."""
    if not path.is_file():
        raise LatentDatasetError(f"{path}: shard file is missing")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            header_len = f.tell()
    except (ValueError, OSError, EOFError) as e:
        raise LatentDatasetError(f"{path}: not a readable .npy file ({e})") from e
    if dtype.hasobject:
        raise LatentDatasetError(f"{path}: holds Python objects, expected a numeric array")
    if fortran and len(shape) > 1:
        raise LatentDatasetError(f"{path}: array is Fortran-ordered; expected C order")
    expected = header_len + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise LatentDatasetError(
            f"{path}: file {what}: {actual} bytes, header promises {expected} "
            f"(shape {shape}, dtype {dtype})"
        )
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise LatentDatasetError(f"{path}: cannot load ({e})") from e


class LatentDataset:
    """Read access to a validated latent dataset (see ``open_latent_dataset``)."""

    def __init__(self, path: Path, manifest: LatentManifest, latents: list[np.ndarray],
                 labels: np.ndarray) -> None:
        self.path = path
        self.manifest = manifest
        # Plain ndarray views of the memory maps: np.memmap's __getitem__ adds Python
        # overhead to every gather without changing what is read.
        self._shards = [a.view(np.ndarray) for a in latents]
        self.labels = labels  # (N,) int64, all shards concatenated, in memory
        counts = np.array([s.count for s in manifest.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)

    def __len__(self) -> int:
        return self.manifest.total

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.manifest.shape

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        """(latent (C, H, W) in the stored dtype, label)."""
        n = len(self)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an integer, got {type(i).__name__}; "
                            "use get_batch for arrays of indices")
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for dataset of {n} samples")
        i = int(i) % n
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        return np.array(self._shards[s][i - self._starts[s]]), int(self.labels[i])

    def get_batch(self, indices: Any, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Gather (latents (B, C, H, W) stored dtype, labels (B,) int64) for global indices.

        ``out``: optional C-contiguous (B, C, H, W) array of the stored dtype to fill.
        Indices sorted by shard (e.g. ascending) are gathered with one copy per row;
        any other order costs a second copy per row on the per-shard path.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"indices must lie in [0, {n}), got range [{idx.min()}, {idx.max()}]")
        shape = (idx.size, *self.shape)
        if out is None:
            out = np.empty(shape, dtype=self.manifest.dtype)
        elif out.shape != shape or out.dtype != np.dtype(self.manifest.dtype) or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {self.manifest.dtype} array of shape {shape}, "
                             f"got {out.dtype} {out.shape}")
        # np.take buffers `out` unless mode != "raise"; the indices are checked above.
        if len(self._shards) == 1:
            np.take(self._shards[0], idx, axis=0, out=out, mode="clip")
        elif idx.size:
            shard = np.searchsorted(self._starts, idx, side="right") - 1
            local = idx - self._starts[shard]
            in_order = bool(np.all(shard[1:] >= shard[:-1]))
            order = None if in_order else np.argsort(shard, kind="stable")
            grouped = shard if order is None else shard[order]
            cuts = (np.flatnonzero(np.diff(grouped)) + 1).tolist()
            bounds = list(zip([0, *cuts], [*cuts, idx.size]))
            if idx.size >= _ROWS_PER_SHARD_FOR_TAKE * len(bounds):
                # Many rows per shard touched: one vectorised np.take per shard.
                for a, b in bounds:
                    src = self._shards[grouped[a]]
                    if order is None:
                        np.take(src, local[a:b], axis=0, out=out[a:b], mode="clip")
                    else:
                        rows = order[a:b]
                        out[rows] = np.take(src, local[rows], axis=0)
            else:
                # Rows spread thinly over many shards (ImageNet has ~80): per-shard calls
                # would cost more than a plain row-by-row copy.
                shards = self._shards
                for row, (s, j) in enumerate(zip(shard.tolist(), local.tolist())):
                    out[row] = shards[s][j]
        return out, self.labels[idx]

    def __repr__(self) -> str:
        m = self.manifest
        return (f"LatentDataset({str(self.path)!r}, n={m.total}, shape={m.shape}, "
                f"dtype={m.dtype}, shards={len(m.shards)}, classes={m.num_classes})")


def open_latent_dataset(path: str | os.PathLike, *, in_memory: bool = False,
                        check_finite: bool = False) -> LatentDataset:
    """Open and validate a latent dataset.

    Every shard's header, size, dtype, shape and count is checked against the manifest,
    and every label against [0, num_classes); any disagreement raises LatentDatasetError
    naming the file. ``in_memory`` reads the latents into RAM instead of memory-mapping
    them; ``check_finite`` additionally scans every latent for NaN/inf (reads everything).
    """
    root = Path(path).absolute()
    manifest = read_manifest(root)
    listed = {name for s in manifest.shards for name in (s.latents, s.labels)}
    stray = sorted(p.name for p in root.iterdir() if _SHARD_RE.match(p.name) and p.name not in listed)
    if stray:
        raise LatentDatasetError(
            f"{root / MANIFEST_NAME}: shard files {stray} exist but are not listed in the manifest"
        )
    c, h, w = manifest.shape
    latents, labels = [], []
    for i, s in enumerate(manifest.shards):
        lp, yp = root / s.latents, root / s.labels
        x = _open_npy(lp, mmap=not in_memory)
        if x.dtype != np.dtype(manifest.dtype):
            raise LatentDatasetError(f"{lp}: dtype {x.dtype}, manifest says {manifest.dtype}")
        if x.shape != (s.count, c, h, w):
            raise LatentDatasetError(
                f"{lp}: shape {x.shape}, manifest says {(s.count, c, h, w)} (count, C, H, W)"
            )
        y = _open_npy(yp, mmap=False)
        if y.dtype != np.int64:
            raise LatentDatasetError(f"{yp}: labels have dtype {y.dtype}, expected int64")
        if y.ndim != 1:
            raise LatentDatasetError(f"{yp}: labels must be 1-D, got shape {y.shape}")
        if y.shape[0] != s.count:
            raise LatentDatasetError(
                f"{yp}: {y.shape[0]} labels but {lp.name} / the manifest hold {s.count} latents"
            )
        if y.min() < 0 or y.max() >= manifest.num_classes:
            bad = int(np.nonzero((y < 0) | (y >= manifest.num_classes))[0][0])
            raise LatentDatasetError(
                f"{yp}: label {int(y[bad])} at row {bad} is outside [0, {manifest.num_classes})"
            )
        if check_finite:
            for start in range(0, s.count, 4096):
                if not np.isfinite(x[start:start + 4096]).all():
                    raise LatentDatasetError(f"{lp}: contains NaN or inf near row {start}")
        latents.append(x)
        labels.append(y)
    return LatentDataset(root, manifest, latents, np.concatenate(labels))
