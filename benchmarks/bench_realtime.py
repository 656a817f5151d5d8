"""Real-time features: events/s the follower appends, and the freshness lag to a live ``/rank``.

1. **Throughput.** A synthetic dataset (``--users`` users, ``--items`` items, ``--per-user``
   requests of 1-3 impressions each, ~25% acted on) is loaded up to its median event time; the
   rest is appended to an embedded log, and :class:`RealtimeConsumer` appends it to the store
   (``--batch`` events a batch) until caught up: events/s, batches/s, users rewritten a batch.
   LMDB, and Redis (store and stream) when ``redis-server`` is on PATH.
2. **Freshness.** ``lifelong serve`` (a TransAct V2 of random weights over the LMDB store: the
   lag does not depend on them) and ``lifelong store follow --poll-ms P`` run as processes. For
   each of ``--probes`` users: rank 8 candidates, append one repin stamped with the wall clock,
   then rank every 2 ms until the scores change (the served S_RT holds the event). The lag is
   event time -> the first ``/rank`` answer that shows it.

    .venv/bin/python benchmarks/bench_realtime.py [--users 2000] [--per-user 300] [--batch 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from lifelong.bench.machine import cpu_model
from lifelong.core.processes import free_port, stop_process
from lifelong.data.io import write_json, write_parquet
from lifelong.data.protocol import Protocol
from lifelong.data.schema import EMBED_DIM, HEADS, ITEMS_SCHEMA, Action
from lifelong.data.users import sort_events, users_from_events
from lifelong.store.feature_store import load_store
from lifelong.store.realtime import RealtimeConsumer
from lifelong.store.stream import EVENT_DTYPE, LogStream, open_stream, to_records
from lifelong.transact.registry import build_model
from lifelong.transact.sequence_layout import SequenceLayout

LAYOUT = SequenceLayout(ll_nn=64, rt=64, rt_nn=32, imp_nn=32)
LL_CAP, IMP_CAP = 1000, 1000
IMP, CLICK, REPIN = (int(a) for a in (Action.IMPRESSION, Action.CLICK, Action.REPIN))


def make_dataset(root: Path, users: int, items: int, per_user: int, seed: int = 0) -> tuple[Path, Path, np.ndarray]:
    """Source and built directories of the events up to the median time; returns them and the stream's events."""
    rng = np.random.default_rng(seed)
    per_req = rng.integers(1, 4, users * per_user)
    user = np.repeat(np.repeat(np.arange(users), per_user), per_req)
    gaps = rng.integers(1, 60_000, (users, per_user)).cumsum(axis=1) + 1_700_000_000_000
    ts = np.repeat(gaps.ravel(), per_req)
    request = np.repeat(np.arange(users * per_user), per_req)
    n = ts.size
    mask = IMP | np.where(rng.random(n) < 0.2, CLICK, 0) | np.where(rng.random(n) < 0.08, REPIN, 0)
    events = sort_events(pa.table({"user_id": user, "item_id": rng.integers(0, items, n), "ts_ms": ts,
                                   "surface": rng.integers(0, 3, n), "action_mask": mask,
                                   "dwell_ms": np.full(n, 100), "request_id": request}))
    cut = int(np.median(ts))
    src, built = root / "src", root / "built"
    src.mkdir()
    (built / "items").mkdir(parents=True)
    emb = rng.integers(-127, 128, (items, EMBED_DIM)).astype(np.int8)
    item_table = pa.table({"item_id": np.arange(items, dtype=np.int64),
                           "embedding": pa.FixedSizeListArray.from_arrays(pa.array((emb / 127).astype(np.float16).ravel()), EMBED_DIM),
                           "author_id": np.zeros(items, np.int64), "topic_id": np.zeros(items, np.int32),
                           "media_type": np.zeros(items, np.int8), "duration_ms": np.zeros(items, np.int32)},
                          schema=ITEMS_SCHEMA)
    loaded = events.filter(pa.compute.less_equal(events.column("ts_ms"), cut))
    write_parquet(item_table, src / "items.parquet")
    write_parquet(loaded, src / "events.parquet")
    write_parquet(users_from_events(loaded), src / "users.parquet")
    write_json({"kind": "ingest", "protocol": Protocol.fit(0, 1).to_dict()}, src / "dataset.json")
    for key, arr in (("item_id", np.arange(items, dtype=np.int64)), ("author_id", np.zeros(items, np.int64)),
                     ("topic_id", np.zeros(items, np.int64)), ("emb_int8", emb)):
        np.save(built / "items" / f"{key}.npy", arr)
    write_json({"data": str(src), "heads": list(HEADS), "layout": asdict(LAYOUT),
                "config": {"ll_cap": LL_CAP, "imp_cap": IMP_CAP}}, built / "build.json")
    rec = to_records(events.filter(pa.compute.greater(events.column("ts_ms"), cut)))
    return src, built, rec[np.lexsort((rec["user_id"], rec["ts_ms"]))]


def throughput(built: Path, records: np.ndarray, store_url: str, stream_url: str, batch: int) -> dict:
    load_store(built, store_url, progress=False)
    with open_stream(stream_url) as stream:
        for i in range(0, len(records), 65536):
            stream.append(records[i:i + 65536])
    with RealtimeConsumer(store_url, stream_url, batch=batch) as consumer:
        t = time.perf_counter()
        done = consumer.run_until_caught_up()
        seconds = time.perf_counter() - t
    events = sum(s.events for s in done)
    return {"events": events, "seconds": round(seconds, 3), "events_per_s": round(events / seconds),
            "batches": len(done), "users_per_batch": round(float(np.mean([s.users for s in done])), 1),
            "tokens_appended": sum(s.explicit + s.impressions for s in done)}


def _rank(url: str, user: int) -> list[float]:
    body = json.dumps({"user_id": user, "candidates": list(range(8))}).encode()
    req = urllib.request.Request(url + "/rank", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return [i["score"] for i in sorted(json.load(resp)["items"], key=lambda i: i["item_id"])]


def freshness(root: Path, built: Path, users: int, probes: int, poll_ms: float, seed: int = 1) -> dict:
    store, stream_dir, run = root / "fresh_store", root / "fresh_stream", root / "run"
    load_store(built, str(store), progress=False)
    run.mkdir()
    model = build_model("transact_v2", layout=LAYOUT, n_heads=len(HEADS))
    torch.save({"name": "transact_v2", "layout": asdict(LAYOUT), "n_heads": len(HEADS), "train": {},
                "state_dict": model.state_dict()}, run / "model.pt")
    port = free_port()
    cli = [sys.executable, "-m", "lifelong.cli"]
    serve = subprocess.Popen([*cli, "serve", "--run", str(run), "--store", str(store), "--port", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stream = LogStream(stream_dir)
    stream.append(np.zeros(0, EVENT_DTYPE))
    follow = subprocess.Popen([*cli, "store", "follow", "--store", str(store), "--stream", str(stream_dir),
                               "--poll-ms", str(poll_ms)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(seed)
    lags = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                _rank(url, 0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        time.sleep(2.0)  # the follower's start-up (its first poll made the version's state)
        for user in rng.choice(users, probes, replace=False):
            before = _rank(url, int(user))
            event = np.zeros(1, EVENT_DTYPE)
            now_ms = int(time.time() * 1000)
            event[0] = (int(user), int(rng.integers(0, 1000)), now_ms, REPIN | IMP, 0, 0, 1)
            stream.append(event)
            while _rank(url, int(user)) == before:
                if time.time() * 1000 - now_ms > 10_000:
                    raise RuntimeError(f"user {user}: the event never became visible")
                time.sleep(0.002)
            lags.append(time.time() * 1000 - now_ms)
            time.sleep(0.05)
    finally:
        stream.close()
        stop_process(follow)
        stop_process(serve)
    lags = np.array(lags)
    return {"probes": probes, "poll_ms": poll_ms, "lag_ms_p50": round(float(np.percentile(lags, 50)), 1),
            "lag_ms_p90": round(float(np.percentile(lags, 90)), 1), "lag_ms_max": round(float(lags.max()), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--per-user", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--probes", type=int, default=30)
    parser.add_argument("--poll-ms", type=float, default=50.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = {"machine": {"cpu": cpu_model(), "nproc": os.cpu_count(), "date": time.strftime("%Y-%m-%d")},
              "args": vars(args) | {"json": str(args.json)}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, built, records = make_dataset(root, args.users, args.items, args.per_user)
        result["stream_events"] = len(records)
        result["lmdb"] = throughput(built, records, str(root / "store"), str(root / "stream"), args.batch)
        print(f"LMDB + log: {result['lmdb']}", flush=True)
        exe = shutil.which("redis-server")
        if exe is not None:
            port = free_port()
            proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(0.5)
                url = f"redis://127.0.0.1:{port}/0"
                result["redis"] = throughput(built, records, url, url + "?key=bench", args.batch)
                print(f"Redis + Redis stream: {result['redis']}", flush=True)
            finally:
                stop_process(proc)
        result["freshness"] = freshness(root, built, args.users, args.probes, args.poll_ms)
        print(f"freshness (LMDB, follow --poll-ms {args.poll_ms:g}): {result['freshness']}", flush=True)
    print(json.dumps(result["machine"]))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
