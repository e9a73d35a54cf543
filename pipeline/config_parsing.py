"""Parsing a config: YAML mappings into frozen dataclasses, types coerced and checked, unknown keys named with a
suggestion, ``--set a.b=v`` overrides applied. What the sections are (and check) is ``pipeline.config``'s business.
"""

from __future__ import annotations

import dataclasses
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from metatrain.tasks.errors import MetatrainError, did_you_mean


class ConfigError(MetatrainError):
    """A config file, config field or ``--set`` override is invalid."""


# A value as an error message shows it: a short prefix, however long or deeply nested the value is.
_SHOWN = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHOWN.maxlevel, _SHOWN.maxdict, _SHOWN.maxlist, _SHOWN.maxtuple = 3, 6, 6, 6
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 60, 60, 40
shown = _SHOWN.repr

MAX_YAML_NODES = 100_000  # values in one YAML file once its aliases are expanded; ours hold a few hundred


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, minus two things a config file must not do (PyYAML has no switch for either): a key
    given twice in one mapping (it keeps the last, silently), and aliases that expand into a huge document (nine
    nested aliases in a 321-byte file are a billion values to whatever walks or prints them)."""

    def compose_document(self):
        node = super().compose_document()
        sizes: dict[int, int] = {}

        def size(n) -> int:  # values after expansion, each shared node counted once per use (memoised by id)
            if id(n) not in sizes:
                children = [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else \
                    n.value if isinstance(n, yaml.SequenceNode) else []
                sizes[id(n)] = min(1 + sum(size(c) for c in children), MAX_YAML_NODES + 1)
            return sizes[id(n)]

        if node is not None and size(node) > MAX_YAML_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"its aliases expand to more than {MAX_YAML_NODES:,} values", node.start_mark)
        return node

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: overriding a merged key is the point
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {shown(key)} given twice (first at line {first + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def yaml_values(text: str) -> Any:
    """``text`` read as YAML by the strict safe loader (no duplicate keys, bounded aliases)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass


def read_yaml(path: str | Path, what: str = "config file", error=ConfigError) -> Any:
    """The YAML file ``path``, or one ``error`` line naming it, the line and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {p} does not exist" if not p.exists() else f"{what} {p} is not a file")
    try:
        return yaml_values(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise error(f"{what} {p} is not UTF-8 text") from None
    except RecursionError:
        raise error(f"{what} {p} nests too deeply to be a config") from None
    except OSError as e:
        raise error(f"cannot read {what} {p} ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None)
        why = f": {' '.join(problem.split())[:120]}" if isinstance(problem, str) else ""
        raise error(f"{what} {p} is not valid YAML{at}{why}") from None


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
        raise ConfigError(f"{where} must be {_type_name(hint)}, got {shown(value)}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {shown(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {shown(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in typing.get_args(hint):
            return "on" if value else "off"  # YAML 1.1 (PyYAML) reads a bare on/off as true/false
        if value in typing.get_args(hint):
            return value
        hint_txt = did_you_mean(value, typing.get_args(hint), ignore_case=True) if len(str(value)) < 100 else ""
        raise ConfigError(f"{where} must be one of {_type_name(hint)}, got {shown(value)}{hint_txt}")
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
    raise ConfigError(f"{where} must be {_type_name(hint)}, got {shown(value)} ({type(value).__name__})")


def _unknown_key(where: str, key: str, known: list[str]) -> ConfigError:
    key = key if len(key) < 100 else shown(key)
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
        raise ConfigError(f"invalid --set {shown(text)}: expected SECTION.FIELD=VALUE, e.g. train.steps=500")
    try:
        value = yaml_values(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
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
                raise ConfigError(f"invalid --set {shown(text)}: {'.'.join(parts[:i + 1])} is not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return data
