"""Taobao UserBehavior (``UserBehavior.csv``: comma-separated, no header,
``user_id, item_id, category_id, behavior_type, timestamp``).

One event per row, with the four real action types:

- ``pv`` -> IMPRESSION (a page view: the item was seen, nothing more), ``cart`` -> CART,
  ``fav`` -> REPIN (save), ``buy`` -> PURCHASE; any other label is quarantined as
  ``unknown behaviour``;
- one event per (user, item, request): a user's rows on one item within the hour are one
  shown item whose action mask is the union of theirs, at the first row's time, with the
  IMPRESSION bit (a cart, fav or buy is made on the item's page, so the item was shown). So a
  training row's labels say what the user did with the item it showed: without the merge a
  ``pv`` and a ``fav`` of the same item would be two rows, one shown and never saved, one
  saved but not shown, and no shown row would ever carry a save;
- ``ts_ms = timestamp * 1000``; the dataset documents its window as 2017-11-25 00:00:00 to
  2017-12-03 23:59:59 China time (UTC+8), and rows outside it are quarantined as
  ``timestamp outside window`` (the head file has a few from September 2017);
- ``topic_id`` = 1 + rank of ``category_id`` among the sorted category ids (0 stays "unknown");
- ``request_id`` = one chunk per (user, UTC hour); surface ``other`` (the log does not say where
  the item was shown); media image; dwell 0; author 0.

Item embeddings use page views as engagement as well as cart/fav/buy: a Taobao ``pv`` opens the
item's detail page, a user-initiated view, unlike a feed impression.

Example::

    parsed = parse(Path("../shared/data/taobao-userbehavior-head"))
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
    dense_ids,
    events_table,
    read_rows,
    seconds_to_ms,
)
from lifelong.data.schema import EXPLICIT_BITS, SURFACE_CODES, Action

FILE = "UserBehavior.csv"
COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
BEHAVIOURS = {"pv": Action.IMPRESSION, "cart": Action.CART, "fav": Action.REPIN, "buy": Action.PURCHASE}
WINDOW_START_S = 1_511_539_200
"""2017-11-25 00:00:00 UTC+8."""
WINDOW_END_S = 1_512_316_800
"""2017-12-04 00:00:00 UTC+8 (exclusive: the last valid second is 2017-12-03 23:59:59)."""
HOUR_MS = 3_600_000
MAPPING = {
    "action_mask": "pv: IMPRESSION, cart: CART, fav: REPIN, buy: PURCHASE; a user's rows on an item within"
                   " the request are one event (union of bits, first time, IMPRESSION)",
    "ts_ms": "timestamp * 1000; rows outside 2017-11-25 00:00 .. 2017-12-03 23:59:59 UTC+8 quarantined",
    "request_id": "one per (user, UTC hour)",
    "surface": "other",
    "topic_id": "1 + rank of category_id among the sorted category ids",
    "media_type": "image",
    "author_id": "0 (not in the data)",
}


def parse(src: Path) -> Parsed:
    """Read and validate ``UserBehavior.csv`` of ``src``.

    Args:
        src: the ``taobao-userbehavior-head`` folder.

    Raises:
        DataError: the file is missing or no line has the five expected fields.

    Example::

        events = parse(src).events
    """
    path = Path(src) / FILE
    rows = read_rows(path, ",", header=False, names=COLUMNS)
    checks = RowChecks(rows)
    item = checks.ints("item_id")
    category = checks.ints("category_id")
    item_ok = checks.ok
    user = checks.ints("user_id")
    code = pc.index_in(rows.column("behavior_type"), value_set=pa.array(list(BEHAVIOURS)))
    checks.flag(code.is_null().to_numpy(zero_copy_only=False), "unknown behaviour")
    seconds = checks.ints("timestamp", nonnegative=False)
    ts = seconds_to_ms(checks, seconds)
    checks.flag((seconds < WINDOW_START_S) | (seconds >= WINDOW_END_S), "timestamp outside window")

    bits = np.array([int(b) for b in BEHAVIOURS.values()], dtype=np.int64)
    mask = bits[pc.fill_null(code, 0).to_numpy(zero_copy_only=False)]
    ok = checks.ok
    user, item_id, ts, mask = user[ok], item[ok], ts[ok], mask[ok] | int(Action.IMPRESSION)
    request = dense_ids(user, ts // HOUR_MS)
    shown = dense_ids(user, item_id, request)
    order = np.lexsort((ts, shown))  # each shown item's rows together, its first row first
    starts = np.flatnonzero(np.r_[True, shown[order][1:] != shown[order][:-1]])
    first = order[starts]
    events = events_table(user[first], item_id[first], ts[first],
                          np.bitwise_or.reduceat(mask[order], starts), request[first], SURFACE_CODES["other"])
    topics = dense_ids(category[item_ok]) + 1
    items = ItemCatalog.from_rows(item[item_ok], "image", topic_ids=topics)
    return Parsed(len(rows), events, items, [checks], has_impressions=True,
                  embedding_bits=EXPLICIT_BITS | int(Action.IMPRESSION), mapping=MAPPING, main_file=path)
