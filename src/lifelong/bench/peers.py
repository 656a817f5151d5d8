"""Peer models on the same rows: FuxiCTR's LongCTR zoo (DIN, SIM, ETA, TWIN, TransAct) beside ours.

``lifelong transact experiment peers --data DS --out REPORT`` exports the rows of a ``lifelong
transact build`` directory to the LongCTR Parquet format, trains each FuxiCTR model with
FuxiCTR's own loop (``BaseModel.fit``: Adam, early stopping and learning-rate decay on its
validation metric) and the defaults of its config template (``configs/peers.yaml``), trains our
rankers with our trainer, and scores all of them on the same evaluation rows: AUC, NE and
HIT@3, every model ranking each request by its probability of the one head exported.

The export, per split (``train``, ``valid``, and ``test``: our evaluation rows, in their order):

- ``{split}.parquet``: ``user_index``, ``item_index`` (the candidate), ``seq_len`` (how many of
  the user's sequence precede the request) and ``label`` (the head);
- ``user_info.parquet``: each user's ``full_item_seq``, the items of their positive actions
  (:data:`~lifelong.data.schema.POSITIVE_BITS`) in time order: the lifelong sequence as item
  ids, of which a LongCTR model reads the last ``max_len`` before the request;
- ``item_info.parquet``: per ``item_index`` (row 0 pads) the ``item_id`` (categorical) and
  ``item_emb``, the 32-d content embedding our rankers read for every item;
- ``feature_map.json``: FuxiCTR's feature specs of the above.

The validation split is ours (``val_days``, :func:`~lifelong.transact.trainer.split_validation`),
so both families stop on the same rows. FuxiCTR is an optional extra (``pip install
'lifelong[peers]'``); importing this module does not import it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lifelong.core.config import load_file
from lifelong.core.errors import ConfigError
from lifelong.core.metrics import auc, head_ne, hit_at_k
from lifelong.core.report import Column, Report, Table
from lifelong.core.sorted_index import positions_in
from lifelong.data.io import load_dataset, write_json
from lifelong.data.schema import POSITIVE_BITS
from lifelong.transact.rank_data import RankData
from lifelong.transact.trainer import TrainConfig, build_train_config, load_model, predict, split_validation, train

PEERS_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "peers.yaml"
"""FuxiCTR models and their template defaults, and our rankers: the rows of the peers table."""
K = 3
_TS_BITS = 42  # a (user, time) key packs the time since the first event into the low 42 bits (139 years)


@dataclass(frozen=True)
class Export:
    """A LongCTR export of a rows directory (:func:`export_longctr`)."""

    directory: Path
    head: str
    rows: dict[str, int]
    users: int
    items: int

    def path(self, name: str) -> str:
        return str(self.directory / name)


def _positive_sequences(data: RankData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The positive actions of the dataset the rows were built from, sorted by (user, time): users
    (sorted), each user's first position, item indices (+1: 0 pads) and (user, time) keys."""
    events = load_dataset(data.meta["data"]).events
    user = events.column("user_id").to_numpy()
    ts = events.column("ts_ms").to_numpy()
    mask = events.column("action_mask").to_numpy().astype(np.int64)
    item, found = positions_in(data.item_id.numpy(), events.column("item_id").to_numpy())
    keep = ((mask & int(POSITIVE_BITS)) != 0) & found
    user, ts, item = user[keep], ts[keep], item[keep] + 1
    order = np.lexsort((ts, user))
    user, ts, item = user[order], ts[order], item[order]
    users, starts = np.unique(user, return_index=True)
    return users, starts, item, _keys(np.searchsorted(users, user), ts)


def _keys(user_pos: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
    """One sortable int64 per (user position, time): times in ms since 1970 fit 42 bits until 2109."""
    return (np.asarray(user_pos, np.int64) << _TS_BITS) | np.asarray(ts_ms, np.int64).clip(0, (1 << _TS_BITS) - 1)


def export_longctr(rows_dir: str | os.PathLike[str], out: str | os.PathLike[str], head: str = "repin",
                   val_days: float = 1.0) -> Export:
    """Write the rows of ``rows_dir`` as a LongCTR Parquet dataset in ``out`` (module docstring).

    Raises:
        ConfigError: ``head`` is not one of the rows' heads.
        DataError: ``val_days`` leaves no training or no validation rows.
    """
    train_data, eval_data = RankData(rows_dir, "train"), RankData(rows_dir, "eval")
    if head not in train_data.heads:
        raise ConfigError(f"--head {head!r}: the rows' heads are {', '.join(train_data.heads)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    users, starts, items, keys = _positive_sequences(train_data)
    bounds = np.r_[starts, items.size]
    all_users = np.union1d(users, np.union1d(train_data.arrays["user_id"], eval_data.arrays["user_id"]))
    seq_of = {int(u): items[a:b] for u, a, b in zip(users, bounds[:-1], bounds[1:])}
    empty = np.zeros(0, np.int64)
    pq.write_table(pa.table({"user_index": np.arange(all_users.size),
                             "full_item_seq": pa.array([seq_of.get(int(u), empty) for u in all_users],
                                                       pa.list_(pa.int64()))}), out / "user_info.parquet")
    emb = train_data.item_emb.numpy()
    n_items = emb.shape[0]
    pq.write_table(pa.table({
        "item_index": np.arange(n_items + 1),
        "item_id": np.arange(n_items + 1),
        "item_emb": pa.array(list(np.vstack([np.zeros((1, emb.shape[1]), np.float32), emb])), pa.list_(pa.float32())),
    }), out / "item_info.parquet")
    train_rows, val_rows = split_validation(train_data, TrainConfig(val_days=val_days))
    counts = {}
    for split, data, rows in (("train", train_data, train_rows), ("valid", train_data, val_rows),
                              ("test", eval_data, np.arange(len(eval_data)))):
        a = data.arrays
        user = np.asarray(a["user_id"])[rows]
        req_ts = np.asarray(a["req_ts"])[np.asarray(a["request"])[rows]]
        pos, found = positions_in(users, user)
        # Actions strictly before the request: a candidate's own label never enters its sequence.
        before = np.searchsorted(keys, _keys(pos, req_ts), side="left") - bounds[pos]
        pq.write_table(pa.table({"user_index": np.searchsorted(all_users, user).astype(np.int64),
                                 "item_index": np.asarray(a["item"])[rows].astype(np.int64) + 1,
                                 "seq_len": np.where(found, before, 0).astype(np.int64),
                                 "label": np.asarray(a["labels"])[rows, data.heads.index(head)].astype(np.int64)}),
                       out / f"{split}.parquet")
        counts[split] = int(rows.size)
    features = [{"user_index": {"type": "meta"}}, {"item_index": {"type": "meta"}}, {"seq_len": {"type": "meta"}},
                {"item_id": {"source": "item", "type": "categorical", "vocab_size": n_items + 1, "padding_idx": 0}},
                {"item_emb": {"source": "item", "type": "embedding", "pretrain_dim": int(emb.shape[1])}}]
    write_json({"dataset_id": out.name, "num_fields": 2, "total_features": n_items + 1, "input_length": 3,
                "labels": ["label"], "features": features}, out / "feature_map.json")
    write_json({"kind": "longctr_export", "rows": str(Path(rows_dir).resolve()), "head": head, "val_days": val_days,
                "counts": counts, "users": int(all_users.size), "items": int(n_items),
                "longest_sequence": int(np.diff(bounds).max(initial=0))}, out / "export.json")
    return Export(out, head, counts, int(all_users.size), int(n_items))


def fuxictr_params(model: str, export: Export, work: Path, seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """The FuxiCTR parameters of one run: its template's defaults (``configs/peers.yaml``), the
    export's paths, then ``overrides`` (e.g. ``epochs`` for a test)."""
    spec = load_file(PEERS_CONFIG)
    if model not in spec["fuxictr"]:
        raise ConfigError(f"unknown FuxiCTR model {model!r}; the peers are {', '.join(spec['fuxictr'])}")
    return {**spec["fuxictr_base"], **spec["fuxictr"][model], "model": model, "dataset_id": export.directory.name,
            "data_root": str(export.directory.parent), "model_root": str(work), "seed": seed, "gpu": -1,
            "verbose": 0, "num_workers": 0, "train_data": export.path("train.parquet"),
            "valid_data": export.path("valid.parquet"), "test_data": export.path("test.parquet"),
            "user_info": export.path("user_info.parquet"), "item_info": export.path("item_info.parquet"),
            **overrides}


def train_fuxictr(model: str, export: Export, work: Path, seed: int = 0, **overrides: Any) -> tuple[np.ndarray, dict]:
    """Train one FuxiCTR LongCTR model with FuxiCTR's ``fit`` and return its probabilities of the
    export's test rows (in their order) and what the run did.

    Raises:
        ConfigError: FuxiCTR (the ``peers`` extra) is not installed, or ``model`` is unknown.
    """
    try:
        import model_zoo.LongCTR as zoo
        from fuxictr.features import FeatureMap
        from fuxictr.pytorch.dataloaders import RankDataLoader
        from fuxictr.pytorch.torch_utils import seed_everything
        from model_zoo.LongCTR.longctr_dataloader import LongCTRDataLoader
    except ImportError as exc:
        raise ConfigError(f"the FuxiCTR peers need the peers extra: pip install 'lifelong[peers]' ({exc})") from None
    params = fuxictr_params(model, export, work, seed, overrides)
    (work / params["dataset_id"]).mkdir(parents=True, exist_ok=True)  # where fit() keeps the best epoch
    seed_everything(seed=seed)
    feature_map = FeatureMap(params["dataset_id"], str(export.directory))
    feature_map.load(export.path("feature_map.json"), params)
    net = getattr(zoo, model)(feature_map, **params)
    start = time.perf_counter()
    train_gen, valid_gen = RankDataLoader(feature_map, stage="train", data_loader=LongCTRDataLoader, **params)
    net.fit(train_gen, validation_data=valid_gen, **params)
    seconds = time.perf_counter() - start
    test_gen = RankDataLoader(feature_map, stage="test", data_loader=LongCTRDataLoader, **params)
    probs = net.predict(test_gen)
    return probs, {"seconds": seconds, "epochs": net._epoch_index + 1,
                   "parameters": int(sum(p.numel() for p in net.parameters())),
                   "params": {k: v for k, v in params.items() if k not in ("train_data", "valid_data", "test_data",
                                                                            "user_info", "item_info")}}


def score(data: RankData, head: str, probs: np.ndarray) -> dict[str, float]:
    """AUC, NE and HIT@3 of one head's probabilities of ``data``'s rows, each request ranked by them,
    and ``calibration``: the mean probability over the head's rate (1 when calibrated on average;
    an NE above 1 beside a good AUC is a model that ranks well and is confidently miscalibrated)."""
    a = data.arrays
    y = np.asarray(a["labels"])[:, data.heads.index(head)]
    groups = np.asarray(a["req_id"])[np.asarray(a["request"])]
    probs = np.asarray(probs, np.float64).reshape(-1)
    rate = float(np.mean(y))
    return {"auc": auc(y, probs), "ne": head_ne(y, probs),
            "hit@3": hit_at_k(groups, np.asarray(a["user_id"]), probs, y, K),
            "calibration": float(np.mean(probs)) / rate if rate > 0 else math.nan}


def run_peers(rows_dir: str | os.PathLike[str], out: str | os.PathLike[str], head: str = "repin",
              val_days: float = 1.0, fuxictr_models: Sequence[str] | None = None,
              ours: Sequence[str] | None = None, seed: int = 0, fuxictr_overrides: dict[str, Any] | None = None,
              train_sets: Sequence[str] = (), log: Callable[[str], None] = print) -> dict:
    """Export, train every peer and every ranker of ours, score them on the evaluation rows and
    write ``out/report.{md,json}``. A model already scored in ``out`` is reused.

    ``fuxictr_overrides`` replace template values of every FuxiCTR model; all but ``epochs`` are
    named in its label (``FuxiCTR TransAct (batch_size=512)``).

    ``fuxictr_models`` and ``ours`` default to every entry of ``configs/peers.yaml``; ``train_sets``
    are ``key=value`` settings of our trainer for every ranker of ours (``val_days`` is set).
    """
    spec = load_file(PEERS_CONFIG)
    fuxictr_models = list(spec["fuxictr"]) if fuxictr_models is None else list(fuxictr_models)
    ours = list(spec["ours"]) if ours is None else list(ours)
    unknown = [m for m in fuxictr_models if m not in spec["fuxictr"]] + [m for m in ours if m not in spec["ours"]]
    if unknown:
        raise ConfigError(f"unknown peers {unknown}; FuxiCTR: {', '.join(spec['fuxictr'])}; "
                          f"ours: {', '.join(spec['ours'])}")
    out = Path(out)
    export = export_longctr(rows_dir, out / "longctr", head, val_days)
    log(f"exported {export.rows} rows, {export.users:,} users, {export.items:,} items to {export.directory}")
    data = RankData(rows_dir, "eval")
    (out / "scores").mkdir(exist_ok=True)
    results: list[dict] = []
    for label in ours:
        entry = _cached(out, label)
        if entry is None:
            cfg = build_train_config({**spec["ours"][label], "seed": seed, "val_days": val_days}, train_sets)
            run = out / "runs" / _slug(label)
            start = time.perf_counter()
            meta = train(rows_dir, run, cfg, log=lambda s: None)
            probs = predict(load_model(run)[0], data)[:, data.heads.index(head)]
            entry = {"label": label, "family": "lifelong", **score(data, head, probs),
                     "seconds": time.perf_counter() - start, "epochs": len(meta["epochs"]),
                     "parameters": meta["parameters"]}
            _keep(out, label, entry, probs)
        results.append(entry)
        log(_line(entry))
    logging.getLogger().setLevel(logging.WARNING)  # FuxiCTR logs every batch's progress at INFO
    # Settings that change what a peer is (not how long it trains) name it, so that a model run
    # twice with different settings keeps both scores, side by side in the table.
    changed = ", ".join(f"{k}={v}" for k, v in sorted((fuxictr_overrides or {}).items()) if k != "epochs")
    for model in fuxictr_models:
        label = f"FuxiCTR {model}" + (f" ({changed})" if changed else "")
        entry = _cached(out, label)
        if entry is None:
            probs, info = train_fuxictr(model, export, out / "checkpoints", seed, **(fuxictr_overrides or {}))
            entry = {"label": label, "family": "FuxiCTR 2.3.10", **score(data, head, probs), **info}
            _keep(out, label, entry, probs)
        results.append(entry)
        log(_line(entry))
    summary = {"head": head, "rows": str(Path(rows_dir).resolve()), "val_days": val_days, "seed": seed,
               "eval_rows": len(data), "results": results,
               "train_negative_rate": float(data.meta["config"].get("train_negative_rate", 1.0))}
    build_peers_report(summary).write(out)
    return summary


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_").lower()


def _keep(out: Path, label: str, entry: dict, probs: np.ndarray) -> None:
    """Write a model's scores and its probabilities of the evaluation rows (in their order), so a
    metric added later can be computed without training again."""
    np.save(out / "scores" / f"{_slug(label)}.npy", np.asarray(probs, np.float32).reshape(-1))
    write_json(entry, out / "scores" / f"{_slug(label)}.json")


def _cached(out: Path, label: str) -> dict | None:
    path = out / "scores" / f"{_slug(label)}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _line(entry: dict) -> str:
    return (f"{entry['label']}: AUC {entry['auc']:.4f}, NE {entry['ne']:.4f}, HIT@3 {entry['hit@3']:.4f} "
            f"({entry['epochs']} epochs, {entry['seconds']:.0f} s)")


def build_peers_report(summary: dict) -> Report:
    """The peers table: one row per model, ours first."""
    def fmt(v: float) -> str:
        return "nan" if math.isnan(v) else f"{v:.4f}"

    head = summary["head"]
    columns = [Column("model", "label"), Column("family", "family"), Column(f"AUC/{head}", "auc", fmt, right=True),
               Column(f"NE/{head}", "ne", fmt, right=True), Column(f"HIT@3/{head}", "hit@3", fmt, right=True),
               Column("mean p / rate", "calibration", fmt, right=True),
               Column("epochs", "epochs", right=True), Column("train s", "seconds", "{:.0f}", right=True),
               Column("parameters", "parameters", "{:,}", right=True)]
    return Report("report", data=summary, title=f"Peers on the same rows ({summary['eval_rows']:,} evaluation rows)",
                  blocks=[Table(columns, summary["results"]),
                          f"Every model ranks each request by its probability of {head}; seed {summary['seed']}; "
                          f"validation: the last {summary['val_days']:g} training day(s).", *_subsampling_note(summary)])


def _subsampling_note(summary: dict) -> list[str]:
    """Rows built with ``--neg-rate`` below 1 keep a share of the label-free training rows,
    weighted by its inverse. Our trainer reads the weights; FuxiCTR's ``fit`` has none, so its
    models learn the subsampled label rate and overstate the probability on the full evaluation
    rows: their NE is not comparable there (AUC and HIT@3, which only rank, are)."""
    rate = summary.get("train_negative_rate", 1.0)
    if rate >= 1.0:
        return []
    return [f"**These rows keep {rate:g} of the label-free training rows** (`--neg-rate`), weighted "
            f"{1 / rate:.3g}x in our trainer. FuxiCTR trains unweighted, so its models learn the subsampled "
            "label rate (see `mean p / rate`): compare their AUC and HIT@3, not their NE. Build the rows "
            "with `--neg-rate 1` to compare NE."]
