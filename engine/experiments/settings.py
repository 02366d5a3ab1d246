"""The toy harness's settings: one Dispersive Loss setting (DispSetting) and a whole comparison (ToyConfig)."""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from engine.config.checks import fail
from engine.objectives.dispersive import DispersiveConfig

NUM_CLASSES = 10


def log(msg: str) -> None:
    """The harness's progress line."""
    print(f"[toy] {msg}", flush=True)


@dataclass(frozen=True)
class DispSetting:
    """One setting of the regulariser's knobs (passed to engine/train.py as --disp-* flags)."""

    lambda_: float = 0.25
    tau: float = 1.0
    blocks: str = "last"
    """"last", "all", "paper" or comma-separated 0-based indices such as "0,2"."""
    variant: str = "infonce_l2"
    scale_invariant: bool = False
    """Squared distances divided by the batch's mean off-diagonal one (``--disp-scale-invariant``;
    infonce_l2 and hinge only)."""

    def __post_init__(self) -> None:
        blocks: Any = self.blocks
        if isinstance(blocks, (list, tuple)):
            blocks = ",".join(str(b) for b in blocks)
            object.__setattr__(self, "blocks", blocks)
        DispersiveConfig(lambda_=self.lambda_, tau=self.tau, blocks=self.block_choice(),
                         variant=self.variant, scale_invariant=self.scale_invariant)  # validates
        if self.lambda_ <= 0:
            raise fail("DispSetting", "lambda_", "> 0 (the baseline is the run without Dispersive Loss)", self.lambda_)

    @classmethod
    def product(cls, lambdas: Sequence[float], taus: Sequence[float], blocks: Sequence[str],
                variants: Sequence[str], scale_invariants: Sequence[bool] = (False,)) -> list["DispSetting"]:
        """Every combination of the knobs' values (a sweep's settings), in that nesting order."""
        return [cls(lambda_=l, tau=t, blocks=b, variant=v, scale_invariant=si) for l, t, b, v, si in
                itertools.product(lambdas, taus, blocks, variants, scale_invariants)]

    @classmethod
    def study(cls) -> list["DispSetting"]:
        """The settings of issue 17's multi-seed study (the baseline comes on top of them): the
        release preset (lambda 0.25, tau 1, last block), the paper's (lambda 0.5, tau 0.5, its
        block), scale-invariant InfoNCE-L2 at tau 0.25, 0.5 and 1 on the last block and on all
        blocks (lambda 0.25), and cosine InfoNCE with the release's lambda, tau and block."""
        return [cls(), cls(lambda_=0.5, tau=0.5, blocks="paper"),
                *(cls(tau=t, blocks=b, scale_invariant=True) for b in ("last", "all") for t in (0.25, 0.5, 1.0)),
                cls(variant="infonce_cosine")]

    def block_choice(self) -> Any:
        """``blocks`` as DispersiveConfig / resolve_blocks take it: a keyword or a tuple of ints."""
        if self.blocks in ("last", "all", "paper"):
            return self.blocks
        try:
            return tuple(int(b) for b in str(self.blocks).split(","))
        except ValueError:
            raise fail("DispSetting", "blocks", "last, all, paper or comma-separated ints", self.blocks) from None

    def tag(self) -> str:
        return (f"disp_l{self.lambda_:g}_t{self.tau:g}_{self.blocks.replace(',', '-')}_{self.variant}"
                + ("_si" if self.scale_invariant else ""))

    def flags(self) -> list[str]:
        return ["--disp-preset", "release", "--disp-lambda", f"{self.lambda_:g}", "--disp-tau", f"{self.tau:g}",
                "--disp-blocks", self.blocks, "--disp-variant", self.variant,
                *(["--disp-scale-invariant"] if self.scale_invariant else [])]

    def describe(self) -> str:
        return (f"lambda {self.lambda_:g}, tau {self.tau:g}, blocks {self.blocks}, {self.variant}"
                + (", scale-invariant" if self.scale_invariant else ""))


@dataclass(frozen=True)
class ToyConfig:
    steps: int = 2000
    """Optimizer steps of each SiT run (2,000 x 128 images: recognisable digits; 600 x 64 with
    patch 2 gave blurred blobs in our runs)."""
    depth: int = 6
    hidden_size: int = 128
    num_heads: int = 4
    patch_size: int = 4
    """4 x 4 patches of the 16 x 16 digits: 16 tokens. Patch 2 (64 tokens) was 6x slower per image
    on the CPU and reached no better samples within the time budget."""
    global_batch: int = 128
    """Also the local batch the regulariser sees (one process)."""
    lr: float = 1e-3
    warmup_steps: int = 50
    ema_decay: float = 0.995
    seed: int = 0
    samples_per_class: int = 100
    """Samples drawn per digit for the metrics (1,000 in all by default)."""
    sample_method: str = "heun"
    sample_steps: int = 16
    """ODE grid points (Heun: 2 model calls per step)."""
    sample_batch: int = 250
    grid_per_class: int = 8
    """Rows of the side-by-side PNG (samples per digit shown)."""
    classifier_epochs: int = 40
    probe_t: float = 0.5
    probe_samples: int | None = None
    """Latents the probe uses (None: all 1,797 digits)."""
    dispersion_samples: int = 256
    disp: DispSetting = field(default_factory=DispSetting)

    def __post_init__(self) -> None:
        for name in ("steps", "depth", "hidden_size", "num_heads", "global_batch", "samples_per_class",
                     "sample_batch", "classifier_epochs"):
            if getattr(self, name) < 1:
                raise fail("ToyConfig", name, ">= 1", getattr(self, name))
        if self.sample_steps < 2:
            raise fail("ToyConfig", "sample_steps", ">= 2", self.sample_steps)

    @classmethod
    def smoke(cls, **overrides: Any) -> "ToyConfig":
        """A few steps of a tiny model: exercises every stage in seconds (numbers mean nothing)."""
        base = dict(steps=4, depth=2, hidden_size=32, num_heads=2, global_batch=16, warmup_steps=0,
                    samples_per_class=4, sample_steps=3, sample_batch=40, grid_per_class=2,
                    classifier_epochs=2, probe_samples=200, dispersion_samples=32)
        return cls(**{**base, **overrides})

    def as_json(self) -> dict:
        """Every setting as plain JSON values (the results files and the score cache's key)."""
        return json.loads(json.dumps(asdict(self), default=str))

    def train_flags(self, seed: int | None = None) -> list[str]:
        """engine/train.py's flags; ``seed`` the training run's (None: ``self.seed``): a multi-seed
        study varies it, while the classifier, the real split, the noise and the probe keep ``self.seed``."""
        return ["--model", "sit_s", "--depth", str(self.depth), "--hidden-size", str(self.hidden_size),
                "--num-heads", str(self.num_heads), "--patch-size", str(self.patch_size), "--data", "digits",
                "--global-batch", str(self.global_batch), "--max-steps", str(self.steps), "--lr", f"{self.lr:g}",
                "--warmup-steps", str(self.warmup_steps), "--ema-decay", f"{self.ema_decay:g}",
                "--seed", str(self.seed if seed is None else seed), "--zero-stage", "1", "--loader", "torch",
                "--num-workers", "0", "--no-flip", "--ckpt-every", str(self.steps), "--keep-last-k", "1",
                "--log-every", str(max(1, self.steps // 10)), "--sample-count", "10", "--sample-steps", "10"]

    def run_suffix(self) -> str:
        return f"s{self.steps}_d{self.depth}_h{self.hidden_size}_p{self.patch_size}"
