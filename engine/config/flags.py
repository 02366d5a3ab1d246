"""Command-line flags generated from (nested) config dataclasses.

Every field of a config dataclass becomes a flag named after it (``zero_stage`` ->
``--zero-stage``); a nested dataclass field contributes its own fields, under the
prefix in its metadata (``DispersiveConfig`` fields become ``--disp-tau`` ...).
Flags default to "not given", so a value from a preset or a JSON file is only
replaced by what the user actually typed.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import functools
import inspect
import textwrap
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


def section(factory, prefix: str = "") -> Any:
    """A nested config field; its leaves get ``prefix`` in their flag names."""
    return dataclasses.field(default_factory=factory, metadata={"prefix": prefix})


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field) of a dataclass."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _strip_optional(tp):
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        return tp, True
    return tp, False


def _parser_for(tp) -> dict[str, Any]:
    tp, _ = _strip_optional(tp)
    origin = get_origin(tp)
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"type": _enum_parser(tp), "metavar": "{" + ",".join(str(e.value) for e in tp) + "}"}
    if origin is Literal:
        choices = get_args(tp)
        return {"choices": choices, "type": type(choices[0])}
    if origin is tuple:
        args = get_args(tp)
        return {"nargs": "+" if Ellipsis in args else len(args), "type": args[0]}
    if origin is list:
        return {"nargs": "+", "type": get_args(tp)[0]}
    if get_origin(tp) in (Union, types.UnionType):
        members = [a for a in get_args(tp) if a is not type(None)]
        if all(isinstance(a, type) and issubclass(a, enum.Enum) for a in members):
            # e.g. ``ODEMethod | SDEMethod``: any member's name; the config decides which enum
            values = list(dict.fromkeys(str(e.value) for a in members for e in a))
            return {"type": _choice_text(values), "metavar": "{" + ",".join(values) + "}"}
        # e.g. ``str | int | tuple[int, ...]`` for block choices; the config validates.
        return {"type": _int_list_or_text}
    if tp in (int, float, str):
        return {"type": tp}
    raise TypeError(f"no command-line parser for config type {tp!r}")


def _int_list_or_text(text: str):
    """``3`` -> 3, ``0,5,7`` -> (0, 5, 7), anything else stays text."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        return text
    return values[0] if len(values) == 1 else values


def _choice_text(values: list[str]):
    """A parser of one of ``values`` (any case, '_' for '-'), returned as spelt in ``values``."""
    def parse(text: str) -> str:
        key = text.strip().lower().replace("_", "-")
        for value in values:
            if key == value.lower():
                return value
        raise argparse.ArgumentTypeError(f"{text!r} is not one of: {', '.join(values)}")
    parse.__name__ = "choice"
    return parse


def _enum_parser(enum_cls):
    def parse(text: str):
        key = text.strip().lower().replace("_", "-")
        for member in enum_cls:  # any case, '_' for '-': the releases write "GVP", "Linear"
            if key in (str(member.value).lower(), member.name.lower().replace("_", "-")):
                return member
        valid = ", ".join(str(e.value) for e in enum_cls)
        raise argparse.ArgumentTypeError(f"{text!r} is not one of: {valid}")
    parse.__name__ = enum_cls.__name__
    return parse


def _walk(cls, prefix: str = ""):
    """Yields (path, flag, field, doc, type) for every leaf field of a nested dataclass."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner, _ = _strip_optional(tp)
        if dataclasses.is_dataclass(inner):
            for path, flag, leaf, doc, leaf_tp in _walk(inner, prefix + f.metadata.get("prefix", "")):
                yield (f.name, *path), flag, leaf, doc, leaf_tp
        else:
            # A class may rename flags (``cli_names``); trailing underscores (``lambda_``) drop.
            name = getattr(cls, "cli_names", {}).get(f.name) or prefix + f.name.rstrip("_")
            yield (f.name,), name.replace("_", "-"), f, field_docs(cls).get(f.name, ""), tp


def add_config_arguments(parser, cls, *, prefix: str = "", dest: str = "cfg",
                         aliases: dict[str, tuple[str, ...]] | None = None) -> None:
    """A flag per leaf field of ``cls`` on ``parser`` (a parser or an argument group).

    ``prefix`` goes in front of every flag name (``transport-`` -> ``--transport-path``);
    ``dest`` names the namespace the values land in (read back by ``overrides_from_args``);
    ``aliases`` maps a flag name to further spellings (e.g. a release's ``--path-type``).
    A config class may say in words what a field's flag shows as its default
    (``cli_defaults``: field -> text), where the value alone would mislead.
    """
    aliases = aliases or {}
    defaults = cls()  # the defaults shown are the whole config's (a section may default to a preset)
    for path, flag, f, help_text, tp in _walk(cls, prefix):
        owner = functools.reduce(getattr, path[:-1], defaults)
        default = getattr(type(owner), "cli_defaults", {}).get(path[-1], getattr(owner, path[-1]))
        if isinstance(default, enum.Enum):
            default = default.value
        shown = "" if default is None else f" (default: {default})"
        kwargs = {"metavar": path[-1].rstrip("_").upper(), **_parser_for(tp)}
        if "choices" in kwargs or kwargs.get("action") is argparse.BooleanOptionalAction:
            kwargs.pop("metavar")  # argparse shows the choices / the --no- form itself
        parser.add_argument(f"--{flag}", *aliases.get(flag, ()), dest=f"{dest}." + ".".join(path), default=None,
                            help=f"{help_text}{shown}".replace("%", "%%"), **kwargs)


def overrides_from_args(args: argparse.Namespace, dest: str = "cfg") -> dict[tuple[str, ...], Any]:
    """The (path -> value) pairs the user actually gave on the command line."""
    return {tuple(k.split(".")[1:]): v for k, v in vars(args).items()
            if k.startswith(f"{dest}.") and v is not None}


def apply_overrides(cfg, overrides: dict[tuple[str, ...], Any]):
    """A copy of ``cfg`` with the given leaves replaced (``__post_init__`` re-validates)."""
    grouped: dict[str, dict] = {}
    leaves: dict[str, Any] = {}
    for path, value in overrides.items():
        if len(path) == 1:
            leaves[path[0]] = tuple(value) if isinstance(value, list) and _is_tuple_field(cfg, path[0]) else value
        else:
            grouped.setdefault(path[0], {})[path[1:]] = value
    for name, sub in grouped.items():
        leaves[name] = apply_overrides(getattr(cfg, name), sub)
    return dataclasses.replace(cfg, **leaves)


def _is_tuple_field(cfg, name: str) -> bool:
    tp, _ = _strip_optional(get_type_hints(type(cfg))[name])
    return get_origin(tp) is tuple


def config_to_dict(cfg) -> dict[str, Any]:
    """Plain JSON-able dict (enums become their values)."""
    def factory(items):
        return {k: (v.value if isinstance(v, enum.Enum) else list(v) if isinstance(v, tuple) else v)
                for k, v in items}
    return dataclasses.asdict(cfg, dict_factory=factory)


def config_from_dict(cls, data: dict[str, Any]):
    """Rebuilds a nested config from ``config_to_dict`` output (unknown keys are an error)."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; valid keys: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        inner, _ = _strip_optional(hints[key])
        if dataclasses.is_dataclass(inner) and isinstance(value, dict):
            value = config_from_dict(inner, value)
        elif get_origin(inner) is tuple and isinstance(value, list):
            value = tuple(value)
        elif isinstance(inner, type) and issubclass(inner, enum.Enum) and value is not None:
            value = inner(value)
        kwargs[key] = value
    return cls(**kwargs)


__all__ = ["section", "field_docs", "add_config_arguments", "overrides_from_args", "apply_overrides", "config_to_dict",
           "config_from_dict"]
