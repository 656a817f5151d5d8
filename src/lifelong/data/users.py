"""The users table, derived from the event timeline so every source fills it the same way."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from lifelong.data.schema import EVENTS_SCHEMA, EXPLICIT_BITS, USERS_SCHEMA


def sort_events(events: pa.Table) -> pa.Table:
    """Cast to the events schema and sort by (user_id, ts_ms, request_id, item_id).

    The full sort key makes the order, hence the written bytes, deterministic.
    """
    events = events.select(EVENTS_SCHEMA.names).cast(EVENTS_SCHEMA)
    return events.sort_by([("user_id", "ascending"), ("ts_ms", "ascending"),
                           ("request_id", "ascending"), ("item_id", "ascending")])


def users_from_events(events: pa.Table) -> pa.Table:
    """Per-user first/last timestamp and event counts of a (user, ts)-sorted events table."""
    users = events.column("user_id").to_numpy()
    ts = events.column("ts_ms").to_numpy()
    explicit = (events.column("action_mask").to_numpy() & EXPLICIT_BITS) != 0
    if users.size == 0:
        return USERS_SCHEMA.empty_table()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], users.size]
    return pa.table(
        {
            "user_id": users[starts],
            "first_ts_ms": ts[starts],
            "last_ts_ms": ts[ends - 1],
            "n_events": (ends - starts).astype(np.int64),
            "n_explicit": np.add.reduceat(explicit.astype(np.int64), starts),
        },
        schema=USERS_SCHEMA,
    )
