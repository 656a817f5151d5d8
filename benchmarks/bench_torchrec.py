"""Monolith's collision-less tables vs TorchRec's managed-collision (MCH/ZCH) tables, side by side on one id stream.

One run, one id stream, one small ranker, trained online in one pass (each batch is scored
before it is trained on: progressive validation):

- **stream**: a world's events in time order (``--world DIR``: its ``events.parquet``; the last
  ``--events`` events), or, without ``--world``, a seeded synthetic Zipf stream whose popular
  ids drift so that new ids keep arriving. Three id slots per event: user, item and the
  user x item cross (a long tail of mostly-new ids). Label: the event's ``click`` bit
  (``--label``), or on the synthetic stream a Bernoulli of a hidden per-id logit sum.
- **ranker**: per slot a dim-16 embedding, concatenated, then an MLP 48 -> 32 -> 1; the dense
  layers use Adam (lr 1e-2) and the embedding rows Adagrad (lr 0.05), identical initial dense
  weights in every variant.
- **variants**:
  - ``collision-less``: :class:`CollisionlessEmbedding` (cuckoo index, counting filter admitting
    an id at its 2nd occurrence, per-row sparse Adagrad);
  - ``torchrec MCH x f``: TorchRec's ``ManagedCollisionEmbeddingCollection`` with one
    ``MCHManagedCollisionModule`` per slot (DistanceLFU eviction, eviction interval 1 batch)
    sized at ``f`` times the collision-less table's final rows (plus its one shared miss row),
    so at f = 1 both hold the same number of rows; its ``nn.Embedding`` rows (sparse gradients) are trained
    by ``torch.optim.Adagrad`` (same lr, eps and zero initial accumulator);
  - ``modulo x 1``: :class:`ModuloEmbedding` at the same rows (ids hashed, collisions kept).

Measured: quality (AUC and NE over the whole stream and its second half), training
examples/s, batched lookups/s of ``--lookup-batch`` (4,096) ids of the cross slot (index only,
index + row gather, and the training-mode admit/profile path), and bytes per admitted id
(rows + index + optimizer state, with what else each table keeps).

TorchRec is optional (see docs/benchmarks.md for the exact pip commands); without it the
script measures the collision-less side only and says so.

    .venv/bin/python benchmarks/bench_torchrec.py --world worlds/small --events 500000 [--json out.json]
    .venv/bin/python benchmarks/bench_torchrec.py --dry-run     # synthetic, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lifelong.bench.machine import cpu_model
from lifelong.core.metrics import auc, normalized_entropy

# Monolith's table modules (now the shared package lifelong.tables), imported in this one place.
from lifelong.tables import embedding as _modules
from lifelong.tables import filters as _filters
from lifelong.tables import hashed as _hashed
from lifelong.tables import table as _table

FilterConfig = _filters.FilterConfig
ModuloEmbedding = _hashed.ModuloEmbedding
CollisionlessEmbedding, sparse_step = _modules.CollisionlessEmbedding, _modules.sparse_step
OptimizerConfig, TableConfig = _table.OptimizerConfig, _table.TableConfig

# torchrec's own metadata asks for the CUDA fbgemm-gpu: the extra holds the rest, torchrec comes without deps.
TORCHREC_INSTALL = ".venv/bin/pip install -e '.[torchrec]' && .venv/bin/pip install torchrec==1.8.0 --no-deps"
try:
    import torchrec
    from torchrec.modules.embedding_configs import EmbeddingConfig
    from torchrec.modules.embedding_modules import EmbeddingCollection
    from torchrec.modules.hash_mc_modules import HashZchManagedCollisionModule
    from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
    from torchrec.modules.mc_modules import (
        DistanceLFU_EvictionPolicy,
        ManagedCollisionCollection,
        MCHManagedCollisionModule,
    )
    from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

    TORCHREC_ERROR: str | None = None
except ImportError as exc:  # the optional extra is not installed
    torchrec = None
    TORCHREC_ERROR = f"{type(exc).__name__}: {exc}"

SLOTS = ("user", "item", "cross")
DIM = 16
EMB_LR = 0.05
DENSE_LR = 1e-2
INIT = 0.05
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer of uint64 values (numpy, wrapping)."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def cross_ids(user: np.ndarray, item: np.ndarray) -> np.ndarray:
    """A non-negative int64 id per (user, item) pair (never int64 max, TorchRec's empty-slot marker)."""
    key = (user.astype(np.uint64) << np.uint64(32)) ^ item.astype(np.uint64)
    return (splitmix(key) >> np.uint64(2)).astype(np.int64)


def world_stream(world: Path, n_events: int, label: str) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    from lifelong.data.schema import ACTION_NAMES

    t = pq.read_table(world / "events.parquet", columns=["user_id", "item_id", "ts_ms", "action_mask"])
    ts = t["ts_ms"].to_numpy()
    order = np.argsort(ts, kind="stable")[-n_events:]
    user, item = t["user_id"].to_numpy()[order], t["item_id"].to_numpy()[order]
    y = (t["action_mask"].to_numpy()[order] & ACTION_NAMES[label]) > 0
    # Distinct slots read distinct raw ids in one TorchRec collection too: offset them apart.
    return {"user": user + (1 << 40), "item": item + (2 << 40), "cross": cross_ids(user, item),
            "label": y.astype(np.float32)}


def synthetic_stream(n_events: int, seed: int) -> dict[str, np.ndarray]:
    """Zipf users and items; item popularity drifts (new items keep arriving); hidden per-id logits."""
    rng = np.random.default_rng(seed)
    n_users, n_items = max(n_events // 200, 50), max(n_events // 20, 200)
    user = (rng.zipf(1.2, n_events) - 1) % n_users
    drift = (np.arange(n_events) * 4 * n_items // n_events)  # the head moves over 4 catalogs' worth of ids
    item = (rng.zipf(1.1, n_events) - 1) % n_items + drift
    cross = cross_ids(user, item)

    def hidden(ids: np.ndarray, scale: float) -> np.ndarray:
        return ((splitmix(ids.astype(np.uint64)) >> np.uint64(11)).astype(np.float64) / 2**53 - 0.5) * 2 * scale

    logit = -2.5 + hidden(user + 7, 1.0) + hidden(item + 11, 1.5) + hidden(cross, 1.5)
    y = rng.random(n_events) < 1 / (1 + np.exp(-logit))
    return {"user": user + (1 << 40), "item": item + (2 << 40), "cross": cross, "label": y.astype(np.float32)}


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(len(SLOTS) * DIM, 32), nn.ReLU(), nn.Linear(32, 1))


def table_cfg(seed: int) -> TableConfig:
    return TableConfig(dim=DIM, init_scale=INIT, seed=seed, filter=FilterConfig(kind="counting", threshold=2, seed=seed),
                       optimizer=OptimizerConfig(kind="adagrad", lr=EMB_LR))


class MonolithModel(nn.Module):
    """Collision-less (or, with ``buckets``, modulo-hashed) tables + the MLP."""

    def __init__(self, seed: int, buckets: dict[str, int] | None = None):
        super().__init__()
        self.emb = nn.ModuleDict({
            s: (CollisionlessEmbedding(table_cfg(seed + i)) if buckets is None
                else ModuloEmbedding(table_cfg(seed + i), buckets[s]))
            for i, s in enumerate(SLOTS)})
        self.head = mlp(seed)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(torch.cat([self.emb[s](batch[s]) for s in SLOTS], 1)).squeeze(1)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.head.parameters(), lr=DENSE_LR)]

    def after_step(self) -> None:
        sparse_step(self, now_ms=0)


class TorchRecModel(nn.Module):
    """TorchRec's ManagedCollisionEmbeddingCollection (one MCH module per slot) + the MLP."""

    def __init__(self, seed: int, zch_size: dict[str, int]):
        super().__init__()
        configs = [EmbeddingConfig(name=s, embedding_dim=DIM, num_embeddings=zch_size[s], feature_names=[s])
                   for s in SLOTS]
        ec = EmbeddingCollection(tables=configs, device=torch.device("cpu"))
        torch.manual_seed(seed + 1)
        for w in ec.parameters():
            nn.init.uniform_(w, -INIT, INIT)
        for e in ec.embeddings.values():
            e.sparse = True  # sparse gradients: Adagrad touches only the rows read, as the collision-less table's does
        mch = {s: MCHManagedCollisionModule(zch_size=zch_size[s], device=torch.device("cpu"),
                                            eviction_policy=DistanceLFU_EvictionPolicy(), eviction_interval=1,
                                            input_hash_size=2**63 - 1)
               for s in SLOTS}
        self.mc_ec = ManagedCollisionEmbeddingCollection(ec, ManagedCollisionCollection(mch, configs))
        self.head = mlp(seed)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n = batch[SLOTS[0]].shape[0]
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=list(SLOTS), values=torch.cat([batch[s] for s in SLOTS]),
                                                  lengths=torch.ones(n * len(SLOTS), dtype=torch.int64))
        out, _ = self.mc_ec(kjt)
        return self.head(torch.cat([out[s].values() for s in SLOTS], 1)).squeeze(1)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Dense Adam for the MLP, torch Adagrad for the tables' rows (created once)."""
        if not hasattr(self, "_opts"):
            emb = self.mc_ec._embedding_module.parameters()
            self._opts = [torch.optim.Adam(self.head.parameters(), lr=DENSE_LR),
                          torch.optim.Adagrad(emb, lr=EMB_LR, initial_accumulator_value=0.0, eps=1e-10)]
        return self._opts

    def after_step(self) -> None:
        pass

    def mch(self, slot: str) -> MCHManagedCollisionModule:
        return self.mc_ec._managed_collision_collection._managed_collision_modules[slot]


def train_online(model: nn.Module, stream: dict[str, np.ndarray], batch: int) -> dict[str, object]:
    """One pass: score each batch before training on it. Returns predictions and examples/s."""
    opts = model.optimizers()
    loss_fn = nn.BCEWithLogitsLoss()
    n = stream["label"].size
    preds = np.empty(n, dtype=np.float32)
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        sl = slice(start, min(start + batch, n))
        b = {s: torch.from_numpy(stream[s][sl]) for s in SLOTS}
        y = torch.from_numpy(stream["label"][sl])
        logits = model(b)
        preds[sl] = torch.sigmoid(logits.detach()).numpy()
        loss = loss_fn(logits, y)
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        model.after_step()
    seconds = time.perf_counter() - t0
    y = stream["label"]
    half = n // 2
    return {"examples_per_s": n / seconds, "seconds": seconds,
            "auc": auc(y, preds), "ne": normalized_entropy(y, preds),
            "auc_2nd_half": auc(y[half:], preds[half:]), "ne_2nd_half": normalized_entropy(y[half:], preds[half:])}


def rate(fn: Callable[[np.ndarray], object], batches: list[np.ndarray], repeats: int = 3) -> float:
    """Ids per second, best of ``repeats`` passes over the batches."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        best = min(best, time.perf_counter() - t0)
    return sum(b.size for b in batches) / best


def monolith_memory(model: MonolithModel) -> dict[str, dict[str, float]]:
    out = {}
    for s in SLOTS:
        t = model.emb[s].table
        n = len(t)
        rows = t.weights.nbytes + t.default.nbytes
        opt = sum(a.nbytes for a in t.state.values()) + sum(a.nbytes for a in t.default_state.values())
        out[s] = {"ids": n, "rows_capacity": t.capacity, "rows_B": rows / n, "index_B": t.index.nbytes / n,
                  "optimizer_B": opt / n, "timestamps_B": t.updated_ms.nbytes / n,
                  "filter_B": (t.filter.nbytes if t.filter else 0) / n}
        out[s]["total_B"] = sum(v for k, v in out[s].items() if k.endswith("_B"))
    return out


def torchrec_memory(model: TorchRecModel, opt: torch.optim.Optimizer) -> dict[str, dict[str, float]]:
    out = {}
    state = opt.state
    for s in SLOTS:
        m = model.mch(s)
        ids = int((m._mch_sorted_raw_ids != torch.iinfo(torch.int64).max).sum())
        w = model.mc_ec._embedding_module.embeddings[s].weight
        index = sum(b.nbytes for name, b in m.named_buffers() if "history" not in name and "metadata" not in name)
        history = sum(b.nbytes for name, b in m.named_buffers() if "history" in name)
        history += m._history_accumulator.nbytes if hasattr(m, "_history_accumulator") else 0
        meta = sum(b.nbytes for b in m._mch_metadata.values())
        opt_b = sum(v.nbytes for v in state[w].values() if torch.is_tensor(v)) if w in state else 0
        out[s] = {"ids": ids, "rows_capacity": w.shape[0], "rows_B": w.nbytes / ids,
                  "index_B": (index - meta) / ids, "optimizer_B": opt_b / ids, "eviction_metadata_B": meta / ids,
                  "history_buffer_B": history / ids}
        out[s]["total_B"] = sum(v for k, v in out[s].items() if k.endswith("_B"))
    return out


def lookup_rates(model: nn.Module, ids: list[np.ndarray]) -> dict[str, float]:
    """Lookups/s of the cross slot: index only, index + gather (eval), and the training admit/profile path."""
    if isinstance(model, MonolithModel):
        emb = model.emb["cross"]
        t = emb.table
        r = {"index": rate(t.lookup, ids), "index_gather": rate(lambda b: t.vectors(t.lookup(b)), ids)}
        # Training path on a copy-free basis: admit counts/inserts, so run it once on the replayed ids.
        r["train_admit"] = rate(lambda b: t.admit(b, now_ms=0), ids, repeats=1)
        return r
    m = model.mch("cross")
    table = model.mc_ec._embedding_module.embeddings["cross"]

    def jt(b: np.ndarray) -> dict[str, JaggedTensor]:
        v = torch.from_numpy(b)
        return {"cross": JaggedTensor(values=v, lengths=torch.ones(v.numel(), dtype=torch.int64))}

    m.eval()
    with torch.no_grad():
        r = {"index": rate(lambda b: m.remap(jt(b)), ids),
             "index_gather": rate(lambda b: table(m.remap(jt(b))["cross"].values()), ids)}
    m.train()
    with torch.no_grad():
        r["train_admit"] = rate(lambda b: m(jt(b)), ids, repeats=1)  # profile (+ eviction every batch) + remap
    return r


def probe_mpzch(ids: list[np.ndarray]) -> dict[str, object]:
    """TorchRec's other ZCH, multi-probe (``HashZchManagedCollisionModule``, fbgemm's ``zero_collision_hash``).

    Its CPU kernel only reads (``readonly``): a training-mode forward, which inserts ids, raises. What
    can be measured is an eval-mode lookup, and only on an empty table (nothing can be inserted), so
    every id misses and falls back to a hashed slot after probing.
    """
    size = 1 << 16
    out: dict[str, object] = {}
    h = HashZchManagedCollisionModule(zch_size=size, device=torch.device("cpu"), total_num_buckets=1, input_hash_size=0)

    def jt(b: np.ndarray) -> dict[str, JaggedTensor]:
        v = torch.from_numpy(b)
        return {"cross": JaggedTensor(values=v, lengths=torch.ones(v.numel(), dtype=torch.int64))}

    try:
        h(jt(ids[0]))
        out["train_insert"] = "ok"
    except RuntimeError as exc:
        out["train_insert"] = f"RuntimeError: {str(exc).splitlines()[0]}"
    h.eval()
    with torch.no_grad():
        out["eval_lookup_empty_table_per_s"] = rate(lambda b: h(jt(b)), ids[:32])
    return out


def markdown(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, help="a world directory (events.parquet); default: a synthetic Zipf stream")
    ap.add_argument("--events", type=int, default=500_000, help="the last N events of the world / synthetic events")
    ap.add_argument("--label", default="click", help="action bit used as the label on a world")
    ap.add_argument("--batch", type=int, default=512, help="training batch")
    ap.add_argument("--lookup-batch", type=int, default=4_096)
    ap.add_argument("--lookup-ids", type=int, default=2**19, help="ids per lookup measurement")
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5],
                    help="TorchRec MCH rows as fractions of the collision-less table's final rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--dry-run", action="store_true", help="20k synthetic events: seconds, keeps the script working")
    args = ap.parse_args()
    if args.dry_run:
        args.world, args.events, args.lookup_ids = None, 20_000, 8 * args.lookup_batch
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

    header = (f"# bench_torchrec — {date.today()}, nproc {os.cpu_count()}, {cpu_model()}, Python "
              f"{platform.python_version()}, torch {torch.__version__}, "
              f"torchrec {getattr(torchrec, '__version__', None) if torchrec else 'NOT INSTALLED'}; "
              f"{args.threads} torch thread(s); load average {os.getloadavg()[0]:.1f}")
    print(header)
    stream = world_stream(args.world, args.events, args.label) if args.world else synthetic_stream(args.events, args.seed)
    n = stream["label"].size
    distinct = {s: int(np.unique(stream[s]).size) for s in SLOTS}
    src = f"world {args.world} (last {n:,} events, label {args.label})" if args.world else f"synthetic Zipf ({n:,})"
    print(f"stream: {src}; positive rate {stream['label'].mean():.4f}; distinct ids "
          + ", ".join(f"{s} {distinct[s]:,}" for s in SLOTS) + "\n")
    if TORCHREC_ERROR:
        print(f"TorchRec is not installed ({TORCHREC_ERROR}); measuring the collision-less side only.\n"
              f"Install it with: {TORCHREC_INSTALL}\n", file=sys.stderr)

    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, max(n - args.lookup_batch, 1), args.lookup_ids // args.lookup_batch)
    lookup_batches = [np.ascontiguousarray(stream["cross"][s: s + args.lookup_batch]) for s in starts]

    # Warm-up (numba's compiled code, torch's first calls) on a throw-away model of each kind.
    head = {k: v[: 2 * args.batch] for k, v in stream.items()}
    train_online(MonolithModel(args.seed), head, args.batch)
    train_online(MonolithModel(args.seed, buckets={s: 1_000 for s in SLOTS}), head, args.batch)
    if torchrec is not None:
        train_online(TorchRecModel(args.seed, {s: 1_000 for s in SLOTS}), head, args.batch)

    results: dict[str, dict] = {}
    mono = MonolithModel(args.seed)
    results["collision-less"] = {**train_online(mono, stream, args.batch), "memory": monolith_memory(mono)}
    rows = {s: len(mono.emb[s].table) for s in SLOTS}
    print(f"collision-less rows (admitted ids): {rows}")

    modulo = MonolithModel(args.seed, buckets={s: rows[s] + 1 for s in SLOTS})
    results["modulo x 1"] = train_online(modulo, stream, args.batch)

    torchrec_models: dict[str, TorchRecModel] = {}
    if torchrec is not None:
        for f in args.fractions:
            zch = {s: max(int(round(f * rows[s])) + 1, 2) for s in SLOTS}  # + the shared miss row
            model = TorchRecModel(args.seed, zch)
            name = f"torchrec MCH x {f:g}"
            r = train_online(model, stream, args.batch)
            r["memory"] = torchrec_memory(model, model.optimizers()[1])
            results[name] = r
            torchrec_models[name] = model

    # Lookups after training, on the same replayed batches of the cross slot.
    speed = {"collision-less": lookup_rates(mono, lookup_batches)}
    for name, model in torchrec_models.items():
        speed[name] = lookup_rates(model, lookup_batches)

    mpzch = probe_mpzch(lookup_batches) if torchrec is not None else None
    if mpzch is not None:
        print(f"\nTorchRec multi-probe ZCH (HashZchManagedCollisionModule) on CPU: training-mode insert: "
              f"{mpzch['train_insert']}; eval-mode lookup of an empty {1 << 16:,}-slot table (every id a miss): "
              f"{mpzch['eval_lookup_empty_table_per_s'] / 1e6:.2f}M ids/s")

    base = results["collision-less"]
    q_rows = [(name, f"{r['auc']:.4f}", f"{r['ne']:.4f}", f"{r['auc_2nd_half']:.4f}", f"{r['ne_2nd_half']:.4f}",
               f"{r['auc'] - base['auc']:+.4f}", f"{r['examples_per_s']:,.0f}",
               f"{r['examples_per_s'] / base['examples_per_s']:.2f}x") for name, r in results.items()]
    print("\nQuality (progressive validation, one online pass) and training speed:\n")
    print(markdown(("table", "AUC", "NE", "AUC 2nd half", "NE 2nd half", "ΔAUC vs collision-less", "train ex/s",
                    "speed vs collision-less"), q_rows))

    print(f"\nLookups of the cross slot, millions of ids/s, batches of {args.lookup_batch:,} ids "
          f"({len(lookup_batches)} batches, best of 3; training path: 1 pass):\n")
    s0 = speed["collision-less"]
    s_rows = [(name, f"{r['index'] / 1e6:.2f}", f"{r['index_gather'] / 1e6:.2f}", f"{r['train_admit'] / 1e6:.2f}",
               f"{r['index'] / s0['index']:.2f}x", f"{r['index_gather'] / s0['index_gather']:.2f}x",
               f"{r['train_admit'] / s0['train_admit']:.2f}x") for name, r in speed.items()]
    print(markdown(("table", "index", "index + gather", "training path (admit / profile+evict+remap)",
                    "index vs ours", "gather vs ours", "training path vs ours"), s_rows))

    print("\nBytes per admitted id (dim-16 fp32 row = 64 B), per slot:\n")
    m_rows = []
    for name, r in results.items():
        for s, m in r.get("memory", {}).items():
            extra = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in m.items()
                              if k.endswith("_B") and k not in ("rows_B", "index_B", "optimizer_B", "total_B"))
            m_rows.append((name, s, f"{m['ids']:,}", f"{m['rows_capacity']:,}", f"{m['rows_B']:.1f}",
                           f"{m['index_B']:.1f}", f"{m['optimizer_B']:.1f}", extra,
                           f"{m['rows_B'] + m['index_B'] + m['optimizer_B']:.1f}", f"{m['total_B']:.1f}"))
    print(markdown(("table", "slot", "admitted ids", "row capacity", "rows", "index", "optimizer", "other",
                    "rows + index + optimizer", "total"), m_rows))

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"header": header, "stream": src, "events": n, "distinct": distinct,
                                         "collisionless_rows": rows, "torchrec_error": TORCHREC_ERROR,
                                         "quality": results, "lookups_per_s": speed,
                                         "mpzch_probe": mpzch}, indent=2, default=float))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
