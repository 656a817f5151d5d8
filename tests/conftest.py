"""Shared fixtures: tiny hand-made tables in the declared schemas."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from lifelong.data.schema import EMBED_DIM, ITEMS_SCHEMA, Action
from lifelong.data.users import sort_events, users_from_events

os.environ.setdefault("LIFELONG_QUIET", "1")


def make_items(n: int = 6, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    emb = (rng.standard_normal((n, EMBED_DIM)) / np.sqrt(EMBED_DIM)).astype(np.float16)
    return pa.table(
        {
            "item_id": np.arange(n, dtype=np.int64),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), EMBED_DIM),
            "author_id": np.zeros(n, dtype=np.int64),
            "topic_id": np.arange(n, dtype=np.int32) % 3,
            "media_type": np.zeros(n, dtype=np.int8),
            "duration_ms": np.zeros(n, dtype=np.int32),
        },
        schema=ITEMS_SCHEMA,
    )


def make_events() -> pa.Table:
    imp, click, repin, hide = (int(a) for a in (Action.IMPRESSION, Action.CLICK, Action.REPIN, Action.HIDE))
    rows = [  # user, item, ts, mask, request
        (1, 0, 1_000, imp, 10), (1, 1, 1_000, imp | click, 10), (1, 2, 2_000, imp | repin, 11),
        (1, 3, 3_000, imp | hide, 12), (2, 4, 1_500, imp, 13), (2, 5, 2_500, imp | click | repin, 14),
    ]
    u, i, t, m, r = (np.array(c) for c in zip(*rows))
    return sort_events(pa.table({"user_id": u, "item_id": i, "ts_ms": t, "surface": np.zeros(len(u)),
                                 "action_mask": m, "dwell_ms": np.full(len(u), 100), "request_id": r}))


@pytest.fixture
def tiny_dataset(tmp_path):
    """A valid dataset directory with 2 users and 6 items."""
    from lifelong.data.io import write_json, write_parquet
    from lifelong.data.protocol import Protocol

    d = tmp_path / "ds"
    d.mkdir()
    events = make_events()
    write_parquet(make_items(), d / "items.parquet")
    write_parquet(events, d / "events.parquet")
    write_parquet(users_from_events(events), d / "users.parquet")
    write_json({"kind": "ingest", "protocol": Protocol.fit(0, 4_000).to_dict()}, d / "dataset.json")
    return d
