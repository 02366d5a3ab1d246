"""Markdown tables from a pytest-benchmark JSON file.

    python -m bench.report                                  # build/bench/benchmark.json -> results.md
    python -m bench.report run.json --out run.md

``pytest bench/`` writes the report at the end of the session (bench/conftest.py). Rows
are grouped by ``extra_info["kind"]`` (set by the benchmarks in bench/):

    dispersive   one pass of one provider at one size   -> table per size, speed-up vs release
    bar          a CPU bar (asserted by its test)        -> target, measured, PASS/FAIL
    all_blocks   the term on every block of SiT-XL/2     -> fraction of a training step
    train_step   images/s for five settings of the term  -> overhead vs no term

Anything else (the data loader benchmark, say) is listed with its median and IQR. On a
GPU run the report also judges the project's GPU targets from the rows it has.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "build" / "bench" / "benchmark.json"
PROVIDER_ORDER = ("release", "torch_compile", "torch_gram", "triton")
MODE_ORDER = ("forward", "backward", "forward_backward")
MODE_LABEL = {"forward": "fwd", "backward": "bwd", "forward_backward": "fwd+bwd"}
ROOFLINE_TARGET_X = 1.3     # fused fwd+bwd within 1.3x of the memory floor (N = 32, XL width, bf16)
XL_BLOCKS_TARGET_PCT = 2.0  # the term on all 28 blocks, % of a SiT-XL/2 training step


def fmt(value: Any, digits: int = 3) -> str:
    """A number with about ``digits`` significant digits; '-' for missing values."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        magnitude = abs(value)
        if magnitude >= 10 ** (digits - 1):
            return f"{value:,.0f}"
        for decimals in range(digits):
            if magnitude >= 10 ** (digits - 1 - decimals):
                return f"{value:.{decimals}f}"
        return f"{value:.{digits}g}"
    return str(value)


def table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return lines


def _header(data: dict) -> list[str]:
    env = data.get("bench", {})
    machine_info = data.get("machine_info", {})
    cpu = machine_info.get("cpu", {}) if isinstance(machine_info.get("cpu"), dict) else {}
    machine = env.get("machine") or cpu.get("brand_raw") or machine_info.get("processor", "unknown machine")
    versions = env.get("versions") or {"python": machine_info.get("python_version", "?")}
    cpus = env.get("cpu_count") or cpu.get("count")
    lines = ["# Benchmark results", "",
             f"- Machine: {machine}" + (f" ({cpus} CPUs)" if cpus else ""),
             f"- Device: {env.get('device', '?')}; mode: {env.get('mode', '?')}",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
             f"- Date: {env.get('date') or data.get('datetime', '?')}"]
    measured = env.get("measured")
    if measured:
        lines.append("- Measured in this run: " + ", ".join(f"{k} {fmt(v)}" for k, v in measured.items()))
    return lines + [""]


def _time_ms(info: dict) -> float:
    """The time a row is compared on: GPU time where measured, else wall time."""
    return info.get("device_ms", info.get("median_ms"))


def _dispersive(rows: list[dict], out_of_memory: list[dict]) -> list[str]:
    infos = [r["extra_info"] for r in rows]
    gpu = any("device_ms" in i for i in infos)
    by_size: dict[tuple, dict[tuple, dict]] = defaultdict(dict)
    for i in infos + [{**o, "oom": True} for o in out_of_memory]:
        by_size[(i["dtype"], i["n"], i["d"])][(i["mode"], i["provider"])] = i
    header = ["N", "D", "dtype", "pass", "provider", "median ms", "IQR ms"]
    header += ["GPU ms"] if gpu else []
    header += ["GB/s", "TFLOP/s", "% mem roofline", "x floor", "workspace MiB", "compile s", "vs release"]
    out = []
    for (dtype, n, d) in sorted(by_size, key=lambda k: (k[0] != "fp32", k[1], k[2])):
        cell = by_size[(dtype, n, d)]
        for mode in MODE_ORDER:
            release = cell.get((mode, "release"))
            if release is not None and release.get("oom"):
                release = None  # nothing to compare with
            for provider in PROVIDER_ORDER:
                i = cell.get((mode, provider))
                if i is None:
                    continue
                if i.get("oom"):
                    out.append([n, d, dtype, MODE_LABEL[mode], provider, "out of memory"]
                               + ["-"] * (len(header) - 6))
                    continue
                speedup = _time_ms(release) / _time_ms(i) if release else None
                row = [n, d, dtype, MODE_LABEL[mode], provider, i.get("median_ms"), i.get("iqr_ms")]
                row += [i.get("device_ms")] if gpu else []
                row += [i.get("GBps"), i.get("TFLOPs"), i.get("pct_memory_roofline"), i.get("x_floor"),
                        i.get("workspace_mib"), i.get("compile_s"),
                        f"{speedup:.2f}x" if speedup is not None else "-"]
                out.append(row)
    basis = "GPU time (CUDA events, L2 flushed)" if gpu else "wall time (median of rounds)"
    source = sorted({i.get("roofline_source", "?") for i in infos})
    return ["## Dispersive term (InfoNCE-L2, tau 1)", "",
            f"GB/s, TFLOP/s and roofline figures use the {basis} and the byte/FLOP counts of "
            f"{', '.join(source)}; the same counts for every provider (effective bandwidth). "
            "'x floor': time over the design floor (z read once per pass, dz written once, at the "
            "measured copy bandwidth). 'workspace': peak allocation of the call minus its output dz "
            "(torch_gram with its pooled buffers freed first, so a CPU forward shows the gradient-sized "
            "buffer it borrows as scratch and keeps for backward). "
            "'compile s': first forward+backward at that shape under torch.compile.", ""] + \
        table(header, out) + [""]


def _bars(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        i = r["extra_info"]
        out.append([i["bar"], i["n"], i["d"], i.get("release_ms"), i.get("torch_gram_ms"),
                    f"{i['measured']:.2f}x", f">= {i['target']:g}x", "PASS" if i["passed"] else "FAIL"])
    return ["## CPU bars (asserted)", "", "Medians of interleaved rounds, forward+backward, fp32.", ""] + \
        table(["bar", "N", "D", "release ms", "torch_gram ms", "speed-up", "target", "result"], out) + [""]


def _all_blocks(rows: list[dict]) -> list[str]:
    out, notes = [], set()
    for r in rows:
        i = r["extra_info"]
        out.append([i["provider"], i["dtype"], i["blocks"], i["n"], i["d"], i.get("median_ms"),
                    i.get("iqr_ms"), i.get("device_ms"), i.get("step_s", 0) * 1e3, i.get("pct_of_step")])
        notes.add(i.get("step_model", ""))
    return ["## The term on every block of SiT-XL/2 (forward+backward per block)", "",
            "Step time: " + "; ".join(sorted(notes)) + ". A real step is slower than this model, so "
            "'% of step' is an upper bound.", ""] + \
        table(["provider", "dtype", "blocks", "N", "D", "wall ms", "IQR ms", "GPU ms", "step ms",
               "% of step"], out) + [""]


def _train_steps(rows: list[dict]) -> list[str]:
    lines = ["## Training step", ""]
    for r in rows:
        i = r["extra_info"]
        lines += [f"{i['model']}, batch {i['batch']}, {i['precision']} (hidden states {i.get('hidden_dtype', '?')}), "
                  f"{i['device']}; forward + backward + AdamW; medians of {i['rounds']} interleaved rounds "
                  f"of {i['steps_per_round']} step(s). Overhead: median over rounds of the step time "
                  "over the no-term step time of the same round, minus 1.", ""]
        lines += table(["setting", "blocks", "implementation", "images/s", "step ms", "IQR ms",
                        "overhead vs no term"],
                       [[s["setting"], s["blocks"], s["impl"], s["images_per_s"], s["step_ms"],
                         s["step_iqr_ms"], f"{s['overhead_pct']:+.2f}%"] for s in i["settings"]])
        verdict = "PASS" if i["passed"] else "FAIL"
        lines += ["", f"Dispersive term on all {i.get('depth', '?')} blocks, this project's implementation: "
                  f"**{i['overhead_all_project_pct']:+.2f}%** of the step without it "
                  f"(target < {i['target_pct']:g}%, {i['bar']}: {verdict}).", ""]
    return lines


def _gpu_targets(groups: dict[str, list[dict]]) -> list[str]:
    dispersive = [r["extra_info"] for r in groups.get("dispersive", [])]
    if not any(i.get("device", "").startswith("cuda") for i in dispersive):
        return []
    lines = ["## GPU targets", ""]
    rows = []
    # 1. Fused fwd+bwd at the paper's size within 1.3x of the memory floor.
    hit = [i for i in dispersive if i["provider"] == "triton" and i["mode"] == "forward_backward"
           and i["n"] == 32 and i["d"] == 294_912 and i["dtype"] == "bf16"]
    if hit:
        x = hit[0]["x_floor"]
        rows.append([f"fused fwd+bwd within {ROOFLINE_TARGET_X}x of the memory roofline, N=32, D=294,912, bf16",
                     f"{x:.2f}x the floor ({_time_ms(hit[0]) * 1e3:.1f} us vs {hit[0]['floor_us']:.1f} us)",
                     "PASS" if x <= ROOFLINE_TARGET_X else "FAIL"])
    else:
        rows.append(["fused fwd+bwd within 1.3x of the memory roofline", "not measured in this run", "-"])
    # 2. Faster than release and torch_compile at every size and pass.
    index = {(i["provider"], i["mode"], i["n"], i["d"], i["dtype"]): i for i in dispersive}
    compared, slower = 0, []
    for (provider, mode, n, d, dtype), i in index.items():
        if provider != "triton":
            continue
        for other in ("release", "torch_compile"):
            j = index.get((other, mode, n, d, dtype))
            if j is None:
                continue
            compared += 1
            if _time_ms(i) >= _time_ms(j):
                slower.append(f"{MODE_LABEL[mode]} N={n} D={d} {dtype} vs {other} "
                              f"({_time_ms(i):.3f} vs {_time_ms(j):.3f} ms)")
    rows.append(["triton faster than release and torch_compile at every size",
                 f"{compared - len(slower)} of {compared} comparisons faster"
                 + (": slower at " + "; ".join(slower) if slower else ""),
                 "PASS" if compared and not slower else ("FAIL" if slower else "-")])
    # 3. The term on all 28 blocks under 2% of a SiT-XL/2 step: measured step, and the model.
    for r in groups.get("train_step", []):
        i = r["extra_info"]
        if i["model"] == "SiT-XL/2" and i["device"].startswith("cuda"):
            pct = i["overhead_all_project_pct"]
            rows.append([f"term on all 28 blocks < {XL_BLOCKS_TARGET_PCT:g}% of a SiT-XL/2 step (measured step)",
                         f"{pct:.2f}%", "PASS" if pct < XL_BLOCKS_TARGET_PCT else "FAIL"])
    for r in groups.get("all_blocks", []):
        i = r["extra_info"]
        if i["provider"] == "triton" and i["device"].startswith("cuda"):
            pct = i["pct_of_step"]
            rows.append([f"term on all 28 blocks < {XL_BLOCKS_TARGET_PCT:g}% of a SiT-XL/2 step "
                         f"(modelled step, {i['dtype']}; upper bound)", f"{pct:.2f}%",
                         "PASS" if pct < XL_BLOCKS_TARGET_PCT else "FAIL"])
    return lines + table(["target", "measured", "result"], rows) + [""]


def _other(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        stats = r.get("stats", {})
        scalars = {k: v for k, v in r.get("extra_info", {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        extra = ", ".join(f"{k} {fmt(v)}" for k, v in list(scalars.items())[:4])
        out.append([r.get("name", "?"), stats.get("median", float("nan")) * 1e3,
                    stats.get("iqr", float("nan")) * 1e3, stats.get("rounds"), extra or "-"])
    return ["## Other benchmarks", ""] + table(["name", "median ms", "IQR ms", "rounds", "details"], out) + [""]


def render(data: dict) -> str:
    """The Markdown report of a pytest-benchmark JSON document."""
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError("not a pytest-benchmark JSON document: no 'benchmarks' list")
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in data["benchmarks"]:
        groups[row.get("extra_info", {}).get("kind", "other")].append(row)
    lines = _header(data)
    out_of_memory = data.get("bench", {}).get("out_of_memory", [])
    if groups.get("dispersive") or out_of_memory:
        lines += _dispersive(groups.get("dispersive", []), out_of_memory)
    if groups.get("bar"):
        lines += _bars(groups["bar"])
    if groups.get("all_blocks"):
        lines += _all_blocks(groups["all_blocks"])
    if groups.get("train_step"):
        lines += _train_steps(groups["train_step"])
    lines += _gpu_targets(groups)
    if groups.get("other"):
        lines += _other(groups["other"])
    return "\n".join(lines).rstrip() + "\n"


def write_report(json_path: Path, md_path: Path) -> str:
    """Renders ``json_path`` into ``md_path``; returns the Markdown."""
    text = render(json.loads(Path(json_path).read_text()))
    md_path = Path(md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="?", type=Path, default=DEFAULT_JSON, help="pytest-benchmark JSON file")
    parser.add_argument("--out", type=Path, default=None, help="Markdown file (default: results.md beside the JSON)")
    args = parser.parse_args(argv)
    if not args.json.exists():
        parser.error(f"{args.json} does not exist; run `pytest bench/` first or pass a JSON file")
    print(write_report(args.json, args.out or args.json.with_name("results.md")), end="")


if __name__ == "__main__":
    main()
