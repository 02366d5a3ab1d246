"""ADM's sample metrics: FID, sFID, Inception Score, precision and recall.

    python -m engine.evaluate REF_BATCH.npz SAMPLES.npz --inception pt_inception-2015-12-05-6726825d.pth
        [--batch-size 100] [--device cuda] [--json metrics.json]

Both files are ADM ``.npz`` batches: ``arr_0`` = (N, H, W, 3) uint8 images. A reference batch such
as ``VIRTUAL_imagenet256_labeled.npz`` also holds ``mu``/``sigma`` (pool_3 statistics of the
whole training set) and ``mu_s``/``sigma_s`` (spatial statistics): FID and sFID use those when
present, as ADM does; the reference images themselves serve precision and recall.

What is computed (ADM's evaluator, openai/guided-diffusion evaluations/evaluator.py):
  FID        Frechet distance of the pool_3 (2048-d) statistics (``engine.evaluation.fid``)
  sFID       the same on mixed_6/conv's first 7 channels, flattened (2023-d)
  IS         exp(E_x KL(p(y|x) || p(y))) on the softmax of the 1008 bias-free logits,
             averaged over 10 splits (ADM: splits of 5,000 of 50,000 samples)
  precision  fraction of samples inside the reference manifold; recall: fraction of reference
             images inside the sample manifold (Kynkaanniemi et al. 2019): a point is inside
             when it lies within the k-th (k = 3) nearest-neighbour radius of some point of
             the other set, radii from pool_3 features, distances in batches of 10,000 rows

Differences from ADM, all deliberate: pairwise distances are computed in float32 (ADM uses
float16 where it can), the Frechet square root is eigendecomposition-based (``--fd-method
sqrtm`` gives ADM's scipy computation), and the network is the PyTorch port of the TF graph
(``engine.evaluation.inception``), so numbers agree with ADM's to the port's accuracy, not bit for bit.

Large batches are streamed from the .npz (a 50,000 x 256 x 256 x 3 file is 9.8 GB), never
loaded whole.
"""

from __future__ import annotations

import math
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from engine.evaluation.fid import FD_METHODS, FeatureStatistics, FrechetDetails, frechet_distance_stats
from engine.evaluation.inception import load_inception

IS_SPLITS = 10
PR_NEIGHBOURS = 3
PR_BATCH = 10_000  # ADM's row and column batch for the distance blocks


# ---------------------------------------------------------------------------------------
# Reading ADM .npz batches without loading them whole
# ---------------------------------------------------------------------------------------


class NpzArrayReader:
    """One array of an .npz, read sequentially in batches of rows."""

    def __init__(self, file, shape: tuple[int, ...], dtype: np.dtype):
        self._file = file
        self.shape = shape
        self.dtype = dtype
        self._row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._rows_read = 0

    def __len__(self) -> int:
        return self.shape[0]

    def read_batch(self, n: int) -> np.ndarray | None:
        n = min(n, self.shape[0] - self._rows_read)
        if n <= 0:
            return None
        want = n * self._row_bytes
        buf = self._file.read(want)
        if len(buf) != want:
            raise ValueError(f"truncated array: expected {want} bytes, got {len(buf)}")
        self._rows_read += n
        return np.frombuffer(buf, dtype=self.dtype).reshape(n, *self.shape[1:])

    def read_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        while (batch := self.read_batch(batch_size)) is not None:
            yield batch


@contextmanager
def open_npz_array(path: str | os.PathLike, name: str = "arr_0") -> Iterator[NpzArrayReader]:
    """Stream ``name`` out of the .npz at ``path`` (plain or compressed, C order)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such .npz batch: {path}")
    with zipfile.ZipFile(path) as archive:
        member = f"{name}.npy"
        if member not in archive.namelist():
            keys = sorted(n[:-4] for n in archive.namelist() if n.endswith(".npy"))
            raise KeyError(f"{path} has no array {name!r}; it holds {keys}")
        with archive.open(member) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            if fortran:
                raise ValueError(f"{path}:{name} is stored in Fortran order; save it C-ordered")
            if dtype.hasobject:
                raise ValueError(f"{path}:{name} holds Python objects, not images")
            yield NpzArrayReader(f, tuple(shape), dtype)


def npz_keys(path: str | os.PathLike) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return sorted(n[:-4] for n in archive.namelist() if n.endswith(".npy"))


def _check_images(batch: np.ndarray, where: str) -> None:
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
        raise ValueError(f"{where}: ADM batches hold uint8 images (N, H, W, 3) in arr_0, "
                         f"got {batch.dtype} {batch.shape}")


# ---------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------


class Activations(NamedTuple):
    pool: np.ndarray  # (N, P) float32
    spatial: np.ndarray  # (N, S) float32
    logits: np.ndarray  # (N, K) float32


@torch.no_grad()
def compute_activations(extractor: torch.nn.Module, batches: Iterator[np.ndarray], *,
                        device: torch.device | str = "cpu", where: str = "images",
                        progress: bool = False, total: int | None = None) -> Activations:
    """Run ``extractor`` over uint8 NHWC batches; it gets float (N, 3, H, W) in [0, 255] and
    returns (pool, spatial, logits)."""
    device = torch.device(device)
    pools, spatials, logits = [], [], []
    bar = None
    if progress:
        bar = tqdm(total=total, desc=f"activations ({where})", unit="img")
    # cuDNN may use TF32 for convolutions by default; metrics want full fp32.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        for batch in batches:
            _check_images(batch, where)
            x = torch.from_numpy(np.array(batch, copy=True)).to(device)  # stream buffers are read-only
            x = x.permute(0, 3, 1, 2).float()  # (N, 3, H, W) in [0, 255]
            out = extractor(x)
            if not (isinstance(out, (tuple, list)) and len(out) == 3):
                raise TypeError("a feature extractor must return (pool, spatial, logits), got "
                                f"{type(out).__name__}")
            pool, spatial, logit = (t.reshape(t.shape[0], -1).float().cpu().numpy() for t in out)
            pools.append(pool)
            spatials.append(spatial)
            logits.append(logit)
            if bar is not None:
                bar.update(len(batch))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        if bar is not None:
            bar.close()
    if not pools:
        raise ValueError(f"{where}: no images")
    return Activations(np.concatenate(pools), np.concatenate(spatials), np.concatenate(logits))


def read_activations(path: str | os.PathLike, extractor: torch.nn.Module, *, batch_size: int = 100,
                     device: torch.device | str = "cpu", progress: bool = False) -> Activations:
    """Activations of every image in an ADM batch's ``arr_0``."""
    with open_npz_array(path, "arr_0") as reader:
        if len(reader.shape) != 4 or reader.shape[-1] != 3 or reader.dtype != np.uint8:
            raise ValueError(f"{path}: arr_0 must be uint8 images (N, H, W, 3), got {reader.dtype} {reader.shape}")
        return compute_activations(extractor, reader.read_batches(batch_size), device=device,
                                   where=str(path), progress=progress, total=len(reader))


# ---------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------


def inception_score(logits: np.ndarray, num_splits: int = IS_SPLITS) -> tuple[float, float]:
    """(mean, std) over ``num_splits`` near-equal consecutive splits of exp(E KL(p(y|x) || p(y)))."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] < num_splits or num_splits < 1:
        raise ValueError(f"Inception Score needs logits (N, K) with N >= num_splits >= 1, got "
                         f"{logits.shape} and {num_splits} splits")
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))  # log softmax (N, K)
    p = np.exp(log_p)
    scores = []
    for part_log_p, part_p in zip(np.array_split(log_p, num_splits), np.array_split(p, num_splits)):
        log_marginal = np.log(part_p.mean(axis=0, keepdims=True))  # (1, K)
        kl = (part_p * (part_log_p - log_marginal)).sum(axis=1)  # (n,)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------
# Improved precision and recall (k-NN manifolds)
# ---------------------------------------------------------------------------------------


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (n, m) between rows, clamped at 0 (rounding)."""
    d = (a * a).sum(1, keepdim=True) - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return d.clamp_min_(0.0)


def knn_radii(features: np.ndarray, k: int = PR_NEIGHBOURS, *, batch_size: int = PR_BATCH,
              device: torch.device | str = "cpu") -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row (the point itself excluded)."""
    feats = torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
    n = feats.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k-NN radii need 1 <= k < number of points; got k={k}, {n} points")
    radii = torch.empty(n, dtype=torch.float32, device=device)
    for start in range(0, n, batch_size):
        rows = feats[start:start + batch_size]
        # Keep the k+1 smallest distances per row block by block: memory stays one block, not a
        # (rows x N) matrix. The point's distance to itself (0) is among them, so the k-th
        # neighbour is the largest of the k+1.
        best = None
        for c in range(0, n, batch_size):
            d = _sq_distances(rows, feats[c:c + batch_size])  # (rows, cols)
            cand = d if best is None else torch.cat([best, d], 1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[start:start + len(rows)] = best.max(dim=1).values
    return radii.cpu().numpy()


def manifold_membership(queries: np.ndarray, support: np.ndarray, support_radii: np.ndarray, *,
                        batch_size: int = PR_BATCH, device: torch.device | str = "cpu") -> np.ndarray:
    """Bool per query row: within the radius of at least one support row (distance <= radius)."""
    q = torch.as_tensor(np.asarray(queries, dtype=np.float32), device=device)
    s = torch.as_tensor(np.asarray(support, dtype=np.float32), device=device)
    r = torch.as_tensor(np.asarray(support_radii, dtype=np.float32), device=device)
    inside = torch.zeros(q.shape[0], dtype=torch.bool, device=device)
    for start in range(0, q.shape[0], batch_size):
        rows = q[start:start + batch_size]
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=device)
        for c in range(0, s.shape[0], batch_size):
            hit |= (_sq_distances(rows, s[c:c + batch_size]) <= r[c:c + batch_size][None, :]).any(1)
        inside[start:start + len(rows)] = hit
    return inside.cpu().numpy()


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = PR_NEIGHBOURS, *,
                     batch_size: int = PR_BATCH, device: torch.device | str = "cpu") -> tuple[float, float]:
    """(precision, recall) of sample features against reference features (Kynkaanniemi et al.)."""
    if reference.shape[1] != samples.shape[1]:
        raise ValueError(f"feature widths differ: reference {reference.shape[1]}, samples {samples.shape[1]}")
    ref_radii = knn_radii(reference, k, batch_size=batch_size, device=device)
    sample_radii = knn_radii(samples, k, batch_size=batch_size, device=device)
    precision = manifold_membership(samples, reference, ref_radii, batch_size=batch_size, device=device).mean()
    recall = manifold_membership(reference, samples, sample_radii, batch_size=batch_size, device=device).mean()
    return float(precision), float(recall)


# ---------------------------------------------------------------------------------------
# The whole evaluation
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationResult:
    inception_score: float
    inception_score_std: float
    fid: float
    sfid: float
    precision: float
    recall: float
    num_samples: int
    num_reference: int
    reference_stats: str
    """"precomputed" (the file's mu/sigma, mu_s/sigma_s) or "computed" (from its images)."""
    fd_method: str
    fid_details: dict
    sfid_details: dict

    def summary(self) -> str:
        return "\n".join([
            f"Inception Score: {self.inception_score:.4f} (std over splits {self.inception_score_std:.4f})",
            f"FID: {self.fid:.4f}",
            f"sFID: {self.sfid:.4f}",
            f"Precision: {self.precision:.4f}",
            f"Recall: {self.recall:.4f}",
            f"({self.num_samples} samples vs {self.num_reference} reference images; reference "
            f"statistics {self.reference_stats}; Frechet square root: {self.fd_method})",
        ])


def reference_statistics(path: str | os.PathLike) -> tuple[FeatureStatistics, FeatureStatistics] | None:
    """The precomputed (pool, spatial) statistics of a reference batch, or None if it has none."""
    keys = set(npz_keys(path))
    if "mu" not in keys:
        return None
    if not {"sigma", "mu_s", "sigma_s"} <= keys:
        raise ValueError(f"{path} has 'mu' but not all of 'sigma', 'mu_s', 'sigma_s' (it holds {sorted(keys)})")
    with np.load(path) as z:
        return (FeatureStatistics(z["mu"], z["sigma"]), FeatureStatistics(z["mu_s"], z["sigma_s"]))


def _details(d: FrechetDetails) -> dict:
    return {k: v for k, v in asdict(d).items() if k != "method"}


def evaluate_batches(ref_path: str | os.PathLike, sample_path: str | os.PathLike, *,
                     extractor: torch.nn.Module | None = None, inception: str | os.PathLike | None = None,
                     batch_size: int = 100, device: torch.device | str | None = None,
                     num_splits: int = IS_SPLITS, k: int = PR_NEIGHBOURS, pr_batch_size: int = PR_BATCH,
                     fd_method: str = "eigh", progress: bool = False) -> EvaluationResult:
    """All five metrics of the samples in ``sample_path`` against the reference ``ref_path``.

    ``extractor``: any module mapping float (N, 3, H, W) images in [0, 255] to (pool, spatial,
    logits); default the FID Inception loaded from ``inception`` (or $DISP_INCEPTION_WEIGHTS).
    """
    if fd_method not in FD_METHODS:
        raise ValueError(f"unknown --fd-method {fd_method!r}; valid: {', '.join(FD_METHODS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for p in (ref_path, sample_path):
        if not Path(p).is_file():
            raise FileNotFoundError(f"no such .npz batch: {p}")
    precomputed = reference_statistics(ref_path)  # fail on a malformed file before any work
    if extractor is None:
        extractor = load_inception(inception, device)
    else:
        extractor = extractor.to(device).eval()

    ref = read_activations(ref_path, extractor, batch_size=batch_size, device=device, progress=progress)
    sample = read_activations(sample_path, extractor, batch_size=batch_size, device=device, progress=progress)

    if precomputed is not None:
        ref_pool, ref_spatial = precomputed
        for name, stats, width in (("mu/sigma", ref_pool, sample.pool.shape[1]),
                                   ("mu_s/sigma_s", ref_spatial, sample.spatial.shape[1])):
            if stats.dim != width:
                raise ValueError(f"{ref_path}: precomputed {name} are {stats.dim}-d but the feature "
                                 f"extractor gives {width}-d features; were they made with another network?")
        source = "precomputed"
    else:
        ref_pool = FeatureStatistics.from_features(ref.pool)
        ref_spatial = FeatureStatistics.from_features(ref.spatial)
        source = "computed"
    sample_pool = FeatureStatistics.from_features(sample.pool)
    sample_spatial = FeatureStatistics.from_features(sample.spatial)
    fid = frechet_distance_stats(sample_pool, ref_pool, method=fd_method)
    sfid = frechet_distance_stats(sample_spatial, ref_spatial, method=fd_method)
    is_mean, is_std = inception_score(sample.logits, num_splits)
    precision, recall = precision_recall(ref.pool, sample.pool, k, batch_size=pr_batch_size, device=device)
    return EvaluationResult(is_mean, is_std, fid.distance, sfid.distance, precision, recall,
                            len(sample.pool), len(ref.pool), source, fd_method, _details(fid), _details(sfid))


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
