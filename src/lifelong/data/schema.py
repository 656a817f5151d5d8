"""The one declaration of lifelong's data model.

Every writer produces, and every reader validates against, the Arrow schemas below. Keeping
them in one module means a column added here is added everywhere.

Example::

    >>> from lifelong.data.schema import Action, EVENTS_SCHEMA
    >>> int(Action.IMPRESSION | Action.CLICK)
    3
    >>> EVENTS_SCHEMA.field("action_mask").type
    DataType(uint16)
"""

from __future__ import annotations

import enum

import pyarrow as pa

EMBED_DIM = 32
"""Width of every item content embedding (the paper's PinSage role)."""


class Action(enum.IntFlag):
    """Bits of ``events.action_mask``. Several bits are set when a user acted several ways."""

    IMPRESSION = 1 << 0
    CLICK = 1 << 1  # click / closeup
    REPIN = 1 << 2  # repin / save / like-strong positive
    LIKE = 1 << 3
    SHARE = 1 << 4
    COMMENT = 1 << 5
    HIDE = 1 << 6  # explicit negative feedback
    LONG_VIEW = 1 << 7
    FOLLOW = 1 << 8
    CART = 1 << 9
    PURCHASE = 1 << 10


KNOWN_ACTION_BITS = int(sum(a.value for a in Action))
EXPLICIT_BITS = KNOWN_ACTION_BITS & ~int(Action.IMPRESSION)
"""An event with any of these bits is an explicit action (it enters S_LL / S_RT)."""
NEGATIVE_BITS = int(Action.HIDE)
POSITIVE_BITS = EXPLICIT_BITS & ~NEGATIVE_BITS
"""Positive engagement: targets of the Next Action Loss, never impression negatives."""

ACTION_NAMES: dict[str, int] = {a.name.lower(): int(a.value) for a in Action}

SURFACES: tuple[str, ...] = ("homefeed", "search", "related", "profile", "other")
"""``events.surface`` is an index into this tuple."""
SURFACE_CODES: dict[str, int] = {name: i for i, name in enumerate(SURFACES)}

MEDIA_TYPES: tuple[str, ...] = ("image", "video")

HEADS: tuple[str, ...] = ("click", "repin", "long_view", "hide")
"""Ranking heads with a label bit each; the oracle stores one probability per head."""
HEAD_BITS: dict[str, int] = {h: ACTION_NAMES[h] for h in HEADS}


def _embedding_type() -> pa.DataType:
    return pa.list_(pa.float16(), EMBED_DIM)


ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("embedding", _embedding_type(), nullable=False),
        pa.field("author_id", pa.int64(), nullable=False),
        pa.field("topic_id", pa.int32(), nullable=False),
        pa.field("media_type", pa.int8(), nullable=False),
        pa.field("duration_ms", pa.int32(), nullable=False),
    ],
    metadata={"lifelong.table": "items"},
)

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("ts_ms", pa.int64(), nullable=False),
        pa.field("surface", pa.int8(), nullable=False),
        pa.field("action_mask", pa.uint16(), nullable=False),
        pa.field("dwell_ms", pa.int32(), nullable=False),
        pa.field("request_id", pa.int64(), nullable=False),
    ],
    metadata={"lifelong.table": "events"},
)
"""The unified timeline, sorted by (user_id, ts_ms). Impressions are events too."""

USERS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("first_ts_ms", pa.int64(), nullable=False),
        pa.field("last_ts_ms", pa.int64(), nullable=False),
        pa.field("n_events", pa.int64(), nullable=False),
        pa.field("n_explicit", pa.int64(), nullable=False),
    ],
    metadata={"lifelong.table": "users"},
)

ORACLE_SCHEMA = pa.schema(
    [pa.field("user_id", pa.int64(), nullable=False),
     pa.field("item_id", pa.int64(), nullable=False),
     pa.field("ts_ms", pa.int64(), nullable=False),
     pa.field("request_id", pa.int64(), nullable=False)]
    + [pa.field(f"p_{h}", pa.float32(), nullable=False) for h in HEADS],
    metadata={"lifelong.table": "oracle"},
)
"""True head probabilities of every shown item (simulated worlds only)."""

TABLES: dict[str, pa.Schema] = {
    "items": ITEMS_SCHEMA,
    "events": EVENTS_SCHEMA,
    "users": USERS_SCHEMA,
    "oracle": ORACLE_SCHEMA,
}
"""File stem -> schema: a dataset directory holds ``<stem>.parquet`` for each."""
