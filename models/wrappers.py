"""Reaching the bare model through training wrappers, and switching its label dropout off."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP / DeepSpeed (``.module``) or torch.compile (``._orig_mod``)."""
    for _ in range(8):  # wrappers nest (compile of DDP), never deeply
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner
    return model


@contextlib.contextmanager
def labels_as_given(module: torch.nn.Module) -> Iterator[None]:
    """Switch off the model's own random label dropout (restored on exit).

    MeanFlow drops labels itself: the target of a dropped row differs (no guidance), and the
    JVP, the guidance passes and the loss forward must all see the same labels. The null-class
    row of the label table stays. Under torch.compile the flag is a guarded constant that is
    always 0 inside this context, so it causes no recompilation.
    """
    embedder = unwrap_model(module).y_embedder
    old = embedder.dropout_prob
    embedder.dropout_prob = 0.0
    try:
        yield
    finally:
        embedder.dropout_prob = old
