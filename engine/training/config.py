"""Typed training configuration. Defaults follow the SiT/DiT releases.

Every field is also a command-line flag of ``engine/train.py`` (see ``engine.config.flags``);
``--config run.json`` loads a whole config first, flags then override it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, Literal

import models
from engine.config.checks import fail, integer, literals, number
from engine.config.flags import section
from engine.objectives.meanflow import MeanFlowConfig
from engine.objectives.dispersive import DispersiveConfig
from engine.diffusion.transport import TransportConfig


@dataclass
class ModelSection:
    cli_names: ClassVar[dict[str, str]] = {"name": "model"}

    name: str = "sit_xl"
    """Registry name (``sit_s`` ... ``sit_xl``, ``dit_b_4``, or release spellings like ``SiT-XL/2``)."""
    attention: Literal["auto", "sdpa", "flash", "math"] = "auto"
    """Attention kernel: flash-attn when installed and on CUDA half precision, else SDPA."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in backward (saves memory, costs ~30% time)."""
    compile: bool = False
    """Run the model under ``torch.compile``."""
    class_dropout_prob: float = 0.1
    """Label dropout for classifier-free guidance (the releases' 0.1)."""
    depth: int | None = None
    """Override the named size's number of blocks (small models for tests and demos)."""
    hidden_size: int | None = None
    """Override the named size's hidden width."""
    num_heads: int | None = None
    """Override the named size's attention heads."""
    patch_size: int | None = None
    """Override the named model's patch size."""

    def __post_init__(self) -> None:
        literals(self)
        models.resolve_name(self.name)  # an unknown name: the error lists the valid ones
        number("ModelSection", "class_dropout_prob", self.class_dropout_prob, low=0, high=1)
        for name in ("depth", "hidden_size", "num_heads", "patch_size"):
            if getattr(self, name) is not None:
                integer("ModelSection", name, getattr(self, name), low=1)

    def overrides(self) -> dict[str, int]:
        """The size overrides that were set, in ``models.create_model``'s argument names."""
        names = ("depth", "hidden_size", "num_heads", "patch_size")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass
class DataSection:
    data: str = "synthetic"
    """A latent dataset directory (engine/data/DATA.md), ``digits`` (built-in) or ``synthetic``."""
    loader: Literal["auto", "dali", "torch"] = "auto"
    """DALI pipeline when installed (``auto``), or the torch DataLoader."""
    flip: bool = True
    """Random horizontal flips in latent space (the releases flip images)."""
    num_workers: int = 2
    """DataLoader worker processes (torch loader only)."""
    synthetic_samples: int = 512
    """Number of samples of the ``synthetic`` dataset."""
    synthetic_shape: tuple[int, int, int] = (4, 32, 32)
    """(C, H, W) of the ``synthetic`` dataset (SD-VAE latents of 256x256 images)."""
    synthetic_classes: int = 1000
    """Classes of the ``synthetic`` dataset."""

    def __post_init__(self) -> None:
        literals(self)
        integer("DataSection", "num_workers", self.num_workers, low=0)
        integer("DataSection", "synthetic_samples", self.synthetic_samples, low=1)
        integer("DataSection", "synthetic_classes", self.synthetic_classes, low=1)
        if len(self.synthetic_shape) != 3:
            raise fail("DataSection", "synthetic_shape", "(C, H, W)", self.synthetic_shape)
        for v in self.synthetic_shape:
            integer("DataSection", "synthetic_shape", v, low=1)


@dataclass
class OptimSection:
    lr: float = 1e-4
    """AdamW learning rate (constant after warm-up, as the releases)."""
    weight_decay: float = 0.0
    """AdamW weight decay (the releases use 0)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas; the Dispersive Loss paper's JAX runs use (0.9, 0.95)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps (the releases use none)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping (as the releases)."""
    fused: bool = True
    """Use torch's fused AdamW kernel on CUDA (covers apex's FusedAdam)."""
    apex: bool = False
    """Use apex's FusedAdam instead (only if apex is installed; it is not on PyPI)."""

    def __post_init__(self) -> None:
        owner = "OptimSection"
        number(owner, "lr", self.lr, low=0, low_open=True)
        number(owner, "weight_decay", self.weight_decay, low=0)
        if len(self.betas) != 2:
            raise fail(owner, "betas", "two numbers (beta1, beta2)", self.betas)
        for beta in self.betas:
            number(owner, "betas", beta, low=0, high=1, high_open=True)
        number(owner, "eps", self.eps, low=0, low_open=True)
        integer(owner, "warmup_steps", self.warmup_steps, low=0)
        number(owner, "grad_clip", self.grad_clip, low=0)


@dataclass
class TrainConfig:
    model: ModelSection = section(ModelSection)
    data: DataSection = section(DataSection)
    transport: TransportConfig = section(TransportConfig, prefix="transport-")
    dispersive: DispersiveConfig = section(functools.partial(DispersiveConfig.preset, "release"), prefix="disp-")
    """The regularizer; by default the release's setting (lambda 0.25, tau 1, last block), since
    this engine exists for it. ``--disp-preset none`` (or ``--disp-lambda 0``) trains the baseline."""
    meanflow: MeanFlowConfig = section(MeanFlowConfig, prefix="mf-")
    optim: OptimSection = section(OptimSection)

    objective: Literal["auto", "meanflow"] = "auto"
    """``auto``: the model family's objective (SiT flow matching, DiT DDPM); ``meanflow``: MeanFlow
    one-step training (engine/objectives/meanflow.py, settings ``--mf-*``) on a SiT model, which is then built
    with a second time input and no sigma half."""
    global_batch: int = 256
    """Images per optimizer step over all ranks (the releases' 256)."""
    micro_batch: int | None = None
    """Images per rank per forward; None = global_batch / world size (no accumulation)."""
    max_steps: int = 400_000
    """Optimizer steps to train for."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32 (the releases) or bf16 mixed precision (fp32 master weights and EMA)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    offload: bool = False
    """ZeRO-Offload: keep optimizer states (and with stage 3, parameters) in CPU memory."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON whose entries override the generated ones."""
    ema_decay: float = 0.9999
    """EMA decay per optimizer step (kept in fp32)."""
    seed: int = 0
    """Global seed; rank r uses seed + r for its noise and times."""
    results_dir: str = "runs/train"
    """Where checkpoints, samples, logs and the summary go."""
    ckpt_every: int = 50_000
    """Checkpoint every this many steps and at the end; 0 writes none at all (a smoke test:
    sit_xl's checkpoint at the end is ~15 GB on disk; --resume auto can only go back to an older one)."""
    keep_last_k: int = 3
    """Keep only the newest k checkpoints (0 keeps all)."""
    resume: str | None = None
    """``auto`` (latest complete checkpoint in results_dir, if any) or a checkpoint directory."""
    log_every: int = 100
    """Log a line and a metrics record every this many steps."""
    tensorboard: bool = True
    """Also write every metric and the sample grids as TensorBoard events (results_dir/tensorboard)."""
    wandb: str | None = None
    """Also log to the Weights & Biases project of this name (into results_dir/wandb; offline unless
    you are logged in or set WANDB_MODE; needs ``pip install wandb``)."""
    sample_every: int = 0
    """Write an EMA sample grid every this many steps (0: only at the end)."""
    sample_count: int = 16
    """Images in each sample grid."""
    sample_steps: int = 50
    """Sampler steps for the grids (Euler ODE for SiT, DDIM for DiT)."""
    cfg_scale: float = 1.0
    """Guidance scale for the sample grids (1 = none)."""
    profile_steps: tuple[int, int] | None = None
    """Trace steps [a, b) with torch.profiler into results_dir/profile (Chrome trace)."""
    max_nonfinite: int = 10
    """Stop after this many consecutive steps skipped for a non-finite loss or gradient."""
    timeout_minutes: float = 30.0
    """Collective timeout: a rank that dies makes the others fail after this, not hang."""

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        literals(self)
        for name in ("global_batch", "max_steps", "log_every", "sample_count", "sample_steps", "max_nonfinite"):
            integer(owner, name, getattr(self, name), low=1)
        for name in ("ckpt_every", "keep_last_k", "sample_every", "seed"):
            integer(owner, name, getattr(self, name), low=0)
        if self.micro_batch is not None:
            integer(owner, "micro_batch", self.micro_batch, low=1)
        number(owner, "ema_decay", self.ema_decay, low=0, high=1, high_open=True)
        number(owner, "cfg_scale", self.cfg_scale)
        number(owner, "timeout_minutes", self.timeout_minutes, low=0, low_open=True)
        if self.profile_steps is not None and not (len(self.profile_steps) == 2
                                                   and 0 <= self.profile_steps[0] < self.profile_steps[1]):
            raise fail(owner, "profile_steps", "A B with 0 <= A < B", self.profile_steps)
        if self.objective == "meanflow" and models.get_config(self.model.name).family != "sit":
            raise fail(owner, "objective", "'auto' for a DiT model ('meanflow' needs a SiT)", self.objective)

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """(micro batch, gradient accumulation steps) for ``world_size`` ranks, or a clear error."""
        micro = self.micro_batch or max(1, self.global_batch // world_size)
        if self.global_batch % (world_size * micro):
            raise ValueError(
                f"--global-batch {self.global_batch} is not divisible by world size {world_size} x "
                f"--micro-batch {micro} = {world_size * micro}; choose a global batch that is a "
                f"multiple of {world_size * micro} or a micro batch that divides "
                f"{self.global_batch // world_size if self.global_batch % world_size == 0 else 'it'}")
        return micro, self.global_batch // (world_size * micro)
