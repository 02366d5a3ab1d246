"""Typed configuration of a SiT/DiT backbone.

Field names follow the constructor arguments of the public SiT and DiT releases
(`input_size`, `patch_size`, ...), so a release's arguments can be passed unchanged;
`family`, `second_time_input`, `grad_checkpointing` and `attention` are this project's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Family = Literal["sit", "dit"]
AttentionBackend = Literal["auto", "sdpa", "flash", "math"]

FAMILIES: tuple[str, ...] = ("sit", "dit")
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "sdpa", "flash", "math")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one diffusion transformer. Validated on construction."""

    family: Family = "sit"
    """"sit" (flow model: forward drops the learned-sigma half, t in [0, 1]) or
    "dit" (DDPM model: forward returns all output channels, t in 0..999)."""
    input_size: int = 32
    """Side of the (square) latent, e.g. 32 for 256x256 images through the SD-VAE (/8)."""
    patch_size: int = 2
    """Side of a patch; tokens = (input_size // patch_size) ** 2."""
    in_channels: int = 4
    """Latent channels."""
    hidden_size: int = 1152
    """Transformer width D."""
    depth: int = 28
    """Number of transformer blocks."""
    num_heads: int = 16
    """Attention heads; must divide hidden_size."""
    mlp_ratio: float = 4.0
    """MLP hidden width = int(hidden_size * mlp_ratio)."""
    class_dropout_prob: float = 0.1
    """Label dropout for classifier-free guidance. > 0 adds a null-class row to the table."""
    num_classes: int = 1000
    """Number of real classes; the null class has label num_classes."""
    learn_sigma: bool = True
    """Network predicts 2 * in_channels (mean and variance interpolation) when True."""
    second_time_input: bool = False
    """Add a second timestep embedder `h_embedder` (MeanFlow: the net sees (t, t - r))."""
    grad_checkpointing: bool = False
    """Recompute each block in backward (torch.utils.checkpoint, non-reentrant) to save memory."""
    attention: AttentionBackend = "auto"
    """"auto": flash-attn for CUDA fp16/bf16 when importable, else SDPA; "sdpa"; "flash"
    (flash-attn required); "math" (explicit softmax(QK^T)V, the slow reference)."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}"
            )
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                     "num_heads", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("learn_sigma", "second_time_input", "grad_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads})"
            )
        if self.input_size % self.patch_size != 0:
            raise ValueError(
                f"input_size ({self.input_size}) must be divisible by patch_size "
                f"({self.patch_size})"
            )
        if (self.hidden_size // 2) % 2 != 0:
            # The 2-D sin-cos table splits D into two halves, each into sin and cos.
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by 4 for the 2-D sin-cos "
                "position table"
            )
        if not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0):
            raise ValueError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if not (0.0 <= self.class_dropout_prob <= 1.0):
            raise ValueError(
                f"class_dropout_prob must be in [0, 1], got {self.class_dropout_prob!r}"
            )

    # ---- derived sizes -------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def out_channels(self) -> int:
        """Channels the final layer predicts (before SiT drops the sigma half)."""
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def pred_channels(self) -> int:
        """Channels `forward` returns: SiT drops the learned-sigma half, DiT keeps it."""
        return self.in_channels if self.family == "sit" else self.out_channels

    @property
    def null_class(self) -> int | None:
        """The label of the null class (``num_classes``), or None when labels are never dropped."""
        return self.num_classes if self.class_dropout_prob > 0 else None

    def require_null_class(self, purpose: str = "classifier-free guidance") -> int:
        """The null-class label, or a ValueError saying that ``purpose`` needs one."""
        if self.null_class is None:
            raise ValueError(f"{purpose} needs a null class, but this model was built with "
                             f"class_dropout_prob={self.class_dropout_prob} (its label table has only the "
                             f"{self.num_classes} real classes)")
        return self.null_class

    @property
    def num_embeddings(self) -> int:
        """Rows of the label table: a null-class row exists only when labels can be dropped."""
        return self.num_classes + int(self.class_dropout_prob > 0)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (safe for `torch.save` / `weights_only=True` loading)."""
        return asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
