"""Attention back ends for the transformer blocks.

The blocks hand over q, k, v in flash-attn's layout (N, T, H, Dh), which is what the
qkv projection produces after a reshape (no permute needed). SDPA and the math
reference want (N, H, T, Dh), so they transpose (views, no copies).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

FlashFn = Callable[..., torch.Tensor]


@functools.lru_cache(maxsize=1)
def load_flash_attn() -> FlashFn | None:
    """`flash_attn.flash_attn_func` when the package imports, else None (imported lazily)."""
    try:
        from flash_attn import flash_attn_func
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return None
    return flash_attn_func


def flash_attn_available() -> bool:
    return load_flash_attn() is not None


def flash_supported(q: torch.Tensor) -> bool:
    """flash-attn runs only on CUDA half-precision tensors."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference softmax(q k^T / sqrt(Dh)) v, (N, T, H, Dh) in and out; softmax in fp32."""
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (N, H, T, Dh)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (N, H, T, T)
    probs = scores.float().softmax(dim=-1).to(v.dtype)
    return (probs @ v).transpose(1, 2)  # (N, T, H, Dh)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's fused attention, (N, T, H, Dh) in and out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # (N, T, H, Dh)
