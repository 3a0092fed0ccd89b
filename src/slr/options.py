"""Typed options of solvers and allocators.

Each registered solver or allocator takes its options as keyword arguments with defaults; ``options_type`` turns
those into a frozen dataclass (one per method), and ``make_options`` builds one from a mapping (CLI ``--opt``, a TOML
table, a results.json), refusing unknown keys and values of the wrong type with a one-line error that names the
valid keys.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .errors import SLRError


def options_type(name: str, fn: Callable, skip: tuple[str, ...] = ()) -> type:
    """A frozen dataclass ``<Name>Options`` of ``fn``'s parameters that have defaults (minus ``skip``)."""
    fields = []
    for p in inspect.signature(fn).parameters.values():
        if p.default is inspect.Parameter.empty or p.name in skip or p.kind is p.VAR_KEYWORD:
            continue
        fields.append((p.name, _hint(p.annotation, fn), dataclasses.field(default=p.default)))
    cls_name = "".join(part.capitalize() for part in name.replace("+", "_").split("_")) + "Options"
    return dataclasses.make_dataclass(cls_name, fields, frozen=True)


def _hint(annotation, fn: Callable):
    """The option's type (annotations are strings under ``from __future__ import annotations``)."""
    if annotation is inspect.Parameter.empty:
        return Any
    if isinstance(annotation, str):
        try:
            return eval(annotation, fn.__globals__)  # noqa: S307  (the solver's own annotation)
        except Exception:  # a name only imported for type checking: no type check for this option
            return Any
    return annotation


def fits(value, hint) -> bool:
    """Whether ``value`` (as parsed from JSON/TOML) is of type ``hint``; int is accepted for float, bool is not int."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is tuple or origin is tuple:
        return isinstance(value, list | tuple)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if hint is list or origin is list:
        return isinstance(value, list)
    return isinstance(value, hint) if isinstance(hint, type) else True


def make_options(cls: type, values, *, flag: str, what: str):
    """``cls`` (an ``options_type``) from a mapping, an instance of ``cls`` (returned as is) or None (defaults)."""
    if values is None:
        return cls()
    if isinstance(values, cls):
        return values
    if dataclasses.is_dataclass(values):
        raise SLRError(f"{type(values).__name__} are not the options of {what}",
                       f"pass {cls.__name__}(...) or a dict of its fields")
    if not isinstance(values, Mapping):
        raise SLRError(f"the options of {what} must be a table of KEY = VALUE, not {type(values).__name__}",
                       f"write e.g. {flag} KEY=VALUE")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    out = {}
    for k, v in values.items():
        if k not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise SLRError(f"{flag} {k}={v} is not an option of {what}", f"use one of: {known}")
        hint = hints.get(k, Any)
        if hint is torch.dtype and isinstance(v, str):  # "float32" (a TOML or results.json value)
            v = _dtype(v, flag, k)
        if not fits(v, hint):
            d = fields[k].default
            raise SLRError(f"{flag} {k}={v} does not fit {what}'s option {k} (type {_name(hint)}, default {d})",
                           f"write e.g. {flag} {k}={d}" if isinstance(d, int | float | str) else
                           "leave it at its default")
        out[k] = tuple(v) if isinstance(v, list) and (hint is tuple or typing.get_origin(hint) is tuple) else v
    return cls(**out)


def _dtype(text: str, flag: str, k: str) -> torch.dtype:
    dt = getattr(torch, text.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise SLRError(f"{flag} {k}={text} is not a torch dtype", f"write e.g. {flag} {k}=float32")
    return dt


def jsonable(obj):
    """``obj`` (dataclasses, tuples, torch dtypes) as plain JSON values; dtypes as their names ("float32")."""
    if dataclasses.is_dataclass(obj):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    return obj


def _name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def as_kwargs(options) -> dict:
    """The options as keyword arguments (shallow: tuple values stay tuples)."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
