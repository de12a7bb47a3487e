"""Load a JobConfig: dataclass defaults, then the YAML file, then `--set a.b=c` overrides.

Every value is type-checked against the dataclass field it fills; an unknown key
or a bad value raises ConfigError naming the key path (e.g. `optimizer.lr`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from hipscale.config.errors import ConfigError
from hipscale.config.schema import JobConfig
from hipscale.config.validate import validate_config


def load_config(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    """Build a validated JobConfig from a YAML file and `key.path=value` overrides.

    Args:
        path: YAML file (None: defaults only).
        overrides: strings `a.b.c=value`; the value is parsed as YAML (`1e-3`, `[1, 2]`, `null`).

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or invalid combination.
    """
    raw: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}".replace("\n", " ")) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        _apply_override(raw, item)
    config = build_dataclass(JobConfig, raw, "")
    validate_config(config)
    return config


def _apply_override(raw: dict, item: str) -> None:
    """Set `raw[a][b][c] = value` for `a.b.c=value` (value parsed as YAML)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key.path=value, got {item!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: cannot parse value {text!r}") from None
    node = raw
    parts = key.strip().split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def build_dataclass(cls: type, raw: Any, path: str) -> Any:
    """Instantiate dataclass `cls` from mapping `raw`, checking keys and types recursively."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"unknown config key {_join(path, key)!r} (known in {path or 'top level'}: {known})")
    kwargs = {name: _convert(hints[name], raw[name], _join(path, name)) for name in fields if name in raw}
    return cls(**kwargs)


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against type `tp` and convert it (ints to floats, lists to tuples, dicts to dataclasses)."""
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args or type(value) is bool and not any(type(a) is bool for a in args):
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {_describe(value)} matches none of "
                          f"{', '.join(_name(a) for a in args)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {_describe(value)}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        return [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {path}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", repr(tp))


def config_to_dict(config: Any) -> dict:
    """The config as plain YAML-serialisable data (tuples become lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def config_to_yaml(config: Any) -> str:
    """The resolved config as YAML text, in field order."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)
