"""Value checks with one message shape: ``<Owner>.<field> must be <rule>, got <value>``.

Configs call these from ``__post_init__``, so every bad value fails where it is set (a flag,
a JSON config, a constructor call) with a message that names the field and the rule.
"""
from __future__ import annotations

import math
from enum import Enum
from typing import Any, Literal, Sequence, TypeVar, get_args, get_type_hints

E = TypeVar("E", bound=Enum)


def fail(owner: str, field: str, rule: str, value: Any) -> ValueError:
    """The ValueError of the shared shape (raise it)."""
    return ValueError(f"{owner}.{field} must be {rule}, got {value!r}")


def number(owner: str, field: str, value: Any, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float (not a bool) within the given bounds (open or closed)."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    rule = " ".join(["a finite number", " and ".join(bounds)]).strip()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(owner, field, rule, value)
    v = float(value)
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if too_low or too_high:
        raise fail(owner, field, rule, value)
    return v


def integer(owner: str, field: str, value: Any, *, low: int | None = None) -> int:
    """``value`` as an int (not a bool), at least ``low``."""
    rule = "an int" + (f" >= {low}" if low is not None else "")
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise fail(owner, field, rule, value)
    return value


def one_of(owner: str, field: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise fail(owner, field, "one of " + ", ".join(repr(c) for c in choices), value)
    return value


def literals(cfg: Any) -> None:
    """Every ``Literal``-typed field of the dataclass ``cfg`` holds one of its values (a JSON
    config or a constructor call is not checked by argparse)."""
    for name, tp in get_type_hints(type(cfg)).items():
        if getattr(tp, "__origin__", None) is Literal:
            one_of(type(cfg).__name__, name, getattr(cfg, name), get_args(tp))


def parse_choice(enum_cls: type[E], value: object, what: str) -> E:
    """``value`` as a member of ``enum_cls`` (member, or its value/name in any case).

    ValueError listing the valid names otherwise, so a typo never selects a default.
    """
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, str):
        key = value.strip().lower().replace("_", "-")
        for member in enum_cls:
            if key in (str(member.value).lower(), member.name.lower().replace("_", "-")):
                return member
    valid = ", ".join(repr(m.value) for m in enum_cls)
    raise ValueError(f"unknown {what} {value!r}; valid: {valid}")
