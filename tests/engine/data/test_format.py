"""On-disk latent format: round trip, validation of bad input, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from engine.data.format import (
    MANIFEST_NAME,
    LatentDatasetError,
    LatentDatasetWriter,
    open_latent_dataset,
    read_manifest,
    write_latent_dataset,
)

SHAPE = (3, 5, 7)  # awkward, non-square on purpose: catches H/W mix-ups


def _arrays(n: int, num_classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *SHAPE)).astype(np.float32), rng.integers(0, num_classes, n)


@pytest.fixture
def ds_path(tmp_path: Path) -> Path:
    """23 samples in shards of 10: three shards (10, 10, 3)."""
    x, y = _arrays(23)
    with LatentDatasetWriter(tmp_path / "ds", shape=SHAPE, num_classes=5, dtype="float32",
                             shard_size=10, source="unit test") as w:
        w.append(x[:4], y[:4])  # batches that straddle shard boundaries
        w.append(x[4:17], y[4:17])
        w.append(x[17:], y[17:])
    return tmp_path / "ds"


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path: Path, dtype: str) -> None:
    x, y = _arrays(23)
    write_latent_dataset(tmp_path / "ds", x, y, num_classes=5, dtype=dtype, shard_size=10,
                         scale_factor=0.18215, flipped_copies=True, source="src",
                         extra={"note": 1})
    ds = open_latent_dataset(tmp_path / "ds")
    m = ds.manifest
    assert len(ds) == 23 and m.total == 23
    assert [s.count for s in m.shards] == [10, 10, 3]
    assert m.shape == SHAPE and m.dtype == dtype and m.num_classes == 5
    assert m.scale_factor == 0.18215 and m.scale_applied and m.flipped_copies
    assert m.source == "src" and m.extra == {"note": 1} and m.format_version == 1
    ref = x.astype(dtype)
    for i in (0, 9, 10, 19, 20, 22, -1):
        xi, yi = ds[i]
        np.testing.assert_array_equal(xi, ref[i])
        assert yi == y[i]
    # Gather across all three shards, unsorted, with repeats.
    idx = np.array([22, 0, 10, 9, 21, 0, 15, 3])
    bx, by = ds.get_batch(idx)
    assert bx.dtype == np.dtype(dtype) and bx.shape == (8, *SHAPE)
    np.testing.assert_array_equal(bx, ref[idx])
    np.testing.assert_array_equal(by, y[idx])
    assert by.dtype == np.int64
    # Many rows per shard (the per-shard np.take path), shuffled, with repeats.
    many = np.random.default_rng(1).integers(0, 23, 60)
    np.testing.assert_array_equal(ds.get_batch(many)[0], ref[many])
    np.testing.assert_array_equal(ds.get_batch(many)[1], y[many])
    # Indices already grouped by shard are gathered straight into a caller's buffer.
    ordered = np.sort(many)
    buf = np.full((60, *SHAPE), np.nan, dtype=dtype)
    assert ds.get_batch(ordered, out=buf)[0] is buf
    np.testing.assert_array_equal(buf, ref[ordered])
    with pytest.raises(ValueError, match="out must be a C-contiguous"):
        ds.get_batch(ordered, out=np.empty((59, *SHAPE), dtype=dtype))
    # In-memory mode reads the same values.
    mem = open_latent_dataset(tmp_path / "ds", in_memory=True)
    np.testing.assert_array_equal(mem.get_batch(idx)[0], bx)


def test_manifest_contents(ds_path: Path) -> None:
    d = json.loads((ds_path / MANIFEST_NAME).read_text())
    assert d["format"] == "dispersive-latents" and d["format_version"] == 1
    assert d["shape"] == list(SHAPE) and d["dtype"] == "float32" and d["total"] == 23
    assert d["shards"][0] == {"latents": "latents-00000.npy", "labels": "labels-00000.npy", "count": 10}
    assert sorted(p.name for p in ds_path.iterdir()) == sorted(
        [MANIFEST_NAME] + [f"{k}-{i:05d}.npy" for i in range(3) for k in ("latents", "labels")])


def test_index_errors(ds_path: Path) -> None:
    ds = open_latent_dataset(ds_path)
    with pytest.raises(IndexError):
        ds[23]
    with pytest.raises(IndexError):
        ds.get_batch([0, 23])
    with pytest.raises(IndexError):
        ds.get_batch([-1])


# --------------------------------------------------------------------------- bad input


def _edit_manifest(path: Path, **changes) -> None:
    mp = path / MANIFEST_NAME
    d = json.loads(mp.read_text())
    d.update(changes)
    mp.write_text(json.dumps(d))


def test_missing_manifest_means_incomplete(ds_path: Path) -> None:
    (ds_path / MANIFEST_NAME).unlink()
    with pytest.raises(LatentDatasetError, match=r"manifest\.json: missing manifest.*incomplete"):
        open_latent_dataset(ds_path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(LatentDatasetError, match="does not exist"):
        open_latent_dataset(tmp_path / "nope")


def test_missing_shard(ds_path: Path) -> None:
    (ds_path / "latents-00001.npy").unlink()
    with pytest.raises(LatentDatasetError, match=r"latents-00001\.npy: shard file is missing"):
        open_latent_dataset(ds_path)


def test_missing_labels_shard(ds_path: Path) -> None:
    (ds_path / "labels-00002.npy").unlink()
    with pytest.raises(LatentDatasetError, match=r"labels-00002\.npy: shard file is missing"):
        open_latent_dataset(ds_path)


def test_truncated_shard(ds_path: Path) -> None:
    p = ds_path / "latents-00001.npy"
    os.truncate(p, p.stat().st_size - 100)
    with pytest.raises(LatentDatasetError, match=r"latents-00001\.npy: file truncated"):
        open_latent_dataset(ds_path)


def test_truncated_header(ds_path: Path) -> None:
    p = ds_path / "latents-00000.npy"
    os.truncate(p, 20)
    with pytest.raises(LatentDatasetError, match=r"latents-00000\.npy: not a readable \.npy"):
        open_latent_dataset(ds_path)


def test_trailing_bytes(ds_path: Path) -> None:
    with open(ds_path / "labels-00000.npy", "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(LatentDatasetError, match=r"labels-00000\.npy: file has trailing bytes"):
        open_latent_dataset(ds_path)


def test_wrong_latent_dtype(ds_path: Path) -> None:
    x = np.load(ds_path / "latents-00000.npy")
    np.save(ds_path / "latents-00000.npy", x.astype(np.float16))
    with pytest.raises(LatentDatasetError, match=r"latents-00000\.npy: dtype float16, manifest says float32"):
        open_latent_dataset(ds_path)


def test_wrong_latent_shape(ds_path: Path) -> None:
    x = np.load(ds_path / "latents-00000.npy")
    np.save(ds_path / "latents-00000.npy", np.ascontiguousarray(x.transpose(0, 1, 3, 2)))
    with pytest.raises(LatentDatasetError, match=r"latents-00000\.npy: shape \(10, 3, 7, 5\)"):
        open_latent_dataset(ds_path)


def test_wrong_label_dtype(ds_path: Path) -> None:
    y = np.load(ds_path / "labels-00001.npy")
    np.save(ds_path / "labels-00001.npy", y.astype(np.int32))
    with pytest.raises(LatentDatasetError, match=r"labels-00001\.npy: labels have dtype int32"):
        open_latent_dataset(ds_path)


def test_label_out_of_range(ds_path: Path) -> None:
    y = np.load(ds_path / "labels-00001.npy")
    y[4] = 5  # num_classes is 5
    np.save(ds_path / "labels-00001.npy", y)
    with pytest.raises(LatentDatasetError, match=r"labels-00001\.npy: label 5 at row 4 is outside \[0, 5\)"):
        open_latent_dataset(ds_path)


def test_negative_label(ds_path: Path) -> None:
    y = np.load(ds_path / "labels-00000.npy")
    y[0] = -1
    np.save(ds_path / "labels-00000.npy", y)
    with pytest.raises(LatentDatasetError, match=r"labels-00000\.npy: label -1 at row 0"):
        open_latent_dataset(ds_path)


def test_label_count_differs(ds_path: Path) -> None:
    y = np.load(ds_path / "labels-00002.npy")
    np.save(ds_path / "labels-00002.npy", y[:-1])
    with pytest.raises(LatentDatasetError, match=r"labels-00002\.npy: 2 labels but latents-00002\.npy"):
        open_latent_dataset(ds_path)


def test_manifest_count_disagrees_with_shard(ds_path: Path) -> None:
    d = json.loads((ds_path / MANIFEST_NAME).read_text())
    d["shards"][2]["count"] = 4
    d["total"] = 24
    (ds_path / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(LatentDatasetError, match=r"latents-00002\.npy: shape \(3, 3, 5, 7\), manifest says \(4,"):
        open_latent_dataset(ds_path)


def test_manifest_total_disagrees(ds_path: Path) -> None:
    _edit_manifest(ds_path, total=24)
    with pytest.raises(LatentDatasetError, match=r"manifest\.json: 'total' is 24 but the shard counts sum to 23"):
        open_latent_dataset(ds_path)


def test_manifest_shape_disagrees(ds_path: Path) -> None:
    _edit_manifest(ds_path, shape=[3, 5, 8])
    with pytest.raises(LatentDatasetError, match=r"latents-00000\.npy: shape .* manifest says \(10, 3, 5, 8\)"):
        open_latent_dataset(ds_path)


def test_manifest_dtype_disagrees(ds_path: Path) -> None:
    _edit_manifest(ds_path, dtype="float16")
    with pytest.raises(LatentDatasetError, match=r"latents-00000\.npy: dtype float32, manifest says float16"):
        open_latent_dataset(ds_path)


def test_manifest_num_classes_too_small(ds_path: Path) -> None:
    _edit_manifest(ds_path, num_classes=1)
    with pytest.raises(LatentDatasetError, match=r"labels-0000\d\.npy: label \d at row \d+ is outside \[0, 1\)"):
        open_latent_dataset(ds_path)


@pytest.mark.parametrize("changes, message", [
    ({"format_version": 99}, "newer than this reader"),
    ({"format": "other"}, "'format' is 'other'"),
    ({"dtype": "int8"}, "'dtype' must be one of"),
    ({"shape": [3, 5]}, "'shape' must be three positive integers"),
    ({"num_classes": 0}, "'num_classes' must be a positive integer"),
    ({"scale_applied": "yes"}, "'scale_applied' must be true or false"),
    ({"shards": []}, "'shards' must be a non-empty list"),
])
def test_manifest_invalid_fields(ds_path: Path, changes: dict, message: str) -> None:
    _edit_manifest(ds_path, **changes)
    with pytest.raises(LatentDatasetError, match=message):
        read_manifest(ds_path)


def test_manifest_missing_key(ds_path: Path) -> None:
    d = json.loads((ds_path / MANIFEST_NAME).read_text())
    del d["scale_factor"]
    (ds_path / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(LatentDatasetError, match=r"manifest lacks keys \['scale_factor'\]"):
        open_latent_dataset(ds_path)


def test_manifest_not_json(ds_path: Path) -> None:
    (ds_path / MANIFEST_NAME).write_text("{ not json")
    with pytest.raises(LatentDatasetError, match=r"manifest\.json: not valid JSON"):
        open_latent_dataset(ds_path)


def test_unlisted_shard_is_an_error(ds_path: Path) -> None:
    np.save(ds_path / "latents-00003.npy", np.zeros((1, *SHAPE), np.float32))
    with pytest.raises(LatentDatasetError, match=r"\['latents-00003\.npy'\] exist but are not listed"):
        open_latent_dataset(ds_path)


def test_non_finite_latents_detected_on_request(ds_path: Path) -> None:
    x = np.load(ds_path / "latents-00001.npy")
    x[3, 0, 0, 0] = np.nan
    np.save(ds_path / "latents-00001.npy", x)
    open_latent_dataset(ds_path)  # not scanned by default (it reads every byte)
    with pytest.raises(LatentDatasetError, match=r"latents-00001\.npy: contains NaN or inf"):
        open_latent_dataset(ds_path, check_finite=True)


def test_is_a_value_error() -> None:
    assert issubclass(LatentDatasetError, ValueError)


# --------------------------------------------------------------------------- writer


def test_writer_rejects_bad_batches(tmp_path: Path) -> None:
    x, y = _arrays(4)
    with LatentDatasetWriter(tmp_path / "ds", shape=SHAPE, num_classes=5, dtype="float32") as w:
        with pytest.raises(ValueError, match=r"latents must have shape \(B, 3, 5, 7\)"):
            w.append(x[:, :, :4], y)
        with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
            w.append(x, y[:3])
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
            w.append(x, y + 5)
        with pytest.raises(TypeError, match="labels must be integers"):
            w.append(x, y.astype(np.float32))
        with pytest.raises(ValueError, match="NaN or inf"):
            w.append(np.full_like(x, np.nan), y)
        w.append(x, y)
    assert len(open_latent_dataset(tmp_path / "ds")) == 4


def test_writer_rejects_fp16_overflow(tmp_path: Path) -> None:
    x, y = _arrays(2)
    with pytest.raises(ValueError, match="NaN or inf after casting to float16"):
        with LatentDatasetWriter(tmp_path / "ds", shape=SHAPE, num_classes=5) as w:
            w.append(x * 1e6, y)
    assert not (tmp_path / "ds").exists()


def test_writer_accepts_torch_tensors(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    x, y = _arrays(3)
    write_latent_dataset(tmp_path / "ds", torch.from_numpy(x), torch.from_numpy(y), num_classes=5)
    np.testing.assert_array_equal(open_latent_dataset(tmp_path / "ds").get_batch([0, 1, 2])[0], x)


def test_atomic_write_failure_leaves_nothing(tmp_path: Path) -> None:
    x, y = _arrays(30)
    with pytest.raises(RuntimeError, match="boom"):
        with LatentDatasetWriter(tmp_path / "ds", shape=SHAPE, num_classes=5, shard_size=10) as w:
            w.append(x[:25], y[:25])  # two shards already on disk in the temp dir
            raise RuntimeError("boom")
    assert not (tmp_path / "ds").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too


def test_nothing_visible_before_close(tmp_path: Path) -> None:
    x, y = _arrays(30)
    w = LatentDatasetWriter(tmp_path / "ds", shape=SHAPE, num_classes=5, shard_size=10)
    w.append(x, y)
    assert not (tmp_path / "ds").exists()  # shards live in a hidden temp dir until close
    hidden = [p for p in tmp_path.iterdir() if p.name.startswith(".ds.tmp-")]
    assert len(hidden) == 1 and not (hidden[0] / MANIFEST_NAME).exists()
    w.close()
    assert len(open_latent_dataset(tmp_path / "ds")) == 30
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_existing_path_needs_overwrite(tmp_path: Path) -> None:
    x, y = _arrays(5)
    write_latent_dataset(tmp_path / "ds", x, y, num_classes=5)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_latent_dataset(tmp_path / "ds", x, y, num_classes=5)
    write_latent_dataset(tmp_path / "ds", x[:2], y[:2], num_classes=5, overwrite=True)
    assert len(open_latent_dataset(tmp_path / "ds")) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_failed_overwrite_keeps_old_dataset(tmp_path: Path) -> None:
    x, y = _arrays(5)
    write_latent_dataset(tmp_path / "ds", x, y, num_classes=5)
    with pytest.raises(RuntimeError):
        with LatentDatasetWriter(tmp_path / "ds", shape=SHAPE, num_classes=5, overwrite=True) as w:
            w.append(x[:2], y[:2])
            raise RuntimeError("crash")
    assert len(open_latent_dataset(tmp_path / "ds")) == 5


def test_writer_copies_appended_arrays(tmp_path: Path) -> None:
    x, y = _arrays(4)
    with LatentDatasetWriter(tmp_path / "ds", shape=SHAPE, num_classes=5, dtype="float32") as w:
        buf = x.copy()
        w.append(buf, y)
        buf[:] = 0  # a caller reusing its buffer must not change what was appended
    np.testing.assert_array_equal(open_latent_dataset(tmp_path / "ds").get_batch(range(4))[0], x)


def test_empty_dataset_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty latent dataset"):
        with LatentDatasetWriter(tmp_path / "ds", shape=SHAPE, num_classes=5):
            pass
    assert list(tmp_path.iterdir()) == []
