"""Build nested dataclasses from YAML/dict data with errors that name the key path.

Knows nothing of the recipe: it walks dataclass fields and their type hints
(``int``, ``float``, ``str``, ``bool``, ``X | None``, ``Literal[...]``,
``list[T]``, ``dict[str, T]`` and nested dataclasses).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Mapping, Union, get_args, get_origin, get_type_hints

from excitation_dist.config import ConfigError

import yaml


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except ConfigError as exc:
                errors.append(str(exc))
        allowed = " or ".join(_describe(o) for o in options if o is not type(None))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: must be {allowed}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: must be {_describe(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: must be a list, got {value!r}")
        (item,) = get_args(tp)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: must be a mapping, got {value!r}")
        _, item = get_args(tp)
        return {str(k): _convert(v, item, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and hasattr(tp, "from_dict"):  # e.g. ExcitationConfig
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: must be a mapping, got {value!r}")
        return tp.from_dict(value)
    raise TypeError(f"{path}: unsupported field type {tp}")


def _key_paths(cls: type, prefix: str = "") -> list[str]:
    """Every key under dataclass ``cls``, nested ones dotted (``moe.num_experts``)."""
    paths = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        paths.append(prefix + f.name)
        nested = [t for t in (hints[f.name], *get_args(hints[f.name])) if dataclasses.is_dataclass(t)]
        if nested:
            paths += _key_paths(nested[0], f"{prefix}{f.name}.")
    return paths


def suggest_key(key: str, cls: type) -> str | None:
    """The allowed key (nested keys dotted) closest to the unknown ``key`` under ``cls``:
    ``num_expert`` under the model finds ``moe.num_experts``, not ``num_layers``."""
    paths = _key_paths(cls)
    leaves = {}
    for path in paths:  # the shallowest path wins for a repeated leaf name
        leaves.setdefault(path.rsplit(".", 1)[-1], path)
    ranked = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=1, cutoff=0.6)
    whole = difflib.get_close_matches(key, paths, n=1, cutoff=0.6)
    if ranked and whole:
        a = difflib.SequenceMatcher(None, key.rsplit(".", 1)[-1], ranked[0]).ratio()
        b = difflib.SequenceMatcher(None, key, whole[0]).ratio()
        return leaves[ranked[0]] if a >= b else whole[0]
    return leaves[ranked[0]] if ranked else (whole[0] if whole else None)


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``data``, recursively; unknown keys and
    wrong types raise :class:`ConfigError` naming ``path.key``."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        named = []
        for k in unknown:
            close = suggest_key(str(k), cls)
            named.append(where + str(k) + (f" (did you mean {where}{close}?)" if close else ""))
        raise ConfigError(
            f"unknown key(s) {', '.join(named)}; allowed under {path or 'the top level'}: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _convert(value, hints[name], f"{path}.{name}" if path else name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if not path or msg.startswith(path) else f"{path}.{msg}") from None


def to_dict(obj: Any) -> Any:
    """Dataclasses (and objects with to_dict) back to plain data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to nested ``data``."""
    data = typing.cast(dict, yaml.safe_load(yaml.safe_dump(data)) or {})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a mapping")
            node = child
        node[parts[-1]] = yaml.safe_load(raw)
    return data
