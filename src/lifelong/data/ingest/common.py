"""Machinery shared by the real-data adapters: text rows, quarantine, ids, items, writing.

Every adapter reads its source files as lines (so each problem row keeps its line number and
raw text), validates fields with vectorised checks, and hands a :class:`Parsed` bundle to
:func:`write_dataset`, which derives users, the protocol and item embeddings and writes the
dataset directory atomically.

Row-level problems never vanish: the first failing check of a row names its reason, the row is
left out of the events, counted under that reason and written to ``quarantine.parquet``
(file, 1-based line number, reason, raw text). Whole-file problems (missing file, missing
header column, no row with the expected number of fields) raise :class:`DataError`.

The event files we read are unquoted delimited text (as the sources ship them), so a line is
split on its delimiter directly; a quoted field simply fails its check and is quarantined,
never silently mis-read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import lifelong
from lifelong.core.errors import ConfigError, DataError
from lifelong.core.sorted_index import positions_in
from lifelong.data.io import atomic_output_dir, write_json, write_parquet
from lifelong.data.item_embeddings import METHOD, learn_item_embeddings
from lifelong.data.protocol import DAY_MS, Protocol, utc_minute
from lifelong.data.schema import ACTION_NAMES, EMBED_DIM, EVENTS_SCHEMA, ITEMS_SCHEMA, MEDIA_TYPES
from lifelong.data.users import sort_events, users_from_events
from lifelong.data.validate import require_file, validate_table

TS_MAX_MS = 4_102_444_800_000
"""2100-01-01 UTC: no source we read logs later; a larger timestamp is corrupt."""
INT32_MAX = 2**31 - 1
EMBEDDING_WINDOW = 5

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string(), nullable=False),
        pa.field("line", pa.int64(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("raw", pa.large_string(), nullable=False),
    ],
    metadata={"lifelong.table": "quarantine"},
)
"""``quarantine.parquet``: one row per rejected input line, in file then line order."""

_INT_RE = r"^-?\d{1,18}$"  # 18 digits always fit int64; longer ids would overflow silently
_FLOAT_RE = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,3})?$"  # finite decimals only, no nan/inf


@dataclass
class TextRows:
    """The data lines of one delimited text file.

    Args:
        path: the file.
        names: column names, by position.
        raw: each data line's text (without line terminator).
        line: each data line's 1-based line number in the file.
        columns: column name -> each line's field; lines with the wrong field count hold empty
            fields (their checks flag them first).
        well_formed: lines with exactly ``len(names)`` fields.

    Example::

        rows = read_rows(path, delimiter=",", header=True, required=("userId", "rating"))
        ratings = rows.column("rating")
    """

    path: Path
    names: tuple[str, ...]
    raw: pa.Array
    line: np.ndarray
    columns: dict[str, pa.Array]
    well_formed: np.ndarray

    def __len__(self) -> int:
        return len(self.raw)

    def column(self, name: str) -> pa.Array:
        """The field ``name`` of every line, whitespace-trimmed, as strings."""
        return pc.utf8_trim_whitespace(self.columns[name])


def read_lines(path: Path) -> tuple[pa.Array, np.ndarray]:
    """Every line of a text file with its 1-based line number; the empty tail after a final newline is dropped.

    Undecodable bytes become U+FFFD, so they spoil only the field they sit in (which then fails
    its check) rather than the whole file.
    """
    text = require_file(Path(path)).read_bytes().decode("utf-8", errors="replace").removeprefix("\ufeff")
    lines = pc.list_flatten(pc.split_pattern(pa.array([text], pa.large_string()), "\n"))
    lines = pc.utf8_rtrim(lines, characters="\r")
    n = len(lines) - 1 if len(lines) and text.endswith("\n") else len(lines)
    return lines.slice(0, n), np.arange(1, n + 1, dtype=np.int64)


def read_rows(path: Path, delimiter: str, header: bool, names: tuple[str, ...] = (),
              required: tuple[str, ...] = ()) -> TextRows:
    """Read a delimited text file into :class:`TextRows`.

    Args:
        path: the file.
        delimiter: field separator (the files are unquoted).
        header: the first line names the columns; otherwise ``names`` gives them.
        names: column names of a header-less file.
        required: columns that must appear in the header.

    Raises:
        DataError: the file is missing or empty, a required header column is missing, or no
            line has the expected number of fields.

    Example::

        rows = read_rows(src / "UserBehavior.csv", ",", header=False,
                         names=("user_id", "item_id", "category_id", "behavior_type", "timestamp"))
    """
    path = Path(path)
    lines, line_no = read_lines(path)
    if header:
        if len(lines) == 0:
            raise DataError(path, "empty file: no header line")
        names = tuple(s.strip() for s in lines[0].as_py().split(delimiter))
        lines, line_no = lines.slice(1), line_no[1:]
        for col in required:
            if col not in names:
                raise DataError(path, "missing header column", column=col)
    if len(lines) == 0:
        raise DataError(path, "no data rows")
    split = pc.split_pattern(lines, delimiter)
    well_formed = pc.equal(pc.list_value_length(split), len(names)).to_numpy(zero_copy_only=False)
    if not well_formed.any():
        first = len(lines[0].as_py().split(delimiter))
        raise DataError(path, f"no row has the expected {len(names)} fields ({', '.join(names)}); "
                              f"line {line_no[0]} has {first}", row=0)
    if not well_formed.all():
        placeholder = pa.scalar(delimiter * (len(names) - 1), lines.type)
        split = pc.split_pattern(pc.if_else(pa.array(well_formed), lines, placeholder), delimiter)
    columns = {name: pc.list_element(split, i) for i, name in enumerate(names)}
    return TextRows(path, names, lines, line_no, columns, well_formed)


@dataclass
class RowChecks:
    """Validity of each line of one file; the first failed check of a line is its reason.

    Args:
        rows: the file's lines.
        prefix: put before every reason (side files use ``"movies.csv: "`` so their reasons
            cannot be confused with the event file's).

    Example::

        checks = RowChecks(rows)
        ts = checks.ints("timestamp")          # flags "missing timestamp" / "unparseable ..."
        checks.flag(ts < 0, "negative timestamp")
        good = checks.ok
    """

    rows: TextRows
    prefix: str = ""
    _code: np.ndarray = field(init=False, repr=False)
    _reasons: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self._code = np.full(len(self.rows), -1, dtype=np.int32)
        self.flag(~self.rows.well_formed, "wrong number of fields")

    @property
    def ok(self) -> np.ndarray:
        """Lines that passed every check so far."""
        return self._code < 0

    def flag(self, bad: np.ndarray, reason: str) -> None:
        """Mark ``bad`` lines with ``reason`` unless an earlier check already rejected them."""
        new = np.asarray(bad, dtype=bool) & self.ok
        if new.any():
            self._reasons.append(self.prefix + reason)
            self._code[new] = len(self._reasons) - 1

    def ints(self, name: str, values: pa.Array | None = None, nonnegative: bool = True) -> np.ndarray:
        """Parse column ``name`` (or ``values``) as int64; failing lines get flagged, hold 0."""
        text = self.rows.column(name) if values is None else values
        return _parse(self, name, text, _INT_RE, pa.int64(), nonnegative)

    def floats(self, name: str, values: pa.Array | None = None) -> np.ndarray:
        """Parse column ``name`` (or ``values``) as float64; failing lines get flagged, hold 0."""
        text = self.rows.column(name) if values is None else values
        return _parse(self, name, text, _FLOAT_RE, pa.float64(), nonnegative=False)

    def flags01(self, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Parse 0/1 indicator columns; other values are flagged ``"<name> not 0 or 1"``."""
        out = {}
        for name in names:
            v = self.ints(name)
            self.flag(v > 1, f"{name} not 0 or 1")
            out[name] = v == 1
        return out

    def flag_duplicates(self, keys: np.ndarray, reason: str) -> None:
        """Flag each valid line whose key already appeared on an earlier valid line (the first wins)."""
        valid = np.flatnonzero(self.ok)
        first = np.unique(keys[valid], return_index=True)[1]
        repeat = np.ones(valid.size, dtype=bool)
        repeat[first] = False
        bad = np.zeros(len(self.rows), dtype=bool)
        bad[valid[repeat]] = True
        self.flag(bad, reason)

    def counts(self) -> dict[str, int]:
        """Reason -> number of rejected lines."""
        hits = np.bincount(self._code[self._code >= 0], minlength=len(self._reasons))
        return {reason: int(n) for reason, n in zip(self._reasons, hits) if n}

    def table(self) -> pa.Table:
        """The rejected lines as a :data:`QUARANTINE_SCHEMA` table."""
        bad = np.flatnonzero(self._code >= 0)
        reasons = np.array(self._reasons, dtype=object)[self._code[bad]] if bad.size else np.array([], dtype=object)
        return pa.table(
            {
                "file": pa.array([self.rows.path.name] * bad.size, pa.string()),
                "line": self.rows.line[bad],
                "reason": pa.array(reasons.tolist(), pa.string()),
                "raw": self.rows.raw.take(pa.array(bad)).cast(pa.large_string()),
            },
            schema=QUARANTINE_SCHEMA,
        )


def _parse(checks: RowChecks, name: str, text: pa.Array, pattern: str, type_: pa.DataType,
           nonnegative: bool) -> np.ndarray:
    empty = pc.equal(pc.utf8_length(text), 0).to_numpy(zero_copy_only=False)
    checks.flag(empty, f"missing {name}")
    valid = pc.match_substring_regex(text, pattern).to_numpy(zero_copy_only=False)
    checks.flag(~valid, f"unparseable {name}")
    zero = pa.scalar("0", text.type)
    values = pc.cast(pc.if_else(pa.array(valid), text, zero), type_).to_numpy(zero_copy_only=False)
    if nonnegative:
        checks.flag(values < 0, f"negative {name}")
    return values


def check_timestamp_ms(checks: RowChecks, ts_ms: np.ndarray) -> None:
    """Flag timestamps before 1970 (``"negative timestamp"``) or after 2100 (``"timestamp out of range"``)."""
    checks.flag(ts_ms < 0, "negative timestamp")
    checks.flag(ts_ms >= TS_MAX_MS, "timestamp out of range")


def seconds_to_ms(checks: RowChecks, seconds: np.ndarray) -> np.ndarray:
    """Unix seconds -> ms after range checks (so the multiplication cannot overflow)."""
    check_timestamp_ms(checks, np.clip(seconds, -1, TS_MAX_MS // 1000) * 1000)
    return np.where(checks.ok, seconds, 0) * 1000


def dense_ids(*keys: np.ndarray) -> np.ndarray:
    """0-based id of each row's key tuple, numbered in sorted key order (deterministic).

    Example::

        >>> dense_ids(np.array([5, 5, 1]), np.array([2, 2, 9])).tolist()
        [1, 1, 0]
    """
    n = keys[0].size
    if n == 0:
        return np.empty(0, dtype=np.int64)
    order = np.lexsort(keys[::-1])
    change = np.zeros(n, dtype=bool)
    for k in keys:
        s = k[order]
        change[1:] |= s[1:] != s[:-1]
    ids = np.empty(n, dtype=np.int64)
    ids[order] = np.cumsum(change)
    return ids


def vocabulary_codes(labels: pa.Array, vocabulary: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Code each label by its 1-based rank in a sorted vocabulary; empty, null or unlisted labels -> 0.

    Args:
        labels: string labels.
        vocabulary: the labels to number (sorted here); default: the distinct non-empty labels.

    Example::

        >>> codes, vocab = vocabulary_codes(pa.array(["news", "", "sports", "news"]))
        >>> codes.tolist(), vocab
        ([1, 0, 2, 1], ['news', 'sports'])
    """
    labels = pc.fill_null(labels.cast(pa.string()), "")
    vocab = sorted(v for v in (pc.unique(labels).to_pylist() if vocabulary is None else vocabulary) if v)
    codes = pc.fill_null(pc.index_in(labels, value_set=pa.array(vocab, pa.string())), -1)
    return (codes.to_numpy(zero_copy_only=False) + 1).astype(np.int32), vocab


def lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``values`` at each ``query`` in ascending unique ``keys``; 0 where the key is absent.

    Example::

        >>> lookup(np.array([2, 5]), np.array([7, 8]), np.array([5, 3])).tolist()
        [8, 0]
    """
    if keys.size == 0:
        return np.zeros(query.size, values.dtype)
    pos, found = positions_in(keys, query)
    return np.where(found, values[pos], 0).astype(values.dtype)


@dataclass
class ItemCatalog:
    """Item attributes of an ingested source, one entry per unique item id (ascending).

    Args:
        item_id: unique ids, ascending.
        topic_id: 0 = unknown.
        duration_ms: video length, 0 for non-videos or unknown.
        media_type: index into :data:`MEDIA_TYPES`.
    """

    item_id: np.ndarray
    topic_id: np.ndarray
    duration_ms: np.ndarray
    media_type: str

    @classmethod
    def from_rows(cls, item_ids: np.ndarray, media_type: str, topic_ids: np.ndarray | None = None,
                  duration_ms: np.ndarray | None = None) -> ItemCatalog:
        """One entry per distinct id: the topic of its first row, the longest duration seen.

        Args:
            item_ids: the item of each (valid) row.
            media_type: ``"image"`` or ``"video"``.
            topic_ids: each row's topic (0 = unknown); the first row of an item wins.
            duration_ms: each row's duration; the max wins (a 0 often means "not logged").

        Example::

            >>> c = ItemCatalog.from_rows(np.array([7, 3, 7]), "video", duration_ms=np.array([0, 5, 9]))
            >>> c.item_id.tolist(), c.duration_ms.tolist()
            ([3, 7], [5, 9])
        """
        ids, first, inv = np.unique(item_ids, return_index=True, return_inverse=True)
        topics = np.zeros(ids.size, np.int32) if topic_ids is None else np.asarray(topic_ids, np.int32)[first]
        durations = np.zeros(ids.size, np.int64)
        if duration_ms is not None:
            np.maximum.at(durations, inv, np.asarray(duration_ms, np.int64))
        return cls(ids.astype(np.int64), topics, durations.astype(np.int32), media_type)


@dataclass
class Parsed:
    """What an adapter hands to :func:`write_dataset`.

    Args:
        rows_read: data lines of the main event file (quarantined ones included).
        events: events in :data:`EVENTS_SCHEMA` column names (any order, any int types).
        items: the catalogue: every event item, plus items known only from rows rejected for
            non-item reasons (their id and attributes parsed, e.g. a Taobao row outside the
            time window), so the catalogue matches the source's own item count.
        checks: row checks of every file read (the main file first).
        has_impressions: whether the source logs shown items (impression bit).
        embedding_bits: action bits that count as engagement for item embeddings.
        mapping: human-readable mapping choices, written to ``dataset.json``.
        main_file: the event file, named in errors.
    """

    rows_read: int
    events: pa.Table
    items: ItemCatalog
    checks: list[RowChecks]
    has_impressions: bool
    embedding_bits: int
    mapping: dict[str, str]
    main_file: Path


@dataclass
class IngestReport:
    """Outcome of one ingest, for printing and for tests.

    Args:
        source: ``kuairand``, ``movielens``, ``mind`` or ``taobao``.
        rows_read: data lines of the main event file (quarantined included).
        events_written: rows of ``events.parquet``.
        users: rows of ``users.parquet``.
        items: rows of ``items.parquet``.
        quarantined: reason -> rejected lines (all files).
        out: the dataset directory.
        protocol: ``Protocol.to_dict()`` of the written data.
        has_impressions: whether the events carry impression bits.
        items_without_events: catalogue items known only from rejected rows.

    Example::

        report = ingest("taobao", Path("../shared/data/taobao-userbehavior-head"), Path("data/taobao"))
        for label, value in report.summary():
            print(f"{label:>16}  {value}")
    """

    source: str
    rows_read: int
    events_written: int
    users: int
    items: int
    quarantined: dict[str, int]
    out: Path
    protocol: dict[str, int]
    has_impressions: bool
    items_without_events: int = 0

    def summary(self) -> list[tuple[str, str]]:
        """Label/value rows for a two-column printout."""
        n_bad = sum(self.quarantined.values())
        bad = f"{n_bad:,}"
        if n_bad:
            bad += " (" + ", ".join(f"{r}: {n:,}" for r, n in sorted(self.quarantined.items())) + ")"
        p = self.protocol
        return [
            ("source", self.source),
            ("rows read", f"{self.rows_read:,}"),
            ("events written", f"{self.events_written:,}"),
            ("users", f"{self.users:,}"),
            ("items", f"{self.items:,}" + (f" ({self.items_without_events:,} without events)"
                                           if self.items_without_events else "")),
            ("impressions", "yes" if self.has_impressions else "no"),
            ("quarantined", bad),
            ("train", f"{utc_minute(p['train_start_ms'])} .. {utc_minute(p['cutoff_ms'])}"),
            ("evaluation", f"{utc_minute(p['eval_start_ms'])} .. {utc_minute(p['eval_end_ms'])}"),
            ("output", str(self.out)),
        ]


def write_dataset(source: str, src: Path, out: Path, parsed: Parsed, seed: int = 0,
                  embedding_lag_days: float = 3.0, protocol_days: tuple[float, float, float] | None = None
                  ) -> IngestReport:
    """Sort events, derive users, protocol and item embeddings; write the directory atomically.

    Args:
        source: the adapter's name.
        src: the dataset folder read.
        out: the dataset directory to (re)place.
        parsed: the adapter's output.
        seed: item-embedding seed.
        embedding_lag_days: learn the item embeddings from the events before the protocol's
            cutoff minus this many days. With 0, every training item has a learned embedding and
            only evaluation items can be cold (the fallback vector), which a ranker never saw in
            training; a lag makes the items first seen in the last days of training cold too, as
            they are in production, where the embedding job runs behind the logs. The default,
            three days, is longer than a one-day validation split (``val_days=1``), so that the
            rows a ranker trains on, not only those it is validated on, show cold items: on
            KuaiRand half of the evaluation rows show an item without training events, and a
            TransAct that never saw one in training put most of them below 5% like probability
            (NE 7.3; with the lag, 0.90: docs/results.md).
        protocol_days: ``(train, gap, eval)`` days for :meth:`Protocol.fit` (None: its defaults).

    Raises:
        DataError: every row was rejected, so there is nothing to write.

    Example::

        report = write_dataset("taobao", src, out, taobao.parse(src))
    """
    events = sort_events(parsed.events)
    if events.num_rows == 0:
        reasons = ", ".join(f"{r}: {n}" for r, n in _counts(parsed.checks).items())
        raise DataError(parsed.main_file, f"no valid rows: every row was quarantined ({reasons})")
    events = validate_table(events, "events", parsed.main_file)
    users = users_from_events(events)
    ts = events.column("ts_ms").to_numpy()
    protocol = Protocol.fit(int(ts.min()), int(ts.max()) + 1, *(protocol_days or ()))
    embedding_cutoff_ms = protocol.cutoff_ms - int(embedding_lag_days * DAY_MS)
    cat = parsed.items
    emb = learn_item_embeddings(
        events.column("user_id").to_numpy(), events.column("item_id").to_numpy(), ts,
        events.column("action_mask").to_numpy(), embedding_cutoff_ms, cat.item_id, cat.topic_id,
        dim=EMBED_DIM, seed=seed, engaged_bits=parsed.embedding_bits, window=EMBEDDING_WINDOW)
    items = validate_table(pa.table(
        {
            "item_id": cat.item_id,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float16).ravel()), EMBED_DIM),
            "author_id": np.zeros(cat.item_id.size, np.int64),
            "topic_id": cat.topic_id,
            "media_type": np.full(cat.item_id.size, MEDIA_TYPES.index(cat.media_type), np.int8),
            "duration_ms": cat.duration_ms,
        },
        schema=ITEMS_SCHEMA,
    ), "items", "items.parquet")
    n_with_events = pc.count_distinct(events.column("item_id")).as_py()
    quarantined = _counts(parsed.checks)
    masks = events.column("action_mask").to_numpy()
    counts = {
        "rows_read": parsed.rows_read,
        "events": events.num_rows,
        "users": users.num_rows,
        "items": items.num_rows,
        "items_without_events": items.num_rows - n_with_events,
        "quarantined": sum(quarantined.values()),
        "events_with_action": {name: int(((masks & bit) != 0).sum()) for name, bit in ACTION_NAMES.items()},
    }
    meta = {
        "kind": "ingest",
        "source": source,
        "src": str(Path(src).resolve()),
        "protocol": protocol.to_dict(),
        "counts": counts,
        "quarantined": quarantined,
        "has_impressions": parsed.has_impressions,
        "embedding_method": METHOD.format(window=EMBEDDING_WINDOW),
        "embedding_lag_days": embedding_lag_days,
        "embedding_cutoff_ms": embedding_cutoff_ms,
        "mapping": parsed.mapping,
        "lifelong_version": lifelong.__version__,
    }
    with atomic_output_dir(out) as tmp:
        write_parquet(items, tmp / "items.parquet")
        write_parquet(events, tmp / "events.parquet")
        write_parquet(users, tmp / "users.parquet")
        if quarantined:
            write_parquet(pa.concat_tables([c.table() for c in parsed.checks]), tmp / "quarantine.parquet")
        write_json(meta, tmp / "dataset.json")
    return IngestReport(source, parsed.rows_read, events.num_rows, users.num_rows, items.num_rows,
                        quarantined, Path(out), protocol.to_dict(), parsed.has_impressions,
                        counts["items_without_events"])


REQUEST_UNITS: tuple[str, ...] = ("native", "day")
"""What one request of an ingested dataset is: the source's own unit (``native``, each adapter's
docstring says which) or all of a user's events of one UTC day (``day``)."""


def regroup_requests(parsed: Parsed, unit: str) -> Parsed:
    """``parsed`` with its events' requests redrawn as ``unit`` (one of :data:`REQUEST_UNITS`).

    HIT@K ranks each request's items; when the source's requests hold one or two labelled items
    (KuaiRand's hourly chunks hold 1.7), every order scores the same, and a user's day is the
    coarser request that makes the metric informative.

    Example::

        >>> ev = events_table(np.array([1, 1, 2]), np.array([5, 6, 5]), np.array([0, DAY_MS - 1, 5]),
        ...                   np.array([1, 1, 1]), np.array([7, 8, 9]), 0)
        >>> p = Parsed(3, ev, None, [], True, 0, {}, Path("f"))
        >>> regroup_requests(p, "day").events.column("request_id").to_pylist()
        [0, 0, 1]
    """
    if unit not in REQUEST_UNITS:
        raise ConfigError(f"unknown request unit {unit!r}; expected one of {', '.join(REQUEST_UNITS)}")
    if unit == "native":
        return parsed
    ev = parsed.events
    day = dense_ids(ev.column("user_id").to_numpy(), ev.column("ts_ms").to_numpy() // DAY_MS)
    events = ev.set_column(ev.schema.get_field_index("request_id"), "request_id", pa.array(day, pa.int64()))
    mapping = {**parsed.mapping, "request_id": "one per (user, UTC day) (--requests day; the source's own: "
                                               f"{parsed.mapping.get('request_id', 'unnamed')})"}
    return replace(parsed, events=events, mapping=mapping)


def _counts(checks: list[RowChecks]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in checks:
        for reason, n in c.counts().items():
            total[reason] = total.get(reason, 0) + n
    return total


def events_table(user_id: np.ndarray, item_id: np.ndarray, ts_ms: np.ndarray, action_mask: np.ndarray,
                 request_id: np.ndarray, surface: int, dwell_ms: np.ndarray | None = None) -> pa.Table:
    """Assemble an (unsorted) events table with :data:`EVENTS_SCHEMA` types.

    Example::

        >>> t = events_table(np.array([1]), np.array([2]), np.array([3]), np.array([1]), np.array([0]), 0)
        >>> t.schema == EVENTS_SCHEMA.remove_metadata()
        True
    """
    n = np.asarray(user_id).size
    return pa.table(
        {
            "user_id": np.asarray(user_id, np.int64),
            "item_id": np.asarray(item_id, np.int64),
            "ts_ms": np.asarray(ts_ms, np.int64),
            "surface": np.full(n, surface, np.int8),
            "action_mask": np.asarray(action_mask, np.uint16),
            "dwell_ms": np.zeros(n, np.int32) if dwell_ms is None else np.asarray(dwell_ms, np.int32),
            "request_id": np.asarray(request_id, np.int64),
        },
        schema=EVENTS_SCHEMA.remove_metadata(),
    )
