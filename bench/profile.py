"""Profile the dispersive kernels and a few SiT training steps; per-kernel roofline table.

    python -m bench.profile                      # cuda when present, else cpu
    python -m bench.profile --quick --device cpu --out build/profile --steps 3

1. Measures the device's copy bandwidth (a large tensor copy) and matmul rate in this run.
2. Times forward and backward of every available provider (bench.providers) at two sizes:
   median of --steps calls (CUDA: GPU time from CUDA events with the L2 flushed; CPU: wall).
3. Runs the same calls and --steps training steps of a small SiT with the term on all
   blocks under torch.profiler and writes a Chrome trace (open in chrome://tracing or
   https://ui.perfetto.dev).
4. Prints, and writes to DIR/profile.md, a table per kernel pass: time, bytes moved,
   GB/s, TFLOP/s and % of the roofline (byte/FLOP counts of kernels.roofline, the
   measured bandwidth and matmul rate), then the profiler's top operators.

--quick: small sizes and a tiny SiT, no torch.compile (its first compile alone takes
tens of seconds on a CPU); a few seconds on a CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Compiled artefacts stay in the ignored build area (set before torch and triton load).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO / "build" / "cache" / "inductor"))
os.environ.setdefault("TRITON_CACHE_DIR", str(REPO / "build" / "cache" / "triton"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from .hardware import DeviceFigures, copy_bandwidth, device_figures, pass_roofline
from .providers import PROVIDERS, loss_fn, timed_pass, unavailable_reason
from .report import fmt, table
from .timing import cuda_device_times, machine_description, now, synchronize

VARIANT = "infonce_l2"
# (N, D): the release's local batch on SiT-XL/2 and a large local batch on SiT-S/2.
SIZES = ((32, 256 * 1152), (256, 256 * 384))
QUICK_SIZES = ((8, 4096), (32, 16384))


@dataclass
class Region:
    provider: str
    n: int
    d: int
    dtype: torch.dtype
    pass_: str
    seconds: float

    @property
    def label(self) -> str:
        return f"dispersive/{self.provider}/N{self.n}xD{self.d}/{str(self.dtype).removeprefix('torch.')}/{self.pass_}"


def _providers(device: torch.device, quick: bool) -> tuple[list[str], list[str]]:
    """(providers to run, notes on the ones left out)."""
    run, notes = [], []
    for p in PROVIDERS:
        reason = unavailable_reason(p, device)
        if reason is None and quick and p == "torch_compile":
            reason = "left out by --quick (a first compile takes tens of seconds on a CPU)"
        if reason:
            notes.append(f"{p}: {reason}")
        else:
            run.append(p)
    return run, notes


def _time_pass(fn, z: torch.Tensor, pass_: str, steps: int) -> float:
    setup, run = timed_pass(fn, z, pass_)
    args, kwargs = setup()
    run(*args, **kwargs)  # warm-up
    if z.device.type == "cuda":
        _, run_async = timed_pass(fn, z, pass_, sync=False)  # events time the device, no host sync inside
        return statistics.median(cuda_device_times(run_async, setup, rounds=steps, device=z.device))
    times = []
    for _ in range(steps):
        args, kwargs = setup()
        start = time.perf_counter()
        run(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_kernels(device: torch.device, dtype: torch.dtype, sizes, providers, steps: int) -> list[Region]:
    regions = []
    for n, d in sizes:
        z = torch.randn(n, d, device=device, dtype=dtype).requires_grad_(True)
        for provider in providers:
            fn, _ = loss_fn(provider, z)
            for pass_ in ("forward", "backward"):
                regions.append(Region(provider, n, d, dtype, pass_, _time_pass(fn, z, pass_, steps)))
    return regions


def _train_setup(device: torch.device, quick: bool):
    """A small SiT, a batch and a step function with the term on every block."""
    import models
    from engine.objectives.build import build_objective
    from engine.objectives.dispersive import DispersiveConfig

    if quick:
        model = models.create_model("sit_s", input_size=8, depth=2, hidden_size=64, num_heads=2, num_classes=10)
        batch, size = 4, 8
    else:
        model = models.create_model("sit_s", input_size=32)
        batch, size = (32 if device.type == "cuda" else 8), 32
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = build_objective("sit", dispersive=DispersiveConfig(lambda_=0.25, blocks="all"))
    x = torch.randn(batch, 4, size, size, device=device)
    y = torch.randint(0, model.config.num_classes, (batch,), device=device)

    def step() -> None:
        objective(model, x, y)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def trace(device: torch.device, dtype: torch.dtype, sizes, providers, steps: int, quick: bool, out: Path):
    """Runs everything once more under torch.profiler; returns the profiler."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    inputs = {(n, d): torch.randn(n, d, device=device, dtype=dtype).requires_grad_(True) for n, d in sizes}
    fns = {(p, key): loss_fn(p, z)[0] for key, z in inputs.items() for p in providers}
    train_step = _train_setup(device, quick)
    train_step()  # warm-up outside the trace
    synchronize(device)
    with profile(activities=activities, record_shapes=False) as prof:
        for (provider, (n, d)), fn in fns.items():
            z = inputs[(n, d)]
            label = f"dispersive/{provider}/N{n}xD{d}/{str(dtype).removeprefix('torch.')}"
            for _ in range(steps):
                with record_function(f"{label}/forward"):
                    loss = fn(z)
                    synchronize(device)
                with record_function(f"{label}/backward"):
                    torch.autograd.grad(loss, z)
                    synchronize(device)
        for _ in range(steps):
            with record_function("train_step/sit_all_blocks"):
                train_step()
                synchronize(device)
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / "trace.json"))
    return prof


def kernel_table(regions: list[Region], figures: DeviceFigures) -> list[str]:
    rows = []
    for r in regions:
        line = pass_roofline(r.n, r.d, r.dtype, VARIANT, r.pass_, figures)
        derived = line.derived(r.seconds)
        rows.append([r.provider, r.n, r.d, str(r.dtype).removeprefix("torch."), r.pass_, r.seconds * 1e3,
                     line.bytes / 1e6, derived["GBps"], derived["TFLOPs"], derived["pct_memory_roofline"],
                     derived["pct_roofline"], line.source])
    return table(["provider", "N", "D", "dtype", "pass", "ms", "MB moved", "GB/s", "TFLOP/s",
                  "% mem roofline", "% roofline", "counts"], rows)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, tiny SiT, no torch.compile")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "profile", help="folder of the outputs")
    parser.add_argument("--steps", type=int, default=3, help="calls per pass and training steps (>= 1)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="dtype of z (default: bfloat16 on CUDA, float32 on CPU)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    sizes = QUICK_SIZES if args.quick else SIZES

    # --quick: a 64 MB copy is still far beyond the caches; a 1024^3 matmul fills the cores.
    figures = (DeviceFigures(device, copy_bandwidth(device, 64 << 20), matmul_size=1024) if args.quick
               else device_figures(device))
    providers, notes = _providers(device, args.quick)
    start = time.perf_counter()
    regions = time_kernels(device, dtype, sizes, providers, args.steps)
    prof = trace(device, dtype, sizes, providers, args.steps, args.quick, args.out)

    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    lines = [f"# Profile: {machine_description(device)}; {now()}", "",
             f"Copy bandwidth {figures.copy_bytes_per_s / 1e9:.1f} GB/s, measured in this run "
             f"(the memory roofline); times: {'GPU time from CUDA events' if device.type == 'cuda' else 'wall'}, "
             f"median of {args.steps}."]
    lines += [f"Left out: {note}" for note in notes] + [""]
    lines += kernel_table(regions, figures)
    lines += ["", f"Matmul rate used for the compute roofline: "
              + ", ".join(f"{k} {fmt(v)}" for k, v in figures.as_dict().items() if k.startswith("matmul")), "",
              f"Top operators by {sort_key.replace('_', ' ')} (whole trace):", "", "```",
              prof.key_averages().table(sort_by=sort_key, row_limit=15), "```",
              "", f"Chrome trace: {args.out / 'trace.json'} ({time.perf_counter() - start:.1f} s)"]
    text = "\n".join(lines)
    (args.out / "profile.md").write_text(text + "\n")
    print(text)
    return args.out / "trace.json"


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
