"""Configs as data: frozen dataclasses, JSON/YAML files, and dotted command-line overrides.

Every model and run is described by a tree of frozen dataclasses so that a run directory's ``config.json`` is enough to
rebuild exactly what trained. ``from_dict`` is strict: a misspelt key is an error that names the key and the valid
ones, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

PACKAGED_CONFIGS = Path(__file__).parent / "configs"  # the run configs `vislang train --config NAME` finds

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message says which key and why."""


def to_dict(cfg: Any) -> Any:
    """Dataclass tree → plain dict (JSON-ready); tuples become lists."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Turn a JSON/YAML value into the declared field type (nested dataclasses, tuples, Optionals)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _coerce(args[0], value, where)
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if args and args[-1] is not Ellipsis:
            return tuple(_coerce(a, v, where) for a, v in zip(args, value))
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, where) for v in value)
    if origin is dict or tp is dict:
        return dict(value or {})
    if tp is bool and isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float) and isinstance(value, str):
        try:
            return tp(float(value)) if tp is int and "e" in value.lower() else tp(value)
        except ValueError as e:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from e
    if tp is float and isinstance(value, int):
        return float(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ConfigError naming the valid ones."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)} in {where or cls.__name__}; valid keys are {sorted(names)}"
        )
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def parse_value(text: str) -> Any:
    """Parse a command-line override value with YAML rules (numbers, booleans, lists, null)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (a copy is returned).

    ``overrides`` is a list of ``key=value`` strings (``--`` prefixes allowed) or a mapping of dotted keys to values.
    """
    out = json.loads(json.dumps(data))
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, dict):
        items = _flatten(overrides)
    else:
        for ov in overrides:
            if "=" not in ov:
                raise ConfigError(f"override {ov!r} has no '='; write it as key.sub=value, e.g. --train.lr=1e-3")
            k, v = ov.split("=", 1)
            items.append((k.lstrip("-"), parse_value(v)))
    for key, value in items:
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested override mappings merge key by key: {"vision": {"width": 8}} changes only vision.width."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def number_list(text: str, kind: type[T], what: str, example: str) -> list[T]:
    """'0,1,2' → [0, 1, 2] of ``kind`` (int or float) for a command-line flag, or a ValueError that names ``what``
    was expected and shows ``example``."""
    try:
        values = [kind(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{text!r} is not a list of {what} separated by commas, e.g. {example}") from None
    if not values:
        raise ValueError(f"empty list of {what}; give e.g. {example}")
    return values


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML config file into a dict, with an error that names the file when it cannot."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass a path to a .yaml or .json file")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot parse {p}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping at the top level")
    return data
