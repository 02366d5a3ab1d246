"""The trainer's parts, one builder each: objective, model config and model, data, loader.

The DeepSpeed engine is built by ``engine.training.deepspeed_setup``, the EMA by
``engine.training.ema.ema_builder`` and the checkpoint manager by
``engine.training.checkpoint``; ``Trainer`` wires them together.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

import models
from engine.data.datasets import dataset_path
from engine.data.format import LatentManifest
from engine.data.loader import LatentLoader, build_loader
from engine.distributed import barrier
from engine.objectives.base import Objective
from engine.objectives.build import build_objective
from engine.training.config import TrainConfig


def seed_everything(seed: int) -> None:
    """torch, numpy and Python's RNGs (this process's streams)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def objective_for(cfg: TrainConfig) -> Objective:
    """The run's objective: MeanFlow when asked, else the model family's (SiT or DiT)."""
    family = "meanflow" if cfg.objective == "meanflow" else models.get_config(cfg.model.name).family
    own = {"sit": {"transport": cfg.transport}, "dit": {}, "meanflow": {"meanflow": cfg.meanflow}}[family]
    return build_objective(family, dispersive=cfg.dispersive, **own)


def prepare_dataset(cfg: TrainConfig, rank: int) -> Path:
    """The dataset directory; the built-in ones are generated once, by rank 0."""
    d = cfg.data
    path = dataset_path(d.data, synthetic_samples=d.synthetic_samples, synthetic_shape=d.synthetic_shape,
                        synthetic_classes=d.synthetic_classes, write=rank == 0)
    barrier()
    return path


def model_config_for(cfg: TrainConfig, manifest: LatentManifest, objective: Objective) -> models.ModelConfig:
    """The named model sized for the data (latent shape, classes), with what the objective needs
    and the size overrides of the command line."""
    c, h, _ = manifest.shape
    return models.get_config(
        cfg.model.name, input_size=h, in_channels=c, num_classes=manifest.num_classes,
        class_dropout_prob=cfg.model.class_dropout_prob, attention=cfg.model.attention,
        grad_checkpointing=cfg.model.grad_checkpointing, **objective.model_overrides(), **cfg.model.overrides())


def build_model(config: models.ModelConfig, seed: int) -> models.DiffusionTransformer:
    """The model with the releases' initialisation, from ``seed``: identical on every rank."""
    torch.manual_seed(seed)
    return models.DiffusionTransformer(config)


def loader_for(cfg: TrainConfig, path: Path, *, micro: int, rank: int, world: int,
               device: torch.device) -> LatentLoader:
    return build_loader(path, micro_batch=micro, rank=rank, world_size=world, seed=cfg.seed, flip=cfg.data.flip,
                        device=device, backend=cfg.data.loader, num_workers=cfg.data.num_workers)
