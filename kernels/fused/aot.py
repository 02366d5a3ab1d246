"""Ahead-of-time compile gate for the fused kernels; needs no GPU. The command is
``python -m kernels.check`` (``kernels/check.py``); here are the configurations and the rules.

Compiles every kernel configuration the launchers in ``kernels.fused.launch`` can pick
(the ``TILES`` table, both shift modes, every epilogue variant; fp32, bf16 and fp16) for
sm_80 (A100) and sm_90 (H100) and fails when one

* does not compile,
* needs more shared memory per block than the target has (the compiler does not check:
  sm_80 166,912 bytes, sm_90 232,448 bytes),
* spills more than ``SPILL_TOLERANCE`` bytes of registers (``ptxas -v`` on the generated PTX),
* multiplies bf16/fp16 tiles without tensor-core instructions (``mma`` on sm_80,
  ``wgmma`` or ``mma`` on sm_90), or uses tf32 for fp32 inputs (they must stay exact).

Specialisation: pointers, row strides and D are compiled as multiples of 16 (what the
runtime sees for model activations, e.g. D = 256 x 1152); other shapes get a less
vectorised specialisation of the same code.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

SHARED_LIMIT = {80: 166_912, 90: 232_448}   # bytes of shared memory per block (opt-in maximum)
# A few spilled registers cost little against a tile that fits badly: the 4-warp tiles of
# TILES spilled 8 B and ran 10-30% faster than the 8-warp ones on an H200 (bench.tile_sweep,
# 2026-11-30); the group axis added since costs sm_80's 64-row bf16/fp16 Gram tile 32 B
# (not re-timed). More than this is a tile that does not fit.
SPILL_TOLERANCE = 32
ARCHS = (80, 90)
DTYPES = ("fp32", "bf16", "fp16")
_MMA = {80: re.compile(r"\bmma\.sync\.aligned"), 90: re.compile(r"\bwgmma\.mma_async|\bmma\.sync\.aligned")}


@dataclass(frozen=True)
class Spec:
    """One compilation: a kernel, its argument types, its constexprs and launch options."""
    kernel: str
    dtype: str                       # z's dtype ("fp32" for the dtype-free kernels)
    signature: dict                  # argument name -> Triton type ("*bf16", "i32", "fp32")
    constexprs: dict
    num_warps: int
    num_stages: int = 3
    tensor_cores: bool = False       # must contain mma (bf16/fp16 kernels with tl.dot)
    exact_fp32: bool = False         # must not contain tf32 (fp32 kernels with tl.dot)
    aligned: tuple = ()              # arguments compiled as multiples of 16

    @property
    def label(self) -> str:
        consts = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items())
        return f"{self.kernel}[{self.dtype}; {consts}; w{self.num_warps}s{self.num_stages}]"


@dataclass
class Result:
    spec: str
    arch: int
    ok: bool
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    mma: bool = False
    seconds: float = 0.0
    problems: list = field(default_factory=list)


def specs() -> list[Spec]:
    """Every configuration the launchers can launch on a GPU (UPCAST is interpreter-only)."""
    from .jit import COSINE, HINGE, L2
    from .tiles import REDUCE_BLOCK_E, REDUCE_BLOCK_S, TILES

    L2, COSINE, HINGE = L2.value, COSINE.value, HINGE.value

    out = []
    f32 = "*fp32"
    out.append(Spec("gram_reduce_kernel", "fp32",
                    dict(ws_ptr=f32, g_ptr=f32, n="i32", np_="i32", split="i32", tile="i32"),
                    dict(BLOCK_E=REDUCE_BLOCK_E, BLOCK_S=REDUCE_BLOCK_S), 4, aligned=("ws_ptr", "g_ptr")))
    for (block_n, low), t in sorted(TILES.items()):
        if not low:  # the N x N epilogue does not depend on z's dtype
            for variant in (L2, COSINE, HINGE):
                out.append(Spec("epilogue_kernel", "fp32",
                                dict(g_ptr=f32, loss_ptr=f32, mix_ptr=f32, rowscale_ptr=f32, n="i32",
                                     dist_scale="fp32", inv_tau="fp32", margin="fp32"),
                                dict(VARIANT=variant, BLOCK=block_n), t.epilogue_warps,
                                aligned=("g_ptr", "mix_ptr", "rowscale_ptr")))
        for dtype in (("bf16", "fp16") if low else ("fp32",)):
            z = f"*{dtype}"
            dots = dict(tensor_cores=low, exact_fp32=not low)
            for same_tile in ((True, False) if block_n == 64 else (True,)):
                for shift in (False, True):
                    out.append(Spec("gram_partial_kernel", dtype,
                                    dict(z_ptr=z, ws_ptr=f32, n="i32", d="i32", stride_z="i32",
                                         stride_zg="i32", nt="i32", blocks_per_split="i32"),
                                    dict(BLOCK_N=block_n, BLOCK_K=t.block_k, SAME_TILE=same_tile, SHIFT=shift,
                                         UPCAST=False), t.warps, t.stages,
                                    aligned=("z_ptr", "ws_ptr", "d", "stride_z", "stride_zg"), **dots))
            for shift in (False, True):
                out.append(Spec("mix_backward_kernel", dtype,
                                dict(z_ptr=z, dz_ptr=z, mix_ptr=f32, rowscale_ptr=f32, gout_ptr=f32, n="i32",
                                     d="i32", stride_z="i32", stride_dz="i32", stride_zg="i32", stride_dzg="i32"),
                                dict(SHIFT=shift, UPCAST=False, BLOCK_M=block_n, BLOCK_N=t.block_j,
                                     BLOCK_D=t.block_d), t.bwd_warps, t.stages,
                                aligned=("z_ptr", "dz_ptr", "mix_ptr", "d", "stride_z", "stride_dz", "stride_zg",
                                         "stride_dzg"), **dots))
            out.append(Spec("cov_backward_kernel", dtype,
                            dict(z_ptr=z, dz_ptr=z, mix_ptr=f32, vec_ptr=f32, gout_ptr=f32, n="i32", d="i32",
                                 stride_z="i32", stride_dz="i32", c="fp32"),
                            dict(UPCAST=False, BLOCK_M=block_n, BLOCK_N=t.block_j, BLOCK_D=t.block_d),
                            t.bwd_warps, t.stages,
                            aligned=("z_ptr", "dz_ptr", "mix_ptr", "d", "stride_z", "stride_dz"), **dots))
            out.append(Spec("cov_column_stats_kernel", dtype,
                            dict(z_ptr=z, inv_ptr=f32, mean_ptr=f32, q_ptr=f32, q2_ptr=f32, n="i32", d="i32",
                                 stride_z="i32"),
                            dict(BLOCK_N=block_n, BLOCK_D=t.block_d), t.warps,
                            aligned=("z_ptr", "mean_ptr", "q_ptr", "d", "stride_z")))
            out.append(Spec("cov_row_stats_kernel", dtype,
                            dict(z_ptr=z, inv_ptr=f32, mean_ptr=f32, q_ptr=f32, r_ptr=f32, n="i32", d="i32",
                                 stride_z="i32", blocks_per_split="i32"),
                            dict(BLOCK_N=block_n, BLOCK_D=t.block_d), t.warps,
                            aligned=("z_ptr", "mean_ptr", "q_ptr", "d", "stride_z")))
    return out


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int, str]:
    """(registers, spill bytes, log) from ``ptxas -v`` of the PTX, with the flags Triton 3.9's
    ``make_cubin`` passes (``--regAllocOptLevel=2`` changes the allocation, so it matters)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path  # the ptxas Triton itself uses for this capability
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(arch)}", str(src),
                               "-o", str(Path(tmp) / "k.o")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{log}")
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", log)]
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    return max(regs, default=0), sum(spills), log


def compile_one(spec: Spec, arch: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget

    from . import jit
    from .tiles import LAUNCH_OPTIONS

    start = time.perf_counter()
    res = Result(spec.label, arch, ok=False)
    fn = getattr(jit, spec.kernel)
    try:
        signature = dict(spec.signature)
        signature.update({k: "constexpr" for k in spec.constexprs})
        names = list(fn.arg_names)
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.aligned}
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                                           **LAUNCH_OPTIONS})
        ptx = compiled.asm["ptx"]
        res.shared_bytes = int(compiled.metadata.shared)
        res.registers, res.spill_bytes, _ = _ptxas_usage(ptx, arch)
        res.mma = bool(_MMA[arch].search(ptx))
    except Exception as exc:  # noqa: BLE001 - every failure is reported, not raised
        res.problems.append(f"compile failed: {type(exc).__name__}: {str(exc).strip()[:2000]}")
        res.seconds = time.perf_counter() - start
        return res
    if res.shared_bytes > SHARED_LIMIT[arch]:
        res.problems.append(f"shared memory {res.shared_bytes} B > {SHARED_LIMIT[arch]} B of sm_{arch}")
    if res.spill_bytes > SPILL_TOLERANCE:
        res.problems.append(f"spills {res.spill_bytes} B of registers")
    if spec.tensor_cores and not res.mma:
        res.problems.append("no tensor-core (mma/wgmma) instruction for a 16-bit tl.dot")
    if spec.exact_fp32 and ".tf32" in ptx:
        res.problems.append("fp32 tl.dot compiled to tf32 (must be ieee)")
    res.ok = not res.problems
    res.seconds = time.perf_counter() - start
    return res


def _run(job):
    return compile_one(*job)


def compile_all(jobs: list[tuple[Spec, int]], workers: int = 1) -> list[Result]:
    """``compile_one`` of every (spec, arch) pair, in order; ``workers`` > 1: that many processes."""
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            return list(pool.map(_run, jobs))
    return [_run(job) for job in jobs]
