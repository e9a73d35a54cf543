"""Parsing a config: YAML mappings into frozen dataclasses, types coerced and checked, unknown keys named with a
suggestion, ``--set a.b=v`` overrides applied. What the sections are (and check) is ``pipeline.config``'s business.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import yaml
from metatrain.tasks.errors import MetatrainError, did_you_mean


class ConfigError(MetatrainError):
    """A config file, config field or ``--set`` override is invalid."""


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint, where: str) -> Any:
    """``value`` as type ``hint`` (int, float, bool, str, Literal, Optional), or ConfigError naming ``where``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(hint):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{where} must be {_type_name(hint)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
        hint_txt = did_you_mean(value, typing.get_args(hint), ignore_case=True)
        raise ConfigError(f"{where} must be one of {_type_name(hint)}, got {value!r}{hint_txt}")
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string; accept what float() accepts
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config field {where} has an unsupported type {hint!r}")
    raise ConfigError(f"{where} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def _unknown_key(where: str, key: str, known: list[str]) -> ConfigError:
    path = f"{where}.{key}" if where else key
    hint = did_you_mean(key, known, cutoff=0.5, prefix=f"{where}." if where else "")
    return ConfigError(f"unknown config key '{path}'{hint}; known: {', '.join(known)}")


def build(cls, data: Any, where: str = ""):
    """Build dataclass ``cls`` from a mapping, recursively, rejecting unknown keys and wrong types."""
    label = where or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(where, str(key), names)
        path = f"{where}.{key}" if where else key
        hint = hints[key]
        kwargs[key] = build(hint, value, path) if dataclasses.is_dataclass(hint) else _coerce(value, hint, path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except MetatrainError as e:  # a section's own check (e.g. AlgorithmConfig) names the field without its section
        raise ConfigError(f"{where}.{e}" if where else str(e)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=v"`` -> (["a", "b"], v) with v read as YAML (numbers, booleans, null, lists)."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or any(not p.strip() for p in parts):
        raise ConfigError(f"invalid --set {text!r}: expected SECTION.FIELD=VALUE, e.g. train.steps=500")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return [p.strip() for p in parts], value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"invalid --set {text!r}: {'.'.join(parts[:i + 1])} is not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return data
