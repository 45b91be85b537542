"""Turn nested dicts into typed dataclasses, naming the offending key on any mistake.

Library option dataclasses (``dgc.DGCOptions``, ``sparse_train.SparsityOptions``) and the
launcher's own sections share this one parser, so a key is spelled and checked the same way
in a YAML file, on the command line and in ``attach(**options)``.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A user-caused configuration mistake; the message is one line naming the key."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        where = f"argument {key}" if key.startswith("-") else f"config key '{key}'"
        super().__init__(f"{where}: {problem}" if key else problem)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:  # Optional[X]: X's own error names the deeper key
            return coerce(value, candidates[0], key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item_tp is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")
        items = [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = value
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) and nan as strings
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if not math.isfinite(number):
                raise ConfigError(key, f"must be a finite number, got {value!r}")
            return float(number)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types.

    After construction, a ``check()`` method on the dataclass (if any) may raise
    ``ConfigError`` with a key relative to the section; it is re-raised with the full key.
    """
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        data = dataclasses.asdict(data)
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise ConfigError(key, f"unknown key (known: {', '.join(sorted(fields))})")
        kwargs[name] = coerce(value, hints[name], key)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ConfigError as err:
            full = f"{prefix}.{err.key}" if prefix and err.key else (err.key or prefix)
            raise ConfigError(full, err.problem) from None
    return obj


def require(ok: bool, key: str, problem: str) -> None:
    """Raise ConfigError(key, problem) unless ``ok``; used in ``check()`` methods."""
    if not ok:
        raise ConfigError(key, problem)


def to_dict(obj: Any) -> Any:
    """Dataclass tree to plain dicts and lists (YAML- and JSON-safe)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
