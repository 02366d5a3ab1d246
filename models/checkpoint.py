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
import math
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch

from .config import ModelConfig
from .dit import DiffusionTransformer
from .registry import SIZES, _canonical, get_config, release_name

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


def _family_from_name(source: PathLike | None) -> str | None:
    """"sit" or "dit" when a file name says so as a word ("SiT-XL-2-256.pt"), else None."""
    if source is None:
        return None
    found = set(re.findall(r"(?<![a-z])(sit|dit)(?![a-z])", os.path.basename(os.fspath(source)).lower()))
    return found.pop() if len(found) == 1 else None


def infer_config(state_dict: Mapping[str, torch.Tensor], source: PathLike | None = None
                 ) -> tuple[ModelConfig, str]:
    """(config, how it was found) from a state_dict's shapes alone, or a ValueError listing candidates.

    Shapes give depth, width, patch, channels, input size, MLP ratio, learned sigma, the label
    table and a MeanFlow second time input; the heads come from the registry size with that
    depth and width. SiT and DiT weights have identical shapes, so the family comes from the
    file name (``SiT-XL-2-256.pt``) or from a MeanFlow ``h_embedder`` (SiT only).
    """
    sd = _strip_prefixes(state_dict)
    need = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
            "final_layer.linear.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"cannot recognise a SiT/DiT in this state_dict: it lacks {missing}")
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    tokens = sd["pos_embed"].shape[1]
    grid = math.isqrt(tokens)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out_channels = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    second_time = any(k.startswith("h_embedder.") for k in sd)
    sizes = [name for name, size in SIZES.items() if (size.depth, size.hidden_size) == (depth, hidden)]
    found = (f"depth {depth}, hidden {hidden}, patch {patch}, {in_channels} channels, "
             f"{'learned sigma' if out_channels == 2 * in_channels else 'no sigma'}, "
             f"{grid * patch}x{grid * patch} latents, {rows} label rows")
    if not sizes:
        known = ", ".join(f"{n} (depth {z.depth}, hidden {z.hidden_size})" for n, z in SIZES.items())
        raise ValueError(f"the state_dict's shapes ({found}) match no registry size: {known}; "
                         "pass the model name and size overrides (--model, or load_model(name=, depth=, ...))")
    family = "sit" if second_time else _family_from_name(source)
    candidates = [_canonical(f, sizes[0], patch) for f in ("sit", "dit")]
    if family is None:
        raise ValueError(f"the state_dict's shapes ({found}) fit {' or '.join(candidates)}: SiT and DiT "
                         "weights look alike, and the file name does not say which; pass --model "
                         f"{candidates[0]} or --model {candidates[1]}")
    name = _canonical(family, sizes[0], patch)
    config = get_config(
        name, input_size=grid * patch, in_channels=in_channels, num_classes=rows - 1,
        class_dropout_prob=0.1, learn_sigma=out_channels == 2 * in_channels,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden, second_time_input=second_time)
    how = (f"{release_name(name)} recognised from the state_dict's shapes ({found}; taken as "
           f"{rows - 1} classes plus the null class"
           + ("; family from the MeanFlow h_embedder)" if second_time else "; family from the file name)"))
    return config, how


def checkpoint_config(ckpt: Mapping[str, Any], name: str | None = None, source: PathLike | None = None,
                      **overrides) -> tuple[ModelConfig, str]:
    """(architecture, where it came from) of a loaded checkpoint.

    In order: ``name`` (plus image_size / num_classes recorded in the checkpoint's args), the
    checkpoint's "config" dict (this project), the model name in its args (the releases),
    else the state_dict's shapes (``infer_config``; ``source`` is the file, whose name may
    tell SiT from DiT). Explicit ``overrides`` always win.
    """
    bare = _is_state_dict(ckpt)
    args_name, hints = (None, {}) if bare else _args_hints(ckpt.get("args"))
    saved_config = None if bare else ckpt.get("config")
    if name is not None:
        return get_config(name, **{**hints, **overrides}), f"{release_name(name)} (as asked)"
    if isinstance(saved_config, Mapping):
        return dataclasses.replace(ModelConfig(**saved_config), **overrides), "the checkpoint's config"
    if args_name is not None:
        return get_config(args_name, **{**hints, **overrides}), f"{args_name} (the checkpoint's training args)"
    config, how = infer_config(load_state_dict_from_checkpoint(ckpt), source)
    return dataclasses.replace(config, **overrides), how


def load_model(
    path_or_obj: PathLike | Mapping[str, Any],
    name: str | None = None,
    *,
    prefer: Literal["ema", "model"] = "ema",
    config: ModelConfig | None = None,
    **overrides,
) -> DiffusionTransformer:
    """Build the model a checkpoint holds and load it strictly; returned in eval mode.

    The architecture is ``config`` when given, else ``checkpoint_config`` decides (``name``,
    the checkpoint's config, its args, or the state_dict's shapes); ``overrides`` always win.
    """
    source = path_or_obj if isinstance(path_or_obj, (str, os.PathLike)) else None
    ckpt = load_checkpoint_file(path_or_obj) if source is not None else path_or_obj
    if not isinstance(ckpt, Mapping):
        raise TypeError(f"checkpoint must be a dict, got {type(ckpt).__name__}")
    state_dict = load_state_dict_from_checkpoint(ckpt, prefer=prefer)
    if config is None:
        config, _ = checkpoint_config(ckpt, name, source, **overrides)
    elif name is not None or overrides:
        raise TypeError("load_model takes either config= or name=/overrides, not both")
    model = DiffusionTransformer(config)
    load_weights(model, state_dict)
    return model.eval()
