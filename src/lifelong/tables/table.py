"""Collision-less embedding table of one feature slot: rows, admission, expiry, sparse optimizer, export.

An :class:`EmbeddingTable` keeps one fp32 row per admitted raw id, found through a
:class:`~lifelong.tables.cuckoo.CuckooIndex`, so two ids never share a vector (unlike
``id mod buckets`` tables). Rows live in one contiguous array that grows geometrically; next
to each row the table keeps the time of its last update and its optimizer state (Adagrad
accumulator, or Adam moments and step count), so that a row trains exactly as if it had its own
dense optimizer, however rarely it is touched.

Life of an id:

- *unseen / filtered*: lookups read the shared default vector (zeros, or a learned vector
  trained by the gradients of every unadmitted id); each occurrence is shown to the admission
  filter (:mod:`lifelong.tables.filters`);
- *admitted*: it gets a row, initialised from a hash of (id, seed) (reproducible and
  independent of arrival order), stamped with the current time;
- *trained*: :meth:`EmbeddingTable.apply_gradients` sums the batch's gradients per id and
  applies the sparse optimizer to those rows only, stamping them;
- *expired*: :meth:`EmbeddingTable.expire` drops ids whose row was not updated for
  ``ttl_ms``; the row goes to the free list and is re-initialised when reused. The filter's
  counters are not reset, so a frequent id that expired is re-admitted on its next occurrence.

Serving reads :meth:`EmbeddingTable.export` (fp16, or int8 with one scale per row);
``since_ms`` restricts it to rows updated since the last push.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from lifelong.core.config import build
from lifelong.core.errors import ConfigError, DataError
from lifelong.data.io import atomic_output_dir, write_json
from lifelong.tables.cuckoo import GOLDEN, CuckooConfig, CuckooIndex, as_id_array, mix64, unit_float
from lifelong.tables.filters import FilterConfig, make_filter

FORMAT = "lifelong.tables.table/1"
OPTIMIZERS = ("adagrad", "adam")
DEFAULTS = ("zeros", "learned")
EXPORT_FORMATS = ("fp32", "fp16", "int8")

# torch's default eps of each optimizer, used when OptimizerConfig.eps is None.
_TORCH_EPS = {"adagrad": 1e-10, "adam": 1e-8}


@dataclass(frozen=True)
class OptimizerConfig:
    """Per-row sparse optimizer, with torch's update rules (``torch.optim.Adagrad`` / ``Adam``).

    Args:
        kind: ``"adagrad"`` or ``"adam"``.
        lr: learning rate.
        eps: added to the denominator; None takes torch's default (1e-10 Adagrad, 1e-8 Adam).
        initial_accumulator_value: Adagrad's accumulator of a new row.
        beta1, beta2: Adam's decay rates of the first and second moments.

    Example::

        >>> OptimizerConfig(kind="adam").eps_value
        1e-08
    """

    kind: str = "adagrad"
    lr: float = 0.01
    eps: float | None = None
    initial_accumulator_value: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise ConfigError(f"optimizer kind must be one of {', '.join(OPTIMIZERS)}, got {self.kind!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.eps is not None and not self.eps > 0:
            raise ConfigError(f"eps must be > 0, got {self.eps}")
        if self.initial_accumulator_value < 0:
            raise ConfigError(f"initial_accumulator_value must be >= 0, got {self.initial_accumulator_value}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")

    @property
    def eps_value(self) -> float:
        return _TORCH_EPS[self.kind] if self.eps is None else self.eps


@dataclass(frozen=True)
class TableConfig:
    """One feature slot's embedding table.

    Args:
        dim: width of a row.
        ttl_ms: :meth:`EmbeddingTable.expire` drops rows not updated for this long; None keeps
            rows forever.
        default: what unadmitted ids read: ``"zeros"``, or ``"learned"`` (one shared vector,
            starting at zero, trained by their gradients with the table's optimizer).
        init_scale: new rows are uniform in ``[-init_scale, init_scale]``.
        seed: seed of the row initialisation.
        initial_rows: row capacity before the first growth.
        row_growth: factor by which row storage grows when full (copying it once). The default
            1.125 keeps the unused capacity under 12.5% of the rows (with their timestamps and
            optimizer state) at the price of copying each row about 1 / (row_growth - 1) = 8
            times over the table's growth; :meth:`EmbeddingTable.reserve` avoids both when
            the size is known.
        index: the cuckoo index.
        filter: the admission filter.
        optimizer: the sparse optimizer.

    Example::

        >>> TableConfig(dim=8, filter=FilterConfig(kind="counting", threshold=2)).filter.threshold
        2
        >>> TableConfig(dim=0)
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: dim must be >= 1, got 0
    """

    dim: int = 16
    ttl_ms: int | None = None
    default: str = "zeros"
    init_scale: float = 0.01
    seed: int = 0
    initial_rows: int = 1024
    row_growth: float = 1.125
    index: CuckooConfig = field(default_factory=CuckooConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ConfigError(f"dim must be >= 1, got {self.dim}")
        if self.ttl_ms is not None and self.ttl_ms < 0:
            raise ConfigError(f"ttl_ms must be >= 0 or None, got {self.ttl_ms}")
        if self.default not in DEFAULTS:
            raise ConfigError(f"default must be one of {', '.join(DEFAULTS)}, got {self.default!r}")
        if self.init_scale < 0:
            raise ConfigError(f"init_scale must be >= 0, got {self.init_scale}")
        if not 0 <= self.seed < 2**64:
            raise ConfigError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.initial_rows < 1:
            raise ConfigError(f"initial_rows must be >= 1, got {self.initial_rows}")
        if not self.row_growth > 1:
            raise ConfigError(f"row_growth must be > 1, got {self.row_growth}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TableConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: unknown or invalid fields.
        """
        return build(cls, d)


@dataclass(frozen=True)
class ExportedRows:
    """Rows of a table as served: sorted ids, compressed values, and the default vector.

    Args:
        ids: (n,) int64, ascending.
        values: (n, dim) float32, float16 or int8.
        scale: (n,) float32 for int8 (``row ~= values * scale``), else None.
        updated_ms: (n,) last update of each row.
        default: (dim,) float32, what unknown ids read.
    """

    ids: np.ndarray
    values: np.ndarray
    scale: np.ndarray | None
    updated_ms: np.ndarray
    default: np.ndarray

    def dequantize(self) -> np.ndarray:
        """(n, dim) float32 rows."""
        if self.scale is not None:
            return self.values.astype(np.float32) * self.scale[:, None]
        return self.values.astype(np.float32)


@njit(cache=True)
def _init_rows(weights: np.ndarray, rows: np.ndarray, ids: np.ndarray, seed: np.uint64, scale: float) -> None:
    for i in range(rows.size):
        h = mix64(np.uint64(ids[i]) ^ seed)
        for j in range(weights.shape[1]):
            h = mix64(h + GOLDEN)
            weights[rows[i], j] = (2.0 * unit_float(h) - 1.0) * scale


@njit(cache=True)
def _adagrad(w: np.ndarray, acc: np.ndarray, rows: np.ndarray, g: np.ndarray, lr: float, eps: float) -> None:
    for i in range(rows.size):
        r = rows[i]
        for j in range(w.shape[1]):
            acc[r, j] += g[i, j] * g[i, j]
            w[r, j] -= lr * g[i, j] / (np.sqrt(acc[r, j]) + eps)


@njit(cache=True)
def _adam(w: np.ndarray, m: np.ndarray, v: np.ndarray, step: np.ndarray, rows: np.ndarray, g: np.ndarray,
          lr: float, beta1: float, beta2: float, eps: float) -> None:
    for i in range(rows.size):
        r = rows[i]
        step[r] += 1
        # Bias corrections use the row's own step count: a row touched k times has seen k
        # updates, whatever happened to the other rows meanwhile.
        step_size = lr / (1.0 - beta1 ** step[r])
        bc2_sqrt = math.sqrt(1.0 - beta2 ** step[r])
        for j in range(w.shape[1]):
            m[r, j] += (g[i, j] - m[r, j]) * (1.0 - beta1)
            v[r, j] = v[r, j] * beta2 + (1.0 - beta2) * g[i, j] * g[i, j]
            w[r, j] -= step_size * m[r, j] / (np.sqrt(v[r, j]) / bc2_sqrt + eps)


def _new_state(opt: OptimizerConfig, n: int, dim: int) -> dict[str, np.ndarray]:
    if opt.kind == "adagrad":
        return {"acc": np.full((n, dim), opt.initial_accumulator_value, dtype=np.float32)}
    return {"m": np.zeros((n, dim), np.float32), "v": np.zeros((n, dim), np.float32), "step": np.zeros(n, np.int64)}


class EmbeddingTable:
    """Collision-less, growable embedding table with admission, expiry and a per-row optimizer.

    Args:
        cfg: the slot's configuration.

    Example::

        >>> table = EmbeddingTable(TableConfig(dim=2, ttl_ms=1_000, filter=FilterConfig(kind="counting", threshold=2)))
        >>> table.admit([5, 5, 8], now_ms=0).tolist()  # 5 is admitted at its 2nd occurrence; 8 not yet
        [0, 0, -1]
        >>> table.vectors(table.lookup([8])).tolist()  # unadmitted: the default (zeros)
        [[0.0, 0.0]]
        >>> table.apply_gradients([5, 5], np.ones((2, 2), np.float32), now_ms=500)
        1
        >>> table.expire(now_ms=1_400).tolist(), table.expire(now_ms=1_500).tolist()
        ([], [5])
    """

    def __init__(self, cfg: TableConfig):
        self.cfg = cfg
        self.index = CuckooIndex(cfg.index)
        self.filter = make_filter(cfg.filter)
        self._seed = np.uint64(cfg.seed)
        self.weights = np.zeros((cfg.initial_rows, cfg.dim), dtype=np.float32)
        self.updated_ms = np.zeros(cfg.initial_rows, dtype=np.int64)
        self.state = _new_state(cfg.optimizer, cfg.initial_rows, cfg.dim)
        self.default = np.zeros(cfg.dim, dtype=np.float32)
        self.default_state = _new_state(cfg.optimizer, 1, cfg.dim)
        self.clock_ms = 0  # latest time seen; the timestamp of rows admitted without an explicit time

    def __len__(self) -> int:
        return len(self.index)

    @property
    def dim(self) -> int:
        return self.cfg.dim

    @property
    def capacity(self) -> int:
        return self.weights.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held: index, filter, rows, timestamps and optimizer state (capacity, not just live rows)."""
        arrays = [self.weights, self.updated_ms, self.default, *self.state.values(), *self.default_state.values()]
        return self.index.nbytes + (self.filter.nbytes if self.filter else 0) + sum(a.nbytes for a in arrays)

    def reserve(self, n_ids: int) -> None:
        """Make room now for ``n_ids`` live ids: the index and exactly that many rows, so that
        filling the table up to that size grows nothing and leaves no unused capacity.

        Example::

            >>> table = EmbeddingTable(TableConfig(dim=4))
            >>> table.reserve(5_000); table.capacity
            5000
            >>> _ = table.admit(np.arange(5_000)); table.capacity
            5000
        """
        self.index.reserve(n_ids)
        if n_ids > self.capacity:
            self._resize(n_ids)

    def lookup(self, ids: object) -> np.ndarray:
        """Row of each id (same shape), -1 where the id has none. Counts nothing, inserts nothing."""
        return self.index.lookup(ids)

    def admit(self, ids: object, now_ms: int | None = None) -> np.ndarray:
        """Rows of ``ids`` (same shape), after showing the ids without a row to the filter.

        Ids the filter admits get a fresh row stamped ``now_ms`` (default: :attr:`clock_ms`);
        the rest read -1 (the default vector).

        Args:
            ids: int64 ids, any shape; repeats count as separate occurrences.
            now_ms: current time.
        """
        now = self._tick(now_ms)
        flat = as_id_array(ids)
        rows = self.index.lookup(flat)
        miss = rows < 0
        if miss.any():
            cand = flat[miss]
            new_ids = np.unique(cand if self.filter is None else cand[self.filter.admit(cand)])
            if new_ids.size:
                new_rows = self.index.insert(new_ids)
                self._reset_rows(new_rows, new_ids, now)
                rows[miss] = self.index.lookup(cand)
        return rows.reshape(np.shape(ids))

    def vectors(self, rows: object) -> np.ndarray:
        """Float32 copies of rows (shape + (dim,)); row -1 reads the default vector."""
        r = np.asarray(rows, dtype=np.int64)
        out = self.weights[np.maximum(r, 0)]
        out[r < 0] = self.default
        return out

    def apply_gradients(self, ids: object, grads: object, now_ms: int) -> int:
        """One sparse optimizer step on the rows of ``ids``; returns how many rows moved.

        Gradients of repeated ids are summed first, as a dense embedding's backward would.
        Ids without a row send their gradients to the default vector when it is learned, and
        nowhere otherwise. Updated rows are stamped ``now_ms``.

        Args:
            ids: int64 ids, any shape.
            grads: float gradients of shape ``ids.shape + (dim,)``.
            now_ms: current time.

        Raises:
            ValueError: ``grads`` has the wrong shape.
        """
        now = self._tick(now_ms)
        flat = as_id_array(ids)
        g = np.asarray(grads, dtype=np.float32)
        if g.shape != (*np.shape(ids), self.dim):
            raise ValueError(f"grads must have shape ids.shape + (dim,) = {(*np.shape(ids), self.dim)}, got {g.shape}")
        g = g.reshape(flat.size, self.dim)
        rows = self.index.lookup(flat)
        hit = rows >= 0
        uniq, inv = np.unique(rows[hit], return_inverse=True)
        summed = np.zeros((uniq.size, self.dim), dtype=np.float32)
        np.add.at(summed, inv, g[hit])
        self._step(self.weights, self.state, uniq, summed)
        self.updated_ms[uniq] = now
        if self.cfg.default == "learned" and not hit.all():
            self._step(self.default[None], self.default_state, np.zeros(1, np.int64), g[~hit].sum(0, keepdims=True))
        return int(uniq.size)

    def remove(self, ids: object) -> np.ndarray:
        """Drop ids now (their rows are freed); returns the freed rows, -1 where absent."""
        return self.index.remove(ids)

    def assign(self, ids: object, values: object, now_ms: int | None = None) -> int:
        """Set the rows of ``ids`` to ``values``, giving ids without a row one (the filter is not asked).

        How a serving copy of a table applies a pushed delta in place: rows are written, never
        trained (optimizer state of new rows starts fresh). Returns how many ids got a new row.

        Example::

            >>> table = EmbeddingTable(TableConfig(dim=2, filter=FilterConfig(kind="counting", threshold=9)))
            >>> table.assign([7, 3], np.array([[1, 2], [3, 4]], np.float16))
            2
            >>> table.vectors(table.lookup([3, 7, 5])).tolist()
            [[3.0, 4.0], [1.0, 2.0], [0.0, 0.0]]
        """
        now = self._tick(now_ms)
        flat = as_id_array(ids)
        v = np.asarray(values, dtype=np.float32).reshape(flat.size, self.dim)
        rows = self.index.lookup(flat)
        miss = rows < 0
        if miss.any():
            new_ids = flat[miss]
            new_rows = self.index.insert(new_ids)
            self._reset_rows(new_rows, new_ids, now)
            rows[miss] = new_rows
        self.weights[rows] = v
        self.updated_ms[rows] = now
        return int(miss.sum())

    def expire(self, now_ms: int) -> np.ndarray:
        """Remove every id whose row was last updated at or before ``now_ms - ttl_ms``; returns those ids.

        With ``ttl_ms=None`` nothing expires.
        """
        self._tick(now_ms)
        if self.cfg.ttl_ms is None:
            return np.zeros(0, dtype=np.int64)
        ids, rows = self.index.items()
        stale = ids[self.updated_ms[rows] <= now_ms - self.cfg.ttl_ms]
        self.index.remove(stale)
        return np.sort(stale)

    def export(self, fmt: str = "fp16", since_ms: int | None = None) -> ExportedRows:
        """The live rows for serving, sorted by id.

        Args:
            fmt: ``"fp32"``, ``"fp16"`` or ``"int8"`` (symmetric, one scale per row:
                ``scale = max|row| / 127``; the error per value is at most ``scale / 2``).
            since_ms: only rows updated at or after this time (an incremental push).

        Raises:
            ConfigError: unknown format.
        """
        if fmt not in EXPORT_FORMATS:
            raise ConfigError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
        ids, rows = self.index.items()
        if since_ms is not None:
            keep = self.updated_ms[rows] >= since_ms
            ids, rows = ids[keep], rows[keep]
        order = np.argsort(ids)
        ids, rows = ids[order], rows[order]
        w = self.weights[rows]
        scale = None
        if fmt == "int8":
            peak = np.abs(w).max(axis=1)
            scale = np.where(peak > 0, peak / 127, 1.0).astype(np.float32)
            values = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
        else:
            values = w.astype(np.float16 if fmt == "fp16" else np.float32)
        return ExportedRows(ids=ids, values=values, scale=scale, updated_ms=self.updated_ms[rows],
                            default=self.default.copy())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the whole table (config, index, free list, filter, rows, timestamps, optimizer
        state) to a directory of ``.npy`` files and ``table.json``, replacing it atomically.

        Only the rows handed out so far are written; :meth:`load` gives back an equal table.
        """
        meta, arrays = self.state_dict()
        with atomic_output_dir(path) as tmp:
            for name, arr in arrays.items():
                np.save(tmp / f"{name}.npy", arr)
            write_json(meta, tmp / "table.json")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EmbeddingTable:
        """Read a table written by :meth:`save`.

        Raises:
            DataError: the directory is missing, of another format, or inconsistent.
        """
        path = Path(path)
        try:
            meta = json.loads((path / "table.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(path, f"not a saved embedding table: {exc}") from exc
        if meta.get("format") != FORMAT:
            raise DataError(path, f"format {meta.get('format')!r} is not {FORMAT!r}")
        try:
            arrays = {name: np.load(path / f"{name}.npy") for name in meta["arrays"]}
            table = cls(TableConfig.from_dict(meta["config"]))
            table.load_state_dict(meta, arrays)
        except (OSError, KeyError, ValueError, ConfigError) as exc:
            raise DataError(path, f"cannot load embedding table: {exc}") from exc
        return table

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able metadata, arrays) describing the table exactly; rows beyond ``n_rows`` are left out.

        The arrays are views of the table's own: copy them before changing the table.
        """
        n = self.index.n_rows
        arrays = {f"index.{k}": v for k, v in self.index.state_dict().items()}
        if self.filter is not None:
            arrays.update({f"filter.{k}": v for k, v in self.filter.state_dict().items()})
        arrays.update({"weights": self.weights[:n], "updated_ms": self.updated_ms[:n], "default": self.default})
        arrays.update({f"opt.{k}": v[:n] for k, v in self.state.items()})
        arrays.update({f"default_opt.{k}": v for k, v in self.default_state.items()})
        meta = {"format": FORMAT, "config": self.cfg.to_dict(), "clock_ms": self.clock_ms, "arrays": sorted(arrays)}
        return meta, arrays

    def load_state_dict(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` output (copies the arrays).

        Raises:
            ValueError: the arrays do not fit this table's configuration.
        """
        self.index.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("index.")})
        if self.filter is not None:
            self.filter.load_state_dict({k[7:]: v for k, v in arrays.items() if k.startswith("filter.")})
        n, dim = self.index.n_rows, self.dim
        expected = {"weights": (n, dim), "updated_ms": (n,), "default": (dim,)}
        expected.update({f"opt.{k}": (n, *v.shape[1:]) for k, v in self.state.items()})
        expected.update({f"default_opt.{k}": v.shape for k, v in self.default_state.items()})
        for name, shape in expected.items():
            if name not in arrays or np.shape(arrays[name]) != shape:
                raise ValueError(f"array {name!r} should have shape {shape}, got "
                                 f"{np.shape(arrays[name]) if name in arrays else 'nothing'}")
        _, rows = self.index.items()
        if rows.size and rows.max() >= n:
            raise ValueError(f"index points at row {rows.max()} beyond the {n} saved rows")
        cap = max(n, 1)
        self.weights = np.zeros((cap, dim), np.float32)
        self.updated_ms = np.zeros(cap, np.int64)
        self.state = _new_state(self.cfg.optimizer, cap, dim)
        self.weights[:n], self.updated_ms[:n] = arrays["weights"], arrays["updated_ms"]
        for k, v in self.state.items():
            v[:n] = arrays[f"opt.{k}"]
        self.default = np.array(arrays["default"], dtype=np.float32)
        self.default_state = {k: np.array(arrays[f"default_opt.{k}"], dtype=v.dtype)
                              for k, v in self.default_state.items()}
        self.clock_ms = int(meta["clock_ms"])

    def _tick(self, now_ms: int | None) -> int:
        now = self.clock_ms if now_ms is None else int(now_ms)
        self.clock_ms = max(self.clock_ms, now)
        return now

    def _reset_rows(self, rows: np.ndarray, ids: np.ndarray, now: int) -> None:
        """Start (or restart, for a reused row) new rows: initial vector, fresh optimizer state, stamped now."""
        need = self.index.n_rows
        if need > self.capacity:
            self._resize(max(need, math.ceil(self.capacity * self.cfg.row_growth), self.cfg.initial_rows))
        _init_rows(self.weights, rows, ids, self._seed, self.cfg.init_scale)
        self.updated_ms[rows] = now
        for k, v in _new_state(self.cfg.optimizer, 1, self.dim).items():
            self.state[k][rows] = v[0]

    def _resize(self, cap: int) -> None:
        def grown(a: np.ndarray) -> np.ndarray:
            out = np.zeros((cap, *a.shape[1:]), dtype=a.dtype)
            out[: a.shape[0]] = a
            return out

        self.weights, self.updated_ms = grown(self.weights), grown(self.updated_ms)
        self.state = {k: grown(v) for k, v in self.state.items()}

    def _step(self, w: np.ndarray, state: dict[str, np.ndarray], rows: np.ndarray, g: np.ndarray) -> None:
        opt = self.cfg.optimizer
        if opt.kind == "adagrad":
            _adagrad(w, state["acc"], rows, g, opt.lr, opt.eps_value)
        else:
            _adam(w, state["m"], state["v"], state["step"], rows, g, opt.lr, opt.beta1, opt.beta2, opt.eps_value)
