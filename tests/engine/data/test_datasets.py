"""Built-in datasets: scikit-learn digits and synthetic latents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.data.datasets import digits_arrays, make_digits_dataset, make_synthetic_dataset
from engine.data.format import LatentDatasetError, open_latent_dataset, write_latent_dataset


def test_digits_dataset(tmp_path: Path) -> None:
    path = make_digits_dataset(tmp_path / "digits")
    ds = open_latent_dataset(path, check_finite=True)
    m = ds.manifest
    assert len(ds) == 1797 and m.num_classes == 10 and m.shape == (1, 16, 16)
    assert m.dtype == "float32" and m.scale_factor == 1.0 and not m.flipped_copies
    assert "load_digits" in m.source and m.extra["builtin"] == "digits"
    x, y = ds.get_batch(np.arange(len(ds)))
    assert sorted(set(y.tolist())) == list(range(10))
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() == -1.0 and x.max() > 0.9  # uses the range, not a sliver of it
    # Same digits as scikit-learn's, in order, bilinearly upsampled: with align_corners
    # False at exactly 2x, output row 2i+1 sits at source i + 1/4, so an interior output
    # pixel (2i+1, 2j+1) is the separable 3/4-1/4 blend of source rows i, i+1, cols j, j+1.
    from sklearn.datasets import load_digits

    src = load_digits()
    np.testing.assert_array_equal(y, src.target)
    v = src.images / 8.0 - 1.0  # (1797, 8, 8)
    w = np.array([0.75, 0.25])
    for i, j in [(2, 3), (4, 5), (0, 6)]:
        want = np.einsum("a,nab,b->n", w, v[:, i:i + 2, j:j + 2], w)
        np.testing.assert_allclose(x[:, 0, 2 * i + 1, 2 * j + 1], want, atol=1e-6)


def test_digits_value_mapping_at_native_size() -> None:
    from sklearn.datasets import load_digits

    x, y = digits_arrays(size=8)  # no resampling: the mapping v / 8 - 1 exactly
    np.testing.assert_array_equal(x[:, 0], (load_digits().images / 8.0 - 1.0).astype(np.float32))


def test_digits_is_idempotent(tmp_path: Path) -> None:
    path = make_digits_dataset(tmp_path / "digits")
    mtime = (path / "manifest.json").stat().st_mtime_ns
    assert make_digits_dataset(path) == path
    assert (path / "manifest.json").stat().st_mtime_ns == mtime  # reused, not rewritten
    with pytest.raises(LatentDatasetError, match="different dataset"):
        make_digits_dataset(path, size=24)
    make_digits_dataset(path, size=24, overwrite=True)
    assert open_latent_dataset(path).shape == (1, 24, 24)


def test_digits_refuses_foreign_or_broken_dirs(tmp_path: Path) -> None:
    write_latent_dataset(tmp_path / "other", np.zeros((2, 1, 16, 16), np.float32), [0, 1],
                         num_classes=2)
    with pytest.raises(LatentDatasetError, match="different dataset"):
        make_digits_dataset(tmp_path / "other")
    (tmp_path / "broken").mkdir()
    with pytest.raises(LatentDatasetError, match="not a valid latent dataset"):
        make_digits_dataset(tmp_path / "broken")


def test_digits_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from engine.digits import main  # what `python -m engine.digits OUT_DIR` runs

    main([str(tmp_path / "d")])
    assert "n=1797" in capsys.readouterr().out
    assert len(open_latent_dataset(tmp_path / "d")) == 1797


def test_synthetic_dataset(tmp_path: Path) -> None:
    path = make_synthetic_dataset(tmp_path / "s", 300, shape=(4, 8, 8), num_classes=1000,
                                  seed=3, shard_size=128)
    ds = open_latent_dataset(path)
    assert len(ds) == 300 and ds.shape == (4, 8, 8) and ds.manifest.dtype == "float16"
    assert [s.count for s in ds.manifest.shards] == [128, 128, 44]
    x, y = ds.get_batch(np.arange(300))
    assert 0.9 < float(x.astype(np.float32).std()) < 1.1 and y.max() < 1000
    again = open_latent_dataset(make_synthetic_dataset(tmp_path / "t", 300, shape=(4, 8, 8), seed=3))
    np.testing.assert_array_equal(again.get_batch(np.arange(300))[0], x)  # seeded
