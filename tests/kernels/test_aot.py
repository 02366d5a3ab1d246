"""The AOT compile gate (``python -m kernels.check``): every kernel configuration compiles
for sm_80 and sm_90 within the shared-memory limit, without more than a few bytes of
register spills, with tensor cores for bf16/fp16. Needs no GPU (Triton compiles to PTX/cubin for a named target)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import pytest

from tests.conftest import REPO


def _compile_env() -> dict:
    """The gate runs in its own process: kernels defined under TRITON_INTERPRET=1 (another
    test module in this process) cannot be compiled for a GPU."""
    env = dict(os.environ)
    env.setdefault("TRITON_CACHE_DIR", str(REPO / "build" / "cache" / "triton"))
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.mark.slow
def test_every_configuration_passes_the_gate(tmp_path):
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "kernels.check", "--quiet", "--json", str(out)],
                          cwd=REPO, env=_compile_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    from kernels.fused.aot import ARCHS, SPILL_TOLERANCE, specs

    assert len(results) == len(ARCHS) * len(specs())
    assert all(r["ok"] and r["spill_bytes"] <= SPILL_TOLERANCE for r in results)
    low = [r for r in results if any(f"[{t};" in r["spec"] for t in ("bf16", "fp16"))
           and r["spec"].split("[")[0] in ("gram_partial_kernel", "mix_backward_kernel", "cov_backward_kernel")]
    assert low and all(r["mma"] for r in low)


def test_specs_cover_the_launchers_tile_table():
    from kernels.fused.aot import specs
    from kernels.fused.tiles import TILES

    labels = [s.label for s in specs()]
    assert len(labels) == len(set(labels))
    for (block_n, low), t in TILES.items():
        for dtype in (("bf16", "fp16") if low else ("fp32",)):
            gram = [s for s in specs() if s.kernel == "gram_partial_kernel" and s.dtype == dtype
                    and s.constexprs["BLOCK_N"] == block_n]
            assert {(s.constexprs["SHIFT"], s.constexprs["BLOCK_K"], s.num_warps) for s in gram} == {
                (False, t.block_k, t.warps), (True, t.block_k, t.warps)}


_OVERSIZED = """
import dataclasses, json
from kernels.fused.aot import compile_one, specs
base = next(s for s in specs() if s.kernel == "gram_partial_kernel" and s.dtype == "bf16"
            and not s.constexprs["SAME_TILE"])
big = dataclasses.replace(base, constexprs={**base.constexprs, "BLOCK_N": 128, "BLOCK_K": 256}, num_stages=4)
print(json.dumps(dataclasses.asdict(compile_one(big, 80))))
"""


def test_gate_reports_an_oversized_configuration():
    """A tile far too large for any GPU: the gate flags its shared memory (the compiler does not)."""
    proc = subprocess.run([sys.executable, "-c", _OVERSIZED], cwd=REPO, env=_compile_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["ok"]
    assert result["shared_bytes"] > 166_912
    assert any("shared memory" in p for p in result["problems"]), result["problems"]


def test_roofline_counts_what_the_kernels_do():
    """The roofline the benchmarks import: at the paper's size the forward pass is one read of
    z (plus the split-K partials), memory-bound; bf16 InfoNCE-L2 turns compute-bound at 129."""
    from kernels.roofline import H100, compute_crossover_n, dispersive_roofline, floor_seconds

    n, d = 32, 294_912
    fwd = dispersive_roofline(n, d, "bfloat16", "infonce_l2", "forward")
    z_bytes = n * d * 2
    assert z_bytes < fwd.bytes < 1.15 * z_bytes
    assert fwd.bound == "memory" and fwd.seconds == pytest.approx(fwd.bytes / H100.bandwidth)
    assert fwd.flops == 2 * 32 * 32 * d * 3                    # one 32 x 32 tile, hi/lo: 3 products
    bwd = dispersive_roofline(n, d, "bfloat16", "infonce_l2", "backward")
    assert 2 * z_bytes <= bwd.bytes < 2.01 * z_bytes and bwd.bound == "memory"
    both = dispersive_roofline(n, d, "bfloat16", "infonce_l2", "both")
    assert both.bytes == fwd.bytes + bwd.bytes and both.flops == fwd.flops + bwd.flops
    assert floor_seconds(n, d, "bfloat16", "both") == pytest.approx(3 * z_bytes / 3.0e12)
    cov = dispersive_roofline(n, d, "float32", "covariance", "forward")
    assert cov.bytes > 3 * n * d * 4                           # three reads of z
    assert compute_crossover_n("bfloat16", "infonce_l2", "forward") == 129
    assert compute_crossover_n("bfloat16", "infonce_cosine", "forward") > 256
    with pytest.raises(ValueError, match="N <= 1024"):
        dispersive_roofline(2048, d)
    with pytest.raises(ValueError, match="dtype"):
        dispersive_roofline(n, d, "float64")
