"""Typed configurations from plain data: one builder for every config of lifelong.

Every config is a frozen dataclass. :func:`build` turns nested plain data (a YAML/JSON file read
by :func:`load_file`, ``--set key=value`` strings parsed by :func:`parse_set`) into one, with
pydantic validating the types: nested mappings become nested configs, lists become tuples,
``1`` is accepted for a float but ``true`` or ``"3"`` is not an int, and an unknown key is a
:class:`~lifelong.core.errors.ConfigError` naming its dotted key and the valid ones. Each
config's own ``__post_init__`` checks then run as usual. :func:`apply_overrides` is the same
builder started from an existing config instead of the defaults.

Example::

    >>> from lifelong.modules.row_features import RowFeatureConfig
    >>> build(RowFeatureConfig, {"id_dim": 8}).id_dim
    8
    >>> build(RowFeatureConfig, {}, ["id_dimm=8"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lifelong.core.errors.ConfigError: id_dimm: no such key (did you mean id_dim?); valid keys are ...
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import functools
import json
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from lifelong.core.errors import ConfigError


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_dims(name: str, dims: tuple[int, ...]) -> None:
    check(all(isinstance(d, int) and d > 0 for d in dims), f"{name} must be positive ints, got {dims}")


C = TypeVar("C")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 with exponent floats without a dot (``1e-3``) read as floats, not strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_value(text: str) -> Any:
    """A ``--set`` value as YAML: ``3`` int, ``1e-3`` float, ``true``, ``[128, 64]``, ``{a: 1}``, else the string."""
    if not text.strip():
        return text
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except (yaml.YAMLError, ValueError):  # e.g. an impossible date: validation names the key
        return text


def parse_set(text: str) -> tuple[str, Any]:
    """``"a.b=3"`` -> ``("a.b", 3)``; the value is read as YAML (:func:`parse_value`).

    Example::

        >>> parse_set("model.mlp_dims=[128, 64]")
        ('model.mlp_dims', [128, 64])
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r} is not of the form key=value (dotted key, e.g. users.n_users=500)")
    return key, parse_value(raw)


def set_key(data: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of nested ``data`` with the dotted ``key`` set (a mapping value merges into a section).

    Sections a key names that do not exist yet are created, so that :func:`build` names an
    unknown one.
    """
    path = key.split(".")
    out = dict(data)
    node = out
    for i, part in enumerate(path[:-1]):
        child = node.get(part, {})
        if not isinstance(child, Mapping):
            raise ConfigError(f"{'.'.join(path[: i + 1])}: is a value, not a section (setting {key})")
        node[part] = dict(child)
        node = node[part]
    last = path[-1]
    if isinstance(node.get(last), Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: is a section; set one of its keys ({', '.join(map(str, node[last]))})")
        node[last] = merge(node[last], value)
    else:
        node[last] = value
    return out


def apply_sets(data: Mapping[str, Any], overrides: Iterable[str | tuple[str, Any]]) -> dict[str, Any]:
    """``data`` with every ``key=value`` string (or ``(key, value)`` pair) set, in order."""
    out = dict(data)
    for item in overrides:
        key, value = parse_set(item) if isinstance(item, str) else item
        out = set_key(out, key, value)
    return out


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings of ``extra`` update those of ``base``, other values replace."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a YAML or JSON file (empty file: ``{}``).

    Raises:
        ConfigError: the file is missing, not YAML/JSON, or does not hold a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def to_data(cfg: Any) -> Any:
    """A config as plain nested data (``dataclasses.asdict`` of its init fields, tuples kept)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_data(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Mapping):
        return {k: to_data(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(to_data(v) for v in cfg)
    return cfg


_STRICT = pydantic.ConfigDict(extra="forbid", strict=True)


def _options(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _section(hint: Any) -> type | None:
    """The dataclass a field holds (``X`` or ``X | None``), if any."""
    for option in _options(hint):
        if isinstance(option, type) and dataclasses.is_dataclass(option):
            return option
    return None


@functools.cache
def _adapter(cls: type) -> pydantic.TypeAdapter:
    """A validator of ``cls`` that forbids unknown keys and converts only losslessly.

    pydantic reads a stdlib dataclass's config from its ``__pydantic_config__`` attribute, so
    it is set on ``cls`` and every config nested in it (the configs stay plain dataclasses).
    Data is validated in strict JSON mode: lists are tuples, ints are floats, nothing else is
    converted (see :func:`build`).
    """
    todo, seen = [cls], set()
    while todo:
        c = todo.pop()
        if c in seen:
            continue
        seen.add(c)
        if "__pydantic_config__" not in vars(c):
            c.__pydantic_config__ = _STRICT
        for hint in typing.get_type_hints(c).values():
            for option in (hint, *typing.get_args(hint)):
                sub = _section(option)
                if sub is not None:
                    todo.append(sub)
    return pydantic.TypeAdapter(cls)


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.date, dt.datetime)):  # YAML reads 2024-01-01 as a date
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_data(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{value!r} ({type(value).__name__}) is not a config value")


def _walk(cls: type, loc: tuple[Any, ...]) -> tuple[str, type | None]:
    """The dotted key of an error location, and the dataclass it ends in."""
    parts: list[str] = []
    current: type | None = cls
    for part in loc:
        if isinstance(part, int):
            parts[-1:] = [f"{parts[-1]}[{part}]"] if parts else [f"[{part}]"]
            current = None
        elif current is not None and part in {f.name for f in dataclasses.fields(current)}:
            parts.append(part)
            current = _section(typing.get_type_hints(current)[part])
        elif current is not None:  # an unknown key
            parts.append(str(part))
            current = None
        # else: a union member's tag, not a key
    return ".".join(parts), current


def _error(cls: type, exc: pydantic.ValidationError, prefix: str) -> ConfigError:
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    key, _ = _walk(cls, loc)
    key = ".".join(p for p in (prefix, key) if p) or cls.__name__
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        _, parent = _walk(cls, loc[:-1])
        names = [f.name for f in dataclasses.fields(parent) if f.init] if parent else []
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return ConfigError(f"{key}: no such key{hint}; valid keys are {', '.join(names)}")
    if err["type"] in ("dataclass_type", "dataclass_exact_type"):
        return ConfigError(f"{key}: is a section; expected a mapping of its keys, got {err['input']!r}")
    if isinstance(err["input"], Mapping):
        return ConfigError(f"{key}: is a value, not a section; got {err['input']!r}")
    more = f" (and {len(exc.errors()) - 1} more errors)" if len(exc.errors()) > 1 else ""
    msg = err["msg"][:1].lower() + err["msg"][1:]
    return ConfigError(f"{key}: {msg}, got {err['input']!r}{more}")


def build(cls: type[C], data: Mapping[str, Any] | None = None, overrides: Iterable[str | tuple[str, Any]] = (),
          base: C | None = None, prefix: str = "") -> C:
    """The config ``cls`` from nested plain data, with ``key=value`` overrides applied on top.

    Args:
        cls: a (frozen) dataclass; fields holding dataclasses are sections.
        data: nested keys, e.g. a parsed YAML file; missing keys keep their defaults.
        overrides: ``dotted.key=value`` strings (values read as YAML, :func:`parse_set`) or
            ``(dotted.key, value)`` pairs, applied in order after ``data``.
        base: start from this config instead of the defaults (nested mappings then update its
            nested configs).
        prefix: dotted key of ``cls`` within a larger config, for error messages.

    Raises:
        ConfigError: an unknown key (naming the dotted key and the valid ones), a value of
            the wrong type, a value a section expects, or a config's own check.

    Example::

        >>> from lifelong.transact.config import BSTConfig
        >>> cfg = build(BSTConfig, {"mlp_dims": [64, 32]}, ["layout.rt=16"])
        >>> cfg.mlp_dims, cfg.layout.rt
        ((64, 32), 16)
    """
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping of keys, got {data!r}")
    merged = merge(to_data(base) if base is not None else {}, data or {})
    merged = apply_sets(merged, overrides)
    try:
        text = json.dumps(merged, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None
    try:
        return _adapter(cls).validate_json(text)
    except pydantic.ValidationError as exc:
        raise _error(cls, exc, prefix) from None


def apply_overrides(cfg: C, overrides: Mapping[str, Any], prefix: str = "") -> C:
    """A copy of ``cfg`` with ``overrides`` applied; nested mappings update nested configs.

    Raises:
        ConfigError: an override names no field of the config, or a value is invalid.

    Example::

        >>> from lifelong.modules.row_features import RowFeatureConfig
        >>> apply_overrides(RowFeatureConfig(), {"id_dim": 8}).out_dim
        64
        >>> apply_overrides(RowFeatureConfig(), {"id_dimm": 8})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: id_dimm: no such key (did you mean id_dim?); valid keys are ...
    """
    if not overrides:
        return cfg
    return build(type(cfg), overrides, base=cfg, prefix=prefix)
