"""Shared fixtures: tiny hand-made tables in the declared schemas."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest
import redis
import torch

from lifelong.core.processes import free_port, stop_process
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


# -- a private redis-server (one per pytest-xdist worker) for the Redis backends -------------------


def wait_ready(proc: subprocess.Popen, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:  # died, e.g. another process took the port first
                return False
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                time.sleep(0.05)
        return False
    finally:
        client.close()


@pytest.fixture
def closed_port() -> int:
    """A local port with no server behind it."""
    return free_port()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """URL of a throwaway redis-server (no persistence), stopped at the end of the session."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not on PATH: the Redis backend tests need it (apt-get install redis-server)")
    workdir = tmp_path_factory.mktemp("redis")
    # The free port can be taken between picking and binding it (other xdist workers): retry.
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait_ready(proc, port, timeout_s=10.0):
            break
        proc.terminate()
        proc.wait()
    else:
        pytest.fail("redis-server did not answer PING within 10 s on three ports")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test runs torch on one thread: test tensors are tiny, and with ``pytest -n 2`` on a
    2-core machine two workers with two threads each oversubscribe the cores and stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
