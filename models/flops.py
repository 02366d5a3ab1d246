"""Matmul FLOPs of one sample through the transformer, for MFU logging.

Counted per sample (MACs = multiply-accumulates; T tokens, D hidden, M = mlp hidden,
P = p*p, F = 256 frequency features):

    patch embed       T * (C_in * P) * D
    time embedder     F * D + D * D                  (twice with second_time_input)
    per block (x L)   T * 3D * D          qkv
                      T * T * D           scores q k^T (all heads together)
                      T * T * D           probs @ v
                      T * D * D           attn proj
                      2 * T * D * M       mlp fc1 + fc2
                      D * 6D              adaLN modulation (once per sample, not per token)
    final layer       D * 2D + T * D * (P * C_out)

    forward FLOPs = 2 * MACs;  training FLOPs (forward + backward) = 3 * forward FLOPs.

Element-wise work (norms, softmax, GELU, modulation) is left out, as is the recompute of
activation checkpointing: MFU counts the model's FLOPs, not the hardware's.

Units: the "GFLOPs" the DiT/SiT papers quote (118.6 for XL/2 at 256x256) are MACs in this
accounting (fvcore counts one fused multiply-add as one flop); `flops_per_sample` returns
twice that (about 237 GFLOPs for XL/2), which is the number to compare with a GPU's peak.
"""

from __future__ import annotations

from .config import ModelConfig

FREQUENCY_EMBEDDING_SIZE = 256


def _config_of(config_or_model) -> ModelConfig:
    if isinstance(config_or_model, ModelConfig):
        return config_or_model
    obj = config_or_model
    # Unwrap torch.compile (`_orig_mod`) and DDP/DeepSpeed (`module`) wrappers.
    for _ in range(4):
        cfg = getattr(obj, "config", None)
        if isinstance(cfg, ModelConfig):
            return cfg
        obj = getattr(obj, "_orig_mod", None) or getattr(obj, "module", None)
        if obj is None:
            break
    raise TypeError(
        f"expected a ModelConfig or a model with a .config, got {type(config_or_model).__name__}"
    )


def macs_breakdown(config_or_model) -> dict[str, int]:
    """Multiply-accumulates per sample, by part of the network."""
    cfg = _config_of(config_or_model)
    T, D, M, L = cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden, cfg.depth
    P, F = cfg.patch_size**2, FREQUENCY_EMBEDDING_SIZE
    n_time = 2 if cfg.second_time_input else 1
    per_block = {
        "qkv": T * D * 3 * D,
        "attn_scores": T * T * D,
        "attn_values": T * T * D,
        "attn_proj": T * D * D,
        "mlp": 2 * T * D * M,
        "adaln": D * 6 * D,
    }
    parts = {
        "patch_embed": T * cfg.in_channels * P * D,
        "time_embed": n_time * (F * D + D * D),
        **{f"blocks.{k}": L * v for k, v in per_block.items()},
        "final_layer": D * 2 * D + T * D * P * cfg.out_channels,
    }
    return parts


def macs_per_sample(config_or_model) -> int:
    """Forward multiply-accumulates per sample (the papers' "GFLOPs" unit)."""
    return sum(macs_breakdown(config_or_model).values())


def flops_per_sample(config_or_model, *, backward: bool = False) -> int:
    """Matmul FLOPs per sample: forward (2 * MACs), or forward + backward (3x) if backward."""
    forward = 2 * macs_per_sample(config_or_model)
    return 3 * forward if backward else forward
