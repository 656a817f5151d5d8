"""DV365 multi-slicing throughput: users/s featurised at a 40k-event mean timeline, side by side.

Synthetic unified timelines (default 64 users, lengths ~ N(40k, 10k) clipped to [1k, 70k], two
years of history each; 200k items, 20k authors, 256 topics, 40% videos; DV365-like action and
dwell mix), the default spec (207 slices, 15 tables), embedding width D = 32, fp32. Timed,
best of ``--repeats``, over the users in batches of ``--batch``:

1. **cut**: :meth:`TimelineSource.batch`: the timelines before t, joined with item attributes,
   from a sorted events table;
2. **membership**: :meth:`SliceFeaturizer.membership` (numpy: rules, windows, bags);
3. **pool**: :func:`pool_slices` forward (torch ``embedding_bag``), and forward + backward;
4. **naive**: a per-user, per-slice Python loop (each slice's rules and window re-evaluated on
   that user's events with numpy, then a numpy (weighted) mean) on ``--naive-users`` users,
   checked equal to the vectorised result.

"featurise" = membership + pool forward, the issue's target: >= 200 users/s at a 40k mean on a
2-core machine. Prints a markdown table and the machine (nproc, CPU model, load average).

    .venv/bin/python benchmarks/bench_slicing.py [--users 64] [--mean 40000] [--batch 16] [--dim 32]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch

from lifelong.bench.machine import cpu_model
from lifelong.data.schema import Action
from lifelong.dv365.featurize import SliceFeaturizer, TimelineSource, UserTimelines, pool_slices
from lifelong.dv365.slices import SliceSpec

DAY_MS = 86_400_000
T_MS = 1_700_000_000_000
N_ITEMS, N_AUTHORS, N_TOPICS = 200_000, 20_000, 256
ACTION_RATES = {Action.CLICK: 0.06, Action.REPIN: 0.015, Action.LIKE: 0.01, Action.SHARE: 0.003,
                Action.COMMENT: 0.003, Action.HIDE: 0.005, Action.LONG_VIEW: 0.03, Action.FOLLOW: 0.001,
                Action.CART: 0.001, Action.PURCHASE: 0.0005}


def synthetic(n_users: int, mean: int, std: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """(events, items) tables: every user's two years of events before ``T_MS``, sorted."""
    rng = np.random.default_rng(seed)
    video = rng.random(N_ITEMS) < 0.4
    duration = np.where(video, np.clip(20_000 * np.exp(0.8 * rng.standard_normal(N_ITEMS)), 3_000, 600_000), 0)
    items = pa.table({"item_id": np.arange(N_ITEMS, dtype=np.int64),
                      "author_id": rng.integers(0, N_AUTHORS, N_ITEMS, dtype=np.int64),
                      "topic_id": rng.integers(0, N_TOPICS, N_ITEMS).astype(np.int32),
                      "media_type": video.astype(np.int8), "duration_ms": duration.astype(np.int32)})
    lengths = np.clip(np.round(rng.normal(mean, std, n_users)), 1_000, 70_000).astype(np.int64)
    n = int(lengths.sum())
    user = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    # Sorting (user, ts) jointly: ts are uniform over two years, so the 3d / 7d windows hold ~0.4% / 1%.
    ts = T_MS - rng.integers(1, 730 * DAY_MS, n)
    order = np.lexsort((ts, user))
    ts = ts[order]
    item = (rng.pareto(1.2, n) * 1_000).astype(np.int64) % N_ITEMS  # heavy-tailed popularity
    mask = np.full(n, int(Action.IMPRESSION), dtype=np.uint16)
    for action, rate in ACTION_RATES.items():
        mask[rng.random(n) < rate] |= np.uint16(action)
    engaged = (mask & ~np.uint16(Action.IMPRESSION)) != 0
    dur = duration[item]
    dwell = np.where(engaged, rng.lognormal(np.log(6_000), 1.0, n), rng.lognormal(np.log(800), 0.6, n))
    dwell = np.where(engaged & (dur > 0), dur * rng.uniform(0.1, 1.5, n), dwell)
    events = pa.table({"user_id": user, "item_id": item, "ts_ms": ts, "action_mask": mask,
                       "dwell_ms": dwell.astype(np.int32)})
    return events, items


def best_time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def naive(spec: SliceSpec, tl: UserTimelines, tables: dict[str, np.ndarray], id_rows: dict[str, int]) -> np.ndarray:
    """The obvious loop: for every user and slice, filter that user's events, then average."""
    out = np.zeros((tl.n_users, len(spec), next(iter(tables.values())).shape[1]), dtype=np.float64)
    for u in range(tl.n_users):
        lo, hi = tl.offsets[u], tl.offsets[u + 1]
        age = tl.t_ms[u] - tl.ts_ms[lo:hi]
        events = UserTimelines(tl.t_ms[u:u + 1], np.array([0, hi - lo]), tl.ts_ms[lo:hi], tl.action_mask[lo:hi],
                               tl.dwell_ms[lo:hi], tl.media_type[lo:hi], tl.duration_ms[lo:hi],
                               {k: v[lo:hi] for k, v in tl.ids.items()})
        for j, s in enumerate(spec.slices):
            keep = s.mask(events) & (age > 0) & (age <= (np.inf if s.window.ms is None else s.window.ms))
            if not keep.any():
                continue
            rows = tables[s.table][events.ids[s.id_type][keep] % id_rows[s.id_type]]
            w = s.weights(events)
            w = np.ones(rows.shape[0]) if w is None else w[keep]
            if w.sum() > 0:
                out[u, j] = (w[:, None] * rows).sum(0) / w.sum()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--mean", type=int, default=40_000)
    parser.add_argument("--std", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--naive-users", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (use 1 when other jobs keep the cores busy: OpenMP waits stall)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    events, items = synthetic(args.users, args.mean, args.std, args.seed)
    source = TimelineSource(events, items)
    spec = SliceSpec.default()
    id_rows = {"media": N_ITEMS, "author": N_AUTHORS, "topic": N_TOPICS}
    featurizer = SliceFeaturizer(spec, id_rows)
    gen = torch.Generator().manual_seed(args.seed)
    tables = {key: (torch.randn(id_rows[t], args.dim, generator=gen) * args.dim**-0.5).requires_grad_()
              for key, t in spec.tables.items()}
    starts = range(0, args.users, args.batch)
    user_ids = np.arange(args.users, dtype=np.int64)
    t_ms = np.full(args.users, T_MS, dtype=np.int64)
    batches = [source.batch(user_ids[i:i + args.batch], t_ms[i:i + args.batch]) for i in starts]
    n_events = sum(int(b.offsets[-1]) for b in batches)
    memberships = [featurizer.membership(b) for b in batches]
    lookups = sum(int(b.indices.numel()) for m in memberships for b in m.bags)

    def forward_backward() -> None:
        for m in memberships:
            pool_slices(m, tables).embeddings.sum().backward()

    def featurise() -> None:
        for b in batches:
            pool_slices(featurizer.membership(b), tables)

    t_cut = best_time(lambda: [source.batch(user_ids[i:i + args.batch], t_ms[i:i + args.batch]) for i in starts],
                      args.repeats)
    t_member = best_time(lambda: [featurizer.membership(b) for b in batches], args.repeats)
    with torch.no_grad():
        t_pool = best_time(lambda: [pool_slices(m, tables) for m in memberships], args.repeats)
        t_feat = best_time(featurise, args.repeats)
    t_back = best_time(forward_backward, args.repeats)

    k = min(args.naive_users, args.users)
    small = source.batch(user_ids[:k], t_ms[:k])
    numpy_tables = {key: t.detach().double().numpy() for key, t in tables.items()}
    t0 = time.perf_counter()
    reference = naive(spec, small, numpy_tables, id_rows)
    t_naive = time.perf_counter() - t0
    with torch.no_grad():
        fast = pool_slices(featurizer.membership(small), tables).embeddings.double().numpy()
    assert np.allclose(fast, reference, atol=1e-5), float(np.abs(fast - reference).max())

    rate = args.users / t_feat
    print(f"# bench_slicing — nproc {os.cpu_count()}, {cpu_model()}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}, numpy {np.__version__}")
    print(f"\n{args.users} users, {n_events:,} events (mean {n_events / args.users:,.0f}/user), "
          f"{len(spec)} slices, {len(spec.tables)} tables, D = {args.dim}, batches of {args.batch} users, "
          f"{lookups:,} embedding lookups ({lookups / n_events:.1f} per event)\n")
    print("| stage | s | users/s | M events/s |")
    print("|---|---:|---:|---:|")
    for name, seconds in [("cut timelines (TimelineSource.batch)", t_cut), ("membership (numpy)", t_member),
                          ("pool forward (embedding_bag)", t_pool), ("**featurise = membership + pool**", t_feat),
                          ("pool forward + backward", t_back)]:
        print(f"| {name} | {seconds:.3f} | {args.users / seconds:,.0f} | {n_events / seconds / 1e6:,.1f} |")
    naive_rate = k / t_naive
    print(f"| naive per-user/per-slice loop ({k} users) | {t_naive:.3f} | {naive_rate:,.2f} | "
          f"{int(small.offsets[-1]) / t_naive / 1e6:,.2f} |")
    print(f"\nfeaturise: {rate:,.0f} users/s, {rate / naive_rate:,.0f}x the naive loop (results equal, atol 1e-5); "
          f"target >= 200 users/s: {'met' if rate >= 200 else 'NOT met'}")


if __name__ == "__main__":
    main()
