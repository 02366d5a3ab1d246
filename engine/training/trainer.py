"""The training loop: DeepSpeed ZeRO engine, EMA, checkpoints, logging, robustness.

``engine/train.py`` parses a :class:`~engine.training.config.TrainConfig` and calls
``Trainer(cfg).fit()``. Everything the run needs to continue bit-identically
(weights, EMA, optimizer, LR schedule, data position, every RNG stream) is in the
checkpoint; see ``engine/training/checkpoint.py`` for the layout.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import models
from engine.config.flags import config_to_dict
from engine.data.format import read_manifest
from engine.distributed import any_true, barrier, group_timeouts, init_distributed, return_freed_memory
from engine.sampling.generate import sample_images
from engine.sampling.images import make_grid, save_png
from engine.sampling.guidance import Guidance
from engine.sampling.samplers import SamplerConfig
from engine.training.builders import (build_model, loader_for, model_config_for, objective_for, prepare_dataset,
                                      seed_everything)
from engine.training.checkpoint import CheckpointManager, rng_state, saved_config, set_rng_state, step_of
from engine.training.config import DataSection, TrainConfig
from engine.training.deepspeed_setup import build_engine
from engine.training.ema import FullEMA, ema_builder, full_state_dict
from engine.training.resume import apply_optimizer_settings, check_resume
from engine.training.saturation import SaturationWatch
from engine.training.metrics import MetricSinks, PhaseTimer, peak_tflops
from engine.training.plots import Floor, plot_run_curves


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


STOP_FILE = "STOP"  # touch RESULTS_DIR/STOP: the run saves (unless --ckpt-every 0) and exits 0 at the next step


def describe_data(data: DataSection, path: Path, shape: str) -> str:
    """What the start-up line says of the data; in words when it is only a smoke test."""
    if data.data == "synthetic":
        return (f"SMOKE TEST on {data.synthetic_samples} random synthetic latents ({shape}), not a "
                "dataset: no --data was given. Train on real data with --data DIR (latents written by "
                "python -m engine.extract_latents, see engine/data/DATA.md), or --data digits for the "
                "built-in toy")
    return f"data {path} ({shape})"


class Trainer:
    """One training run, built from named parts:

    objective    what is trained (``builders.objective_for``): it also says which model
                 overrides it needs, its FLOPs per image and its grid sampler
    model_cfg    the architecture for the data (``builders.model_config_for``)
    engine       DeepSpeed around the model (``deepspeed_setup.build_engine``)
    ema          fp32 EMA of the master weights (``ema.ema_builder``)
    loader       the batch stream (``builders.loader_for``)
    checkpoints  save / resume of all of it (``checkpoint.CheckpointManager``)
    timer, metrics  step-time split and the metrics sinks (``metrics.MetricSinks``: files,
                 TensorBoard, wandb); ``plots`` draws curves.png at the end
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed(cfg.timeout_minutes)
        self.micro, self.accum = cfg.batch_layout(self.world)
        self.is_main = self.rank == 0
        self.out = Path(cfg.results_dir)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed + self.rank)

        self.objective = objective_for(cfg)
        self.data_path = prepare_dataset(cfg, self.rank)
        self.model_cfg = model_config_for(cfg, read_manifest(self.data_path), self.objective)
        model = build_model(self.model_cfg, cfg.seed)
        seed_everything(cfg.seed + self.rank)
        self.param_names = [n for n, _ in model.named_parameters()]
        finish_ema = ema_builder(model, sharded=cfg.zero_stage == 3, keep=self.is_main, device=self.device)
        if cfg.precision == "bf16":
            # DeepSpeed's bf16 mode casts the module anyway and builds the fp32 master weights
            # from the cast; doing it here first halves the peak memory of start-up (an XL
            # model is 2.7 GB in fp32 on every rank until DeepSpeed partitions it).
            model = model.to(torch.bfloat16)
        self.engine = build_engine(model, cfg, self.micro, self.accum, self.device,
                                   self.out / "deepspeed_config.json" if self.is_main else None)
        del model
        if self.device.type == "cpu":
            return_freed_memory()  # the unsharded start-up copies are dead now
        self.ema = finish_ema(self.engine)
        del finish_ema  # drops the initial weights it held
        if cfg.model.compile:
            self.engine.compile()  # DeepSpeed compiles the wrapped module in place
        # Full fp32 weights must be gathered unless the module already holds them.
        self.gather = cfg.zero_stage == 3 or cfg.precision == "bf16"
        self.loader = loader_for(cfg, self.data_path, micro=self.micro, rank=self.rank, world=self.world,
                                 device=self.device)
        self.checkpoints = CheckpointManager(
            self.out / "checkpoints", rank=self.rank, keep_last_k=cfg.keep_last_k, engine=self.engine,
            ema=self.ema, loader=self.loader, release_fields=self._release_fields,
            full_weights=lambda keep: full_state_dict(self.engine, self.param_names, self.gather, keep=keep))
        self.step = 0
        self.images_seen = 0
        self.nonfinite_run = 0
        self.skipped = 0
        # SIGTERM/SIGINT only ever sets _signalled; _stop is what every rank agreed on. One flag
        # for both loses a signal that lands while this rank waits in the agreeing all-reduce: the
        # reduce's older answer overwrites it, and the run trains on until the launcher kills it.
        self._signalled = False
        self._stop = False
        # Fault injection (tests): from this step on every loss is non-finite.
        self._nan_from = int(os.environ.get("DISPERSIVE_FAULT_NAN_FROM_STEP", "0")) or None
        self.timer = PhaseTimer(self.device)
        self.saturation = SaturationWatch()
        self.resume = self.checkpoints.dir.resolve_resume(cfg.resume)
        self.metrics = MetricSinks.open(self.out, enabled=self.is_main, tensorboard=cfg.tensorboard,
                                        wandb=cfg.wandb, config=config_to_dict(cfg),
                                        resumed_at=None if self.resume is None else step_of(self.resume))
        self.flops_per_image = self.objective.flops_per_image(self.model_cfg)
        self.peak = peak_tflops(self.device, cfg.precision)

    # ----------------------------------------------------------- checkpoints
    def save(self) -> None:
        self.checkpoints.save(self.step, {"step": self.step, "images_seen": self.images_seen,
                                          "skipped": self.skipped},
                              config=config_to_dict(self.cfg), healthy=self.nonfinite_run == 0)

    def load(self, path: Path) -> list[str]:
        """Restores the run from ``path`` and applies the settings a resume may change (refusing
        the ones it may not: ``engine.training.resume``); returns the changes for the log."""
        saved = saved_config(path)
        changes = check_resume(saved, config_to_dict(self.cfg), path) if saved is not None else []
        counters = self.checkpoints.load(path)
        self.step, self.images_seen, self.skipped = counters["step"], counters["images_seen"], counters["skipped"]
        apply_optimizer_settings(self.engine, self.cfg.optim)
        return changes

    def _release_fields(self) -> dict[str, Any]:
        """The release-format file's fields besides the weights: the releases' ``args`` their
        sampling scripts read (a dict, not a Namespace, so ``torch.load(weights_only=True)``
        reads it) with this run's whole config, and the model config."""
        mc = self.model_cfg
        args = {"model": models.release_name(self.cfg.model.name), "image_size": mc.input_size * 8,
                "num_classes": mc.num_classes, "global_batch_size": self.cfg.global_batch,
                "global_seed": self.cfg.seed, "train_config": config_to_dict(self.cfg)}
        return {"args": args, "config": mc.to_dict()}

    # ------------------------------------------------------------------ loop
    def _on_signal(self, signum, frame) -> None:
        self._signalled = True

    def _micro_step(self, batch, diagnostics: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y, valid = batch["x"], batch["y"], batch["valid"]
        # The latents stay fp32 under bf16 too: the noisy input and the target are formed in
        # fp32 and the model casts its own input (models.dit's patch embedding).
        with self.timer.phase("forward"):
            out = self.objective(self.engine, x, y, valid=valid, diagnostics=diagnostics)
        return out["loss"], out

    def train_step(self, it, diagnostics: bool = False) -> dict[str, float] | None:
        """One optimizer step (``accum`` micro-batches); None when it was skipped. ``diagnostics``
        (log steps): the objective adds the dispersive term's per-block diagnostics."""
        logs: dict[str, float] = {}
        bad_any = False
        for _ in range(self.accum):
            with self.timer.phase("data"):
                batch = next(it)
            loss, out = self._micro_step(batch, diagnostics)
            if self._nan_from is not None and self.step + 1 >= self._nan_from:
                loss = loss * math.nan
            # One tiny all-reduce per micro-batch (a host sync): every rank must agree on
            # skipping, and on stopping after SIGTERM, or the collectives would desynchronise.
            stop = self._signalled or (self.is_main and (self.out / STOP_FILE).exists())
            flags = any_true(torch.stack([~torch.isfinite(loss.detach()).cpu(), torch.tensor(stop)]))
            bad, self._stop = bool(flags[0]), bool(flags[1])
            bad_any |= bad
            if bad and self.accum == 1:
                break  # skip backward and the optimizer step: the weights stay as they were
            if bad:  # inside an accumulation window: contribute nothing from this micro-batch
                loss, out = self._micro_step({**batch, "x": torch.zeros_like(batch["x"]),
                                              "valid": torch.zeros_like(batch["valid"])})
                loss = loss * 0.0
            with self.timer.phase("backward"):
                self.engine.backward(loss)
            with self.timer.phase("optimizer"):
                skipped_before = self.engine.skipped_steps
                self.engine.step()
            bad_any |= self.engine.skipped_steps != skipped_before  # DeepSpeed saw a non-finite gradient
            for key, value in out.items():
                if key != "loss":
                    logs[key] = logs.get(key, 0.0) + float(value) / self.accum
        self.step += 1
        self.images_seen += self.cfg.global_batch
        if bad_any:
            self.skipped += 1
            self.nonfinite_run += 1
            if self.nonfinite_run >= self.cfg.max_nonfinite:
                raise NonFiniteError(
                    f"{self.nonfinite_run} consecutive steps had a non-finite loss or gradient "
                    f"(last at step {self.step}); stopping without a checkpoint from this state. "
                    f"Resume from the last checkpoint with a lower --lr, --grad-clip, or fp32.")
            return None
        self.nonfinite_run = 0
        with self.timer.phase("ema"):
            self.ema.update(self.engine, self.cfg.ema_decay, self.gather)
        norm = self.engine.get_global_grad_norm()
        logs["grad_norm"] = float(norm) if norm is not None else math.nan
        logs["lr"] = self.engine.get_lr()[0]
        return logs

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        resume = self.resume
        changes = self.load(resume) if resume is not None else []
        self._print_startup(resume)
        if resume is not None:
            note = self.checkpoints.abandon_newer()
            if self.is_main:
                if changes:
                    print(f"[train] resume applies the new settings: {', '.join(changes)}", flush=True)
                if note:
                    print(f"[train] {note}", flush=True)
        stop_file = self.out / STOP_FILE
        if self.is_main and stop_file.exists():
            stop_file.unlink()
            print(f"[train] removed a leftover {stop_file} (it would have stopped this run at once)", flush=True)
        barrier()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

        # Redirected to a file (CI, a cluster's log), a bar that redraws 10 times a second
        # would flood it: redraw every 30 s there instead.
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.is_main, desc="train",
                   dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)
        try:
            last, stopped_by_signal = self._loop(bar)
        finally:  # an error's one line then starts a line of its own
            bar.close()
        if cfg.ckpt_every:
            self.save()
        if stopped_by_signal and self.is_main and (self.out / STOP_FILE).exists():
            (self.out / STOP_FILE).unlink()  # honoured: a resume must not stop at once
            print(f"[train] stopped at step {self.step} by {self.out / STOP_FILE} (removed); "
                  + ("--resume auto continues from here" if cfg.ckpt_every else
                     "no checkpoint written (--ckpt-every 0)"), flush=True)
        grid = self.sample_grid()
        summary = self._summary(last, grid, stopped_by_signal)
        self._finish_metrics()
        return summary

    def _loop(self, bar) -> tuple[dict[str, float], bool]:
        """Steps until max_steps or a stop request; returns (the last logs, stopped early)."""
        cfg = self.cfg
        it = iter(self.loader)
        last: dict[str, float] = {}
        window_start, window_images = time.perf_counter(), 0
        profiler = None
        stopped_by_signal = False
        try:
            while self.step < cfg.max_steps:
                if cfg.profile_steps and self.step == cfg.profile_steps[0]:
                    profiler = self._start_profiler()
                log_now = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.max_steps
                self.timer.sync = log_now
                logs = self.train_step(it, diagnostics=log_now)
                window_images += cfg.global_batch
                if profiler is not None and self.step >= cfg.profile_steps[1]:
                    self._stop_profiler(profiler)
                    profiler = None
                bar.update(1)
                if logs is not None:
                    last = logs
                if log_now:
                    elapsed = time.perf_counter() - window_start
                    self._log(last, window_images / elapsed, self.timer.pop(), bar)
                    window_start, window_images = time.perf_counter(), 0
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.sample_grid()
                if self._stop:
                    stopped_by_signal = True
                    break
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.max_steps:
                    self.save()
        finally:
            if profiler is not None:
                self._stop_profiler(profiler)
        return last, stopped_by_signal

    def _finish_metrics(self) -> None:
        """Close the sinks; rank 0 draws the run's curves into results_dir/curves.png."""
        self.metrics.close()
        if self.is_main and (self.out / "metrics.jsonl").exists():
            floor = Floor.of(self.cfg.dispersive, self.micro, self.world)
            try:
                print(f"[train] curves: {plot_run_curves(self.out, floor=floor)}", flush=True)
            except Exception as e:  # a picture is not worth failing a finished run: say so, go on
                print(f"[train] warning: could not draw curves.png ({type(e).__name__}: {e}); "
                      f"python -m engine.plot {self.out} retries", flush=True)

    # ------------------------------------------------------------ reporting
    def _print_startup(self, resume: Path | None) -> None:
        if not self.is_main:
            return
        mc = self.model_cfg
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())
        peak = f"{self.peak:.0f} TFLOP/s ({self.cfg.precision})" if self.peak else "unknown (MFU not reported)"
        print(f"[train] model {self.cfg.model.name} ({mc.family}, depth {mc.depth}, hidden {mc.hidden_size}, "
              f"{n_params:,} parameters); "
              + describe_data(self.cfg.data, self.data_path,
                              f"{mc.in_channels}x{mc.input_size}x{mc.input_size}, {mc.num_classes} classes"),
              flush=True)
        print(f"[train] {self.world} rank(s) on {self.device.type}; global batch {self.cfg.global_batch} = "
              f"{self.world} x micro {self.micro} x accumulation {self.accum}; ZeRO-{self.cfg.zero_stage}, "
              f"{self.cfg.precision}; device peak {peak}; {self.flops_per_image / 1e9:.2f} GFLOP per image "
              f"(forward+backward)", flush=True)
        timeouts = group_timeouts()
        if timeouts:
            minutes = sorted({t.total_seconds() / 60 for t in timeouts})
            print(f"[train] collective timeout {', '.join(f'{m:g}' for m in minutes)} min on "
                  f"{'all ' if len(minutes) == 1 else ''}{len(timeouts)} process group(s); stop the run with "
                  f"SIGTERM to the ranks or: touch {self.out / STOP_FILE}", flush=True)
        d = self.cfg.dispersive
        disp = (f"{d.variant}{' (scale-invariant)' if d.scale_invariant else ''}, lambda {d.lambda_}, tau {d.tau}, "
                f"blocks {d.blocks}, scope {d.scope}"
                if d.enabled else "off")
        print(f"[train] dispersive loss: {disp}; results in {self.out}" +
              (f"; resumed from {resume} at step {self.step}" if resume else ""), flush=True)
        if not self.cfg.ckpt_every:
            older = self.checkpoints.dir.latest()
            print("[train] --ckpt-every 0: no checkpoint will be written, so " +
                  (f"--resume auto would go back to {older}" if older else "this run cannot be resumed"), flush=True)

    def _log(self, logs: dict[str, float], images_per_s: float, phases: dict[str, float], bar) -> None:
        tflops = images_per_s * self.flops_per_image / 1e12
        record = {"images_per_s": images_per_s, "tflops": tflops,
                  "mfu": tflops / self.peak if self.peak else None, "skipped_steps": self.skipped,
                  **logs, **{f"time/{k}": v for k, v in phases.items()}}
        self.metrics.scalars(self.step, record)
        warning = self.saturation.update(record)
        if warning and self.is_main:
            bar.write(f"[train] warning: {warning}")
        if self.is_main:
            disp = logs.get("dispersive_total", 0.0)
            bar.set_postfix(loss=f"{logs.get('diffusion_loss', math.nan):.4f}", disp=f"{disp:.4f}",
                            img_s=f"{images_per_s:.1f}")
            bar.write(f"step {self.step:>7d}  diffusion {logs.get('diffusion_loss', math.nan):.5f}  "
                      f"dispersive {disp:.5f}  grad_norm {logs.get('grad_norm', math.nan):.3f}  "
                      f"lr {logs.get('lr', math.nan):.2e}  {images_per_s:.1f} img/s  {tflops:.3f} TFLOP/s"
                      + (f"  MFU {tflops / self.peak:.1%}" if self.peak else ""))

    def sample_grid(self) -> Path | None:
        """An EMA sample grid from fixed noise and labels (rank 0 samples; the others wait)."""
        path = None
        ema_model = self._ema_model()  # a collective under ZeRO-3
        if self.is_main:
            sampler = SamplerConfig(**self.objective.grid_sampler(self.cfg.sample_steps))
            labels = torch.arange(self.cfg.sample_count) % self.model_cfg.num_classes
            guidance = Guidance(scale=self.cfg.cfg_scale, channels="all") if self.cfg.cfg_scale != 1.0 else None
            # The RNG streams must not move: sampling here may not change what training draws.
            rng = rng_state()
            images = sample_images(ema_model, labels, sampler=sampler, guidance=guidance,
                                   transport=self.objective.sampling_transport(), seed=self.cfg.seed)
            set_rng_state(rng)
            # Few classes (digits): one column per class, so each column is one label.
            nrow = self.model_cfg.num_classes if self.model_cfg.num_classes <= 16 else None
            grid = make_grid(images, nrow=nrow)
            path = save_png(grid, self.out / "samples" / f"{self.step:07d}.png")
            self.metrics.image("samples/ema", self.step, grid)
        barrier()
        return path

    def _ema_model(self) -> torch.nn.Module | None:
        """The EMA weights as a model on rank 0 (None elsewhere)."""
        if isinstance(self.ema, FullEMA):
            return self.ema.model
        weights = self.ema.full_state_dict(self.engine)
        if weights is None:
            return None
        with torch.device("meta"):  # no second set of weights: the gathered tensors are used as they are
            model = models.DiffusionTransformer(self.model_cfg)
        model.load_state_dict(weights, assign=True)
        return model.to(self.device).eval()

    def _start_profiler(self):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(activities=activities, record_shapes=True, with_flops=True)
        prof.__enter__()
        return prof

    def _stop_profiler(self, prof) -> None:
        prof.__exit__(None, None, None)
        folder = self.out / "profile"
        folder.mkdir(parents=True, exist_ok=True)
        trace = folder / f"trace-rank{self.rank:02d}.json"
        prof.export_chrome_trace(str(trace))
        if self.is_main:
            print(f"[train] profiler trace written to {trace}", flush=True)

    def _summary(self, last: dict[str, float], grid: Path | None, by_signal: bool) -> dict[str, Any]:
        latest = self.checkpoints.dir.latest()
        records = [json.loads(line) for line in open(self.out / "metrics.jsonl")] \
            if self.is_main and (self.out / "metrics.jsonl").exists() else []
        if not last and records and records[-1]["step"] == self.step:
            # a launch that resumed at max_steps ran no step: its final logs are the last logged ones
            last = {k: v for k, v in records[-1].items() if k != "step"}
        summary = {"step": self.step, "stopped_by_signal": by_signal, "skipped_steps": self.skipped,
                   "final": last, "checkpoint": str(latest) if latest else None,
                   "release_checkpoint": str(self.checkpoints.dir.release_path(self.step)) if self.cfg.ckpt_every
                   else None,
                   "sample_grid": str(grid) if grid else None}
        if self.is_main:
            speeds = [r["images_per_s"] for r in records[1:]] or [r["images_per_s"] for r in records]
            summary["images_per_s"] = float(np.median(speeds)) if speeds else None
            with open(self.out / "summary.json", "w") as f:
                json.dump(summary, f, indent=2)
            print(f"[train] done at step {self.step}: diffusion loss {last.get('diffusion_loss', math.nan):.5f}, "
                  f"dispersive {last.get('dispersive_total', 0.0):.5f}, "
                  f"{summary['images_per_s'] or math.nan:.1f} images/s (median over log windows)", flush=True)
            print(f"[train] checkpoint: {summary['release_checkpoint']} (DeepSpeed: {summary['checkpoint']})"
                  if self.cfg.ckpt_every else "[train] checkpoint: none written (--ckpt-every 0)"
                  + (f"; the latest on disk is {latest} (an earlier launch's)" if latest else ""))
            print(f"[train] sample grid: {summary['sample_grid']}", flush=True)
        return summary
