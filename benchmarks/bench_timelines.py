"""Throughput of point-in-time timeline construction (lifelong.data.timelines).

Builds a synthetic sorted events table (default 2,000 users, 10M events, ~30% explicit), then
times, for 1M random (user, request time) pairs:

1. range computation (``build_timelines``: S_LL / S_RT / S_IMP bounds, default caps);
2. materialising the row indices of all three sequences, at smaller caps, on a subsample;
3. a naive per-request Python loop over the same index (one ``np.searchsorted`` per request
   and sequence kind) on a small subsample, checked equal to (1), for the speed-up ratio.

Usage::

    .venv/bin/python benchmarks/bench_timelines.py [--users 2000] [--events 10000000] [--requests 1000000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lifelong.data.schema import Action
from lifelong.data.timelines import EventIndex, TimelineConfig, build_timelines

DAY_MS = 86_400_000


def synthetic_events(n_users: int, n_events: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted (user_id, ts_ms, action_mask) with skewed per-user history lengths and tied ts."""
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 1.0, n_users)
    counts = rng.multinomial(n_events, weights / weights.sum())
    ids = np.sort(rng.choice(10 * n_users, n_users, replace=False)).astype(np.int64)
    user = np.repeat(ids, counts)
    # Gaps of 0 give ties; restarting the running sum at each user keeps ts sorted per user.
    gaps = rng.integers(0, 2 * 365 * DAY_MS // max(1, n_events // n_users), n_events)
    gaps[rng.random(n_events) < 0.2] = 0
    csum = np.cumsum(gaps)
    first = np.r_[0, np.cumsum(counts)[:-1]]
    ts = 1_600_000_000_000 + csum - np.repeat(csum[first] - gaps[first], counts)
    mask = np.full(n_events, int(Action.IMPRESSION), dtype=np.uint16)
    engaged = rng.random(n_events) < 0.3
    mask[engaged] |= (1 << rng.integers(1, 11, int(engaged.sum()))).astype(np.uint16)
    return user, ts, mask


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def naive_ranges(index: EventIndex, user_ids: np.ndarray, request_ts: np.ndarray,
                 cfg: TimelineConfig) -> dict[str, list[tuple[int, int]]]:
    """The obvious loop: per request, find the user's segments and binary-search each one."""
    segment = {int(u): k for k, u in enumerate(index.users)}
    out: dict[str, list[tuple[int, int]]] = {"ll": [], "rt": [], "imp": []}
    for u, t in zip(user_ids.tolist(), request_ts.tolist()):
        k = segment.get(u, index.users.size)
        e0, e1 = index.explicit.starts[k], index.explicit.starts[k + 1]
        i0, i1 = index.impressions.starts[k], index.impressions.starts[k + 1]
        rt_end = e0 + int(np.searchsorted(index.explicit.ts[e0:e1], t))
        rt_start = max(e0, rt_end - cfg.rt_cap)
        imp_end = i0 + int(np.searchsorted(index.impressions.ts[i0:i1], t))
        out["rt"].append((rt_start, rt_end))
        out["ll"].append((max(e0, rt_start - cfg.ll_cap), rt_start))
        out["imp"].append((max(i0, imp_end - cfg.imp_cap), imp_end))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--materialise-requests", type=int, default=200_000)
    parser.add_argument("--naive-requests", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    user, ts, mask = synthetic_events(args.users, args.events, args.seed)
    print(f"synthetic events: {args.events:,} rows, {args.users:,} users, "
          f"{time.perf_counter() - start:.1f} s to generate")

    start = time.perf_counter()
    index = EventIndex(user, ts, mask)
    print(f"EventIndex build: {time.perf_counter() - start:.2f} s "
          f"({index.explicit.rows.size:,} explicit, {index.impressions.rows.size:,} bare impressions, "
          f"longest user segment {index.explicit.longest:,} explicit)")

    rng = np.random.default_rng(args.seed + 1)
    # 1% unknown users; request times over the whole span, so some precede a user's history.
    req_user = np.where(rng.random(args.requests) < 0.01, -1, rng.choice(index.users, args.requests))
    req_ts = rng.integers(ts.min(), ts.max() + 2, args.requests)

    cfg = TimelineConfig()
    t_ranges = best_of(args.repeats, lambda: build_timelines(index, req_user, req_ts, cfg))
    ranges_rps = args.requests / t_ranges
    print(f"ranges   ({cfg}): {args.requests:,} requests in {t_ranges:.3f} s "
          f"= {ranges_rps:,.0f} requests/s")

    small = TimelineConfig(ll_cap=256, rt_cap=64, imp_cap=64)
    m = min(args.materialise_requests, args.requests)

    def materialise() -> int:
        tl = build_timelines(index, req_user[:m], req_ts[:m], small)
        return tl.ll.values.size + tl.rt.values.size + tl.imp.values.size

    tokens = materialise()
    t_mat = best_of(args.repeats, materialise)
    print(f"ranges + row indices ({small}): {m:,} requests in {t_mat:.3f} s = {m / t_mat:,.0f} requests/s, "
          f"{tokens / t_mat / 1e6:,.1f} M tokens/s ({tokens / m:.0f} tokens/request)")

    k = min(args.naive_requests, args.requests)
    start = time.perf_counter()
    naive = naive_ranges(index, req_user[:k], req_ts[:k], cfg)
    naive_rps = k / (time.perf_counter() - start)
    fast = build_timelines(index, req_user[:k], req_ts[:k], cfg)
    for name, pairs in naive.items():
        lo, hi = np.array(pairs, dtype=np.int64).reshape(-1, 2).T
        assert np.array_equal(lo, fast.ranges[name][0]) and np.array_equal(hi, fast.ranges[name][1]), name
    print(f"naive per-request loop: {k:,} requests = {naive_rps:,.0f} requests/s; "
          f"vectorised ranges are {ranges_rps / naive_rps:,.0f}x faster (results equal)")


if __name__ == "__main__":
    main()
