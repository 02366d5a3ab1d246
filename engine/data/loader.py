"""Loaders for latent datasets: a DALI pipeline and a torch DataLoader, one contract.

The contract (written out in engine/data/DATA.md) is computed by ``BatchSchedule`` and both
backends only execute it, so for the same (dataset, seed, micro_batch, rank, world_size)
they produce identical batches:

- epoch order: a permutation of all N indices from ``SeedSequence([seed, epoch])``;
- padding: the order is extended by wrapping around to a multiple of
  global_batch = world_size * micro_batch; padded positions are marked ``valid=False``;
- ranks: global batch b covers positions [b*G, (b+1)*G); rank r takes the contiguous
  slice [b*G + r*m, b*G + (r+1)*m);
- flips: position p of epoch e is mirrored on W iff ``flip_draws(seed, e)[p] < 0.5``.

Each batch is ``{"x": float32 (B, C, H, W), "y": int64 (B,), "valid": bool (B,),
"index": int64 (B,)}`` on the target device. ``iter(loader)`` never ends: epochs advance
by themselves, and ``state_dict()`` / ``load_state_dict()`` resume at the exact batch.
"""

from __future__ import annotations

import collections
import itertools
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch

from engine.data.format import LatentDataset, open_latent_dataset

Backend = Literal["auto", "dali", "torch"]
Batch = dict[str, torch.Tensor]

# Spawn key that separates the flip stream from the permutation stream of the same
# (seed, epoch). Not 0: SeedSequence pads its entropy with zeros, so [s, e, 0] == [s, e].
_FLIP_STREAM = 1


# --------------------------------------------------------------------------- contract


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of dataset indices, (N,) int64."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    return rng.permutation(num_samples).astype(np.int64)


def flip_draws(length: int, seed: int, epoch: int) -> np.ndarray:
    """Uniform [0, 1) draws, one per global position of the padded epoch, (P,) float64."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, _FLIP_STREAM]))
    return rng.random(length)


@dataclass(frozen=True)
class EpochPlan:
    """Everything about one epoch, indexed by global position p in [0, P)."""

    index: np.ndarray  # (P,) int64 dataset index
    valid: np.ndarray  # (P,) bool, False on wrapped-around padding
    flip: np.ndarray  # (P,) bool, mirror on W


@dataclass(frozen=True)
class BatchSchedule:
    """Which samples rank ``rank`` sees at each step; shared by both backends."""

    num_samples: int
    micro_batch: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    flip: bool = True

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {self.micro_batch}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must lie in [0, {self.world_size}), got {self.rank}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy SeedSequence), got {self.seed}")

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.num_samples // self.global_batch)  # ceil

    @property
    def padded_length(self) -> int:
        return self.steps_per_epoch * self.global_batch

    def plan(self, epoch: int) -> EpochPlan:
        return _cached_plan(self.num_samples, self.padded_length, self.seed, epoch, self.flip)

    def batch(self, global_step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(index, valid, flip) for this rank at a global step counted across epochs."""
        epoch, step = divmod(global_step, self.steps_per_epoch)
        p = self.plan(epoch)
        start = step * self.global_batch + self.rank * self.micro_batch
        sl = slice(start, start + self.micro_batch)
        return p.index[sl], p.valid[sl], p.flip[sl]


@lru_cache(maxsize=4)
def _cached_plan(n: int, padded: int, seed: int, epoch: int, flip: bool) -> EpochPlan:
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    perm = epoch_permutation(n, seed, epoch)
    # Wrap around (repeatedly, if the dataset is smaller than one global batch).
    index = perm[np.arange(padded) % n]
    valid = np.arange(padded) < n
    flips = flip_draws(padded, seed, epoch) < 0.5 if flip else np.zeros(padded, dtype=bool)
    for a in (index, valid, flips):
        a.flags.writeable = False  # shared through the cache
    return EpochPlan(index, valid, flips)


def gather_batch(ds: LatentDataset, index: np.ndarray, flip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Latents (B, C, H, W) in the stored dtype with flips applied, labels (B,) int64."""
    x, y = ds.get_batch(index)
    if flip.any():
        x[flip] = x[flip][..., ::-1]
    return x, y


# --------------------------------------------------------------------------- loader base


class LatentLoader:
    """Infinite, resumable iterator of batches for one rank (see module docstring).

    Only one iterator over a loader should be active at a time: iterating advances the
    loader's own position, which is what ``state_dict`` reports.
    """

    backend: str = "base"

    def __init__(self, dataset: LatentDataset, schedule: BatchSchedule, device: torch.device,
                 prefetch: int, num_workers: int) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.schedule = schedule
        self.device = device
        self.prefetch = prefetch
        self.num_workers = num_workers
        self.epoch = 0
        self.step_in_epoch = 0
        self._generation = 0  # bumped by set_epoch / load_state_dict to restart streams

    # -- contract facts
    @property
    def seed(self) -> int:
        return self.schedule.seed

    @property
    def micro_batch(self) -> int:
        return self.schedule.micro_batch

    @property
    def global_batch(self) -> int:
        return self.schedule.global_batch

    @property
    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    # -- position
    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch, self.step_in_epoch = int(epoch), 0
        self._generation += 1

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch to be yielded (batches already yielded are consumed)."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed,
                "global_batch": self.global_batch}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        missing = {"epoch", "step_in_epoch", "seed"} - set(sd)
        if missing:
            raise ValueError(f"loader state lacks keys {sorted(missing)}")
        if sd["seed"] != self.seed:
            raise ValueError(f"loader state has seed {sd['seed']} but this loader uses seed "
                             f"{self.seed}; build the loader with the checkpoint's seed")
        if "global_batch" in sd and sd["global_batch"] != self.global_batch:
            raise ValueError(
                f"loader state was saved with global batch {sd['global_batch']}, this loader has "
                f"{self.global_batch} (world_size x micro_batch); positions would not line up")
        epoch, step = int(sd["epoch"]), int(sd["step_in_epoch"])
        if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
            raise ValueError(f"bad loader position epoch={epoch}, step_in_epoch={step} "
                             f"(steps_per_epoch={self.steps_per_epoch})")
        if step == self.steps_per_epoch:
            epoch, step = epoch + 1, 0
        self.epoch, self.step_in_epoch = epoch, step
        self._generation += 1

    # -- iteration
    def __iter__(self) -> Iterator[Batch]:
        while True:
            generation = self._generation
            start = self.epoch * self.steps_per_epoch + self.step_in_epoch
            stream = self._stream(start)
            try:
                for batch in stream:
                    # Advance before yielding: once the caller holds a batch it is consumed.
                    self.step_in_epoch += 1
                    if self.step_in_epoch == self.steps_per_epoch:
                        self.epoch, self.step_in_epoch = self.epoch + 1, 0
                    yield batch
                    if self._generation != generation:
                        break  # position was changed from outside: restart the stream there
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()

    def _stream(self, start: int) -> Iterator[Batch]:
        """Batches for global steps start, start + 1, ... forever."""
        raise NotImplementedError

    def __repr__(self) -> str:
        s = self.schedule
        return (f"{type(self).__name__}(n={s.num_samples}, micro_batch={s.micro_batch}, "
                f"rank={s.rank}/{s.world_size}, seed={s.seed}, flip={s.flip}, "
                f"device={self.device}, epoch={self.epoch}, step={self.step_in_epoch})")


# --------------------------------------------------------------------------- torch backend


class _StepBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item g is the whole micro batch of global step g.

    Batching happens here (one vectorised gather per step) rather than per sample in a
    collate function; the DataLoader runs with batch_size=None.
    """

    def __init__(self, dataset: LatentDataset, schedule: BatchSchedule, in_memory: bool) -> None:
        self.ds: LatentDataset | None = dataset
        self.path = dataset.path
        self.in_memory = in_memory
        self.schedule = schedule

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers reopen by path instead of pickling memory maps (which would copy).
        return {**self.__dict__, "ds": None}

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        if self.ds is None:
            self.ds = open_latent_dataset(self.path, in_memory=self.in_memory)
        index, valid, flip = self.schedule.batch(g)
        x, y = gather_batch(self.ds, index, flip)
        return {"x": torch.from_numpy(x), "y": torch.from_numpy(y),
                "valid": torch.from_numpy(valid.copy()), "index": torch.from_numpy(index.copy())}


class _CountFrom(torch.utils.data.Sampler):
    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class TorchLatentLoader(LatentLoader):
    """The contract executed by a torch.utils.data.DataLoader (num_workers processes)."""

    backend = "torch"

    def __init__(self, *args: Any, in_memory: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_memory = in_memory

    def _stream(self, start: int) -> Iterator[Batch]:
        workers = self.num_workers
        loader = torch.utils.data.DataLoader(
            _StepBatches(self.dataset, self.schedule, self.in_memory),
            batch_size=None,  # items are already batches
            sampler=_CountFrom(start),
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=self.prefetch if workers > 0 else None,
            persistent_workers=False,
            # Its own generator: a DataLoader iterator otherwise draws its base seed from the
            # global RNG, which would shift the trainer's noise after a resume.
            generator=torch.Generator(),
        )
        for b in loader:
            yield _to_device(b, self.device)


def _to_device(b: dict[str, torch.Tensor], device: torch.device) -> Batch:
    non_blocking = device.type == "cuda"
    out = {key: t.to(device, non_blocking=non_blocking) for key, t in b.items()}
    if "x" in out:
        # Moved in the stored dtype and widened on the device: half the copy bytes for fp16.
        out["x"] = _widen(out["x"])
    return out


# torch runs CPU element-wise ops above this many elements on its intra-op (OpenMP)
# threads (at::internal::GRAIN_SIZE).
_GRAIN = 32768


def _widen(x: torch.Tensor) -> torch.Tensor:
    """float32 copy of x (B, ...); on the CPU in row chunks below torch's grain size.

    A single .float() of a whole batch is split over the intra-op threads; when the
    cores are oversubscribed (a CPU training step, other processes) the parallel region
    waits for descheduled threads: single calls measured at ~8 ms instead of ~10 us on
    the 2-core VM. Chunks below the grain size run on the calling thread alone.
    """
    if x.dtype == torch.float32:
        return x
    if x.device.type != "cpu" or x.dim() == 0 or x.numel() <= _GRAIN:
        return x.float()
    out = torch.empty(x.shape, dtype=torch.float32)
    rows = max(1, _GRAIN // max(1, x[0].numel()))
    for a in range(0, x.shape[0], rows):
        out[a:a + rows].copy_(x[a:a + rows])
    return out


# --------------------------------------------------------------------------- DALI backend


class DaliLatentLoader(LatentLoader):
    """The contract executed by a DALI pipeline.

    ``fn.external_source`` (batch mode) gathers the rank's samples by index from the
    memory maps, and ``fn.flip(horizontal=flag)`` with a per-sample flag mirrors them on
    W on DALI's worker threads, ``prefetch`` pipeline runs ahead of the one being
    consumed. A CPU pipeline (device_id=None) serves CPU training; for a CUDA device the
    flip runs on that GPU and the output lands in GPU memory.

    Measured on a 2-core CPU (numbers in engine/data/DATA.md), a plain one-latent-per-DALI-
    sample pipeline (fn.cast to float32, then fn.flip) ran at a third to half of the
    in-process DataLoader's speed: DALI's CPU operators cost ~2-5 us per sample whatever
    its size (fn.flip with an argument input ~3.5 us, fn.cast fp16->fp32 ~4.7 us for a
    4x32x32 latent), plus ~100 us per pipeline run. So:
    - one run serves ``steps_per_run`` consecutive steps, amortising the per-run cost;
    - each run's latents are grouped by flip flag into two DALI samples of layout FCHW
      (frames = latents): rows not to flip, rows to flip. fn.flip(horizontal=[0, 1])
      mirrors W of every frame of the second sample, and the rows are scattered back to
      their batch positions afterwards. Same result, 2 DALI samples per run instead of
      steps_per_run x micro_batch;
    - float16 latents travel through DALI as their int16 bit patterns (a flip only moves
      values, so this is exact; CPU fn.flip has no float16 kernel, and fn.cast to float32
      cost more than the flip). Torch widens to float32 on the device, once per run;
    - labels, valid mask and indices do not go through DALI: they come from the same
      ``BatchSchedule.batch(g)`` the source used for step g (DALI returns runs in order),
      which keeps them aligned by construction.
    """

    backend = "dali"

    def __init__(self, *args: Any, steps_per_run: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import nvidia.dali  # noqa: F401  (fail at build time, not at first batch)

        if steps_per_run is None:
            # ~512 samples a run (16 x 32 measured 20-25% faster than 8 x 32 on 2 cores).
            steps_per_run = max(1, min(16, 512 // self.micro_batch))
        if steps_per_run < 1:
            raise ValueError(f"steps_per_run must be >= 1, got {steps_per_run}")
        self.steps_per_run = steps_per_run

    def _run_plan(self, first_step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """For steps first_step .. first_step + steps_per_run - 1, in batch order:
        index (R,), valid (R,), the order in which the source gathers the rows (R,)
        (unflipped first), and the number of unflipped rows; R = steps_per_run * micro_batch."""
        parts = [self.schedule.batch(first_step + j) for j in range(self.steps_per_run)]
        index, valid, flip = (np.concatenate(p) for p in zip(*parts))
        # Grouped by flag and, within a group, by dataset index: the source then reads
        # each shard's rows in one sequential np.take straight into place.
        rows = np.lexsort((index, flip))
        return index, valid, rows, int(len(flip) - flip.sum())

    def _build_pipeline(self, start: int):  # -> (nvidia.dali.Pipeline, plans by first step)
        from nvidia.dali import fn
        from nvidia.dali.pipeline import Pipeline

        ds, k = self.dataset, self.steps_per_run
        as_int16 = ds.manifest.dtype == "float16"
        flags = [np.int32(0), np.int32(1)]
        # no_copy=True below: DALI reads our arrays in place, so they must stay alive for
        # prefetch_queue_depth runs after they are handed over; keep a few more.
        alive: collections.deque = collections.deque(maxlen=self.prefetch + 3)
        plans: dict[int, tuple] = {}  # first step of a run -> its _run_plan, until consumed

        def source(info):  # info.iteration counts runs since the pipeline was built
            first = start + info.iteration * k
            plans[first] = plan = self._run_plan(first)  # reused by _stream for this run
            index, _, rows, n_keep = plan
            x = np.empty((len(rows), *ds.shape), dtype=ds.manifest.dtype)  # grouped by flag
            ds.get_batch(index[rows[:n_keep]], out=x[:n_keep])
            ds.get_batch(index[rows[n_keep:]], out=x[n_keep:])
            if as_int16:
                x = x.view(np.int16)
            alive.append(x)
            return [x[:n_keep], x[n_keep:]], flags

        on_gpu = self.device.type == "cuda"
        device_id = None
        if on_gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        pipe = Pipeline(
            batch_size=2,  # two samples per run: the rows to keep, the rows to mirror
            num_threads=max(1, self.num_workers),
            device_id=device_id,
            # +1: the run whose output we are copying out occupies a queue slot until the
            # next pipe.run(), so depth 2 would leave only one run in flight (measured
            # ~10-40% slower than depth 3).
            prefetch_queue_depth=self.prefetch + 1,
        )
        with pipe:
            x, flip = fn.external_source(source=source, num_outputs=2, batch=True,
                                         batch_info=True, layout=["FCHW", ""], no_copy=True)
            if on_gpu:
                x = x.gpu()
            x = fn.flip(x, horizontal=flip)  # mirrors W of every frame where flag = 1
            pipe.set_outputs(x)
        pipe.build()
        return pipe, plans

    def _stream(self, start: int) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        pipe, plans = self._build_pipeline(start)
        k, m = self.steps_per_run, self.micro_batch
        dev = self.device
        fp16 = self.dataset.manifest.dtype == "float16"
        carrier = torch.int16 if fp16 else torch.float32
        chw = self.dataset.shape
        stream = torch.cuda.current_stream(dev) if dev.type == "cuda" else None
        labels = torch.from_numpy(self.dataset.labels)
        try:
            for first in itertools.count(start, k):
                (x_out,) = pipe.run()
                index, valid, rows, n_keep = plans.pop(first)
                # A fresh tensor each run: DALI reuses its buffers, and the caller may
                # hold on to a batch while the next one is produced.
                groups = ((0, rows[:n_keep]), (1, rows[n_keep:]))
                if stream is None:
                    # CPU: scatter straight from DALI's output buffers (zero-copy views).
                    xn = np.empty((k * m, *chw), dtype=np.int16 if fp16 else np.float32)
                    for sample, positions in groups:
                        if len(positions):
                            xn[positions] = np.asarray(x_out[sample])  # back to batch order
                    x = torch.from_numpy(xn)  # (R, C, H, W)
                else:
                    x = torch.empty((k * m, *chw), dtype=carrier, device=dev)
                    for sample, positions in groups:
                        if len(positions):
                            group = torch.empty((len(positions), *chw), dtype=carrier, device=dev)
                            feed_ndarray(x_out[sample], group, cuda_stream=stream)
                            x[torch.from_numpy(positions).to(dev)] = group  # back to batch order
                if fp16:
                    x = _widen(x.view(torch.float16))  # on the device, once per run
                idx = torch.from_numpy(index)
                meta = _to_device({"y": labels[idx], "valid": torch.from_numpy(valid),
                                   "index": idx}, dev)
                parts = {"x": x.split(m), **{key: t.split(m) for key, t in meta.items()}}
                for j in range(k):
                    yield {key: p[j] for key, p in parts.items()}
        finally:
            del pipe


# --------------------------------------------------------------------------- factory


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def default_num_workers(backend: str, device: torch.device) -> int:
    """DALI threads / DataLoader worker processes when the caller does not say.

    One per spare core (one core left to the training loop), at most 4: a batch is one
    memory-mapped gather, so a few are plenty. The DataLoader on a CPU device gets 0
    workers: moving each batch through worker shared memory costs more than the gather
    itself (measured ~10x slower with 1 worker on a 2-core machine), and with CPU
    training there is no accelerator time to overlap with.
    """
    spare = max(1, min(4, (os.cpu_count() or 2) - 1))
    if backend == "torch" and device.type == "cpu":
        return 0
    return spare


def build_loader(
    path: str | os.PathLike | LatentDataset,
    *,
    micro_batch: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    flip: bool = True,
    device: str | torch.device = "cpu",
    backend: Backend = "auto",
    prefetch: int = 2,
    num_workers: int | None = None,
    in_memory: bool = False,
    dali_steps_per_run: int | None = None,
) -> LatentLoader:
    """Build the loader for one rank.

    path: dataset directory (or an already opened LatentDataset).
    micro_batch: samples per rank per step; global_batch = world_size * micro_batch.
    flip: random horizontal flips in latent space (set False when the dataset already
        stores flipped copies, see manifest.flipped_copies).
    backend: "dali", "torch", or "auto" (DALI when nvidia.dali imports, else torch).
    prefetch: work prepared ahead: DALI pipeline runs in flight (prefetch_queue_depth is
        prefetch + 1) / DataLoader prefetch_factor (batches per worker; unused with 0
        workers).
    num_workers: DALI threads / DataLoader worker processes (default: see
        default_num_workers).
    in_memory: read the latents into RAM instead of memory-mapping them.
    dali_steps_per_run: DALI only: micro batches produced per pipeline run (default:
        enough for ~512 samples, at most 16). Affects speed and prefetch depth, never
        which batches come out.
    """
    if backend not in ("auto", "dali", "torch"):
        raise ValueError(f"backend must be 'auto', 'dali' or 'torch', got {backend!r}")
    ds = path if isinstance(path, LatentDataset) else open_latent_dataset(Path(path), in_memory=in_memory)
    schedule = BatchSchedule(len(ds), micro_batch, rank, world_size, seed, flip)
    dev = torch.device(device)
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
    workers = default_num_workers(backend, dev) if num_workers is None else num_workers
    if backend == "dali":
        return DaliLatentLoader(ds, schedule, dev, prefetch, workers, steps_per_run=dali_steps_per_run)
    return TorchLatentLoader(ds, schedule, dev, prefetch, workers, in_memory=in_memory)
