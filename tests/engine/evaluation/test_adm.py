"""ADM metrics: Frechet distance numerics, IS, precision/recall, .npz plumbing, the Inception net."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import linalg

from engine.evaluate import main
from engine.evaluation.adm import (compute_activations, evaluate_batches, inception_score, knn_radii,
                                   manifold_membership, open_npz_array, precision_recall)
from engine.evaluation.fid import FeatureStatistics, StatsAccumulator, frechet_details, frechet_distance
from engine.evaluation.inception import (FIDInceptionV3, InceptionWeightsError, WEIGHTS_ENV, WEIGHTS_FILENAME,
                                         WEIGHTS_URL, load_inception, tf1_resize_bilinear)
from tests.conftest import REPO

DIMS = [1, 7, 64, 203]


def random_spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d + 3))
    return a @ a.T / a.shape[1]


def scipy_fd(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's general matrix square root (no fallbacks)."""
    covmean = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


# ---------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_matches_scipy(d, method):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    ours = frechet_distance(mu1, s1, mu2, s2, method=method)
    ref = scipy_fd(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-8, abs=1e-8)


def test_rank_deficient_covariances_stay_real_and_agree():
    # Fewer samples than dimensions (as with 2048-d features of a few hundred images): both
    # covariances are singular, where sqrtm produces imaginary parts and eigh clips at 0.
    rng = np.random.default_rng(0)
    d = 128
    s1, s2 = random_spd(rng, d, rank=40), random_spd(rng, d, rank=50)
    mu = rng.standard_normal(d)
    eig = frechet_details(mu, s1, mu, s2, method="eigh")
    adm = frechet_details(mu, s1, mu, s2, method="sqrtm")
    assert np.isfinite(eig.distance) and eig.max_imag == 0.0
    assert -1e-10 < eig.min_eigenvalue <= 0.0  # rounding only, reported relative to the top
    assert eig.distance == pytest.approx(adm.distance, rel=1e-6)
    assert eig.mean_term == 0.0


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((500, 32)) * 3 + 1
    stats = FeatureStatistics.from_features(feats)
    scale = np.trace(stats.sigma)
    for method in ("eigh", "sqrtm"):
        assert abs(frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma, method=method)) < 1e-9 * scale


@pytest.mark.parametrize("d", [3, 50])
def test_shifted_gaussians_analytic(d):
    rng = np.random.default_rng(d)
    shift = rng.standard_normal(d)
    # Equal isotropic covariances: only the mean shift counts.
    s = 2.5 * np.eye(d)
    assert frechet_distance(np.zeros(d), s, shift, s) == pytest.approx(shift @ shift, rel=1e-12)
    # Diagonal covariances: sum (sqrt a_i - sqrt b_i)^2 on top of the shift.
    a, b = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
    expected = shift @ shift + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(shift, np.diag(a), np.zeros(d), np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_sampled_shifted_gaussians_approach_the_mean_shift():
    rng = np.random.default_rng(2)
    d, n = 8, 200_000
    shift = np.full(d, 0.5)
    x = rng.standard_normal((n, d))
    y = rng.standard_normal((n, d)) + shift
    fd = frechet_distance(*astuple(FeatureStatistics.from_features(x)), *astuple(FeatureStatistics.from_features(y)))
    assert fd == pytest.approx(shift @ shift, abs=0.01)  # 2.0 analytic; sampling error ~ d / n


def astuple(s: FeatureStatistics):
    return s.mu, s.sigma


def test_frechet_rejects_bad_input():
    with pytest.raises(ValueError, match="means have different shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.zeros(2), np.array([[np.nan, 0], [0, 1]]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="unknown Frechet method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


def test_streaming_statistics_match_numpy_even_with_a_large_offset():
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((1000, 16)) * 0.01 + 1e4  # a common offset 1e6 x the spread
    acc = StatsAccumulator()
    for chunk in np.array_split(feats, 7):
        acc.update(chunk)
    stats = acc.finalize()
    centred = feats - feats.mean(0)  # numpy's two-pass covariance is accurate here
    np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, centred.T @ centred / 999, rtol=1e-7, atol=1e-12)
    assert stats.count == 1000 and np.array_equal(stats.sigma, stats.sigma.T)


# ---------------------------------------------------------------------------------------
# Inception Score, precision and recall
# ---------------------------------------------------------------------------------------


def test_inception_score_limits():
    n, k = 1000, 10
    assert inception_score(np.zeros((n, k)))[0] == pytest.approx(1.0)  # no information
    confident = np.full((n, k), -1e4)
    confident[np.arange(n), np.arange(n) % k] = 0.0  # each class equally often, each sample sure
    mean, std = inception_score(confident, num_splits=10)
    assert mean == pytest.approx(k, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="num_splits"):
        inception_score(np.zeros((5, k)), num_splits=10)


def brute_force_pr(ref: np.ndarray, sam: np.ndarray, k: int) -> tuple[float, float]:
    def d2(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(d2(ref, ref), axis=1)[:, k]
    r_sam = np.sort(d2(sam, sam), axis=1)[:, k]
    precision = (d2(sam, ref) <= r_ref[None, :]).any(1).mean()
    recall = (d2(ref, sam) <= r_sam[None, :]).any(1).mean()
    return float(precision), float(recall)


def test_precision_recall_matches_brute_force_across_blocks():
    rng = np.random.default_rng(4)
    ref = rng.standard_normal((97, 6)).astype(np.float32)
    sam = (rng.standard_normal((83, 6)) * 1.3 + 0.4).astype(np.float32)
    expected = brute_force_pr(ref.astype(np.float64), sam.astype(np.float64), 3)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0  # a non-trivial case
    for block in (10, 33, 10_000):  # blocks smaller than, not dividing, and larger than the sets
        assert precision_recall(ref, sam, 3, batch_size=block) == pytest.approx(expected)
    radii = knn_radii(ref, 3, batch_size=10)
    brute = np.sort(((ref[:, None] - ref[None]) ** 2).sum(-1), axis=1)[:, 3]
    np.testing.assert_allclose(radii, brute, rtol=1e-4, atol=1e-5)


def test_precision_recall_extremes():
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((50, 4)).astype(np.float32)
    assert precision_recall(ref, ref.copy()) == (1.0, 1.0)
    assert precision_recall(ref, ref + 100.0) == (0.0, 0.0)
    inside = manifold_membership(ref[:5] + 1e-3, ref, knn_radii(ref, 3))
    assert inside.all()


# ---------------------------------------------------------------------------------------
# .npz plumbing with a tiny random feature extractor
# ---------------------------------------------------------------------------------------


class TinyExtractor(nn.Module):
    """A stand-in for the Inception net: (pool (N, 6), spatial (N, 2*4*4), logits (N, 5))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.tanh(self.conv(x / 127.5 - 1.0))  # (N, 6, H/2, W/2)
        pool = h.mean(dim=(2, 3))  # (N, 6)
        spatial = nn.functional.adaptive_avg_pool2d(h[:, :2], 4).flatten(1)  # (N, 32)
        return pool, spatial, self.fc(pool) * 4


def images(seed: int, n: int, size: int = 12, bright: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, size=(n, size, size, 3))
    return np.clip(base + bright, 0, 255).astype(np.uint8)


def write_ref(path: Path, imgs: np.ndarray, extractor: nn.Module | None = None, **extra) -> Path:
    arrays = {"arr_0": imgs, **extra}
    if extractor is not None:  # ADM's reference layout: images plus precomputed statistics
        acts = compute_activations(extractor, iter([imgs]))
        pool, spatial = FeatureStatistics.from_features(acts.pool), FeatureStatistics.from_features(acts.spatial)
        arrays.update(mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("compressed", [False, True])
def test_streaming_reader_matches_np_load(tmp_path, compressed):
    imgs = images(0, 23)
    path = tmp_path / "a.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=imgs, labels=np.arange(23))
    with open_npz_array(path) as reader:
        assert reader.shape == imgs.shape and len(reader) == 23
        batches = list(reader.read_batches(10))
    assert [len(b) for b in batches] == [10, 10, 3]
    np.testing.assert_array_equal(np.concatenate(batches), imgs)
    with pytest.raises(KeyError, match="arr_0"):
        with open_npz_array(path, "missing"):
            pass


def test_evaluate_uses_precomputed_reference_statistics(tmp_path):
    ext = TinyExtractor()
    ref_imgs, sam_imgs = images(1, 60), images(2, 40, bright=40)
    # The reference's precomputed statistics deliberately differ from its images' own: FID and
    # sFID must use the file's (ADM: whole-training-set statistics), P/R the images.
    other = compute_activations(ext, iter([images(3, 80, bright=80)]))
    pool, spatial = FeatureStatistics.from_features(other.pool), FeatureStatistics.from_features(other.spatial)
    ref = write_ref(tmp_path / "ref.npz", ref_imgs, mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu,
                    sigma_s=spatial.sigma)
    sam = tmp_path / "sam.npz"
    np.savez(sam, arr_0=sam_imgs)
    res = evaluate_batches(ref, sam, extractor=ext, batch_size=16, device="cpu")
    acts = compute_activations(ext, iter([sam_imgs]))
    s_pool = FeatureStatistics.from_features(acts.pool)
    s_spatial = FeatureStatistics.from_features(acts.spatial)
    assert res.reference_stats == "precomputed"
    assert res.fid == pytest.approx(frechet_distance(s_pool.mu, s_pool.sigma, pool.mu, pool.sigma), rel=1e-9)
    assert res.sfid == pytest.approx(frechet_distance(s_spatial.mu, s_spatial.sigma, spatial.mu, spatial.sigma),
                                     rel=1e-9)
    ref_acts = compute_activations(ext, iter([ref_imgs]))
    assert (res.precision, res.recall) == pytest.approx(precision_recall(ref_acts.pool, acts.pool))
    assert res.inception_score == pytest.approx(inception_score(acts.logits)[0])
    assert res.num_samples == 40 and res.num_reference == 60 and 1.0 <= res.inception_score <= 5.0


def test_evaluate_without_precomputed_stats_and_self_comparison(tmp_path):
    ext = TinyExtractor()
    imgs = images(4, 50)
    ref = write_ref(tmp_path / "ref.npz", imgs)
    sam = tmp_path / "same.npz"
    np.savez(sam, arr_0=imgs)
    res = evaluate_batches(ref, sam, extractor=ext, batch_size=7)
    assert res.reference_stats == "computed"
    assert abs(res.fid) < 1e-8 and abs(res.sfid) < 1e-8
    assert res.precision == 1.0 and res.recall == 1.0
    # Precomputed statistics written from the same extractor give the same numbers.
    ref2 = write_ref(tmp_path / "ref2.npz", imgs, extractor=ext)
    res2 = evaluate_batches(ref2, sam, extractor=ext, batch_size=50)
    assert res2.reference_stats == "precomputed" and abs(res2.fid) < 1e-8


def test_evaluate_rejects_mismatched_or_malformed_batches(tmp_path):
    ext = TinyExtractor()
    imgs = images(5, 30)
    ref = write_ref(tmp_path / "ref.npz", imgs, mu=np.zeros(2048), sigma=np.eye(2048),
                    mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    sam = tmp_path / "sam.npz"
    np.savez(sam, arr_0=imgs)
    with pytest.raises(ValueError, match="2048-d but the feature extractor gives 6-d"):
        evaluate_batches(ref, sam, extractor=ext)
    bad = tmp_path / "float.npz"
    np.savez(bad, arr_0=imgs.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        evaluate_batches(bad, sam, extractor=ext)
    with pytest.raises(FileNotFoundError, match="no such .npz"):
        evaluate_batches(tmp_path / "nope.npz", sam, extractor=ext)


# ---------------------------------------------------------------------------------------
# The Inception network and its weights file
# ---------------------------------------------------------------------------------------


def test_missing_inception_weights_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    for where in (None, tmp_path / "absent.pth"):
        with pytest.raises(InceptionWeightsError) as info:
            load_inception(where)
        msg = str(info.value)
        assert WEIGHTS_FILENAME in msg and WEIGHTS_URL in msg and "--inception" in msg
    # Through the CLI: one line on stderr, exit status 2, before any image is read.
    imgs = images(6, 10)
    np.savez(tmp_path / "r.npz", arr_0=imgs)
    proc = subprocess.run([sys.executable, "-m", "engine.evaluate", str(tmp_path / "r.npz"), str(tmp_path / "r.npz"),
                           "--inception", str(tmp_path / "absent.pth"), "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Inception weights file not found" in proc.stderr and WEIGHTS_FILENAME in proc.stderr
    with pytest.raises(InceptionWeightsError):
        main([str(tmp_path / "r.npz"), str(tmp_path / "r.npz"), "--inception", str(tmp_path / "absent.pth")])


def test_inception_architecture_shapes_and_weight_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    trunk = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("fc."))
    assert trunk == 21_785_568  # torchvision's Inception-v3 without aux head: 23,834,568 - 1000-way fc
    assert net.fc.weight.shape == (1008, 2048)
    x = torch.from_numpy(images(7, 2, size=40)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        pool, spatial, logits = net(x)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 17 * 17 * 7) and logits.shape == (2, 1008)
    torch.testing.assert_close(logits, pool @ net.fc.weight.T)  # bias-free, as ADM's softmax

    # A state_dict file in the port's layout loads strictly and reproduces the outputs.
    path = tmp_path / WEIGHTS_FILENAME
    torch.save(net.state_dict(), path)
    loaded = load_inception(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).pool, pool)
    broken = {k: v for k, v in net.state_dict().items() if not k.startswith("Mixed_7c.branch_pool")}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(InceptionWeightsError, match="missing: Mixed_7c.branch_pool"):
        load_inception(tmp_path / "broken.pth")


def test_tf1_resize_has_no_half_pixel_offset():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    # Downsampling by 2 samples input pixels 0 and 2 exactly (torch's half-pixel resize averages).
    torch.testing.assert_close(tf1_resize_bilinear(x, 2), x[:, :, ::2, ::2])
    row = torch.tensor([[[[0.0, 2.0]]]]).expand(1, 1, 2, 2)
    up = tf1_resize_bilinear(row, 4)  # positions 0, 0.5, 1, 1.5 -> clamped at the last pixel
    torch.testing.assert_close(up[0, 0, 0], torch.tensor([0.0, 1.0, 2.0, 2.0]))
