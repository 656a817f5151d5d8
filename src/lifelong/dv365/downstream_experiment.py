"""The DV365 downstream-value experiment: does the frozen user embedding help other models?

On the splits of :mod:`lifelong.dv365.downstream_data` (a training window, a later evaluation
day), with the embedding of each split's users exported as of the split's start and frozen:

1. **ranker**: :class:`~lifelong.dv365.downstream_ranker.DLRMRanker` with and without the
   embedding (linear projection concatenated into the interaction); NE and AUC per task on the
   evaluation day, and the relative NE delta ``(NE_with − NE_without) / NE_without`` (negative
   is better; the paper reports the gain ``−delta`` > 0.4% on average);
2. **retrieval**: :class:`~lifelong.dv365.retrieval.TwoTower` without the embedding, with a
   linear projection of it, and with GateNet then the projection; HitRate@1/@10 over the whole
   item corpus for the evaluation day's engaged (user, item) pairs.

Both baselines know the user through the same count features and, by default, a user-id
embedding, so the embedding must add something those do not already carry. Every variant
is trained with each seed of the config, and the table reports the mean and the spread.

The embedding enters as a ``(U, R, C)`` float array from an :data:`EmbeddingFn`, so it does
not matter how it was produced (:func:`tower_embeddings` runs a trained tower and passes
its output through the export's 4-bit codec). It is divided by one scalar, its root mean
square over the training split, so the learning rate suits any tower's output scale.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lifelong.core.atomic import write_atomic
from lifelong.core.errors import ConfigError
from lifelong.core.metrics import auc, mean_std, normalized_entropy
from lifelong.core.quantization import dequantize_4bit, quantize_4bit
from lifelong.core.report import Column, Figure, Report, Table, pyplot
from lifelong.data.schema import HEADS, SURFACES
from lifelong.dv365.downstream_data import (
    DownstreamData,
    DownstreamDataConfig,
    Split,
    load_downstream_data,
)
from lifelong.dv365.downstream_ranker import DLRMRanker, DLRMRankerConfig
from lifelong.dv365.retrieval import (
    TwoTower,
    TwoTowerConfig,
    hit_rate_at_k,
    in_batch_softmax_loss,
)
from lifelong.modules.heads import ranking_loss

EmbeddingFn = Callable[[np.ndarray, int], np.ndarray]
"""``(user_ids, as_of_ms) -> float32 (len(user_ids), R, C)``: the embedding exported as of a time."""

RETRIEVAL_VARIANTS = ("none", "linear", "gatenet")
HIT_KS = (1, 10)


@dataclass(frozen=True)
class DownstreamConfig:
    """The downstream experiment.

    Args:
        data: which examples (window, subsampling).
        seeds: every variant is trained once per seed.
        user_id: the baselines (and so every variant) embed the user id too.
        ranker_epochs, retrieval_epochs: passes over the training rows / pairs.
        batch_size: rows or pairs per step.
        lr: Adam learning rate.
        max_queries: score a seeded subset of this many evaluation (user, item) pairs for
            HitRate (None: all of them; the cost is mostly scoring each user once, not the pairs).

    Example::

        >>> DownstreamConfig(seeds=(0,)).ranker_epochs
        2
    """

    data: DownstreamDataConfig = field(default_factory=DownstreamDataConfig)
    seeds: tuple[int, ...] = (0, 1)
    user_id: bool = True
    ranker_epochs: int = 2
    retrieval_epochs: int = 4
    batch_size: int = 1024
    lr: float = 2e-3
    max_queries: int | None = None

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("the downstream experiment needs at least one seed")
        if min(self.ranker_epochs, self.retrieval_epochs, self.batch_size, self.max_queries or 1) < 1 or self.lr <= 0:
            raise ConfigError("epochs, batch_size and max_queries must be >= 1 and lr > 0")


def quantized_roundtrip(emb: np.ndarray) -> np.ndarray:
    """What a reader of the export gets back: the 4-bit per-row codes, de-quantized.

    Example::

        >>> x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 2, 16)
        >>> float(np.abs(quantized_roundtrip(x) - x).max()) <= (1 / 15) / 2 + 1e-6
        True
    """
    return dequantize_4bit(quantize_4bit(emb))


def tower_embeddings(run_dir: str | os.PathLike[str], world_dir: str | os.PathLike[str],
                     quantize: bool = True) -> EmbeddingFn:
    """An :data:`EmbeddingFn` running the trained user tower of ``run_dir`` on ``world_dir``.

    Args:
        run_dir: a ``lifelong dv365 train`` run.
        world_dir: the world whose timelines the tower reads.
        quantize: pass the output through the export's 4-bit codec, as a downstream reader
            of the key-value store sees it.
    """
    from lifelong.dv365.tower import load_tower

    tower = load_tower(run_dir)

    def embed(user_ids: np.ndarray, as_of_ms: int) -> np.ndarray:
        emb = np.asarray(tower.embed_users(world_dir, user_ids, as_of_ms), dtype=np.float32)
        return quantized_roundtrip(emb) if quantize else emb

    return embed


def cached_embeddings(embeddings: EmbeddingFn, directory: str | os.PathLike[str]) -> EmbeddingFn:
    """``embeddings`` remembered on disk (``emb_<as_of_ms>_<users hash>.npy``), for reruns.

    A tower embeds the ``lifelong`` world's 2,000 users in minutes; the models here train in
    seconds. The file name holds the time and a hash of the user ids, not the tower: use one
    directory per tower.
    """
    directory = Path(directory)

    def embed(user_ids: np.ndarray, as_of_ms: int) -> np.ndarray:
        digest = hashlib.sha1(np.ascontiguousarray(user_ids, dtype=np.int64).tobytes()).hexdigest()[:12]
        path = directory / f"emb_{int(as_of_ms)}_{digest}.npy"
        if path.is_file():
            return np.load(path)
        emb = np.asarray(embeddings(user_ids, as_of_ms), dtype=np.float32)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: np.save(f, emb))
        return emb

    return embed


def _seeded(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


class _Adam:
    """Adam over the dense parameters and SparseAdam over the id tables' sparse gradients."""

    def __init__(self, model: torch.nn.Module, lr: float):
        tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse]
        dense = [p for p in model.parameters() if all(p is not t for t in tables)]
        self.optimizers = [torch.optim.Adam(dense, lr=lr)] + ([torch.optim.SparseAdam(tables, lr=lr)] if tables else [])

    def step(self, loss: torch.Tensor) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.optimizers:
            opt.step()


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    order = rng.permutation(n)
    for a in range(0, n, batch_size):
        yield torch.from_numpy(np.sort(order[a:a + batch_size]))


@dataclass
class _RankerInputs:
    dense: torch.Tensor
    sparse: torch.Tensor
    user: torch.Tensor
    labels: torch.Tensor


def _ranker_inputs(data: DownstreamData, split: Split, user_id: bool) -> _RankerInputs:
    dense = np.concatenate([data.item_content[split.item], data.item_dense[split.item],
                            split.user_dense[split.user]], axis=1)
    ids = [split.item, data.item_author[split.item], data.item_topic[split.item], split.surface]
    if user_id:
        ids.append(split.user)
    return _RankerInputs(torch.from_numpy(dense), torch.from_numpy(np.stack(ids, axis=1)),
                         torch.from_numpy(split.user), torch.from_numpy(split.labels))


def _sparse_buckets(data: DownstreamData, user_id: bool) -> tuple[int, ...]:
    """Table rows covering every index, so that no two ids share a row."""
    buckets = (data.item_ids.size, int(data.item_author.max()) + 1, int(data.item_topic.max()) + 1, len(SURFACES))
    return buckets + ((data.user_ids.size,) if user_id else ())


def ranker_metrics(data: DownstreamData, emb_train: np.ndarray | None, emb_eval: np.ndarray | None,
                   cfg: DownstreamConfig, seed: int) -> dict[str, dict[str, float]]:
    """Train the DLRM ranker (with the embedding when given) and score the evaluation day.

    Args:
        data: the splits.
        emb_train, emb_eval: (U, R, C) embedding of every user as of each split's start, or
            both None for the baseline.
        cfg: the experiment.
        seed: weights and shuffling.

    Returns:
        ``{head: {"ne": ..., "auc": ...}}`` on the evaluation rows.
    """
    rng = _seeded(seed)
    train, evaluation = (_ranker_inputs(data, s, cfg.user_id) for s in (data.train, data.eval))
    emb = None if emb_train is None else (torch.from_numpy(emb_train), torch.from_numpy(emb_eval))
    model = DLRMRanker(DLRMRankerConfig(n_dense=train.dense.shape[1], sparse_buckets=_sparse_buckets(data, cfg.user_id),
                                        n_tasks=len(HEADS), sparse_grad=True,
                                        user_embedding=None if emb is None else tuple(emb_train.shape[1:])))
    with torch.no_grad():
        # Starting at the base rates saves the first steps from merely learning them (hide: 0.4%).
        rate = train.labels.mean(0).clamp(1e-4, 1 - 1e-4)
        model.top[-1].bias.copy_(torch.log(rate / (1 - rate)))
    opt = _Adam(model, cfg.lr)
    model.train()
    for _ in range(cfg.ranker_epochs):
        for idx in _batches(train.dense.shape[0], cfg.batch_size, rng):
            user_emb = None if emb is None else emb[0][train.user[idx]]
            opt.step(ranking_loss(model(train.dense[idx], train.sparse[idx], user_emb), train.labels[idx]))
    model.eval()
    probs = []
    with torch.no_grad():
        for a in range(0, evaluation.dense.shape[0], 8192):
            idx = torch.arange(a, min(a + 8192, evaluation.dense.shape[0]))
            user_emb = None if emb is None else emb[1][evaluation.user[idx]]
            probs.append(torch.sigmoid(model(evaluation.dense[idx], evaluation.sparse[idx], user_emb)))
    p = torch.cat(probs).numpy()
    y = data.eval.labels
    return {h: {"ne": normalized_entropy(y[:, k], p[:, k]), "auc": auc(y[:, k], p[:, k])} for k, h in enumerate(HEADS)}


def retrieval_metrics(data: DownstreamData, emb_train: np.ndarray | None, emb_eval: np.ndarray | None,
                      projection: str, cfg: DownstreamConfig, seed: int) -> dict[int, float]:
    """Train the two-tower model (reading the embedding through ``projection`` when given) and
    return HitRate@K for the evaluation day's engaged pairs over the whole item corpus."""
    rng = _seeded(seed)
    user_sparse = torch.from_numpy(np.arange(data.user_ids.size)[:, None] if cfg.user_id
                                   else np.zeros((data.user_ids.size, 0), dtype=np.int64))
    item_content = torch.from_numpy(np.concatenate([data.item_content, data.item_dense], axis=1))
    item_sparse = torch.from_numpy(np.stack([np.arange(data.item_ids.size), data.item_author, data.item_topic], axis=1))
    buckets = _sparse_buckets(data, user_id=False)[:3]
    tower_cfg = TwoTowerConfig(n_user_dense=data.train.user_dense.shape[1],
                               user_buckets=(data.user_ids.size,) if cfg.user_id else (),
                               item_buckets=buckets, content_dim=item_content.shape[1],
                               user_embedding=None if emb_train is None else tuple(emb_train.shape[1:]),
                               projection=projection, sparse_grad=True)
    model = TwoTower(tower_cfg)
    opt = _Adam(model, cfg.lr)
    pair_user, pair_item = torch.from_numpy(data.train.pair_user), torch.from_numpy(data.train.pair_item)
    freq = np.bincount(data.train.pair_item, minlength=data.item_ids.size)
    log_q = torch.from_numpy(np.log(np.maximum(freq, 1) / data.train.pair_item.size).astype(np.float32))
    dense = {s.name: torch.from_numpy(s.user_dense) for s in (data.train, data.eval)}
    emb = {} if emb_train is None else {"train": torch.from_numpy(emb_train), "eval": torch.from_numpy(emb_eval)}
    model.train()
    for _ in range(cfg.retrieval_epochs):
        for idx in _batches(pair_user.numel(), cfg.batch_size, rng):
            u, i = pair_user[idx], pair_item[idx]
            user_vecs = model.user_vectors(dense["train"][u], user_sparse[u], emb["train"][u] if emb else None)
            item_vecs = model.item_vectors(item_content[i], item_sparse[i])
            opt.step(in_batch_softmax_loss(user_vecs, item_vecs, i, tower_cfg.temperature, log_q[i]))
    model.eval()
    with torch.no_grad():
        users = model.user_vectors(dense["eval"], user_sparse, emb.get("eval"))
        items = torch.cat([model.item_vectors(item_content[a:a + 65536], item_sparse[a:a + 65536])
                           for a in range(0, data.item_ids.size, 65536)])
    query = np.random.default_rng(cfg.data.seed).permutation(data.eval.pair_user.size)[:cfg.max_queries]
    return hit_rate_at_k(users, items, data.eval.pair_user[query], data.eval.pair_item[query], ks=HIT_KS)


def _mean_std(values: list[float]) -> dict[str, float]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std}


def summarize(ranker: Mapping[str, list[dict]], retrieval: Mapping[str, list[dict]]) -> dict[str, Any]:
    """Mean and spread over seeds of every figure, and the relative NE deltas.

    The delta of each seed compares the two rankers trained with that seed, so the spread
    is that of the paired difference.
    """
    out: dict[str, Any] = {"ranker": {}, "retrieval": {}}
    for h in HEADS:
        ne = {v: [run[h]["ne"] for run in ranker[v]] for v in ranker}
        deltas = [(w - b) / b for w, b in zip(ne["with"], ne["without"])]
        out["ranker"][h] = {"ne_without": _mean_std(ne["without"]), "ne_with": _mean_std(ne["with"]),
                            "auc_without": _mean_std([run[h]["auc"] for run in ranker["without"]]),
                            "auc_with": _mean_std([run[h]["auc"] for run in ranker["with"]]),
                            "relative_ne_delta": _mean_std(deltas)}
    per_seed_avg = np.mean([[(w[h]["ne"] - b[h]["ne"]) / b[h]["ne"] for h in HEADS]
                            for w, b in zip(ranker["with"], ranker["without"])], axis=1)
    out["ranker"]["average_relative_ne_delta"] = _mean_std(list(per_seed_avg))
    for v, runs in retrieval.items():
        out["retrieval"][v] = {f"hit@{k}": _mean_std([run[k] for run in runs]) for k in HIT_KS}
    return out


def run_downstream(world_dir: str | os.PathLike[str], embeddings: EmbeddingFn, out: str | os.PathLike[str],
                   cfg: DownstreamConfig = DownstreamConfig(), log: Callable[[str], None] = print,
                   provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the whole experiment; write ``results.json``, ``results.md`` and ``downstream.png`` into ``out``.

    Args:
        world_dir: the world or dataset.
        embeddings: the embedding exported as of a time (see :func:`tower_embeddings`).
        out: output directory (created).
        cfg: the experiment.
        log: progress lines.
        provenance: extra entries for ``results.json`` (e.g. the tower run).

    Returns:
        The results (also in ``results.json``): ``summary`` (see :func:`summarize`), the
        per-seed figures, the split sizes and the wall time.

    Example::

        results = run_downstream("worlds/lifelong", tower_embeddings("runs/dv365", "worlds/lifelong"), "runs/down")
        results["summary"]["ranker"]["average_relative_ne_delta"]["mean"]
    """
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_downstream_data(world_dir, cfg.data)
    log(f"splits: train {len(data.train):,} rows / {data.train.pair_user.size:,} pairs as of {data.train.as_of_ms}, "
        f"eval {len(data.eval):,} rows / {data.eval.pair_user.size:,} pairs as of {data.eval.as_of_ms}")
    raw = {s.name: np.asarray(embeddings(data.user_ids, s.as_of_ms), dtype=np.float32) for s in (data.train, data.eval)}
    for name, emb in raw.items():
        if emb.ndim != 3 or emb.shape[0] != data.user_ids.size or not np.isfinite(emb).all():
            raise ConfigError(f"the {name} embeddings must be finite (users, rows, dim), got {emb.shape}")
    scale = float(np.sqrt(np.mean(np.square(raw["train"])))) or 1.0
    emb = {k: v / scale for k, v in raw.items()}
    log(f"embeddings {raw['train'].shape[1:]} per user, rms {scale:.4g}")

    ranker: dict[str, list[dict]] = {"without": [], "with": []}
    retrieval: dict[str, list[dict]] = {v: [] for v in RETRIEVAL_VARIANTS}
    for seed in cfg.seeds:
        ranker["without"].append(ranker_metrics(data, None, None, cfg, seed))
        ranker["with"].append(ranker_metrics(data, emb["train"], emb["eval"], cfg, seed))
        log(f"seed {seed} ranker NE without/with: " + ", ".join(
            f"{h} {ranker['without'][-1][h]['ne']:.4f}/{ranker['with'][-1][h]['ne']:.4f}" for h in HEADS))
        for v in RETRIEVAL_VARIANTS:
            e_train, e_eval = (None, None) if v == "none" else (emb["train"], emb["eval"])
            retrieval[v].append(retrieval_metrics(data, e_train, e_eval, "linear" if v == "none" else v, cfg, seed))
        log(f"seed {seed} retrieval HitRate@1/@10: " + ", ".join(
            f"{v} {retrieval[v][-1][1]:.4f}/{retrieval[v][-1][10]:.4f}" for v in RETRIEVAL_VARIANTS))
    results = {
        "kind": "dv365_downstream", "world": str(Path(world_dir).resolve()), "config": asdict(cfg),
        "embedding_shape": list(raw["train"].shape[1:]), "embedding_rms": scale,
        "splits": {s.name: {"as_of_ms": s.as_of_ms, "end_ms": s.end_ms, "rows": len(s), "pairs": int(s.pair_user.size)}
                   for s in (data.train, data.eval)},
        "per_seed": {"ranker": ranker, "retrieval": {v: [{str(k): r[k] for k in r} for r in runs]
                                                     for v, runs in retrieval.items()}},
        "corpus": int(data.item_ids.size), "summary": summarize(ranker, retrieval),
        "seconds": round(time.perf_counter() - t0, 1),
        **dict(provenance or {}),
    }
    build_report(results).write(out)
    return results


def build_report(results: Mapping[str, Any]) -> Report:
    """``results.md`` (ranker NE per task, retrieval HitRate), ``results.json`` (``results``) and
    ``downstream.png`` (:func:`plot_downstream`)."""
    summary = results["summary"]
    n = len(results["config"]["seeds"])

    def pm(scale: float = 1.0, digits: int = 4) -> Callable[[Mapping[str, float]], str]:
        return lambda stat: f"{scale * stat['mean']:.{digits}f} ± {abs(scale) * stat['std']:.{digits}f}"

    ranker = Table([Column("task", "task"), Column("NE without", "ne_without", pm()), Column("NE with", "ne_with", pm()),
                    Column("NE gain (%)", "relative_ne_delta", pm(-100, 2)),
                    Column("AUC without", "auc_without", pm()), Column("AUC with", "auc_with", pm())],
                   [*({"task": h, **summary["ranker"][h]} for h in HEADS),
                    {"task": "**average**", "relative_ne_delta": summary["ranker"]["average_relative_ne_delta"]}])
    base = summary["retrieval"]["none"]["hit@10"]["mean"]
    names = {"none": "no embedding", "linear": "+ embedding, linear projection", "gatenet": "+ embedding, GateNet"}
    retrieval = Table([Column("user tower", "name"), Column("HitRate@1", "hit@1", pm(100, 3)),
                       Column("HitRate@10", "hit@10", pm(100, 3)),
                       Column("HitRate@10 vs none", "vs_none", lambda r: f"{100 * (r['mean'] - base) / base:+.1f}%")],
                      [{"name": names[v], **summary["retrieval"][v],
                        **({} if v == "none" or base == 0 else {"vs_none": summary["retrieval"][v]["hit@10"]})}
                       for v in RETRIEVAL_VARIANTS])
    blocks = [f"Ranker (DLRM), evaluation day, mean ± std over {n} seeds; NE gain = −relative NE delta.", ranker,
              f"Two-tower retrieval over all {results['corpus']:,} items, mean ± std over {n} seeds (%).", retrieval]
    return Report("results", data=results, blocks=blocks, figures=[Figure(lambda: plot_downstream(results), "downstream")])


def render_markdown(results: Mapping[str, Any]) -> str:
    """The two result tables (ranker NE per task, retrieval HitRate) as Markdown."""
    return build_report(results).markdown().rstrip("\n")


def plot_downstream(results: Mapping[str, Any]):
    """Two panels: the ranker's NE gain per task, and HitRate@1/@10 per retrieval variant (a matplotlib figure)."""
    summary = results["summary"]
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(10, 3.8))
    names = [*HEADS, "average"]
    deltas = [summary["ranker"][h]["relative_ne_delta"] for h in HEADS] + [summary["ranker"]["average_relative_ne_delta"]]
    gains = [-100 * d["mean"] for d in deltas]
    ax1.bar(names, gains, yerr=[100 * d["std"] for d in deltas], color=["C0"] * len(HEADS) + ["C3"], capsize=3)
    ax1.axhline(0.4, color="gray", ls="--", lw=1, label="paper: > 0.4% average")
    ax1.axhline(0, color="black", lw=0.8)
    ax1.set_ylabel("NE gain with the embedding (%)")
    ax1.set_title("DLRM ranker: −(NE_with − NE_without) / NE_without")
    ax1.legend(fontsize=8)
    width = 0.27
    x = np.arange(len(HIT_KS))
    for j, v in enumerate(RETRIEVAL_VARIANTS):
        stats = [summary["retrieval"][v][f"hit@{k}"] for k in HIT_KS]
        ax2.bar(x + (j - 1) * width, [100 * s["mean"] for s in stats], width, yerr=[100 * s["std"] for s in stats],
                label={"none": "no embedding", "linear": "linear projection", "gatenet": "GateNet"}[v], capsize=3)
    ax2.set_xticks(x, [f"HitRate@{k}" for k in HIT_KS])
    ax2.set_ylabel("% of eval-day engaged pairs")
    ax2.set_title("Two-tower retrieval over all items")
    ax2.legend(fontsize=8)
    n_seeds = len(results["config"]["seeds"])
    fig.suptitle(f"DV365 downstream value ({n_seeds} seeds, error bars: std over seeds)", fontsize=10)
    fig.tight_layout()
    return fig
