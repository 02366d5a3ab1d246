"""Loaders: the sampling contract, 2-rank sharding, flips, DALI == DataLoader, resume."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data.loader import (
    BatchSchedule,
    DaliLatentLoader,
    TorchLatentLoader,
    build_loader,
    dali_available,
    epoch_permutation,
)
from engine.data.format import open_latent_dataset, write_latent_dataset

N = 45  # not a multiple of any global batch used below: exercises padding
SHAPE = (2, 3, 5)  # W = 5 is odd: the middle column stays put under a flip
MICRO = 4
WORLD = 2

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not installed")
BACKENDS = [pytest.param("dali", marks=needs_dali), "torch"]


@pytest.fixture(scope="module", params=["float32", "float16"])
def ds_path(request, tmp_path_factory) -> Path:
    """Three shards (20, 20, 5); every sample distinct and not W-symmetric."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, *SHAPE)).astype(np.float32)
    y = rng.integers(0, 7, N)
    path = tmp_path_factory.mktemp("loaders") / f"ds-{request.param}"
    write_latent_dataset(path, x, y, num_classes=7, dtype=request.param, shard_size=20)
    return path


def take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(iter(loader), n))


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for i, (ba, bb) in enumerate(zip(a, b)):
        assert ba.keys() == bb.keys() == {"x", "y", "valid", "index"}
        for k in ba:
            assert ba[k].dtype == bb[k].dtype, (i, k)
            assert torch.equal(ba[k], bb[k]), f"batch {i} differs in {k!r}"


# --------------------------------------------------------------------------- contract


def test_permutation_is_the_documented_one() -> None:
    want = np.random.default_rng(np.random.SeedSequence([3, 7])).permutation(50)
    np.testing.assert_array_equal(epoch_permutation(50, 3, 7), want)
    assert not np.array_equal(epoch_permutation(50, 3, 7), epoch_permutation(50, 3, 8))


def test_schedule_padding_and_slices() -> None:
    s0 = BatchSchedule(N, MICRO, rank=0, world_size=WORLD, seed=5)
    s1 = BatchSchedule(N, MICRO, rank=1, world_size=WORLD, seed=5)
    assert s0.global_batch == 8 and s0.steps_per_epoch == 6 and s0.padded_length == 48
    plan = s0.plan(2)
    perm = epoch_permutation(N, 5, 2)
    np.testing.assert_array_equal(plan.index[:N], perm)
    np.testing.assert_array_equal(plan.index[N:], perm[:3])  # wrap-around padding
    assert plan.valid[:N].all() and not plan.valid[N:].any()
    # Contiguous rank slices of each global batch.
    idx0, _, _ = s0.batch(2 * 6 + 1)
    idx1, _, _ = s1.batch(2 * 6 + 1)
    np.testing.assert_array_equal(idx0, plan.index[8:12])
    np.testing.assert_array_equal(idx1, plan.index[12:16])


def test_dataset_smaller_than_global_batch() -> None:
    s = BatchSchedule(3, micro_batch=4, rank=1, world_size=2)
    assert s.steps_per_epoch == 1
    p = s.plan(0)
    assert p.valid.sum() == 3 and sorted(p.index[p.valid]) == [0, 1, 2]


@pytest.mark.parametrize("kwargs, message", [
    (dict(micro_batch=0), "micro_batch must be >= 1"),
    (dict(micro_batch=2, rank=2, world_size=2), r"rank must lie in \[0, 2\)"),
    (dict(micro_batch=2, seed=-1), "seed must be >= 0"),
])
def test_schedule_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchSchedule(10, **kwargs)


# --------------------------------------------------------------------------- two ranks


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_cover_each_epoch_exactly_once(ds_path: Path, backend: str) -> None:
    ds = open_latent_dataset(ds_path)
    loaders = [build_loader(ds_path, micro_batch=MICRO, rank=r, world_size=WORLD, seed=11,
                            backend=backend, num_workers=1) for r in range(WORLD)]
    spe = loaders[0].steps_per_epoch
    assert spe == -(-N // (MICRO * WORLD)) and len(loaders[1]) == spe
    streams = [take(l, 3 * spe) for l in loaders]
    orders = []
    for epoch in range(3):
        seen_valid: list[int] = []
        n_invalid = 0
        for r in range(WORLD):
            for b in streams[r][epoch * spe:(epoch + 1) * spe]:
                assert b["x"].shape == (MICRO, *SHAPE) and b["x"].dtype == torch.float32
                assert b["y"].dtype == torch.int64 and b["index"].dtype == torch.int64
                assert b["valid"].dtype == torch.bool
                seen_valid += b["index"][b["valid"]].tolist()
                n_invalid += int((~b["valid"]).sum())
                # Labels (and latents, up to a flip) belong to the reported index.
                x_ref, y_ref = ds.get_batch(b["index"].numpy())
                assert torch.equal(b["y"], torch.from_numpy(y_ref))
                x_ref = torch.from_numpy(x_ref.astype(np.float32))
                same = (b["x"] == x_ref).flatten(1).all(1)
                mirrored = (b["x"] == x_ref.flip(-1)).flatten(1).all(1)
                assert (same | mirrored).all()
        # Each epoch: every sample exactly once among valid slots, and the padding is invalid.
        assert sorted(seen_valid) == list(range(N)), f"epoch {epoch}"
        assert n_invalid == spe * MICRO * WORLD - N
        orders.append(seen_valid)
    # Ranks are disjoint: within a step, no valid index appears on both ranks.
    for s in range(3 * spe):
        a = set(streams[0][s]["index"][streams[0][s]["valid"]].tolist())
        b = set(streams[1][s]["index"][streams[1][s]["valid"]].tolist())
        assert not a & b
    assert orders[0] != orders[1] != orders[2]  # a new permutation every epoch
    # The iterator advanced the loader's own position across the epochs.
    assert loaders[0].state_dict()["epoch"] == 3 and loaders[0].state_dict()["step_in_epoch"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_flip_mirrors_w(ds_path: Path, backend: str) -> None:
    kw = dict(micro_batch=MICRO, world_size=WORLD, rank=1, seed=4, backend=backend, num_workers=1)
    flipped = take(build_loader(ds_path, flip=True, **kw), 12)
    plain = take(build_loader(ds_path, flip=False, **kw), 12)
    sched = BatchSchedule(N, MICRO, rank=1, world_size=WORLD, seed=4, flip=True)
    n_flipped = 0
    for g, (bf, bp) in enumerate(zip(flipped, plain)):
        assert torch.equal(bf["index"], bp["index"])  # flips do not change the order
        _, _, flags = sched.batch(g)
        for i, f in enumerate(flags):
            want = bp["x"][i].flip(-1) if f else bp["x"][i]  # mirror on W only
            assert torch.equal(bf["x"][i], want)
            n_flipped += int(f)
    assert 0 < n_flipped < 12 * MICRO  # both outcomes occur


# --------------------------------------------------------------------------- DALI == DataLoader


@needs_dali
@pytest.mark.parametrize("steps_per_run", [None, 1, 5])  # 5 does not divide steps_per_epoch
def test_dali_and_dataloader_produce_identical_batches(ds_path: Path, steps_per_run) -> None:
    for rank in range(WORLD):
        kw = dict(micro_batch=MICRO, rank=rank, world_size=WORLD, seed=2)
        dali = build_loader(ds_path, backend="dali", num_workers=2, prefetch=3,
                            dali_steps_per_run=steps_per_run, **kw)
        torch_ = build_loader(ds_path, backend="torch", num_workers=0, **kw)
        assert isinstance(dali, DaliLatentLoader) and isinstance(torch_, TorchLatentLoader)
        n = 2 * dali.steps_per_epoch + 1  # crosses two epoch boundaries
        assert_same_batches(take(dali, n), take(torch_, n))


@needs_dali
def test_dataloader_workers_match_dali(ds_path: Path) -> None:
    kw = dict(micro_batch=MICRO, world_size=1, seed=9)
    with_workers = take(build_loader(ds_path, backend="torch", num_workers=2, **kw), 15)
    assert_same_batches(take(build_loader(ds_path, backend="dali", **kw), 15), with_workers)


def test_auto_backend() -> None:
    want = DaliLatentLoader if dali_available() else TorchLatentLoader
    x = np.zeros((3, 1, 2, 2), np.float32)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        write_latent_dataset(Path(d) / "ds", x, [0, 1, 2], num_classes=3)
        assert type(build_loader(Path(d) / "ds", micro_batch=2)) is want


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stop", [4, 6, 9])  # mid-epoch, exactly at an epoch end, next epoch
def test_resume_continues_exactly(ds_path: Path, backend: str, stop: int) -> None:
    kw = dict(micro_batch=MICRO, rank=1, world_size=WORLD, seed=3, backend=backend, num_workers=1)
    reference = take(build_loader(ds_path, **kw), stop + 8)
    first = build_loader(ds_path, **kw)
    it = iter(first)
    head = [next(it) for _ in range(stop)]
    assert_same_batches(head, reference[:stop])
    sd = first.state_dict()
    spe = first.steps_per_epoch
    assert (sd["epoch"], sd["step_in_epoch"]) == divmod(stop, spe) and sd["seed"] == 3
    resumed = build_loader(ds_path, **kw)
    resumed.load_state_dict(sd)
    assert_same_batches(take(resumed, 8), reference[stop:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_position_change_during_iteration(ds_path: Path, backend: str) -> None:
    kw = dict(micro_batch=MICRO, world_size=1, seed=6, backend=backend, num_workers=1)
    loader = build_loader(ds_path, **kw)
    spe = loader.steps_per_epoch
    reference = take(build_loader(ds_path, **kw), 3 * spe)
    it = iter(loader)
    next(it), next(it)
    loader.set_epoch(2)  # the live iterator restarts at the new position
    assert_same_batches([next(it) for _ in range(3)], reference[2 * spe:2 * spe + 3])
    loader.load_state_dict({"epoch": 0, "step_in_epoch": 5, "seed": 6})
    assert_same_batches([next(it) for _ in range(2)], reference[5:7])
    assert loader.state_dict() == {"epoch": 0, "step_in_epoch": 7, "seed": 6, "global_batch": MICRO}


def test_load_state_dict_rejects_mismatches(ds_path: Path) -> None:
    loader = build_loader(ds_path, micro_batch=MICRO, world_size=WORLD, seed=1, backend="torch")
    with pytest.raises(ValueError, match="seed 2 but this loader uses seed 1"):
        loader.load_state_dict({"epoch": 0, "step_in_epoch": 0, "seed": 2})
    with pytest.raises(ValueError, match="global batch 16"):
        loader.load_state_dict({"epoch": 0, "step_in_epoch": 0, "seed": 1, "global_batch": 16})
    with pytest.raises(ValueError, match="bad loader position"):
        loader.load_state_dict({"epoch": 0, "step_in_epoch": 99, "seed": 1})
    with pytest.raises(ValueError, match="lacks keys"):
        loader.load_state_dict({"epoch": 0})
    # The end of an epoch is normalised to the start of the next one.
    loader.load_state_dict({"epoch": 1, "step_in_epoch": loader.steps_per_epoch, "seed": 1})
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["step_in_epoch"] == 0


def test_build_loader_rejects_bad_backend(ds_path: Path) -> None:
    with pytest.raises(ValueError, match="backend must be"):
        build_loader(ds_path, micro_batch=2, backend="jax")  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(37, 4, 32, 32), (3, 5, 7, 1000), (1, 70000)])
def test_widen_in_chunks_is_exact(shape) -> None:
    from engine.data.loader import _GRAIN, _widen

    x = torch.randn(shape).half()
    assert x.numel() > _GRAIN  # the chunked path
    out = _widen(x)
    assert out.dtype == torch.float32 and torch.equal(out, x.float())


@needs_dali
def test_dali_matches_dataloader_at_training_shapes(tmp_path: Path) -> None:
    """4x32x32 float16, micro batch 32: exercises the chunked widening and np.take paths."""
    from engine.data.datasets import make_synthetic_dataset

    path = make_synthetic_dataset(tmp_path / "s", 300, shard_size=128, num_classes=10)
    for rank in range(2):
        kw = dict(micro_batch=32, rank=rank, world_size=2, seed=1)
        dali = build_loader(path, backend="dali", **kw)
        ref = build_loader(path, backend="torch", num_workers=0, **kw)
        n = 2 * dali.steps_per_epoch + 3
        assert_same_batches(take(dali, n), take(ref, n))
