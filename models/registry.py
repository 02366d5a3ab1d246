"""Model sizes, names and `create_model`.

Canonical names: `{family}_{size}` (patch 2) and `{family}_{size}_{patch}` for patch 4 and 8,
e.g. `sit_xl`, `sit_xl_4`, `dit_s_8`. Also accepted: `sit_xl_2`, and the releases' spellings
(`SiT-XL/2`, `DiT-B/4`); matching ignores case and treats '-' and '/' like '_'.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import ModelConfig
from .dit import DiffusionTransformer


@dataclass(frozen=True)
class Size:
    depth: int
    hidden_size: int
    num_heads: int


SIZES: dict[str, Size] = {
    "s": Size(depth=12, hidden_size=384, num_heads=6),
    "b": Size(depth=12, hidden_size=768, num_heads=12),
    "l": Size(depth=24, hidden_size=1024, num_heads=16),
    "xl": Size(depth=28, hidden_size=1152, num_heads=16),
}
PATCHES: tuple[int, ...] = (2, 4, 8)
DEFAULT_PATCH = 2

# Arguments a caller may override; `family` is fixed by the name.
OVERRIDABLE: tuple[str, ...] = tuple(n for n in ModelConfig.field_names() if n != "family")


def _canonical(family: str, size: str, patch: int) -> str:
    return f"{family}_{size}" if patch == DEFAULT_PATCH else f"{family}_{size}_{patch}"


def _release_spelling(family: str, size: str, patch: int) -> str:
    return f"{'SiT' if family == 'sit' else 'DiT'}-{size.upper()}/{patch}"


# canonical name -> (family, size, patch)
MODELS: dict[str, tuple[str, str, int]] = {
    _canonical(f, s, p): (f, s, p) for f in ("sit", "dit") for s in SIZES for p in PATCHES
}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace("/", "_")


# every accepted spelling (normalised) -> canonical name
_ALIASES: dict[str, str] = {}
for _name, (_f, _s, _p) in MODELS.items():
    _ALIASES[_name] = _name
    _ALIASES[f"{_f}_{_s}_{_p}"] = _name  # sit_xl_2
    _ALIASES[_normalise(_release_spelling(_f, _s, _p))] = _name  # SiT-XL/2


def list_models() -> list[str]:
    """Canonical model names."""
    return list(MODELS)


def resolve_name(name: str) -> str:
    """Canonical name for any accepted spelling; ValueError listing valid names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    canonical = _ALIASES.get(_normalise(name))
    if canonical is None:
        raise ValueError(
            f"unknown model {name!r}. Valid names: {', '.join(MODELS)} "
            "(also '<name>_2' and release spellings such as 'SiT-XL/2', 'DiT-B/4')"
        )
    return canonical


def get_config(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named model with release-style argument overrides."""
    family, size, patch = MODELS[resolve_name(name)]
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        hint = " ('family' is set by the model name)" if "family" in unknown else ""
        raise TypeError(
            f"unknown model argument(s) {unknown}{hint}. Valid: {', '.join(OVERRIDABLE)}"
        )
    dims = SIZES[size]
    base = ModelConfig(
        family=family,  # type: ignore[arg-type]
        patch_size=patch,
        depth=dims.depth,
        hidden_size=dims.hidden_size,
        num_heads=dims.num_heads,
    )
    return dataclasses.replace(base, **overrides)  # re-runs __post_init__ validation


def create_model(name: str, **overrides) -> DiffusionTransformer:
    """Build a model by name, e.g. `create_model("sit_xl", input_size=32, attention="sdpa")`.

    Overrides use the releases' constructor names (input_size, patch_size, in_channels,
    hidden_size, depth, num_heads, mlp_ratio, class_dropout_prob, num_classes, learn_sigma)
    plus second_time_input, grad_checkpointing and attention. Build under
    `with torch.device("meta"):` to count parameters without allocating them.
    """
    return DiffusionTransformer(get_config(name, **overrides))


def release_name(name: str) -> str:
    """The releases' spelling of a model name (``sit_xl`` -> ``SiT-XL/2``), as their ``args.model``."""
    return _release_spelling(*MODELS[resolve_name(name)])
