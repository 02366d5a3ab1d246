"""Loading model weights from release or project checkpoints.

Accepted layouts (a path or an already-loaded object):
  * a bare state_dict {name: tensor};
  * the releases' {"model", "ema", "opt", "args"} (args an argparse.Namespace);
  * this project's checkpoints: the same keys, possibly with "config" (a dict of ModelConfig
    fields, see `ModelConfig.to_dict`), and keys possibly prefixed by "module." (DDP /
    DeepSpeed) or "_orig_mod." (torch.compile).
Files are always read with `torch.load(map_location="cpu", weights_only=True)`; the releases'
argparse.Namespace is allow-listed for that.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch

from .config import ModelConfig
from .dit import DiffusionTransformer
from .registry import get_config

PathLike = str | os.PathLike
STRIP_PREFIXES = ("module.", "_orig_mod.")
VAE_DOWNSAMPLE = 8  # the releases build input_size = image_size // 8 (SD-VAE latents)


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not fit the model; the message lists them."""


def load_checkpoint_file(path: PathLike) -> Any:
    """torch.load on CPU with weights_only=True, allowing the releases' argparse args."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:  # prefixes can stack, e.g. "_orig_mod.module."
            stripped = False
            for prefix in STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def load_state_dict_from_checkpoint(
    path_or_obj: PathLike | Mapping[str, Any], prefer: Literal["ema", "model"] = "ema"
) -> dict[str, torch.Tensor]:
    """The model state_dict inside a checkpoint, EMA weights first unless prefer="model"."""
    if prefer not in ("ema", "model"):
        raise ValueError(f"prefer must be 'ema' or 'model', got {prefer!r}")
    obj = load_checkpoint_file(path_or_obj) if isinstance(path_or_obj, (str, os.PathLike)) else path_or_obj
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint must be a dict, got {type(obj).__name__}")
    if _is_state_dict(obj):
        return _strip_prefixes(obj)

    # "module" is where DeepSpeed's model_states files keep the weights.
    model_keys = ("model", "module", "state_dict")
    order = ("ema", *model_keys) if prefer == "ema" else (*model_keys, "ema")
    found = [k for k in order if isinstance(obj.get(k), Mapping) and _is_state_dict(obj[k])]
    if not found:
        raise KeyError(
            f"no state_dict found in checkpoint: expected a bare state_dict or one of the keys "
            f"{order}; top-level keys are {sorted(map(str, obj))}"
        )
    chosen = found[0]
    if chosen != order[0] and (prefer == "ema" or chosen == "ema"):
        warnings.warn(f"checkpoint has no {prefer!r} weights; loading {chosen!r} instead", stacklevel=2)
    return _strip_prefixes(obj[chosen])


def describe_mismatch(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], limit: int = 20) -> str | None:
    """A readable list of missing / unexpected / mis-shaped keys, or None when they fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or misshaped):
        return None

    def section(title: str, items: list[str]) -> str:
        shown = "\n    ".join(items[:limit])
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"  {title} ({len(items)}):\n    {shown}{more}"

    lines = ["checkpoint does not match the model:"]
    if missing:
        lines.append(section("missing keys", missing))
    if unexpected:
        lines.append(section("unexpected keys", unexpected))
    if misshaped:
        lines.append(section("mis-shaped keys", misshaped))
    hints = []
    if any(k.startswith("h_embedder.") for k in missing):
        hints.append("model has second_time_input=True but the checkpoint has no h_embedder")
    if any(k.startswith("h_embedder.") for k in unexpected):
        hints.append("checkpoint was trained with second_time_input=True")
    if any(k.startswith("blocks.") for k in missing + unexpected):
        hints.append("block counts differ: check the model size (depth)")
    if any(m.startswith("pos_embed") for m in misshaped):
        hints.append("token count differs: check input_size (image_size // 8) and patch_size")
    if any(m.startswith("y_embedder") for m in misshaped):
        hints.append("label table rows = num_classes + 1 when class_dropout_prob > 0")
    if any(m.startswith("final_layer.linear") for m in misshaped):
        hints.append("output width differs: check learn_sigma, patch_size and in_channels")
    if hints:
        lines.append("  hints: " + "; ".join(hints))
    return "\n".join(lines)


def load_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Strict load with a readable error (CheckpointMismatchError) on any mismatch."""
    problem = describe_mismatch(model, state_dict)
    if problem is not None:
        raise CheckpointMismatchError(problem)
    model.load_state_dict(state_dict, strict=True)


def _args_hints(args: Any) -> tuple[str | None, dict[str, Any]]:
    """Model name and size arguments recorded in a checkpoint's training args."""
    if args is None:
        return None, {}
    get = args.get if isinstance(args, Mapping) else lambda k, d=None: getattr(args, k, d)
    hints: dict[str, Any] = {}
    if isinstance(get("image_size"), int):
        hints["input_size"] = get("image_size") // VAE_DOWNSAMPLE
    if isinstance(get("num_classes"), int):
        hints["num_classes"] = get("num_classes")
    name = get("model")
    return (name if isinstance(name, str) else None), hints


def load_model(
    path_or_obj: PathLike | Mapping[str, Any],
    name: str | None = None,
    *,
    prefer: Literal["ema", "model"] = "ema",
    **overrides,
) -> DiffusionTransformer:
    """Build the model a checkpoint holds and load it strictly; returned in eval mode.

    The architecture comes from, in order: `name` (plus image_size / num_classes recorded in
    the checkpoint's args), the checkpoint's "config" dict (this project), or the model name
    in its args (the releases). Explicit `overrides` always win.
    """
    ckpt = load_checkpoint_file(path_or_obj) if isinstance(path_or_obj, (str, os.PathLike)) else path_or_obj
    if not isinstance(ckpt, Mapping):
        raise TypeError(f"checkpoint must be a dict, got {type(ckpt).__name__}")
    state_dict = load_state_dict_from_checkpoint(ckpt, prefer=prefer)

    bare = _is_state_dict(ckpt)
    args_name, hints = (None, {}) if bare else _args_hints(ckpt.get("args"))
    saved_config = None if bare else ckpt.get("config")
    if name is not None:
        config = get_config(name, **{**hints, **overrides})
    elif isinstance(saved_config, Mapping):
        config = dataclasses.replace(ModelConfig(**saved_config), **overrides)
    elif args_name is not None:
        config = get_config(args_name, **{**hints, **overrides})
    else:
        raise ValueError(
            "cannot tell which model this checkpoint holds (no 'config' or args.model): "
            "pass name=, e.g. load_model(path, 'sit_xl')"
        )
    model = DiffusionTransformer(config)
    load_weights(model, state_dict)
    return model.eval()
