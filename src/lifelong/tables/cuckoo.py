"""Cuckoo hash index: raw int64 ids to stable row numbers, growing without collisions.

Every id lives in one slot of one of two candidate buckets (``slots`` slots each) chosen by
two hashes of the id. A new id takes a free slot in either bucket; when both are full it
evicts a random occupant, which moves to its other bucket, and so on for at most
``max_kicks`` moves (a random-walk cuckoo insert). When the walk fails, or the load would pass
``max_load``, the bucket array grows by ``growth`` and every entry is re-placed. The index
maps ids to *rows* of the caller's storage: a row is assigned once, when the id is inserted,
and never changes while the id is live; growing moves entries between slots, never between
rows. Removed ids give their rows back through a free list (LIFO), so storage stays dense.

Memory is 12 bytes per slot (int64 key + int32 row; an empty slot holds row -1, so any int64
is a valid id), i.e. ``12 / load`` bytes per id, plus 8 bytes per freed-and-not-reused row.
The hot loops (lookup, insert, remove, rehash) are numba-compiled over whole batches; Python
only runs once per batch and once per growth. ``cache=True`` keeps the compiled code on disk,
so only the first call on a machine pays the few seconds of JIT compilation. (Numba checks a
cached function against its own file only: after editing a helper here that
``filters.py`` or ``table.py`` calls, delete their ``__pycache__/*.nb*`` files.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from lifelong.core.errors import ConfigError

# splitmix64 constants. Numba types a bare Python int in a shift or product with a uint64 as
# int64 and promotes the pair to float64, so every constant is a uint64 scalar.
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S11, _S27, _S30, _S31, _S32 = np.uint64(11), np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)

MAX_ROWS = 2**31 - 1  # rows are stored as int32 in the slots
MAX_BUCKETS = 2**32 - 1  # multiply-shift reduction takes 32 hash bits per bucket choice


@njit(cache=True)
def mix64(x: np.uint64) -> np.uint64:
    """The splitmix64 finalizer: a cheap bijective 64-bit mix (every input bit moves every output bit)."""
    x = (x ^ (x >> _S30)) * _MIX1
    x = (x ^ (x >> _S27)) * _MIX2
    return x ^ (x >> _S31)


@njit(cache=True)
def next_random(rng: np.ndarray) -> np.uint64:
    """The next splitmix64 output of the generator whose 64-bit state is ``rng[0]`` (advanced in place)."""
    rng[0] += GOLDEN
    return mix64(rng[0])


@njit(cache=True)
def unit_float(h: np.uint64) -> float:
    """The top 53 bits of a hash as a float in [0, 1)."""
    return np.float64(h >> _S11) * (1.0 / 9007199254740992.0)


@njit(cache=True)
def reduce_range(h32: np.uint64, n: int) -> int:
    """Map 32 uniform hash bits onto ``[0, n)`` with a multiply and a shift (no division, any n)."""
    return np.int64((h32 * np.uint64(n)) >> _S32)


@njit(cache=True)
def _buckets(key: int, seed: np.uint64, n: int) -> tuple[int, int]:
    h = mix64(np.uint64(key) ^ seed)
    return reduce_range(h >> _S32, n), reduce_range(h & _LOW32, n)


@njit(cache=True)
def _find_slot(keys: np.ndarray, vals: np.ndarray, seed: np.uint64, key: int) -> tuple[int, int]:
    """(bucket, slot) holding ``key``, or (-1, -1)."""
    # Keys first: a miss never reads ``vals``, which sits on another cache line.
    b1, b2 = _buckets(key, seed, keys.shape[0])
    for s in range(keys.shape[1]):
        if keys[b1, s] == key and vals[b1, s] >= 0:
            return b1, s
    for s in range(keys.shape[1]):
        if keys[b2, s] == key and vals[b2, s] >= 0:
            return b2, s
    return -1, -1


@njit(cache=True)
def _place(keys: np.ndarray, vals: np.ndarray, seed: np.uint64, key: int, val: int, rng: np.ndarray,
           max_kicks: int) -> tuple[bool, int, int]:
    """Store a new (key, val), evicting along a random walk if both buckets are full.

    Returns (True, _, _) on success, else (False, key, val) of the entry left without a slot
    (not necessarily the one passed in: the walk may have displaced it into the table).
    """
    n, slots = keys.shape
    b1, b2 = _buckets(key, seed, n)
    for s in range(slots):
        if vals[b1, s] < 0:
            keys[b1, s], vals[b1, s] = key, val
            return True, key, val
    for s in range(slots):
        if vals[b2, s] < 0:
            keys[b2, s], vals[b2, s] = key, val
            return True, key, val
    b = b1 if next_random(rng) & np.uint64(1) else b2
    for _ in range(max_kicks):
        s = np.int64(next_random(rng) % np.uint64(slots))
        key, keys[b, s] = keys[b, s], key
        val, vals[b, s] = vals[b, s], val
        c1, c2 = _buckets(key, seed, n)
        b = c2 if c1 == b else c1
        for s in range(slots):
            if vals[b, s] < 0:
                keys[b, s], vals[b, s] = key, val
                return True, key, val
    return False, key, val


@njit(cache=True, nogil=True)
def _lookup(keys: np.ndarray, vals: np.ndarray, seed: np.uint64, ids: np.ndarray, out: np.ndarray) -> None:
    for i in range(ids.size):
        b, s = _find_slot(keys, vals, seed, ids[i])
        out[i] = vals[b, s] if b >= 0 else -1


@njit(cache=True)
def _insert(keys: np.ndarray, vals: np.ndarray, seed: np.uint64, free: np.ndarray, meta: np.ndarray,
            rng: np.ndarray, ids: np.ndarray, out: np.ndarray, start: int, max_size: int,
            max_kicks: int) -> tuple[int, int, int, int]:
    """Insert ``ids[start:]``; ``meta`` is [size, n_rows, n_free], updated in place.

    Returns (status, next position, homeless key, homeless row): status 0 when all are in;
    1 when ``ids[position]`` is new and the load limit is reached; 2 when the random walk
    failed, leaving the returned entry (already counted as live) without a slot.
    """
    for i in range(start, ids.size):
        key = ids[i]
        b, s = _find_slot(keys, vals, seed, key)
        if b >= 0:
            out[i] = vals[b, s]
            continue
        if meta[0] >= max_size:
            return 1, i, 0, -1
        if meta[2] > 0:
            meta[2] -= 1
            row = free[meta[2]]
        else:
            row = meta[1]
            meta[1] += 1
        meta[0] += 1
        out[i] = row
        ok, hk, hv = _place(keys, vals, seed, key, row, rng, max_kicks)
        if not ok:
            return 2, i + 1, hk, hv
    return 0, ids.size, 0, -1


@njit(cache=True)
def _remove(keys: np.ndarray, vals: np.ndarray, seed: np.uint64, free: np.ndarray, meta: np.ndarray,
            ids: np.ndarray, out: np.ndarray) -> None:
    for i in range(ids.size):
        b, s = _find_slot(keys, vals, seed, ids[i])
        if b < 0:
            out[i] = -1
            continue
        out[i] = vals[b, s]
        vals[b, s] = -1
        free[meta[2]] = out[i]
        meta[2] += 1
        meta[0] -= 1


@njit(cache=True)
def _rehash(old_keys: np.ndarray, old_vals: np.ndarray, keys: np.ndarray, vals: np.ndarray, seed: np.uint64,
            rng: np.ndarray, max_kicks: int, homeless_key: int, homeless_val: int) -> bool:
    """Place every live entry of the old arrays (and the homeless one, if its row is >= 0) in the new ones."""
    for b in range(old_keys.shape[0]):
        for s in range(old_keys.shape[1]):
            if old_vals[b, s] >= 0:
                ok, _, _ = _place(keys, vals, seed, old_keys[b, s], old_vals[b, s], rng, max_kicks)
                if not ok:
                    return False
    if homeless_val >= 0:
        ok, _, _ = _place(keys, vals, seed, homeless_key, homeless_val, rng, max_kicks)
        return ok
    return True


@njit(cache=True)
def _entries(keys: np.ndarray, vals: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> None:
    k = 0
    for b in range(keys.shape[0]):
        for s in range(keys.shape[1]):
            if vals[b, s] >= 0:
                ids[k], rows[k] = keys[b, s], vals[b, s]
                k += 1


def as_id_array(ids: object) -> np.ndarray:
    """``ids`` (any shape; a numpy array, a CPU tensor or a list) as a flat contiguous int64 array.

    Raises:
        ValueError: the values are not integers.

    Example::

        >>> as_id_array([[1, 2], [3, -4]])
        array([ 1,  2,  3, -4])
    """
    arr = np.asarray(ids)
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
    # uint64 ids above 2**63 wrap to negative int64: still one distinct key per id.
    return np.ascontiguousarray(arr.reshape(-1).astype(np.int64, copy=False))


@dataclass(frozen=True)
class CuckooConfig:
    """Shape and growth policy of a :class:`CuckooIndex`.

    Args:
        initial_buckets: buckets before the first growth (small values make tests grow often).
        slots: slots per bucket; 4 lets two-choice cuckoo hashing run above 90% load.
        max_load: grow before the live ids would exceed this fraction of all slots.
        growth: factor applied to the bucket count on each growth (any count works: buckets are
            chosen by multiply-shift, not a power-of-two mask). 1.5 keeps the load between
            ``max_load / 1.5`` and ``max_load``, i.e. 13 to 20 bytes per id at the defaults.
        max_kicks: longest eviction walk before the insert gives up and grows the table.
        seed: hash seed.

    Example::

        >>> CuckooConfig(initial_buckets=4).slots
        4
        >>> CuckooConfig(max_load=1.5)
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: max_load must be in (0, 1), got 1.5
    """

    initial_buckets: int = 64
    slots: int = 4
    max_load: float = 0.9
    growth: float = 1.5
    max_kicks: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.initial_buckets <= MAX_BUCKETS:
            raise ConfigError(f"initial_buckets must be in [1, {MAX_BUCKETS}], got {self.initial_buckets}")
        if not 1 <= self.slots <= 64:
            raise ConfigError(f"slots must be in [1, 64], got {self.slots}")
        if not 0 < self.max_load < 1:
            raise ConfigError(f"max_load must be in (0, 1), got {self.max_load}")
        if not self.growth > 1:
            raise ConfigError(f"growth must be > 1, got {self.growth}")
        if self.max_kicks < 1:
            raise ConfigError(f"max_kicks must be >= 1, got {self.max_kicks}")
        if not 0 <= self.seed < 2**64:
            raise ConfigError(f"seed must be in [0, 2**64), got {self.seed}")


class CuckooIndex:
    """Batched map from raw int64 ids to row numbers ``0 .. n_rows - 1``; absent ids read -1.

    Args:
        cfg: bucket shape and growth policy.

    Example::

        >>> index = CuckooIndex(CuckooConfig(initial_buckets=1))
        >>> index.insert([10, -7, 10, 2**62]).tolist()  # a repeated id keeps its row
        [0, 1, 0, 2]
        >>> index.lookup([[-7, 5]]).tolist()
        [[1, -1]]
        >>> index.remove([10]).tolist(), index.insert([99]).tolist()  # row 0 is reused
        ([0], [0])
        >>> len(index), index.n_rows
        (3, 3)
    """

    def __init__(self, cfg: CuckooConfig = CuckooConfig()):
        self.cfg = cfg
        self._seed = np.uint64(cfg.seed)
        self._keys = np.zeros((cfg.initial_buckets, cfg.slots), dtype=np.int64)
        self._vals = np.full((cfg.initial_buckets, cfg.slots), -1, dtype=np.int32)
        self._free = np.zeros(0, dtype=np.int64)
        self._meta = np.zeros(3, dtype=np.int64)  # live ids, rows ever handed out, rows on the free list
        self._rng = np.array([cfg.seed], dtype=np.uint64)  # eviction choices

    def __len__(self) -> int:
        return int(self._meta[0])

    @property
    def n_rows(self) -> int:
        """Rows handed out so far (live or free): the caller's storage needs this many."""
        return int(self._meta[1])

    @property
    def n_free(self) -> int:
        """Rows on the free list, reused (last freed first) before new rows are handed out."""
        return int(self._meta[2])

    @property
    def n_buckets(self) -> int:
        return self._keys.shape[0]

    @property
    def load(self) -> float:
        """Live ids over slots."""
        return len(self) / self._keys.size

    @property
    def nbytes(self) -> int:
        """Bytes held by the index (slots and free list)."""
        return self._keys.nbytes + self._vals.nbytes + self._free.nbytes

    def lookup(self, ids: object) -> np.ndarray:
        """Row of each id (same shape as ``ids``), -1 where absent."""
        flat = as_id_array(ids)
        out = np.empty(flat.size, dtype=np.int64)
        _lookup(self._keys, self._vals, self._seed, flat, out)
        return out.reshape(np.shape(ids))

    def insert(self, ids: object) -> np.ndarray:
        """Insert the absent ids (in order, so repeats share one row) and return every id's row.

        Ids already present keep their row. Grows (and re-places all entries) as often as needed.
        """
        flat = as_id_array(ids)
        if self.n_rows + flat.size - self.n_free > MAX_ROWS:
            raise ValueError(f"a CuckooIndex holds at most {MAX_ROWS} rows")
        out = np.empty(flat.size, dtype=np.int64)
        start = 0
        while True:
            max_size = int(self.cfg.max_load * self._keys.size)
            status, start, hk, hv = _insert(self._keys, self._vals, self._seed, self._free, self._meta, self._rng,
                                            flat, out, start, max_size, self.cfg.max_kicks)
            if status == 0:
                return out.reshape(np.shape(ids))
            self._rehash(self._next_size(self.n_buckets), hk, hv)

    def remove(self, ids: object) -> np.ndarray:
        """Remove ids; returns the row each one freed (same shape as ``ids``), -1 where absent."""
        flat = as_id_array(ids)
        if self.n_free + flat.size > self._free.size:
            grown = np.zeros(max(self.n_free + flat.size, 2 * self._free.size), dtype=np.int64)
            grown[: self.n_free] = self._free[: self.n_free]
            self._free = grown
        out = np.empty(flat.size, dtype=np.int64)
        _remove(self._keys, self._vals, self._seed, self._free, self._meta, flat, out)
        return out.reshape(np.shape(ids))

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, rows) of every live entry, in slot order (no particular order)."""
        ids = np.empty(len(self), dtype=np.int64)
        rows = np.empty(len(self), dtype=np.int64)
        _entries(self._keys, self._vals, ids, rows)
        return ids, rows

    def reserve(self, n_ids: int) -> None:
        """Grow now, if needed, so that ``n_ids`` live ids fit without another growth."""
        need = math.ceil(n_ids / (self.cfg.max_load * self.cfg.slots))
        if need > self.n_buckets:
            self._rehash(need, 0, -1)

    def grow(self) -> None:
        """Grow by one step of ``cfg.growth`` (as an insert does when it runs out of room)."""
        self._rehash(self._next_size(self.n_buckets), 0, -1)

    def _next_size(self, n_buckets: int) -> int:
        return max(n_buckets + 1, math.ceil(n_buckets * self.cfg.growth))

    def _rehash(self, n_buckets: int, homeless_key: int, homeless_val: int) -> None:
        while True:
            if n_buckets > MAX_BUCKETS:
                raise ValueError(f"a CuckooIndex holds at most {MAX_BUCKETS} buckets")
            keys = np.zeros((n_buckets, self.cfg.slots), dtype=np.int64)
            vals = np.full((n_buckets, self.cfg.slots), -1, dtype=np.int32)
            if _rehash(self._keys, self._vals, keys, vals, self._seed, self._rng, self.cfg.max_kicks,
                       homeless_key, homeless_val):
                self._keys, self._vals = keys, vals
                return
            # A failed walk at the new size is rare (load is at most max_load / growth); grow more.
            n_buckets = self._next_size(n_buckets)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything that defines the index (slots, free list, counters, generator), as arrays."""
        return {"keys": self._keys, "vals": self._vals, "free": self._free[: self.n_free], "meta": self._meta,
                "rng": self._rng}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` output exactly (copies the arrays).

        Raises:
            ValueError: the arrays do not describe an index of this configuration.
        """
        keys, vals = np.asarray(state["keys"]), np.asarray(state["vals"])
        meta, free, rng = np.asarray(state["meta"]), np.asarray(state["free"]), np.asarray(state["rng"])
        if keys.ndim != 2 or keys.shape[1] != self.cfg.slots or vals.shape != keys.shape:
            raise ValueError(f"index slots of shape {keys.shape}/{vals.shape} do not match {self.cfg.slots} slots")
        if meta.shape != (3,) or rng.shape != (1,) or free.shape != (meta[2],):
            raise ValueError("index counters, generator or free list have the wrong shape")
        if int((vals >= 0).sum()) != meta[0]:
            raise ValueError(f"index holds {(vals >= 0).sum()} live slots, counters say {meta[0]}")
        if (vals.size and vals.max() >= meta[1]) or (free.size and not 0 <= free.min() <= free.max() < meta[1]):
            raise ValueError(f"index or free list points beyond the {meta[1]} rows handed out")
        self._keys = np.ascontiguousarray(keys, dtype=np.int64).copy()
        self._vals = np.ascontiguousarray(vals, dtype=np.int32).copy()
        self._free = np.asarray(free, dtype=np.int64).copy()
        self._meta = np.asarray(meta, dtype=np.int64).copy()
        self._rng = np.asarray(rng, dtype=np.uint64).copy()
