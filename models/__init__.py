"""SiT/DiT diffusion-transformer backbones (release-compatible weights and outputs)."""

from .attention import flash_attn_available
from .checkpoint import (
    CheckpointMismatchError,
    checkpoint_config,
    describe_mismatch,
    infer_config,
    load_checkpoint_file,
    load_model,
    load_state_dict_from_checkpoint,
    load_weights,
)
from .config import ModelConfig
from .dit import DiffusionTransformer, resolve_blocks, sincos_2d, timestep_embedding
from .flops import flops_per_sample, macs_breakdown, macs_per_sample
from .wrappers import labels_as_given, unwrap_model
from .registry import MODELS, SIZES, create_model, get_config, list_models, release_name, resolve_name

__all__ = [
    "CheckpointMismatchError",
    "checkpoint_config",
    "DiffusionTransformer",
    "MODELS",
    "ModelConfig",
    "SIZES",
    "create_model",
    "describe_mismatch",
    "flash_attn_available",
    "flops_per_sample",
    "get_config",
    "labels_as_given",
    "infer_config",
    "list_models",
    "load_checkpoint_file",
    "load_model",
    "load_state_dict_from_checkpoint",
    "load_weights",
    "macs_breakdown",
    "macs_per_sample",
    "resolve_blocks",
    "release_name",
    "resolve_name",
    "sincos_2d",
    "timestep_embedding",
    "unwrap_model",
]
