"""The SiT/DiT diffusion transformer: one implementation for both families.

Layout, module names and parameter shapes follow the public SiT and DiT releases, so their
checkpoints load with `load_state_dict(strict=True)`:

    pos_embed (1, T, D)                       fixed 2-D sin-cos table (a non-trainable Parameter)
    x_embedder.proj                           Conv2d(C, D, p, stride=p): patchify + embed
    t_embedder.mlp.{0,2}                      Linear(256, D), SiLU, Linear(D, D)
    y_embedder.embedding_table                Embedding(num_classes [+1 null class], D)
    blocks.i.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}
    final_layer.{linear, adaLN_modulation.1}

Families: SiT (flow matching) gets t in [0, 1] and, with learn_sigma, `forward` keeps only the
first in_channels output channels; DiT (DDPM) gets t as 0..999 floats and returns all of them.
Both embed t with the same sinusoidal features (max_period 10000).

Project extras: `return_hidden` taps of block outputs (for Dispersive Loss), an optional second
time input `h` (MeanFlow), flash-attn / SDPA attention, per-block activation checkpointing.
Mixed precision: layer norms, the timestep frequency features and the residual stream stay in
fp32 under bf16 autocast (only the matmuls drop to bf16).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import flash_supported, load_flash_attn, math_attention, sdpa_attention
from .config import ModelConfig

BlockSpec = Union[int, Sequence[int], Literal["last", "all", "paper"], None]
FREQUENCY_EMBEDDING_SIZE = 256  # width of the sinusoidal timestep features (both releases)
NORM_EPS = 1e-6


# ---------------------------------------------------------------------------------------
# Fixed tables and small helpers
# ---------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) times: (N,) -> (N, dim), [cos | sin].

    Frequencies run geometrically from 1 down to 1/max_period. Always computed in fp32:
    DiT times reach 999, and bf16 arguments would put the phases off by whole radians.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)  # (half,)
    args = t.float()[:, None] * freqs[None, :]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) float64 positions -> (M, dim) [sin | cos] with frequencies 1 / 10000^(2i/dim)."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega  # (dim/2,)
    angles = positions[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """2-D sin-cos position table, (grid_size**2, dim) in float64, tokens in row-major order.

    The first half of the channels encodes the column (x) coordinate and the second half the
    row (y) coordinate, the order the released checkpoints were trained with.
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (g, g) each
    return torch.cat(
        [sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1
    )


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample affine on normalised tokens. x (N, T, D), shift/scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def resolve_blocks(blocks: BlockSpec, depth: int) -> list[int]:
    """Turn a `return_hidden` request into 0-based block indices, in the order asked.

    blocks: None (no taps -> []), an int or a list of ints (negative counts from the end,
    Python style), "last", "all", or "paper" (the paper's block num_layers // 4, counted
    from 1, i.e. index depth // 4 - 1).
    """
    if blocks is None:
        return []
    if isinstance(blocks, str):
        if blocks == "last":
            return [depth - 1]
        if blocks == "all":
            return list(range(depth))
        if blocks == "paper":
            if depth < 4:
                raise ValueError(f"blocks='paper' means block depth // 4 (from 1); depth {depth} < 4")
            return [depth // 4 - 1]
        raise ValueError(
            f"unknown block selection {blocks!r}: use 'last', 'all', 'paper', an int or a list of ints"
        )
    items = [blocks] if isinstance(blocks, int) else blocks
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"blocks must be an int, a list of ints or a string, got {type(blocks).__name__}")
    out = []
    for b in items:
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"block indices must be ints, got {b!r} ({type(b).__name__})")
        if not -depth <= b < depth:
            raise ValueError(f"block index {b} out of range for depth {depth} (valid: {-depth}..{depth - 1})")
        out.append(b % depth)
    return out


# ---------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D-dim tokens (a strided conv is a per-patch linear)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A model cast to bf16 (DeepSpeed's bf16 mode) still gets fp32 latents from the objective.
        x = self.proj(x.to(self.proj.weight.dtype))  # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, T, D), row-major tokens


class TimestepEmbedder(nn.Module):
    """Scalar time -> D: sinusoidal features (256) then a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)  # (N, 256) fp32
        # Match the weights' dtype for a model cast to bf16; under autocast weights stay fp32
        # and autocast lowers the matmul itself.
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class label -> D, with label dropout for classifier-free guidance.

    When dropout_prob > 0 the table has an extra row for the null class (label num_classes);
    labels are dropped at random only in training, or where `force_drop_ids == 1`.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(
        self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if force_drop_ids is not None and self.dropout_prob == 0:
            raise ValueError("force_drop_ids needs class_dropout_prob > 0 (no null-class row otherwise)")
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


# ---------------------------------------------------------------------------------------
# Transformer block and final layer
# ---------------------------------------------------------------------------------------


class FP32LayerNorm(nn.Module):
    """LayerNorm without affine parameters, computed in fp32 whatever the input dtype.

    Normalising bf16 activations in bf16 is where long mixed-precision runs pick up NaNs.
    """

    def __init__(self, hidden_size: int, eps: float = NORM_EPS):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (self.hidden_size,), eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (release key names)."""

    def __init__(self, hidden_size: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.backend = backend
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)
        # Resolved once here, not in forward, so torch.compile sees a plain attribute.
        self._flash = load_flash_attn() if backend in ("auto", "flash") else None
        if backend == "flash" and self._flash is None:
            raise ImportError("attention='flash' needs the flash_attn package (pip install flash-attn)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, Dh)
        q, k, v = qkv.unbind(2)  # (N, T, H, Dh) each
        if self.backend == "math":
            out = math_attention(q, k, v)
        elif self._flash is not None and flash_supported(q):
            out = self._flash(q, k, v)  # (N, T, H, Dh)
        elif self.backend == "flash":
            raise RuntimeError(
                f"attention='flash' needs CUDA fp16/bf16 tensors, got {q.device} {q.dtype}"
            )
        else:
            out = sdpa_attention(q, k, v)  # (N, T, H, Dh)
        return self.proj(out.reshape(n, t, d))  # (N, T, D)


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation, as released) -> fc2."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning (shift, scale, gate x 2)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int, attention: str = "auto"):
        super().__init__()
        self.norm1 = FP32LayerNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, attention)
        self.norm2 = FP32LayerNorm(hidden_size)
        self.mlp = Mlp(hidden_size, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mod = self.adaLN_modulation(c)  # (N, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)  # (N, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a linear to p*p*out_channels values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = FP32LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (N, D) each
        x = modulate(self.norm_final(x), shift, scale)  # (N, T, D)
        return self.linear(x)  # (N, T, p*p*C_out)


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------


class DiffusionTransformer(nn.Module):
    """SiT / DiT backbone. Build through `models.create_model(name, **overrides)`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a models.ModelConfig, got {type(config).__name__}")
        self.config = config
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.in_channels, D, config.patch_size)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        # Only registered when enabled, so release checkpoints have no extra keys.
        self.h_embedder = TimestepEmbedder(D) if config.second_time_input else None
        # Fixed table stored as a frozen Parameter (not a buffer) because the releases'
        # checkpoints carry it under the key "pos_embed" and count it in the parameter total.
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, D), requires_grad=False)
        self.blocks = nn.ModuleList(
            DiTBlock(D, config.num_heads, config.mlp_hidden, config.attention) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels)
        self.initialize_weights()

    # ---- initialisation (as in the releases) ----------------------------------------
    @torch.no_grad()
    def initialize_weights(self) -> None:
        # Every linear: xavier-uniform weight, zero bias (the transformer default of the releases).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        # Fixed sin-cos positions, computed in float64 and rounded once to the parameter dtype.
        table = sincos_2d(self.config.hidden_size, self.config.grid_size)
        self.pos_embed.copy_(table.to(self.pos_embed.dtype).unsqueeze(0))

        # The patch conv is a linear over (C, p, p): initialise it like one (xavier on the
        # flattened (D, C*p*p) view, which shares storage with the conv weight).
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        # Embedding table and timestep MLPs: small normal init.
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for embedder in (self.t_embedder, self.h_embedder):
            if embedder is not None:
                nn.init.normal_(embedder.mlp[0].weight, std=0.02)
                nn.init.normal_(embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: zero the modulation outputs so every block starts as the identity
        # (gates are 0) and the final layer starts by predicting exactly 0.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Turn per-block activation checkpointing on or off (updates `config`)."""
        self.config = dataclasses.replace(self.config, grad_checkpointing=bool(enabled))

    # ---- forward ----------------------------------------------------------------------
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        n = x.shape[0]
        p, g, c = self.config.patch_size, self.config.grid_size, self.config.out_channels
        x = x.reshape(n, g, g, p, p, c)  # (N, gh, gw, p, q, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C, gh, p, gw, q)
        return x.reshape(n, c, g * p, g * p)  # (N, C, H, W)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        h: torch.Tensor | None = None,
        return_hidden: BlockSpec = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Predict from latents x (N, C, H, W), times t (N,), labels y (N,).

        h: second time input (N,), required iff `config.second_time_input`.
        return_hidden: block selection (see `resolve_blocks`); when given, returns
        (prediction, [block outputs (N, T, D) in the order asked]).
        """
        cfg = self.config
        if cfg.second_time_input and h is None:
            raise ValueError("this model has second_time_input=True: pass h (N,)")
        if not cfg.second_time_input and h is not None:
            raise ValueError("h given but the model was built with second_time_input=False")
        taps = resolve_blocks(return_hidden, cfg.depth) if return_hidden is not None else None
        keep = set(taps) if taps else set()
        if t.dim() == 0:
            t = t.expand(x.shape[0])

        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t)  # (N, D)
        if self.h_embedder is not None:
            if h.dim() == 0:
                h = h.expand(x.shape[0])
            c = c + self.h_embedder(h)  # (N, D)
        c = c + self.y_embedder(y, self.training)  # (N, D)

        checkpointing = cfg.grad_checkpointing and torch.is_grad_enabled()
        kept: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            if checkpointing:
                x = checkpoint(block, x, c, use_reentrant=False)  # (N, T, D)
            else:
                x = block(x, c)  # (N, T, D)
            if i in keep:
                kept[i] = x  # a reference, not a copy

        out = self.final_layer(x, c)  # (N, T, p*p*C_out)
        out = self.unpatchify(out)  # (N, C_out, H, W)
        if cfg.pred_channels != cfg.out_channels:
            out = out[:, : cfg.pred_channels]  # SiT drops the learned-sigma half: (N, C, H, W)
        if taps is None:
            return out
        return out, [kept[i] for i in taps]

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guidance_channels: int | Literal["all"] | None = None,
        h: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Classifier-free guidance on a batch whose second half carries the null label.

        Only the first half of x is used (duplicated), as in the releases. By default guidance
        is applied to the first 3 output channels only and the remaining channels are each row's
        own prediction (the releases' convention, kept "for exact reproducibility");
        guidance_channels="all" guides every channel, an int guides that many leading channels.
        """
        n = x.shape[0]
        if n % 2:
            raise ValueError(f"forward_with_cfg needs an even batch (cond | uncond), got {n}")
        half = x[: n // 2]
        combined = torch.cat([half, half], dim=0)  # (N, C, H, W)
        out = self.forward(combined, t, y, h=h)  # (N, C_pred, H, W)
        channels = out.shape[1]
        if guidance_channels is None:
            k = min(3, channels)
        elif guidance_channels == "all":
            k = channels
        elif isinstance(guidance_channels, int) and not isinstance(guidance_channels, bool):
            if not 1 <= guidance_channels <= channels:
                raise ValueError(f"guidance_channels must be in 1..{channels}, got {guidance_channels}")
            k = guidance_channels
        else:
            raise ValueError(f"guidance_channels must be None, 'all' or an int, got {guidance_channels!r}")
        guided, rest = out[:, :k], out[:, k:]
        cond, uncond = guided.split(n // 2, dim=0)  # (N/2, k, H, W) each
        mixed = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([mixed, mixed], dim=0), rest], dim=1)  # (N, C_pred, H, W)
