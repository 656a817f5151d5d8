"""Typed configurations from plain data: validation helpers and overrides.

Every config is a frozen dataclass. :func:`apply_overrides` turns a plain mapping (a parsed
YAML section, ``--set key=value`` flags) into a new config, converting nested mappings and
lists, so that a typo in a key is a :class:`~lifelong.core.errors.ConfigError` instead of a
silently ignored field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from lifelong.core.errors import ConfigError


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_dims(name: str, dims: tuple[int, ...]) -> None:
    check(all(isinstance(d, int) and d > 0 for d in dims), f"{name} must be positive ints, got {dims}")


C = TypeVar("C")


def _coerce(hint: Any, value: Any) -> Any:
    """YAML and JSON give lists where the config declares tuples (which keep it hashable)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if isinstance(value, list) and any(typing.get_origin(h) is tuple for h in options):
        return tuple(value)
    return value


def apply_overrides(cfg: C, overrides: Mapping[str, Any]) -> C:
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
        lifelong.core.errors.ConfigError: RowFeatureConfig has no field 'id_dimm'; fields are ...
    """
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise ConfigError(f"{type(cfg).__name__} has no field {key!r}; fields are {', '.join(names)}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[key] = apply_overrides(current, value)
        else:
            changes[key] = _coerce(hints[key], value)
    try:
        return dataclasses.replace(cfg, **changes)
    except TypeError as exc:
        raise ConfigError(f"invalid {type(cfg).__name__}: {exc}") from exc
