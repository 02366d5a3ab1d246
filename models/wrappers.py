"""Reaching the bare model through training wrappers."""
from __future__ import annotations

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
