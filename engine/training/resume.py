"""What a resume may change, checked before launch, and the changes applied after the load.

A checkpoint is the state of one experiment. Its *fixed* settings say what the saved weights
and optimizer state are (the architecture, the objective and its regularizer, the precision
and ZeRO layout of the saved shards, the dataset the saved data position indexes); a resume
that changes one is refused, naming it: start a new ``--results-dir`` to change them. Every
other setting may change and takes effect (the term's ``backend`` and MeanFlow's ``sample_steps`` too): the optimizer's hyper-parameters (lr, betas, eps,
weight decay, warm-up; torch's ``load_state_dict`` would otherwise bring the saved ones back),
gradient clipping, EMA decay, run length, logging, checkpointing, sampling, the timeout,
batch size and seed (the loader picks the data position up), and runtime choices
(attention kernel, compile, activation checkpointing, data loader, workers).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import models
from engine.objectives.dispersive import DispersiveConfig
from engine.objectives.meanflow import MeanFlowConfig
from engine.training.checkpoint import CheckpointError



def _fields(section: str, cls: type, but: tuple[str, ...] = ()) -> tuple[tuple[str, str], ...]:
    return tuple((section, f.name) for f in dataclasses.fields(cls) if f.name not in but)


# (section, field) or (field,). Not fixed: the term's backend and MeanFlow's grid sampler steps,
# which change how the same thing is computed or looked at, not what is trained.
FIXED: tuple[tuple[str, ...], ...] = (
    ("model", "name"), ("model", "depth"), ("model", "hidden_size"), ("model", "num_heads"),
    ("model", "patch_size"), ("model", "class_dropout_prob"), ("objective",), ("transport",),
    *_fields("dispersive", DispersiveConfig, but=("backend",)),
    *_fields("meanflow", MeanFlowConfig, but=("sample_steps",)),
    ("precision",), ("zero_stage",), ("data", "data"),
)
APPLIED_OPTIM = ("lr", "betas", "eps", "weight_decay", "warmup_steps")


_ABSENT = object()  # a setting the saved config predates: nothing to compare it with


def _get(config: dict[str, Any], key: tuple[str, ...]) -> Any:
    for part in key:
        if not isinstance(config, dict) or part not in config:
            return _ABSENT
        config = config[part]
    return config


def _same(key: tuple[str, ...], saved: Any, now: Any) -> bool:
    if saved is _ABSENT:
        return True
    if key == ("model", "name") and saved is not None and now is not None:
        return models.resolve_name(saved) == models.resolve_name(now)  # "SiT-XL/2" is sit_xl
    if key == ("data", "data") and saved is not None and now is not None:
        return saved == now or Path(saved).resolve() == Path(now).resolve()
    return saved == now


def check_resume(saved: dict[str, Any], now: dict[str, Any], where: Path) -> list[str]:
    """Refuses (``CheckpointError``) a resume that changes a fixed setting; returns the
    sentences for the log about the optimizer settings that change and will be applied."""
    changed = [(key, _get(saved, key), _get(now, key)) for key in FIXED
               if not _same(key, _get(saved, key), _get(now, key))]
    if changed:
        listed = "; ".join(f"{'.'.join(key)}: saved {old!r}, now {new!r}" for key, old, new in changed)
        raise CheckpointError(
            f"cannot resume from {where}: these settings are fixed for a run and differ from the ones it was "
            f"saved with ({listed}). Drop the flags (--config {where / 'config.json'} gives the saved ones), "
            "or train with them into a new --results-dir")
    notes = []
    for name in APPLIED_OPTIM:
        old, new = _get(saved, ("optim", name)), _get(now, ("optim", name))
        if old is not _ABSENT and old != new:
            notes.append(f"optim.{name} {old} -> {new}")
    return notes


def apply_optimizer_settings(engine: Any, optim: Any) -> None:
    """Puts this run's optimizer settings into the loaded optimizer and schedule: the saved
    state's moments and step count stay, its hyper-parameters go. The schedule's multiplier
    is this run's (``deepspeed_setup.warmup_factor``: a function is not part of its state)."""
    schedule = engine.lr_scheduler
    groups = schedule.optimizer.param_groups
    schedule.base_lrs = [optim.lr] * len(groups)
    factor = schedule.lr_lambdas[0](schedule.last_epoch)
    for group in groups:
        group.update(lr=optim.lr * factor, initial_lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                     weight_decay=optim.weight_decay)
    schedule._last_lr = [g["lr"] for g in groups]
