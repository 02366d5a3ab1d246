"""Host launchers of the fused Dispersive Loss: check z, allocate, launch.

The kernels are in ``kernels.fused.jit`` (read its docstring for the passes and the
precision scheme), their tiles in ``kernels.fused.tiles``. Here:

    forward(z, variant, ...)  -> (loss, mix_hat, state)     # no host sync anywhere
    backward(g, z, mix_hat, state, variant) -> dz
    gram(z, shift)            -> N x N fp32 Gram (split-K, deterministic reduction)
    supports(z), supports_groups(z, variant)                 # what the fused path takes

``kernels.dispersive_loss(z, backend="triton")`` reaches them through the custom op in
``kernels.ops``; this module imports neither (calls go one way: API -> op -> launcher ->
jit). The fused path serves N <= ``MAX_N`` and fp32/bf16/fp16; beyond that (or fp64)
the API sends the call to the Gram path (``kernels.gram``, on CUDA tensors too), from
``supports``. ``variant`` is one of ``kernels.VARIANTS``: the API validated it, it is
not checked again here. The N x N epilogue runs as one Triton program for N <= ``EPILOGUE_MAX_N``
(InfoNCE-L2, cosine, hinge): at the paper's N = 32 it is a single launch instead of
twenty small torch launches. Beyond that, and for covariance, it is the same math as
torch ops on the N x N matrix (``kernels.gram``'s epilogue functions).

Buffers the kernels must write are allocated with ``torch.empty``; tests set
``POISON_BUFFERS = True`` to get them NaN-filled instead, so an element a kernel forgot
to write shows up as NaN.
"""
from __future__ import annotations

import functools

import torch
from triton.runtime.interpreter import InterpretedFunction

from .. import gram as gram_path
from . import jit as K
from .tiles import (DISTANCE_VARIANTS, EPILOGUE_MAX_N, LAUNCH_OPTIONS, MAX_N, REDUCE_BLOCK_E, REDUCE_BLOCK_S,
                    SUPPORTED_DTYPES, TILES, Tiles, block_rows, tiles_for)

POISON_BUFFERS = False  # tests: NaN-fill every buffer a kernel is expected to overwrite
_EPILOGUE_CODE = {"infonce_l2": K.L2.value, "infonce_cosine": K.COSINE.value, "hinge": K.HINGE.value}


# Whether the kernels were defined for the interpreter (fixed when @triton.jit ran, i.e. at
# import); a plain global also lets torch.compile read it without tracing into triton.
INTERPRETED = isinstance(K.gram_partial_kernel, InterpretedFunction)


def interpreting() -> bool:
    return INTERPRETED


def _problem(z: torch.Tensor, layout: bool = True) -> Exception | None:
    """Why the kernels cannot take the (N, D) input z (None: they can); ``layout=False``
    leaves out its strides (a caller that flattens z makes the last dimension contiguous)."""
    if z.dtype not in SUPPORTED_DTYPES:
        return TypeError(f"the Triton kernels take float32, bfloat16 or float16, got {z.dtype}")
    if not 1 <= z.shape[0] <= MAX_N:
        return ValueError(f"the fused path supports 1 <= N <= {MAX_N} rows, got N = {z.shape[0]}")
    if z.shape[1] < 1:
        return ValueError("z must have at least one column")
    if layout and z.stride(-1) != 1:
        return ValueError(f"z's last dimension must be contiguous (stride 1), got strides {z.stride()}")
    if not (z.is_cuda or interpreting()):
        return RuntimeError("the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 set before "
                            "triton is imported, for CPU tensors)")
    return None


def supports(z: torch.Tensor) -> bool:
    """Whether the fused path takes this flattened (N, D) input, any strides (else: the Gram path)."""
    return z.dim() == 2 and _problem(z, layout=False) is None


def supports_groups(z: torch.Tensor, variant: str) -> bool:
    """Whether one fused call takes a stack (K, N, D) of batches like this one (N, D):
    N <= ``EPILOGUE_MAX_N`` and not covariance (the variants whose whole epilogue is the
    one-program kernel)."""
    return supports(z) and z.shape[0] <= EPILOGUE_MAX_N and variant != "covariance"


def _upcast(z: torch.Tensor) -> bool:
    return interpreting() and z.dtype == torch.bfloat16


def _empty(shape, dtype, device) -> torch.Tensor:
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs to aim for in a split-K launch: two per SM keep every SM streaming.

    Under the interpreter programs run one after another, so only a few splits (enough
    to exercise uneven splits in the tests).
    """
    if device.type == "cuda":
        return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def _split_columns(n_blocks: int, tiles_in_grid: int, device: torch.device, split: int | None):
    """(splits, blocks per split) for n_blocks column blocks; no split is empty."""
    if split is None:
        split = max(1, -(-_target_programs(device) // tiles_in_grid))
    per = -(-n_blocks // max(1, min(split, n_blocks)))
    return -(-n_blocks // per), per


def _check(z: torch.Tensor) -> None:
    """Raises when the kernels cannot take z: one check per entry point (forward, backward, gram)."""
    if z.dim() == 3:  # a stack of K batches (groups); each is checked as an (N, D) input
        if z.shape[0] < 1:
            raise ValueError("a stack of batches needs at least one group")
        z = z[0]
    elif z.dim() != 2:
        raise ValueError(f"z must be flattened to (N, D) or stacked to (K, N, D), got shape {tuple(z.shape)}")
    problem = _problem(z)
    if problem is not None:
        raise problem


def _check_out(out: torch.Tensor, shape: tuple, dtype: torch.dtype, row_stride_ok: bool = False) -> torch.Tensor:
    """A caller's output buffer: right shape and dtype, contiguous (rows may be strided for dz)."""
    layout_ok = out.stride(-1) == 1 if row_stride_ok else out.is_contiguous()
    if tuple(out.shape) != shape or out.dtype != dtype or not layout_ok:
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape}, "
                         f"got {out.dtype} {tuple(out.shape)} with strides {out.stride()}")
    return out


# ----------------------------------------------------------------------------- forward


def _groups(z: torch.Tensor) -> torch.Tensor:
    """z as a stack (K, N, D): a view with K = 1 for a single batch."""
    return z if z.dim() == 3 else z.unsqueeze(0)


def gram(z: torch.Tensor, shift: bool, *, split: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """N x N fp32 Gram of z (of ``z - z_0`` with ``shift``): split-K partials, then a fixed-order sum.
    For a stack (K, N, D), the K Grams (K, N, N) from the same two launches."""
    _check(z)
    return _gram(z, shift, split, out)


def _gram(z: torch.Tensor, shift: bool, split: int | None, out: torch.Tensor | None) -> torch.Tensor:
    """``gram`` of a checked z."""
    zg = _groups(z)
    k, n, d = zg.shape
    t = tiles_for(n, z.dtype)
    nt = -(-n // t.block_n)
    split, per = _split_columns(-(-d // t.block_k), k * nt * (nt + 1) // 2, z.device, split)
    np_ = nt * t.block_n
    ws = _empty((k, split, np_, np_), torch.float32, z.device)                   # (K, S, NP, NP)
    K.gram_partial_kernel[(nt * nt, split, k)](
        zg, ws, n, d, zg.stride(1), zg.stride(0), nt, per,
        BLOCK_N=t.block_n, BLOCK_K=t.block_k, SAME_TILE=nt == 1, SHIFT=shift, UPCAST=_upcast(z),
        num_warps=t.warps, num_stages=t.stages, **LAUNCH_OPTIONS)
    shape = (k, n, n) if z.dim() == 3 else (n, n)
    g = _empty(shape, torch.float32, z.device) if out is None else _check_out(out, shape, torch.float32)
    K.gram_reduce_kernel[(-(-n * n // REDUCE_BLOCK_E), k)](ws, g, n, np_, split, t.block_n,
            BLOCK_E=REDUCE_BLOCK_E, BLOCK_S=REDUCE_BLOCK_S, num_warps=4, **LAUNCH_OPTIONS)
    return g


def _normalise_rows(mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mix = rowscale[:, None] * mix_hat with max |mix_hat_ij| = 1 per row (as epilogue_kernel)."""
    rowscale = mix.abs().amax(dim=1)
    rowscale = torch.where(rowscale == 0, torch.ones_like(rowscale), rowscale)
    return (mix / rowscale[:, None]).contiguous(), rowscale


def _covariance(z: torch.Tensor, g: torch.Tensor, split: int | None):
    """Second pass (column and row statistics) and the N x N epilogue of the covariance variant."""
    n, d = z.shape
    t = tiles_for(n, z.dtype)
    inv, gram_n, k = gram_path.covariance_setup(g)                              # (N,), (N, N), (N, N)
    inv = inv.contiguous()
    n_blocks = -(-d // t.block_d)
    mean = _empty((d,), torch.float32, z.device)
    q = _empty((d,), torch.float32, z.device)
    q2 = _empty((n_blocks,), torch.float32, z.device)
    K.cov_column_stats_kernel[(n_blocks,)](z, inv, mean, q, q2, n, d, z.stride(0),
            BLOCK_N=t.block_n, BLOCK_D=t.block_d, num_warps=t.warps, **LAUNCH_OPTIONS)
    nt = -(-n // t.block_n)
    rsplit, per = _split_columns(n_blocks, nt, z.device, split)
    r = _empty((rsplit, n), torch.float32, z.device)
    K.cov_row_stats_kernel[(nt, rsplit)](z, inv, mean, q, r, n, d, z.stride(0), per,
            BLOCK_N=t.block_n, BLOCK_D=t.block_d, num_warps=t.warps, **LAUNCH_OPTIONS)
    loss, tvec = gram_path.covariance_finish(g, gram_n, k, q2.sum(), r.sum(dim=0))
    mix_hat, rowscale = _normalise_rows((4.0 / n**2) * inv[:, None] * k)
    return loss, mix_hat, torch.stack((rowscale, inv, tvec * inv))


def forward(z: torch.Tensor, variant: str, tau: float = 1.0, margin: float = 1.0,
            normalize_by_dim: bool = True, *, split: int | None = None):
    """(loss, mix_hat, state) of the flattened z (N, D); backward needs (z, mix_hat, state).

    loss is a 0-dim fp32 tensor; mix_hat (N, N) and state (1 or 3, N) are fp32. A stack
    z (K, N, D) that ``supports_groups`` gives K losses (K,), (K, N, N) and (K, 1, N).
    ``split`` overrides the number of column splits of the Gram kernel (tests).
    """
    _check(z)
    if z.dim() == 3 and not supports_groups(z[0], variant):
        raise ValueError(f"a stack of batches takes N <= {EPILOGUE_MAX_N} and no covariance, got N = "
                         f"{z.shape[1]}, {variant}; call per batch instead")
    n, d = z.shape[-2:]
    g = _gram(z, variant in DISTANCE_VARIANTS, split, None)                    # ([K,] N, N)
    if variant == "covariance":
        return _covariance(z, g, split)
    dist_scale = 1.0 / d if normalize_by_dim else 1.0
    if n > EPILOGUE_MAX_N:
        loss, mix = gram_path.gram_epilogue(g, variant, tau, margin, dist_scale)
        mix_hat, rowscale = _normalise_rows(mix)
        return loss, mix_hat, rowscale[None, :]
    lead = z.shape[:-2]                                                        # (K,) or ()
    loss = _empty(lead, torch.float32, z.device)
    mix_hat = _empty((*lead, n, n), torch.float32, z.device)
    state = _empty((*lead, 1, n), torch.float32, z.device)
    K.epilogue_kernel[(_groups(z).shape[0],)](g, loss, mix_hat, state, n, dist_scale, 1.0 / tau, margin,
            VARIANT=_EPILOGUE_CODE[variant], BLOCK=block_rows(n, z.dtype),
            num_warps=tiles_for(n, z.dtype).epilogue_warps, **LAUNCH_OPTIONS)
    return loss, mix_hat, state


# ----------------------------------------------------------------------------- backward


def backward(grad_out: torch.Tensor, z: torch.Tensor, mix_hat: torch.Tensor, state: torch.Tensor,
             variant: str, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """dL/dz (N, D) in z's dtype: one more read of z, one write of dz. For a stack (K, N, D),
    grad_out is (K,) and dz (K, N, D)."""
    _check(z)
    n, d = z.shape[-2:]
    k = _groups(z).shape[0]
    mix_hat, state = mix_hat.contiguous(), state.contiguous()                 # ([K,] N, N), ([K,] 1 or 3, N)
    t = tiles_for(n, z.dtype)
    # stays on the device; contiguous: the kernel reads g[k] at offset k, and the gradient of
    # values.sum() arrives expanded (stride 0), which read past g for every block but the first
    g = grad_out.detach().to(device=z.device, dtype=torch.float32).reshape(k).contiguous()
    shape = tuple(z.shape)
    dz = _empty(shape, z.dtype, z.device) if out is None else _check_out(out, shape, z.dtype, True)  # ([K,] N, D)
    grid = (-(-n // t.block_n) * -(-d // t.block_d), k)                      # row tiles fastest
    common = dict(UPCAST=_upcast(z), BLOCK_M=t.block_n, BLOCK_N=t.block_j, BLOCK_D=t.block_d,
                  num_warps=t.bwd_warps, num_stages=t.stages, **LAUNCH_OPTIONS)
    if variant == "covariance":  # single batches only (forward refuses a covariance stack)
        K.cov_backward_kernel[grid](z, dz, mix_hat, state, g, n, d, z.stride(0), dz.stride(0),
                4.0 / n**2, **common)
    else:
        zg, dzg = _groups(z), _groups(dz)
        K.mix_backward_kernel[grid](zg, dzg, mix_hat, state, g, n, d, zg.stride(1), dzg.stride(1),
                zg.stride(0), dzg.stride(0), SHIFT=variant in DISTANCE_VARIANTS, **common)
    return dz


__all__ = ["EPILOGUE_MAX_N", "INTERPRETED", "MAX_N", "TILES", "Tiles", "backward", "forward", "gram",
           "supports", "supports_groups", "tiles_for"]
