"""Admission filters: which ids have been seen often enough to deserve an embedding row.

Most ids in a recommendation stream occur once or twice; giving each a row would fill the table
with vectors that never train. A filter sees every occurrence of an id that has no row yet and
says when to admit it. :class:`CountingFilter` counts occurrences in a count-min sketch of
4-bit counters (two per byte) and admits at ``threshold``; :class:`ProbabilisticFilter` keeps
no state per id and admits each occurrence with probability ``p`` (so an id seen k times is
admitted with probability ``1 - (1 - p)^k``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from lifelong.core.errors import ConfigError
from lifelong.tables.cuckoo import GOLDEN, as_id_array, mix64, next_random, reduce_range, unit_float

MAX_COUNT = 15  # a 4-bit counter saturates here
FILTER_KINDS = ("none", "counting", "probabilistic")

_S32 = np.uint64(32)


@njit(cache=True)
def _get(counters: np.ndarray, g: int) -> int:
    return (counters[g >> 1] >> ((g & 1) * 4)) & 15


@njit(cache=True)
def _set(counters: np.ndarray, g: int, value: int) -> None:
    shift = (g & 1) * 4
    counters[g >> 1] = (counters[g >> 1] & ~(15 << shift)) | (value << shift)


@njit(cache=True)
def _positions(key: int, seed: np.uint64, width: int, out: np.ndarray) -> None:
    """Counter of ``key`` in each hash row; the rows are laid out one after another."""
    h = mix64(np.uint64(key) ^ seed)
    for j in range(out.size):
        out[j] = j * width + reduce_range(h >> _S32, width)
        h = mix64(h + GOLDEN)


@njit(cache=True)
def _count(counters: np.ndarray, seed: np.uint64, width: int, n_hashes: int, ids: np.ndarray, add: bool,
           out: np.ndarray) -> None:
    pos = np.empty(n_hashes, dtype=np.int64)
    for i in range(ids.size):
        _positions(ids[i], seed, width, pos)
        est = 15
        for j in range(n_hashes):
            est = min(est, _get(counters, pos[j]))
        if add and est < 15:
            # Conservative update: raise only the counters below the new estimate. Every
            # counter of an id still bounds its true count from above (no undercount), and
            # the other ids sharing them are inflated less than by incrementing all.
            est += 1
            for j in range(n_hashes):
                if _get(counters, pos[j]) < est:
                    _set(counters, pos[j], est)
        out[i] = est


@njit(cache=True)
def _bernoulli(rng: np.ndarray, p: float, out: np.ndarray) -> None:
    for i in range(out.size):
        out[i] = unit_float(next_random(rng)) < p


@dataclass(frozen=True)
class FilterConfig:
    """Which admission filter a table uses, and its parameters.

    Args:
        kind: ``"none"`` (admit every id on first sight), ``"counting"`` or ``"probabilistic"``.
        threshold: counting: occurrences (1..15) at which an id is admitted.
        width: counting: 4-bit counters per hash row (``n_hashes * width / 2`` bytes in all).
            Overcounting stays rare while the distinct ids between two expiries are well
            below ``width``.
        n_hashes: counting: hash rows; an id's count is the minimum of its counters.
        probability: probabilistic: chance that one occurrence admits the id.
        seed: hashes (counting) or random draws (probabilistic).

    Example::

        >>> FilterConfig(kind="counting", threshold=16)
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: threshold must be in [1, 15] (4-bit counters), got 16
    """

    kind: str = "none"
    threshold: int = 3
    width: int = 2**20
    n_hashes: int = 3
    probability: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FILTER_KINDS:
            raise ConfigError(f"filter kind must be one of {', '.join(FILTER_KINDS)}, got {self.kind!r}")
        if not 1 <= self.threshold <= MAX_COUNT:
            raise ConfigError(f"threshold must be in [1, {MAX_COUNT}] (4-bit counters), got {self.threshold}")
        if not 1 <= self.width <= 2**32:
            raise ConfigError(f"width must be in [1, 2**32], got {self.width}")
        if not 1 <= self.n_hashes <= 16:
            raise ConfigError(f"n_hashes must be in [1, 16], got {self.n_hashes}")
        if not 0 < self.probability <= 1:
            raise ConfigError(f"probability must be in (0, 1], got {self.probability}")
        if not 0 <= self.seed < 2**64:
            raise ConfigError(f"seed must be in [0, 2**64), got {self.seed}")


class CountingFilter:
    """Count-min sketch of saturating 4-bit counters; admits an id at its ``threshold``-th occurrence.

    Estimates never undercount (``count(id) >= min(true count, 15)``) and may overcount when
    ids share counters, which can only admit an id early.

    Args:
        cfg: ``threshold``, ``width``, ``n_hashes`` and ``seed`` are used.

    Example::

        >>> f = CountingFilter(FilterConfig(kind="counting", threshold=2, width=64))
        >>> f.admit([7, 8, 7, 7]).tolist()  # 7 is admitted from its second occurrence on
        [False, False, True, True]
        >>> f.count([7, 8, 9]).tolist()
        [3, 1, 0]
    """

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg
        self._seed = np.uint64(cfg.seed)
        self._counters = np.zeros((cfg.n_hashes * cfg.width + 1) // 2, dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        return self._counters.nbytes

    def count(self, ids: object) -> np.ndarray:
        """Estimated occurrences of each id so far (uint8, 0..15, flat)."""
        return self._run(ids, add=False)

    def add(self, ids: object) -> np.ndarray:
        """Count one occurrence per element, in order; returns each id's estimate just after it (flat)."""
        return self._run(ids, add=True)

    def admit(self, ids: object) -> np.ndarray:
        """Count the occurrences; True where the id has reached the threshold (flat bool)."""
        return self.add(ids) >= self.cfg.threshold

    def _run(self, ids: object, add: bool) -> np.ndarray:
        flat = as_id_array(ids)
        out = np.empty(flat.size, dtype=np.uint8)
        _count(self._counters, self._seed, self.cfg.width, self.cfg.n_hashes, flat, add, out)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"counters": self._counters}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` output (copies).

        Raises:
            ValueError: the counters do not match this configuration.
        """
        counters = np.asarray(state["counters"])
        if counters.shape != self._counters.shape or counters.dtype != np.uint8:
            raise ValueError(f"filter counters {counters.dtype}{counters.shape} do not match "
                             f"uint8{self._counters.shape}")
        self._counters = counters.copy()


class ProbabilisticFilter:
    """Admits each occurrence of an unadmitted id with probability ``cfg.probability``.

    Args:
        cfg: ``probability`` and ``seed`` are used.

    Example::

        >>> ProbabilisticFilter(FilterConfig(kind="probabilistic", probability=1.0)).admit([1, 2]).tolist()
        [True, True]
    """

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg
        self._rng = np.array([cfg.seed], dtype=np.uint64)

    @property
    def nbytes(self) -> int:
        return self._rng.nbytes

    def admit(self, ids: object) -> np.ndarray:
        """One independent draw per element (flat bool)."""
        out = np.empty(as_id_array(ids).size, dtype=np.bool_)
        _bernoulli(self._rng, self.cfg.probability, out)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"rng": self._rng}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` output (copies).

        Raises:
            ValueError: the generator state is not one uint64.
        """
        rng = np.asarray(state["rng"])
        if rng.shape != (1,) or rng.dtype != np.uint64:
            raise ValueError(f"filter generator state must be uint64 of shape (1,), got {rng.dtype}{rng.shape}")
        self._rng = rng.copy()


AdmissionFilter = CountingFilter | ProbabilisticFilter


def make_filter(cfg: FilterConfig) -> AdmissionFilter | None:
    """The filter ``cfg`` describes; None for ``kind="none"`` (every id is admitted at once).

    Example::

        >>> type(make_filter(FilterConfig(kind="counting", width=8))).__name__
        'CountingFilter'
    """
    if cfg.kind == "counting":
        return CountingFilter(cfg)
    if cfg.kind == "probabilistic":
        return ProbabilisticFilter(cfg)
    return None
