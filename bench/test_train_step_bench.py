"""Training step throughput with and without the dispersive term, release vs this project.

    pytest bench/test_train_step_bench.py

One SiT model, one batch, one optimizer; five settings of the term, timed in interleaved
rounds (each round runs every setting, in a rotating order) so that the ratios come from
the same machine state:

    none            no dispersive term (the model is called without hidden-state taps)
    last/release    the term on the last block (the release's setting), release's pdist code
    last/project    the same, this project's implementation (kernels.dispersive_loss_groups, auto)
    all/release     the term on every block, release's code
    all/project     the term on every block, this project's implementation

"release" swaps the objective's call for the release's pdist formulation
(``bench.providers.release_term``), nothing else. A step is forward, backward and AdamW.

CPU: SiT-S/2 at input 32 (256 tokens), batch 8, fp32. GPU: SiT-XL/2, the release's local
batch 32, bf16 autocast. Overhead of a setting = median over rounds of (its step time /
the no-term step time in the same round) - 1. BAR (asserted on CPU): all/project < 5%.
GPU target (printed): all/project < 2% of the step.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch

import models
from engine.objectives.build import build_objective
from engine.objectives.dispersive import DispersiveConfig

from .conftest import BenchSettings
from .providers import release_term
from .timing import summarize, synchronize

CPU_BAR_PCT = 5.0
GPU_TARGET_PCT = 2.0


@dataclass(frozen=True)
class Setting:
    name: str
    blocks: str | None      # None: no term; "last" or "all"
    impl: str               # "none", "release" or "project"


SETTINGS = (
    Setting("none", None, "none"),
    Setting("last/release", "last", "release"),
    Setting("last/project", "last", "project"),
    Setting("all/release", "all", "release"),
    Setting("all/project", "all", "project"),
)


@dataclass(frozen=True)
class StepSetup:
    model: str
    batch: int
    precision: str          # "fp32" or "bf16-autocast"
    steps_per_round: int
    rounds: int


def step_setup(run: BenchSettings) -> StepSetup:
    if run.device.type == "cuda":
        return StepSetup("sit_xl", 32, "bf16-autocast", steps_per_round=5, rounds=11 if run.full else 5)
    batch = int(os.environ.get("BENCH_TRAIN_BATCH", 8))
    # Odd round counts: the median is one round's value, not the mean of two. 21 rounds (~3 min
    # on the 2-core VM): one step varies by ~7% there, and with 5 rounds the all-blocks overhead
    # of the same code read +4.6% and +7.7% in two runs, with 11 +3.4% and +5.1%; separate
    # 30- and 40-round runs gave +2.4% and +4.1%.
    return StepSetup("sit_s", batch, "fp32", steps_per_round=1, rounds=31 if run.full else 21)


def _objective(setting: Setting):
    if setting.blocks is None:
        return build_objective("sit", dispersive=DispersiveConfig())
    # The release's lambda and tau; only the blocks (and the implementation) vary.
    return build_objective("sit", dispersive=DispersiveConfig(lambda_=0.25, tau=1.0, blocks=setting.blocks))


def test_train_step(benchmark, bench_settings: BenchSettings) -> None:
    device = bench_settings.device
    cfg = step_setup(bench_settings)
    torch.manual_seed(0)
    model = models.create_model(cfg.model, input_size=32).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0,
                            **({"fused": True} if device.type == "cuda" else {}))
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(cfg.batch, 4, 32, 32, generator=gen, device=device)          # latents (N, 4, 32, 32)
    y = torch.randint(0, 1000, (cfg.batch,), generator=gen, device=device)
    objectives = {s.name: _objective(s) for s in SETTINGS}
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.precision == "bf16-autocast"
                else contextlib.nullcontext())
    hidden_dtype: dict[str, str] = {}

    def step(setting: Setting, seed: int) -> None:
        # Same noise and times for every setting: the generator is re-seeded per step.
        g = torch.Generator(device=device).manual_seed(seed)
        impl = release_term() if setting.impl == "release" else contextlib.nullcontext()
        with impl, autocast:
            out = objectives[setting.name](model, x, y, generator=g)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed_steps(setting: Setting, seed: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for k in range(cfg.steps_per_round):
            step(setting, seed + k)
        synchronize(device)  # the round ends when the device is done
        return (time.perf_counter() - start) / cfg.steps_per_round

    def note_dtype(_module, _inputs, out) -> None:  # returns None: the output is left alone
        hidden_dtype.setdefault("dtype", str(out.dtype).removeprefix("torch."))

    # The dtype the term sees: the last block's output, read during the warm-up.
    hook = model.blocks[-1].register_forward_hook(note_dtype)
    for s in SETTINGS:  # warm-up: allocator, autotuning, first-call costs of every path
        step(s, 0)
    hook.remove()
    synchronize(device)

    times: dict[str, list[float]] = {s.name: [] for s in SETTINGS}
    counter = [0]

    def one_round() -> None:
        r = counter[0]
        counter[0] += 1
        order = SETTINGS[r % len(SETTINGS):] + SETTINGS[:r % len(SETTINGS)]  # rotate: no fixed position
        for s in order:
            times[s.name].append(timed_steps(s, seed=1000 * (r + 1)))

    benchmark.pedantic(one_round, rounds=cfg.rounds, warmup_rounds=0)

    base = times["none"]
    results = []
    for s in SETTINGS:
        stats = summarize(times[s.name])
        ratios = [t / b for t, b in zip(times[s.name], base)]  # same round, same machine state
        results.append({
            "setting": s.name, "blocks": s.blocks or "-", "impl": s.impl,
            "images_per_s": cfg.batch / stats["median"], "step_ms": stats["median"] * 1e3,
            "step_iqr_ms": stats["iqr"] * 1e3,
            "overhead_pct": 100 * (summarize(ratios)["median"] - 1) if s.impl != "none" else 0.0})
    by_name = {r["setting"]: r for r in results}
    overhead = by_name["all/project"]["overhead_pct"]
    target = GPU_TARGET_PCT if device.type == "cuda" else CPU_BAR_PCT
    benchmark.extra_info.update({
        "kind": "train_step", "model": models.release_name(cfg.model), "batch": cfg.batch,
        "precision": cfg.precision, "hidden_dtype": hidden_dtype["dtype"], "device": str(device),
        "depth": model.config.depth, "steps_per_round": cfg.steps_per_round, "rounds": cfg.rounds,
        "settings": results, "overhead_all_project_pct": overhead, "target_pct": target,
        "passed": overhead < target,
        "bar": "asserted (CPU bar)" if device.type != "cuda" else "printed (GPU target)"})
    print()
    for r in results:
        print(f"{r['setting']:>13}: {r['images_per_s']:8.2f} images/s, step {r['step_ms']:9.1f} ms "
              f"(IQR {r['step_iqr_ms']:.1f}), overhead {r['overhead_pct']:+.2f}%")
    if device.type == "cuda":
        verdict = "meets" if overhead < target else "MISSES"
        print(f"GPU target: the term on all {model.config.depth} blocks costs {overhead:.2f}% of a "
              f"{models.release_name(cfg.model)} step: {verdict} the {target:g}% target")
        return
    assert overhead < CPU_BAR_PCT, (
        f"the dispersive term on all {model.config.depth} blocks (this project's implementation) adds "
        f"{overhead:.2f}% to a {models.release_name(cfg.model)} training step at batch {cfg.batch} "
        f"(median over {cfg.rounds} interleaved rounds); the bar is {CPU_BAR_PCT:g}%")
