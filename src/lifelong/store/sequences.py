"""Serving records: a user's full history and the item table as flat, zero-copy blobs.

Serving (docs/design.md, "Serving") fetches a user's sequences once per request and runs the NN
search over them itself, so a record holds the user's whole stored history, not a timeline:
:meth:`UserSequences.timeline` cuts S_LL, S_RT and S_imp for any request time afterwards.

A record is one blob: a small header, then each array contiguous, every array starting on an
8-byte boundary (offset within the blob). Decoding makes ``np.frombuffer`` views over the blob
(``bytes`` from Redis, a ``memoryview`` into LMDB's memory map), never a copy, so the cost of
reading a user is the fetch. Integers are little-endian, the native order of every host
lifelong runs on, so the views need no byte swapping.

Layout of a user record (``n`` explicit actions, ``m`` bare impressions)::

    header  "LLUS", version u16, embedding dim u16, user_id i64, n i64, m i64   (32 bytes)
    ts_ms i64[n] | item i32[n] | action u16[n] | surface i8[n] | emb i8[n, dim]
    imp_ts_ms i64[m] | imp_item i32[m] | ... | imp_emb i8[m, dim]

Example::

    >>> import numpy as np
    >>> u = UserSequences.from_arrays(7, ts_ms=[10, 20], item=[3, 1], action=[2, 4], surface=[0, 1],
    ...                               emb=np.ones((2, 32)), imp_ts_ms=[15], imp_item=[2],
    ...                               imp_action=[1], imp_surface=[0], imp_emb=np.zeros((1, 32)))
    >>> blob = u.encode()
    >>> back = UserSequences.decode(blob)
    >>> back.user_id, back.ts_ms.tolist(), back.imp_item.tolist(), len(blob)
    (7, [10, 20], [2], 200)
    >>> np.shares_memory(back.emb, np.frombuffer(blob, np.uint8))
    True
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lifelong.core.errors import DataError
from lifelong.data.schema import EMBED_DIM
from lifelong.data.timelines import EventIndex

Buffer = bytes | bytearray | memoryview
"""What a record decodes from: ``bytes`` (Redis), a ``memoryview`` (LMDB), or a ``bytearray``."""

FORMAT_VERSION = 1
_USER_HEADER = struct.Struct("<4sHHqqq")  # magic, version, dim, user_id, n explicit, n impressions
_ITEM_HEADER = struct.Struct("<4sHHq")  # magic, version, dim, n items
_USER_MAGIC, _ITEM_MAGIC = b"LLUS", b"LLIT"

# (name, dtype, embedding-shaped) of one token; a user record has these for explicit actions,
# then again with "imp_" for bare impressions. dtype objects, not strings: decoding is per request.
_TOKEN_FIELDS: tuple[tuple[str, np.dtype, bool], ...] = (
    ("ts_ms", np.dtype("<i8"), False), ("item", np.dtype("<i4"), False), ("action", np.dtype("<u2"), False),
    ("surface", np.dtype("i1"), False), ("emb", np.dtype("i1"), True),
)
_USER_FIELDS = tuple((prefix + name, dtype, is_emb) for prefix in ("", "imp_") for name, dtype, is_emb in _TOKEN_FIELDS)
_ITEM_FIELDS: tuple[tuple[str, np.dtype, bool], ...] = (
    ("item_id", np.dtype("<i8"), False), ("author_id", np.dtype("<i8"), False), ("topic_id", np.dtype("<i8"), False),
    ("emb_int8", np.dtype("i1"), True),
)

Plan = list[tuple[str, np.dtype, tuple[int, ...], int, int]]
"""Where each array of a blob lives: ``(name, dtype, shape, element count, byte offset)``."""


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _plan(spec: tuple[tuple[str, np.dtype, bool], ...], rows: list[int], header_size: int) -> tuple[Plan, int]:
    """The arrays of a blob, in ``spec`` order with ``rows[i]`` rows each, and the blob's size."""
    plan, offset = [], _align8(header_size)
    for (name, dtype, is_emb), n in zip(spec, rows):
        shape, count = ((n, EMBED_DIM), n * EMBED_DIM) if is_emb else ((n,), n)
        plan.append((name, dtype, shape, count, offset))
        offset = _align8(offset + dtype.itemsize * count)
    return plan, offset


def _pack(header: bytes, plan: Plan, size: int, arrays: dict[str, np.ndarray]) -> bytes:
    blob = bytearray(size)
    blob[:len(header)] = header
    for name, dtype, shape, count, offset in plan:
        np.frombuffer(blob, dtype, count, offset).reshape(shape)[...] = arrays[name]
    return bytes(blob)


def _unpack(buf: Buffer, plan: Plan, size: int, what: str) -> dict[str, np.ndarray]:
    if len(buf) != size:
        raise DataError(what, f"corrupt record: {len(buf)} bytes, the header says {size}")
    return {name: np.frombuffer(buf, dtype, count, offset).reshape(shape) for name, dtype, shape, count, offset in plan}


def _read_header(buf: Buffer, header: struct.Struct, magic: bytes, what: str) -> tuple[Any, ...]:
    if len(buf) < header.size:
        raise DataError(what, f"corrupt record: {len(buf)} bytes, shorter than its header")
    got_magic, version, dim, *rest = header.unpack_from(buf)
    if got_magic != magic or version != FORMAT_VERSION or dim != EMBED_DIM:
        raise DataError(what, f"not a lifelong v{FORMAT_VERSION} record (magic {got_magic!r}, version {version}, "
                              f"dim {dim}): reload the store with this version of lifelong")
    return tuple(rest)


@dataclass(frozen=True)
class TimelineRanges:
    """S_LL, S_RT and S_imp of one request as index ranges into a :class:`UserSequences`.

    ``ll_lo:ll_hi`` and ``rt_lo:rt_hi`` index the explicit arrays (``ll_hi == rt_lo``: the two
    are adjacent and disjoint), ``imp_lo:imp_hi`` the impression arrays; all chronological.

    Example::

        >>> r = TimelineRanges(0, 2, 2, 5, 1, 3)
        >>> r.ll, r.rt, r.imp
        (slice(0, 2, None), slice(2, 5, None), slice(1, 3, None))
    """

    ll_lo: int
    ll_hi: int
    rt_lo: int
    rt_hi: int
    imp_lo: int
    imp_hi: int

    @property
    def ll(self) -> slice:
        """S_LL as a slice of the explicit arrays."""
        return slice(self.ll_lo, self.ll_hi)

    @property
    def rt(self) -> slice:
        """S_RT as a slice of the explicit arrays."""
        return slice(self.rt_lo, self.rt_hi)

    @property
    def imp(self) -> slice:
        """S_imp as a slice of the impression arrays."""
        return slice(self.imp_lo, self.imp_hi)


@dataclass(frozen=True, eq=False, repr=False)
class UserSequences:
    """One user's whole stored history, in the events table's order.

    Explicit actions (``action_mask & EXPLICIT_BITS != 0``) fill the first five arrays, bare
    impressions (``action_mask == IMPRESSION``) the ``imp_`` ones; other events are not kept.
    Arrays decoded from a store are read-only views into the fetched bytes; from LMDB they die
    with the read transaction (touching them once the store is closed crashes the process), so
    :meth:`copy` what must outlive it. The repr shows counts only, never the buffers.

    Args:
        user_id: the user.
        ts_ms: int64 event times, non-decreasing.
        item: int32 index of each token's item in the item table (:class:`ItemRecords`).
        action: uint16 action masks.
        surface: int8 surface codes.
        emb: int8 ``(n, 32)``: each token's item embedding (its row of the item table), so
            that NN search reads one contiguous block.
        imp_ts_ms, imp_item, imp_action, imp_surface, imp_emb: the same for bare impressions.

    Example::

        >>> u = UserSequences.empty(3)
        >>> u
        UserSequences(user_id=3, n_explicit=0, n_impressions=0)
        >>> u.timeline(None, ll_cap=10, rt_cap=2, imp_cap=2)
        TimelineRanges(ll_lo=0, ll_hi=0, rt_lo=0, rt_hi=0, imp_lo=0, imp_hi=0)
    """

    user_id: int
    ts_ms: np.ndarray
    item: np.ndarray
    action: np.ndarray
    surface: np.ndarray
    emb: np.ndarray
    imp_ts_ms: np.ndarray
    imp_item: np.ndarray
    imp_action: np.ndarray
    imp_surface: np.ndarray
    imp_emb: np.ndarray

    @classmethod
    def from_arrays(cls, user_id: int, **arrays: Any) -> UserSequences:
        """Build from array-likes, cast to the stored dtypes (copies only where a cast is needed).

        Args:
            user_id: the user.
            **arrays: every array field of the class, by name.
        """
        return cls(int(user_id), **{name: np.asarray(arrays[name], dtype=dtype) for name, dtype, _ in _USER_FIELDS})

    @classmethod
    def empty(cls, user_id: int) -> UserSequences:
        """A user without stored events."""
        return cls.from_arrays(user_id, **{name: np.zeros((0, EMBED_DIM) if is_emb else 0)
                                           for name, _, is_emb in _USER_FIELDS})

    def __repr__(self) -> str:
        return f"UserSequences(user_id={self.user_id}, n_explicit={self.n_explicit}, n_impressions={self.n_impressions})"

    def copy(self) -> UserSequences:
        """A copy owning its arrays, independent of the buffer it was decoded from."""
        return UserSequences(self.user_id, **{name: np.array(getattr(self, name)) for name, _, _ in _USER_FIELDS})

    @property
    def n_explicit(self) -> int:
        return int(self.ts_ms.shape[0])

    @property
    def n_impressions(self) -> int:
        return int(self.imp_ts_ms.shape[0])

    @staticmethod
    def _layout(n: int, m: int) -> tuple[Plan, int]:
        return _plan(_USER_FIELDS, [n] * len(_TOKEN_FIELDS) + [m] * len(_TOKEN_FIELDS), _USER_HEADER.size)

    def encode(self) -> bytes:
        """The record's blob (see the module docstring for the layout)."""
        n, m = self.n_explicit, self.n_impressions
        plan, size = self._layout(n, m)
        arrays = {name: getattr(self, name) for name, _, _ in _USER_FIELDS}
        for name, _, shape, _, _ in plan:
            if np.shape(arrays[name]) != shape:
                raise ValueError(f"user {self.user_id}: {name} has shape {np.shape(arrays[name])}, expected {shape}")
        header = _USER_HEADER.pack(_USER_MAGIC, FORMAT_VERSION, EMBED_DIM, self.user_id, n, m)
        return _pack(header, plan, size, arrays)

    @classmethod
    def decode(cls, buf: Buffer) -> UserSequences:
        """Views over an encoded record; valid as long as ``buf`` is (for LMDB: its read txn).

        Raises:
            DataError: the blob is not a record of this format version, or is truncated.
        """
        user_id, n, m = _read_header(buf, _USER_HEADER, _USER_MAGIC, "<user record>")
        plan, size = cls._layout(n, m)
        return cls(user_id, **_unpack(buf, plan, size, f"<record of user {user_id}>"))

    def timeline(self, t_ms: int | None, ll_cap: int, rt_cap: int, imp_cap: int) -> TimelineRanges:
        """S_LL, S_RT and S_imp of a request at ``t_ms``, as ranges into this record's arrays.

        The semantics of :func:`lifelong.data.timelines.build_timelines`: only events strictly
        before ``t_ms``; S_RT the newest ``rt_cap`` explicit actions, S_LL the ``ll_cap`` before
        S_RT's oldest (ties split by the table order), S_imp the newest ``imp_cap`` impressions.

        Args:
            t_ms: request time, epoch ms; None: after every stored event.
            ll_cap, rt_cap, imp_cap: the sequences' length caps (>= 0).

        Example::

            >>> u = UserSequences.from_arrays(1, ts_ms=[5, 5, 9], item=[0, 1, 2], action=[2, 2, 2],
            ...     surface=[0, 0, 0], emb=np.zeros((3, 32)), imp_ts_ms=[9], imp_item=[3],
            ...     imp_action=[1], imp_surface=[0], imp_emb=np.zeros((1, 32)))
            >>> r = u.timeline(9, ll_cap=10, rt_cap=1, imp_cap=10)
            >>> r.ll, r.rt, r.imp
            (slice(0, 1, None), slice(1, 2, None), slice(0, 0, None))
        """
        if min(ll_cap, rt_cap, imp_cap) < 0:
            raise ValueError(f"caps must be >= 0, got ll_cap={ll_cap}, rt_cap={rt_cap}, imp_cap={imp_cap}")
        if t_ms is None:
            rt_hi, imp_hi = self.n_explicit, self.n_impressions
        else:
            # side="left" counts the events strictly before t_ms: an event at t_ms is never visible.
            rt_hi = int(np.searchsorted(self.ts_ms, t_ms, side="left"))
            imp_hi = int(np.searchsorted(self.imp_ts_ms, t_ms, side="left"))
        rt_lo = max(0, rt_hi - rt_cap)
        return TimelineRanges(max(0, rt_lo - ll_cap), rt_lo, rt_lo, rt_hi, max(0, imp_hi - imp_cap), imp_hi)


def iter_user_sequences(index: EventIndex, item: np.ndarray, action_mask: np.ndarray, surface: np.ndarray,
                        emb_int8: np.ndarray, max_tokens: int = 1 << 20) -> Iterator[list[UserSequences]]:
    """Every user of an events table as :class:`UserSequences`, in chunks of users.

    Each chunk gathers its users' tokens with a few vector operations (bounded by
    ``max_tokens``, or one user if a single user has more); the records are views into them.

    Args:
        index: the events' :class:`EventIndex` (it gives the table order and the users).
        item: item-table index of every event row.
        action_mask: every event's action mask.
        surface: every event's surface.
        emb_int8: ``(n_items, 32)`` int8 item embeddings, indexed by ``item``.
        max_tokens: most explicit + impression tokens gathered per chunk.

    Example::

        >>> from lifelong.data.schema import Action
        >>> mask = np.array([int(Action.CLICK), int(Action.IMPRESSION), int(Action.LIKE)])
        >>> index = EventIndex(np.array([4, 4, 6]), np.array([1, 2, 3]), mask)
        >>> chunks = list(iter_user_sequences(index, np.array([0, 1, 0]), mask, np.zeros(3, np.int8),
        ...                                   np.zeros((2, 32), np.int8)))
        >>> [(u.user_id, u.item.tolist(), u.imp_item.tolist()) for u in chunks[0]]
        [(4, [0], [1]), (6, [0], [])]
    """
    n_users = index.users.size
    # Tokens before user rank k, both kinds: chunk boundaries are found on it by bisection.
    before = index.explicit.starts[:n_users + 1] + index.impressions.starts[:n_users + 1]
    a = 0
    while a < n_users:
        b = int(np.searchsorted(before, before[a] + max_tokens, side="right")) - 1
        b = min(max(b, a + 1), n_users)
        parts = {}
        for prefix, seg in (("", index.explicit), ("imp_", index.impressions)):
            lo, hi = int(seg.starts[a]), int(seg.starts[b])
            rows = seg.rows[lo:hi]
            idx = item[rows].astype(np.int32)
            parts[prefix] = (lo, seg.starts, {"ts_ms": seg.ts[lo:hi], "item": idx,
                                              "action": action_mask[rows].astype(np.uint16),
                                              "surface": surface[rows].astype(np.int8), "emb": emb_int8[idx]})
        chunk = []
        for k in range(a, b):
            arrays = {}
            for prefix, (base, starts, cols) in parts.items():
                s = slice(int(starts[k]) - base, int(starts[k + 1]) - base)
                arrays.update({prefix + name: col[s] for name, col in cols.items()})
            chunk.append(UserSequences(int(index.users[k]), **arrays))
        yield chunk
        a = b


@dataclass(frozen=True, eq=False, repr=False)
class ItemRecords:
    """The item table at serving time, sorted by id.

    Decoded from a store, the arrays are views of its buffer, like :class:`UserSequences`'.

    Args:
        item_id: int64, sorted ascending, unique.
        emb_int8: int8 ``(n, 32)`` embeddings (``lifelong.core.quantization`` code).
        author_id: int64 per item.
        topic_id: int64 per item.

    Example::

        >>> items = ItemRecords.from_arrays([3, 8], np.zeros((2, 32)), [1, 1], [0, 2])
        >>> idx, known = ItemRecords.decode(items.encode()).index_of([8, 5])
        >>> idx.tolist(), known.tolist()
        ([1, -1], [True, False])
    """

    item_id: np.ndarray
    emb_int8: np.ndarray
    author_id: np.ndarray
    topic_id: np.ndarray

    @classmethod
    def from_arrays(cls, item_id: Any, emb_int8: Any, author_id: Any, topic_id: Any) -> ItemRecords:
        """Build from array-likes, cast to the stored dtypes.

        Raises:
            DataError: ids are not strictly increasing or the arrays differ in length.
        """
        item_id = np.asarray(item_id, dtype=np.int64)
        if np.any(item_id[1:] <= item_id[:-1]):
            raise DataError("<items>", "item ids must be sorted and unique")
        items = cls(item_id, np.asarray(emb_int8, dtype=np.int8), np.asarray(author_id, dtype=np.int64),
                    np.asarray(topic_id, dtype=np.int64))
        n = item_id.size
        if items.emb_int8.shape != (n, EMBED_DIM) or items.author_id.shape != (n,) or items.topic_id.shape != (n,):
            raise DataError("<items>", f"item arrays differ in length (expected {n} rows, embeddings (n, {EMBED_DIM}))")
        return items

    @classmethod
    def from_dir(cls, directory: str | Path) -> ItemRecords:
        """Read a built dataset's ``items/`` directory (``item_id.npy``, ``emb_int8.npy``, ...).

        Raises:
            DataError: naming a missing or unreadable file.
        """
        directory = Path(directory)
        arrays = {}
        for name, _, _ in _ITEM_FIELDS:
            path = directory / f"{name}.npy"
            if not path.is_file():
                raise DataError(path, "missing item file (is this a directory made by `lifelong transact build`?)")
            try:
                arrays[name] = np.load(path)
            except (OSError, ValueError) as exc:
                raise DataError(path, f"not a readable .npy file ({exc})") from None
        return cls.from_arrays(**arrays)

    def __len__(self) -> int:
        return int(self.item_id.size)

    def __repr__(self) -> str:
        return f"ItemRecords(n_items={len(self)})"

    def copy(self) -> ItemRecords:
        """A copy owning its arrays, independent of the buffer it was decoded from."""
        return ItemRecords(*(np.array(getattr(self, name)) for name in ("item_id", "emb_int8", "author_id", "topic_id")))

    @staticmethod
    def _layout(n: int) -> tuple[Plan, int]:
        return _plan(_ITEM_FIELDS, [n] * len(_ITEM_FIELDS), _ITEM_HEADER.size)

    def encode(self) -> bytes:
        """The table as one blob: header, then each array contiguous and 8-byte aligned."""
        plan, size = self._layout(len(self))
        header = _ITEM_HEADER.pack(_ITEM_MAGIC, FORMAT_VERSION, EMBED_DIM, len(self))
        return _pack(header, plan, size, {name: getattr(self, name) for name, _, _ in _ITEM_FIELDS})

    @classmethod
    def decode(cls, buf: Buffer) -> ItemRecords:
        """Views over an encoded table; valid as long as ``buf`` is."""
        (n,) = _read_header(buf, _ITEM_HEADER, _ITEM_MAGIC, "<items record>")
        plan, size = cls._layout(n)
        return cls(**_unpack(buf, plan, size, "<items record>"))

    def index_of(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """Row of each id in the table, and which ids are known.

        Args:
            ids: item ids (any shape).

        Returns:
            ``(idx, known)``: int64 rows, -1 where unknown; bool mask of the known ids.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self):
            return np.full(ids.shape, -1, dtype=np.int64), np.zeros(ids.shape, dtype=bool)
        pos = np.minimum(np.searchsorted(self.item_id, ids), len(self) - 1)
        known = self.item_id[pos] == ids
        return np.where(known, pos, -1), known
