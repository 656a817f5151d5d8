"""DV365 multi-slicing: a declarative spec of which timeline events each slice pools.

A *slice* is one token of the user embedding's input (docs/design.md, "Timelines and multi-slicing"): the events of a
user's unified timeline that pass **all** of the slice's rules and fall in its time window,
pooled over one id type of the events' items (``media`` = item id, ``author``, ``topic``), by
a plain mean or a weighted mean. :mod:`lifelong.dv365.featurize` computes them.

Rules, each a typed dataclass with a vectorised :meth:`mask` over many events at once:

- ``action`` (:class:`ActionRule`): action-type bits of ``action_mask``: at least one bit of
  ``any_of`` set and no bit of ``none_of``. Names are lower-case
  :class:`~lifelong.data.schema.Action` members or the schema's groups ``explicit``,
  ``positive``, ``negative``.
- ``source`` (:class:`SourceRule`): the logging source, i.e. the item's media type, ``video``
  or ``image``.
- ``dwell`` (:class:`DwellRule`): ``min_ms <= dwell_ms <= max_ms`` (closed, as the paper's
  ``[T_lb, T_ub]``; a missing bound is unbounded).
- ``watch_ratio`` (:class:`WatchRatioRule`): ``min <= dwell_s / duration_s ** beta <= max``
  (closed; seconds, so that ``beta != 1`` has a unit-independent reading). Videos only: an
  item of duration 0 (an image) has no watch ratio and never matches.
- ``score`` (:class:`ScoreRule`): the debiased score
  ``s = ln(dwell_s + 1) / ln(gamma * duration_s + 1)`` (:func:`debiased_score`) kept when
  ``s > threshold`` (strict, as the paper's ``s > s0``). Videos only, as ``watch_ratio``.

Time windows are point-in-time correct. For a featurisation time ``t`` and an event at
``ts_ms``, the event's age is ``Δt = t - ts_ms``; window ``W`` keeps ``Δt ∈ (0, W]``, i.e.
``t - W <= ts_ms < t``: an event *at* ``t`` is never seen, one exactly ``W`` old is. ``all``
keeps every ``Δt > 0``. (For DV365's distant-interest objective, featurise at
``t = example time - 24 h``.)

Embedding tables are shared by group (the paper's sharing): a slice reads the table
:attr:`Slice.table` = ``{stream}_{polarity}_{id_type}_{pooling}``, where ``stream`` is
``explicit`` when an ``action`` rule admits explicit actions only (else ``implicit``),
``polarity`` is ``negative`` when an ``action`` rule admits negative actions only (else
``positive``; a slice may set it, e.g. for skips), and ``pooling`` is ``weighted`` or ``mean``.

The YAML spec lists *entries*; each entry expands into one slice per (window, id type), named
``{entry}/{window}/{id_type}``, in that order::

    windows: [3d, 7d, all]              # default windows of every entry
    id_types: [media, author, topic]    # default id types of every entry
    slices:
      - name: click
        rules: [{type: action, any_of: [click]}]
      - name: skip
        rules: [{type: dwell, max_ms: 999}]
        polarity: negative
      - name: engaged_video
        rules: [{type: score, threshold: 0.5, gamma: 1.0}]
        weight: score                   # mean weighted by s; also dwell, log_dwell
        windows: [7d, all]              # this entry's own windows

Windows are ``all`` or ``<integer><unit>`` with unit ``ms``, ``s``, ``m``, ``h``, ``d``, ``w``.
:meth:`SliceSpec.default` loads the packaged ``default_slices.yaml`` (207 slices).

Example::

    >>> spec = SliceSpec.from_dict({"windows": ["3d", "all"], "id_types": ["topic"], "slices": [
    ...     {"name": "hide", "rules": [{"type": "action", "any_of": ["hide"]}]}]})
    >>> [s.name for s in spec.slices], spec.slices[0].table
    (['hide/3d/topic', 'hide/all/topic'], 'explicit_negative_topic_mean')
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import yaml

from lifelong.core.errors import ConfigError
from lifelong.data.schema import ACTION_NAMES, EXPLICIT_BITS, MEDIA_TYPES, NEGATIVE_BITS, POSITIVE_BITS

ID_TYPES: tuple[str, ...] = ("media", "author", "topic")
"""Id types a slice can pool over: the item itself, its author, its topic."""

WEIGHTS: tuple[str, ...] = ("score", "dwell", "log_dwell")
"""Per-event weights of weighted slices: the debiased score (of the slice's ``score`` rule),
dwell in seconds, ``ln(dwell_s + 1)``."""

POLARITIES: tuple[str, ...] = ("positive", "negative")

ACTION_GROUPS: dict[str, int] = {"explicit": EXPLICIT_BITS, "positive": POSITIVE_BITS, "negative": NEGATIVE_BITS}
"""Names of the schema's bit groups, usable in ``action`` rules next to single actions."""

_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_WINDOW_RE = re.compile(r"(\d+)(ms|s|m|h|d|w)")
DURATION_UNITS = ", ".join(_UNIT_MS)
"""The units of :func:`parse_duration_ms`, for error messages."""


def parse_duration_ms(text: object) -> int | None:
    """Milliseconds of a positive ``<integer><unit>`` duration (unit in ms, s, m, h, d, w), else None.

    Callers raise their own error on None, naming what the duration was for.

    Example::

        >>> parse_duration_ms("6h"), parse_duration_ms("0d"), parse_duration_ms("1.5h")
        (21600000, None, None)
    """
    match = _WINDOW_RE.fullmatch(text) if isinstance(text, str) else None
    return None if match is None or int(match[1]) == 0 else int(match[1]) * _UNIT_MS[match[2]]


class EventColumns(Protocol):
    """The per-event columns rules read (one entry per event, any number of users)."""

    action_mask: np.ndarray
    dwell_ms: np.ndarray
    media_type: np.ndarray
    duration_ms: np.ndarray


def debiased_score(dwell_ms: np.ndarray, duration_ms: np.ndarray, gamma: float) -> np.ndarray:
    """DV365's debiased engagement score ``s = ln(dwell_s + 1) / ln(gamma * duration_s + 1)``.

    Dividing by a duration term removes the bias of long videos collecting long dwells.
    Undefined (inf or nan) for duration 0, which :class:`ScoreRule` excludes.

    Args:
        dwell_ms: dwell times, ms.
        duration_ms: video durations, ms.
        gamma: scale of the duration term (> 0).

    Example::

        >>> debiased_score(np.array([3000, 0]), np.array([3000, 3000]), 1.0).tolist()
        [1.0, 0.0]
    """
    dwell_s = np.asarray(dwell_ms, dtype=np.float64) / 1000.0
    duration_s = np.asarray(duration_ms, dtype=np.float64) / 1000.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log1p(dwell_s) / np.log1p(gamma * duration_s)


def watch_ratio(dwell_ms: np.ndarray, duration_ms: np.ndarray, beta: float) -> np.ndarray:
    """``dwell_s / duration_s ** beta``; undefined (inf or nan) for duration 0.

    Example::

        >>> dwell, duration = np.array([2000]), np.array([4000])
        >>> watch_ratio(dwell, duration, 1.0).tolist(), watch_ratio(dwell, duration, 0.5).tolist()
        ([0.5], [1.0])
    """
    dwell_s = np.asarray(dwell_ms, dtype=np.float64) / 1000.0
    duration_s = np.asarray(duration_ms, dtype=np.float64) / 1000.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return dwell_s / duration_s**beta


def _bits(names: tuple[str, ...]) -> int:
    out = 0
    for name in names:
        out |= ACTION_GROUPS.get(name, ACTION_NAMES.get(name, 0))
    return out


@dataclass(frozen=True)
class ActionRule:
    """Events with any bit of ``any_of`` and no bit of ``none_of`` in ``action_mask``.

    Args:
        any_of: action names (``click``, ``hide``, ...) or groups (``explicit``, ``positive``,
            ``negative``); at least one.
        none_of: names whose bits must all be clear.

    Example::

        >>> rule = ActionRule(any_of=("impression",), none_of=("explicit",))
        >>> rule.mask(SimpleEvents(action_mask=np.array([1, 3, 2]))).tolist()
        [True, False, False]
    """

    TYPE: ClassVar[str] = "action"
    any_of: tuple[str, ...]
    none_of: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("any_of", "none_of"):  # a bare string or a list would iterate or not hash
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if not self.any_of:
            raise ConfigError("'any_of' must name at least one action")
        valid = [*ACTION_NAMES, *ACTION_GROUPS]
        for name in (*self.any_of, *self.none_of):
            if name not in valid:
                raise ConfigError(f"unknown action {name!r}{_did_you_mean(name, valid)}; valid: {', '.join(valid)}")

    @property
    def any_bits(self) -> int:
        return _bits(self.any_of)

    @property
    def none_bits(self) -> int:
        return _bits(self.none_of)

    def mask(self, events: EventColumns) -> np.ndarray:
        """Which events pass (bool, one per event)."""
        mask = np.asarray(events.action_mask)
        out = (mask & self.any_bits) != 0
        if self.none_of:
            out &= (mask & self.none_bits) == 0
        return out


@dataclass(frozen=True)
class SourceRule:
    """Events whose item has media type ``media`` (the logging source: ``video`` or ``image``).

    Example::

        >>> SourceRule("video").mask(SimpleEvents(media_type=np.array([0, 1]))).tolist()
        [False, True]
    """

    TYPE: ClassVar[str] = "source"
    media: str

    def __post_init__(self) -> None:
        if self.media not in MEDIA_TYPES:
            raise ConfigError(f"unknown media {self.media!r}; valid: {', '.join(MEDIA_TYPES)}")

    def mask(self, events: EventColumns) -> np.ndarray:
        """Which events pass (bool, one per event)."""
        return np.asarray(events.media_type) == MEDIA_TYPES.index(self.media)


def _check_bounds(lo: float | None, hi: float | None, lo_name: str, hi_name: str) -> None:
    if lo is None and hi is None:
        raise ConfigError(f"set at least one of {lo_name!r} and {hi_name!r}")
    for name, value in ((lo_name, lo), (hi_name, hi)):
        if value is not None and not value >= 0:
            raise ConfigError(f"{name!r} must be >= 0, got {value!r}")
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"{lo_name!r} ({lo}) exceeds {hi_name!r} ({hi})")


@dataclass(frozen=True)
class DwellRule:
    """Events with ``min_ms <= dwell_ms <= max_ms``; a bound left out is unbounded.

    Example::

        >>> DwellRule(min_ms=1000, max_ms=2000).mask(SimpleEvents(dwell_ms=np.array([999, 1000, 2000, 2001]))).tolist()
        [False, True, True, False]
    """

    TYPE: ClassVar[str] = "dwell"
    min_ms: int | None = None
    max_ms: int | None = None

    def __post_init__(self) -> None:
        _check_bounds(self.min_ms, self.max_ms, "min_ms", "max_ms")

    def mask(self, events: EventColumns) -> np.ndarray:
        """Which events pass (bool, one per event)."""
        dwell = np.asarray(events.dwell_ms)
        out = np.ones(dwell.shape, dtype=bool)
        if self.min_ms is not None:
            out &= dwell >= self.min_ms
        if self.max_ms is not None:
            out &= dwell <= self.max_ms
        return out


@dataclass(frozen=True)
class WatchRatioRule:
    """Videos with ``min <= dwell_s / duration_s ** beta <= max`` (:func:`watch_ratio`).

    Example::

        >>> events = SimpleEvents(dwell_ms=np.array([500, 1500, 100]), duration_ms=np.array([1000, 1000, 0]))
        >>> WatchRatioRule(min=0.5).mask(events).tolist()
        [True, True, False]
    """

    TYPE: ClassVar[str] = "watch_ratio"
    min: float | None = None
    max: float | None = None
    beta: float = 1.0

    def __post_init__(self) -> None:
        _check_bounds(self.min, self.max, "min", "max")
        if not self.beta > 0:
            raise ConfigError(f"'beta' must be > 0, got {self.beta!r}")

    def mask(self, events: EventColumns) -> np.ndarray:
        """Which events pass (bool, one per event)."""
        duration = np.asarray(events.duration_ms)
        ratio = watch_ratio(events.dwell_ms, duration, self.beta)
        out = duration > 0
        if self.min is not None:
            out &= ratio >= self.min
        if self.max is not None:
            out &= ratio <= self.max
        return out


@dataclass(frozen=True)
class ScoreRule:
    """Videos whose debiased score (:func:`debiased_score`) exceeds ``threshold`` (strictly).

    Example::

        >>> events = SimpleEvents(dwell_ms=np.array([3000, 2999, 9000]), duration_ms=np.array([3000, 3000, 0]))
        >>> ScoreRule(threshold=0.99).mask(events).tolist(), ScoreRule(threshold=1.0).mask(events).tolist()
        ([True, True, False], [False, False, False])
    """

    TYPE: ClassVar[str] = "score"
    threshold: float
    gamma: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold):
            raise ConfigError(f"'threshold' must be finite, got {self.threshold!r}")
        if not self.gamma > 0:
            raise ConfigError(f"'gamma' must be > 0, got {self.gamma!r}")

    def mask(self, events: EventColumns) -> np.ndarray:
        """Which events pass (bool, one per event)."""
        duration = np.asarray(events.duration_ms)
        return (duration > 0) & (debiased_score(events.dwell_ms, duration, self.gamma) > self.threshold)


Rule = ActionRule | SourceRule | DwellRule | WatchRatioRule | ScoreRule
RULE_TYPES: dict[str, type] = {cls.TYPE: cls for cls in (ActionRule, SourceRule, DwellRule, WatchRatioRule, ScoreRule)}


@dataclass(frozen=True)
class SimpleEvents:
    """Per-event columns given directly, e.g. to try a rule; columns not given are zeros.

    Example::

        >>> SimpleEvents(dwell_ms=np.array([5, 6])).action_mask.tolist()
        [0, 0]
    """

    action_mask: np.ndarray | None = None
    dwell_ms: np.ndarray | None = None
    media_type: np.ndarray | None = None
    duration_ms: np.ndarray | None = None

    def __post_init__(self) -> None:
        names = [f.name for f in dataclasses.fields(self)]
        given = [getattr(self, name) for name in names if getattr(self, name) is not None]
        n = len(given[0]) if given else 0
        for name in names:
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.zeros(n, dtype=np.int64))


@dataclass(frozen=True)
class Window:
    """A time window: events with age ``Δt = t - ts_ms`` in ``(0, ms]``; ``ms=None`` is ``all``.

    Args:
        ms: the window's length, ms (> 0), or None for all history.
        label: how the spec wrote it (``3d``); slice names use it.

    Example::

        >>> Window.parse("3d"), Window.parse("all").ms
        (Window(ms=259200000, label='3d'), None)
    """

    ms: int | None
    label: str = dataclasses.field(compare=False)

    @classmethod
    def parse(cls, text: object) -> Window:
        """``all`` or ``<integer><unit>``, unit in ms, s, m, h, d, w."""
        if text == "all":
            return cls(None, "all")
        ms = parse_duration_ms(text)
        if ms is None:
            raise ConfigError(f"window {text!r} is not 'all' or a positive <integer><unit> "
                              f"with unit one of {DURATION_UNITS} (e.g. '3d')")
        return cls(ms, text)

    def sort_key(self) -> float:
        """Windows sort by length, ``all`` last."""
        return math.inf if self.ms is None else self.ms


@dataclass(frozen=True)
class Slice:
    """One pooled token: events passing every rule, inside the window, pooled over an id type.

    Args:
        name: unique name (``{entry}/{window}/{id_type}`` when read from YAML).
        rules: the rules an event must all pass (at least one).
        window: the time window.
        id_type: ``media``, ``author`` or ``topic``.
        weight: None for a plain mean, else a name in :data:`WEIGHTS`; ``score`` needs
            exactly one ``score`` rule (it reuses its ``gamma``).
        polarity: ``positive`` or ``negative`` engagement, choosing the embedding table;
            None derives it: ``negative`` when an action rule admits negative actions only.

    Example::

        >>> s = Slice("skip", (DwellRule(max_ms=999),), Window.parse("all"), "author", polarity="negative")
        >>> s.stream, s.pooling, s.table
        ('implicit', 'mean', 'implicit_negative_author_mean')
    """

    name: str
    rules: tuple[Rule, ...]
    window: Window
    id_type: str
    weight: str | None = None
    polarity: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))  # hashable: slices sharing rules share a pool
        if not self.rules:
            raise ConfigError("'rules' must hold at least one rule")
        if self.id_type not in ID_TYPES:
            raise ConfigError(f"unknown id type {self.id_type!r}; valid: {', '.join(ID_TYPES)}")
        if self.weight is not None and self.weight not in WEIGHTS:
            raise ConfigError(f"unknown weight {self.weight!r}{_did_you_mean(self.weight, WEIGHTS)}; "
                              f"valid: {', '.join(WEIGHTS)} (leave it out for a plain mean)")
        if self.weight == "score" and sum(isinstance(r, ScoreRule) for r in self.rules) != 1:
            raise ConfigError("weight 'score' needs exactly one rule of type 'score' (its gamma defines the score)")
        if self.polarity is None:
            negative = any(isinstance(r, ActionRule) and not r.any_bits & ~NEGATIVE_BITS for r in self.rules)
            object.__setattr__(self, "polarity", "negative" if negative else "positive")
        elif self.polarity not in POLARITIES:
            raise ConfigError(f"unknown polarity {self.polarity!r}; valid: {', '.join(POLARITIES)}")

    @property
    def stream(self) -> str:
        """``explicit`` when an action rule admits explicit actions only, else ``implicit``."""
        explicit = any(isinstance(r, ActionRule) and not r.any_bits & ~EXPLICIT_BITS for r in self.rules)
        return "explicit" if explicit else "implicit"

    @property
    def pooling(self) -> str:
        """``weighted`` or ``mean``."""
        return "mean" if self.weight is None else "weighted"

    @property
    def table(self) -> str:
        """Key of the embedding table this slice reads: ``{stream}_{polarity}_{id_type}_{pooling}``."""
        return f"{self.stream}_{self.polarity}_{self.id_type}_{self.pooling}"

    def mask(self, events: EventColumns) -> np.ndarray:
        """Which events pass every rule (windows aside)."""
        out = self.rules[0].mask(events)
        for rule in self.rules[1:]:
            out &= rule.mask(events)
        return out

    def weights(self, events: EventColumns) -> np.ndarray | None:
        """Per-event pooling weights (float64), or None for a plain mean."""
        if self.weight == "score":
            gamma = next(r.gamma for r in self.rules if isinstance(r, ScoreRule))
            return debiased_score(events.dwell_ms, events.duration_ms, gamma)
        if self.weight is None:
            return None
        dwell_s = np.asarray(events.dwell_ms, dtype=np.float64) / 1000.0
        return dwell_s if self.weight == "dwell" else np.log1p(dwell_s)


@dataclass(frozen=True)
class SliceSpec:
    """An ordered set of uniquely named slices; the order is the featurizer's output order.

    Args:
        slices: the slices (at least one, unique names).

    Example::

        >>> spec = SliceSpec.default()
        >>> len(spec), spec.windows[0].label, len(spec.tables)
        (207, '3d', 15)
    """

    slices: tuple[Slice, ...]

    def __post_init__(self) -> None:
        if not self.slices:
            raise ConfigError("a slice spec needs at least one slice")
        seen: set[str] = set()
        for s in self.slices:
            if s.name in seen:
                raise ConfigError(f"duplicate slice name {s.name!r}")
            seen.add(s.name)

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slices]

    @property
    def windows(self) -> tuple[Window, ...]:
        """The distinct windows used, shortest first, ``all`` last."""
        return tuple(sorted({s.window for s in self.slices}, key=Window.sort_key))

    @property
    def tables(self) -> dict[str, str]:
        """Embedding table key -> its id type, for every table the slices read (sorted by key)."""
        return {key: id_type for key, id_type in sorted({(s.table, s.id_type) for s in self.slices})}

    @classmethod
    def from_dict(cls, data: object, source: str = "<dict>") -> SliceSpec:
        """Build from the YAML structure (see the module docstring).

        Args:
            data: the parsed YAML: a mapping with ``slices`` and optional default ``windows``
                and ``id_types``.
            source: where it came from, for error messages.

        Raises:
            ConfigError: naming the spec, the entry and the key that is wrong.
        """
        where = f"slice spec {source}"
        _keys(data, where, required=("slices",), optional=("windows", "id_types"))
        assert isinstance(data, Mapping)
        windows = data.get("windows", ["all"])
        _windows(windows, f"{where}: windows")
        id_types = _id_types(data.get("id_types", list(ID_TYPES)), f"{where}: id_types")
        entries = data["slices"]
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{where}: 'slices' must be a non-empty list of entries, got {entries!r}")
        names: set[str] = set()
        slices: list[Slice] = []
        for i, entry in enumerate(entries):
            here = f"{where}: slices[{i}]"
            _keys(entry, here, required=("name", "rules"), optional=("windows", "id_types", "weight", "polarity"))
            name = entry["name"]
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
                raise ConfigError(f"{here}: 'name' must be a non-empty string of letters, digits and _.+-, "
                                  f"got {name!r}")
            here = f"{where}: slices[{i}] ({name!r})"
            if name in names:
                raise ConfigError(f"{here}: duplicate entry name")
            names.add(name)
            rules = entry["rules"]
            if not isinstance(rules, list) or not rules:
                raise ConfigError(f"{here}: 'rules' must be a non-empty list of rules, got {rules!r}")
            parsed = tuple(_rule(r, f"{here}: rules[{j}]") for j, r in enumerate(rules))
            for window in _windows(entry.get("windows", windows), f"{here}: windows"):
                for id_type in _id_types(entry.get("id_types", id_types), f"{here}: id_types"):
                    try:
                        slices.append(Slice(f"{name}/{window.label}/{id_type}", parsed, window, id_type,
                                            entry.get("weight"), entry.get("polarity")))
                    except ConfigError as exc:
                        raise ConfigError(f"{here}: {exc}") from None
        return cls(tuple(slices))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> SliceSpec:
        """Read a YAML spec file.

        Raises:
            ConfigError: the file is missing, not YAML, or not a valid spec.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"slice spec file not found: {path}")
        return cls._from_text(path.read_text(), str(path))

    @classmethod
    def default(cls) -> SliceSpec:
        """The packaged default spec (``default_slices.yaml``: 23 entries x 3 windows x 3 id types)."""
        resource = importlib.resources.files(__package__).joinpath("default_slices.yaml")
        return cls._from_text(resource.read_text(), "default_slices.yaml")

    @classmethod
    def _from_text(cls, text: str, source: str) -> SliceSpec:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"slice spec {source} is not valid YAML: {exc}") from None
        return cls.from_dict(data, source)


def _did_you_mean(word: str, valid: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(word), [str(v) for v in valid], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _keys(data: object, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    valid = [*required, *optional]
    for key in data:
        if key not in valid:
            raise ConfigError(f"{where}: unknown key {key!r}{_did_you_mean(key, valid)}; "
                              f"valid keys: {', '.join(valid)}")
    for key in required:
        if key not in data:
            raise ConfigError(f"{where}: missing key {key!r}")


def _id_types(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of id types, got {value!r}")
    for v in value:
        if v not in ID_TYPES:
            raise ConfigError(f"{where}: unknown id type {v!r}{_did_you_mean(v, ID_TYPES)}; "
                              f"valid: {', '.join(ID_TYPES)}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: duplicate id types in {value!r}")
    return value


def _windows(value: object, where: str) -> list[Window]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of windows, got {value!r}")
    try:
        windows = [Window.parse(v) for v in value]
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if len(set(windows)) != len(windows):
        raise ConfigError(f"{where}: duplicate windows in {value!r}")
    return windows


def _names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError("a name or a list of names")


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("a number")
    return float(value)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("an integer")
    return value


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("a name")
    return value


_PARAM_TYPES: dict[str, Callable[[Any], Any]] = {
    "tuple[str, ...]": _names, "str": _name, "int | None": _integer, "float | None": _number, "float": _number,
}


def _rule(data: object, where: str) -> Rule:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping with a 'type', got {data!r}")
    kind = data.get("type")
    if kind not in RULE_TYPES:
        hint = _did_you_mean(kind, list(RULE_TYPES)) if isinstance(kind, str) else ""
        raise ConfigError(f"{where}: rule type {kind!r}{hint} is not one of {', '.join(RULE_TYPES)}")
    cls = RULE_TYPES[kind]
    where = f"{where} ({kind})"
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = tuple(n for n, f in fields.items() if f.default is dataclasses.MISSING)
    _keys(data, where, required=("type", *required), optional=tuple(n for n in fields if n not in required))
    kwargs = {}
    for key, value in data.items():
        if key == "type":
            continue
        kind = str(fields[key].type)
        if value is None and kind.endswith("| None"):
            kwargs[key] = None
            continue
        try:
            kwargs[key] = _PARAM_TYPES[kind](value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {key!r} must be {exc}, got {value!r}") from None
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
