"""MIND news logs (``behaviors.tsv`` and ``news.tsv``: tab-separated, no header).

``behaviors.tsv`` columns: impression id, user id (``U123``), time (``11/12/2019 2:14:46 PM``,
read as UTC), click history (space-separated ``N123`` ids, may be empty), impressions
(space-separated ``N123-1`` clicked / ``N123-0`` shown-not-clicked).

- Each impression token -> one event with IMPRESSION (| CLICK when ``-1``) at the row's time,
  ``request_id`` = the impression id: real impression-based negatives.
- The click history has no timestamps. Each user's longest history string (ties: the earliest
  row) becomes CLICK events, in their logged order, at 1-minute spacing ending 1 hour before
  the user's first impression row, so the history precedes every logged request and keeps its
  order. These are explicit actions; they share one synthetic ``request_id`` per user,
  numbered after the largest impression id so the two kinds never collide.
- ids drop their letter: ``N12345`` -> 12345, ``U81994`` -> 81994.
- ``topic_id`` = 1-based rank of the news category (``news.tsv`` column 2) in the sorted
  category vocabulary, 0 where ``news.tsv`` does not cover the item (most items: it covers
  about 4% of ids). Surface homefeed, media image, dwell 0, author 0.

A row with any malformed impression or history token is quarantined whole, so a request is
never written with some of its shown items missing.

Example::

    parsed = parse(Path("../shared/data/mind-small-sample"))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lifelong.data.ingest.common import (
    ItemCatalog,
    Parsed,
    RowChecks,
    TextRows,
    check_timestamp_ms,
    dense_ids,
    events_table,
    lookup,
    read_lines,
    read_rows,
    vocabulary_codes,
)
from lifelong.data.schema import EXPLICIT_BITS, SURFACE_CODES, Action

BEHAVIORS = "behaviors.tsv"
NEWS = "news.tsv"
COLUMNS = ("impression_id", "user_id", "time", "history", "impressions")
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"
MINUTE_MS = 60_000
HOUR_MS = 3_600_000
MAPPING = {
    "action_mask": "impression token: IMPRESSION (| CLICK if -1); history: CLICK",
    "ts_ms": "row time read as UTC; history: 1-minute spacing ending 1 hour before the user's first row",
    "request_id": "impression id; history: one synthetic id per user after the largest impression id",
    "history": "the user's longest history string",
    "surface": "homefeed",
    "topic_id": "1 + index of the news.tsv category in the sorted category vocabulary, 0 = not covered",
    "media_type": "image",
    "author_id": "0 (not in the data)",
}


def parse(src: Path) -> Parsed:
    """Read and validate ``behaviors.tsv`` and ``news.tsv`` of ``src``.

    Args:
        src: the ``mind-small-sample`` folder.

    Raises:
        DataError: a file is missing or no line of ``behaviors.tsv`` has five fields.

    Example::

        events = parse(src).events
    """
    src = Path(src)
    news_ids, news_topics, news_checks = _news_topics(src / NEWS)
    path = src / BEHAVIORS
    rows = read_rows(path, "\t", header=False, names=COLUMNS)
    checks = RowChecks(rows)

    imp_text = rows.column("impressions")
    checks.flag(pc.equal(pc.utf8_length(imp_text), 0).to_numpy(zero_copy_only=False), "missing impressions")
    imp = _Tokens(imp_text, r"^N\d{1,18}-[01]$", allow_empty=False)
    checks.flag(imp.row_has_bad, "bad impression token")
    hist = _Tokens(rows.column("history"), r"^N\d{1,18}$", allow_empty=True)
    checks.flag(hist.row_has_bad, "bad history token")
    item_ok = checks.ok
    impression_id = checks.ints("impression_id")
    user = checks.ints("user_id", _strip_letter(checks, "user_id", rows.column("user_id"), "U"))
    time_text = rows.column("time")
    checks.flag(pc.equal(pc.utf8_length(time_text), 0).to_numpy(zero_copy_only=False), "missing time")
    parsed_time = pc.strptime(time_text, format=TIME_FORMAT, unit="s", error_is_null=True)
    checks.flag(parsed_time.is_null().to_numpy(zero_copy_only=False), "unparseable time")
    ts = pc.fill_null(parsed_time.cast(pa.int64()), 0).to_numpy(zero_copy_only=False) * 1000
    check_timestamp_ms(checks, ts)
    ok = checks.ok

    # Shown items: one event per token of a valid row.
    take = ok[imp.row]
    row = imp.row[take]
    clicked = pc.ends_with(imp.tokens, "1").to_numpy(zero_copy_only=False)[take]
    shown = events_table(user[row], imp.ids[take], ts[row],
                         np.where(clicked, int(Action.IMPRESSION | Action.CLICK), int(Action.IMPRESSION)),
                         impression_id[row], SURFACE_CODES["homefeed"])

    history = _history_events(ok, user, ts, impression_id, hist)

    item_ids = np.concatenate([imp.ids[item_ok[imp.row]], hist.ids[item_ok[hist.row]]])
    items = ItemCatalog.from_rows(item_ids, "image", topic_ids=lookup(news_ids, news_topics, item_ids))
    return Parsed(len(rows), pa.concat_tables([shown, history]), items, [checks, news_checks],
                  has_impressions=True, embedding_bits=EXPLICIT_BITS, mapping=MAPPING, main_file=path)


class _Tokens:
    """Space-separated tokens of each line, exploded: token text, line, position, parsed id.

    ``row_has_bad`` marks lines with a token not matching ``pattern``; an empty string is a
    line with no tokens when ``allow_empty``.
    """

    def __init__(self, text: pa.Array, pattern: str, allow_empty: bool):
        empty = pc.equal(pc.utf8_length(text), 0).to_numpy(zero_copy_only=False)
        lists = pc.split_pattern(text, " ")
        lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
        if allow_empty:
            lengths[empty] = 0  # split("") yields one empty token; an empty history has none
            lists = pc.if_else(pa.array(empty), pa.scalar([], lists.type), lists)
        self.lengths = lengths
        self.tokens = pc.list_flatten(lists)
        self.row = np.repeat(np.arange(lengths.size), lengths)
        starts = np.cumsum(lengths) - lengths
        self.position = np.arange(self.row.size) - starts[self.row]
        valid = pc.match_substring_regex(self.tokens, pattern).to_numpy(zero_copy_only=False)
        self.row_has_bad = np.bincount(self.row[~valid], minlength=lengths.size) > 0
        digits = pc.extract_regex(self.tokens, r"^N(?P<id>\d{1,18})").field("id")
        digits = pc.if_else(pa.array(valid), digits, pa.scalar("0", digits.type))
        self.ids = pc.cast(digits, pa.int64()).to_numpy(zero_copy_only=False)


def _history_events(ok: np.ndarray, user: np.ndarray, ts: np.ndarray, impression_id: np.ndarray,
                    hist: _Tokens) -> pa.Table:
    """CLICK events of each user's longest history, 1 minute apart, ending 1 h before the user's first row."""
    valid = np.flatnonzero(ok)
    if valid.size == 0:
        return events_table(*(np.empty(0, np.int64),) * 5, SURFACE_CODES["homefeed"])
    rank = dense_ids(user[valid])  # 0.. in ascending user id
    first_ts = np.full(rank.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(first_ts, rank, ts[valid])
    # Longest history first; ties go to the earliest row so the choice never depends on file order.
    order = valid[np.lexsort((impression_id[valid], ts[valid], -hist.lengths[valid], user[valid]))]
    chosen = order[np.r_[True, user[order][1:] != user[order][:-1]]]  # ascending user id, like rank
    row_first_ts = np.zeros(ok.size, np.int64)
    row_first_ts[chosen] = first_ts
    is_chosen = np.zeros(ok.size, bool)
    is_chosen[chosen] = True
    take = is_chosen[hist.row]
    row = hist.row[take]
    after = hist.lengths[row] - 1 - hist.position[take]  # history clicks that follow this one
    first_request = int(impression_id[valid].max()) + 1
    return events_table(user[row], hist.ids[take], row_first_ts[row] - HOUR_MS - after * MINUTE_MS,
                        np.full(row.size, int(Action.CLICK)), first_request + dense_ids(user[row]),
                        SURFACE_CODES["homefeed"])


def _strip_letter(checks: RowChecks, name: str, text: pa.Array, letter: str) -> pa.Array:
    """Digits after the id's letter; lines without the letter are flagged ``unparseable <name>``."""
    checks.flag(pc.equal(pc.utf8_length(text), 0).to_numpy(zero_copy_only=False), f"missing {name}")
    checks.flag(~pc.starts_with(text, letter).to_numpy(zero_copy_only=False), f"unparseable {name}")
    return pc.utf8_slice_codeunits(text, 1)


def _news_topics(path: Path) -> tuple[np.ndarray, np.ndarray, RowChecks]:
    """Sorted news ids of ``news.tsv`` with their category codes (first line of an id wins)."""
    lines, line_no = read_lines(path)
    parts = pc.extract_regex(lines, r"^(?P<news_id>[^\t]*)\t(?P<category>[^\t]*)(?:\t|$)")
    well_formed = parts.is_valid().to_numpy(zero_copy_only=False)
    columns = {name: parts.field(name) for name in ("news_id", "category")}
    checks = RowChecks(TextRows(path, tuple(columns), lines, line_no, columns, well_formed), prefix=f"{NEWS}: ")
    ids = checks.ints("news_id", _strip_letter(checks, "news_id", checks.rows.column("news_id"), "N"))
    checks.flag_duplicates(ids, "duplicate news_id")
    ok = checks.ok
    codes, _ = vocabulary_codes(checks.rows.column("category").filter(pa.array(ok)))
    order = np.argsort(ids[ok])
    return ids[ok][order], codes[order], checks
