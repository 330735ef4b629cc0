"""The one config parser: TOML files and dotted `key=value` overrides into nested dataclasses.

Each config dataclass lives beside the code it configures (`ModelConfig` in model/config.py,
`TrainConfig` in train/trainer.py, ...); a run config only composes them. This module knows
nothing about any of them: it walks dataclass fields and their annotations.

    >>> override(cfg, ["train.max_steps=100", "model.preset=tiny"])

Unknown keys and wrong types raise `ConfigError` with one line naming the key:
`unknown config key 'optim.lrr' (did you mean 'optim.lr'?)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from pellucid.errors import ConfigError
from pellucid.files import parse_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _parse_scalar(key: str, tp: Any, value: Any) -> Any:
    """Coerce `value` (a TOML value, JSON value or override string) to annotation `tp`."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _parse_scalar(key, opt, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (str,)
        if isinstance(value, str):
            where = f"config key '{key}' expects a list, got {value!r:.40}"
            is_json = value.strip().startswith("[")
            value = parse_json(value, where, ConfigError) if is_json else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        items = [_parse_scalar(key, item_tp, v) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"config key '{key}' expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise ConfigError(f"config key '{key}' expects a number, got {value!r}") from None
        else:
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        if not math.isfinite(out):
            raise ConfigError(f"config key '{key}' must be finite, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    if tp is Path:
        return Path(value)
    raise ConfigError(f"config key '{key}' has an unsupported type {tp!r}")


def _unknown(key: str, known: list[str], prefix: str) -> ConfigError:
    full = [f"{prefix}{k}" for k in known]
    near = difflib.get_close_matches(f"{prefix}{key}", full, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(full)})"
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a table")
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(key, names, prefix)
        tp = hints[key]
        if _is_dataclass_type(tp):
            kwargs[key] = from_dict(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _parse_scalar(f"{prefix}{key}", tp, value)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"config section '{prefix.rstrip('.') or cls.__name__}': {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain JSON-able dict (Paths become strings, tuples lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def override(cfg: T, assignments: list[str]) -> T:
    """Apply `a.b.c=value` strings to a (nested) dataclass, returning a new one."""
    data = to_dict(cfg)
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node: dict[str, Any] = data
        cls: Any = type(cfg)
        for depth, part in enumerate(parts):
            hints = _field_types(cls)
            names = [f.name for f in dataclasses.fields(cls) if f.init]
            prefix = "".join(p + "." for p in parts[:depth])
            if part not in names:
                raise _unknown(part, names, prefix)
            tp = hints[part]
            if depth == len(parts) - 1:
                if _is_dataclass_type(tp):
                    raise ConfigError(f"config key '{dotted}' is a section; set one of its keys")
                node[part] = _parse_scalar(dotted, tp, raw)
            else:
                if not _is_dataclass_type(tp):
                    raise ConfigError(f"config key '{prefix}{part}' is not a section")
                node, cls = node[part], tp
    return from_dict(type(cfg), data)


def load(cls: type[T], path: str | Path | None = None, assignments: list[str] | None = None) -> T:
    """Defaults of `cls`, updated by TOML file `path`, then by `assignments`."""
    cfg = cls()
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        merged = to_dict(cfg)
        _deep_update(merged, data)
        cfg = from_dict(cls, merged)
    return override(cfg, assignments or [])


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
