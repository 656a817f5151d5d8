"""The downstream experiment's examples (against the raw events) and a whole run on a tiny world."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lifelong.core.errors import ConfigError, DataError
from lifelong.data.io import load_dataset
from lifelong.data.protocol import DAY_MS, Protocol
from lifelong.data.schema import HEAD_BITS, HEADS, POSITIVE_BITS
from lifelong.data.world import load_config, simulate, write_world
from lifelong.dv365.downstream_data import (
    RECENT_MS,
    DownstreamDataConfig,
    load_downstream_data,
)
from lifelong.dv365.downstream_experiment import (
    DownstreamConfig,
    cached_embeddings,
    run_downstream,
)
from tests.test_cli import run_cli


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(simulate(load_config("tiny")), tmp_path_factory.mktemp("downstream") / "w")


def test_splits_hold_the_windows_impressions_and_point_in_time_user_counts(world):
    data = load_downstream_data(world, DownstreamDataConfig(train_days=2, max_train_rows=None, max_eval_rows=None),
                                batch_rows=333)  # many batches: the accumulation is exercised
    ds = load_dataset(world, with_oracle=False)
    protocol = Protocol.from_meta(ds.meta)
    ev = {c: ds.events.column(c).to_numpy() for c in ("user_id", "item_id", "ts_ms", "action_mask")}
    assert data.train.as_of_ms == protocol.cutoff_ms - 2 * DAY_MS and data.train.end_ms == protocol.cutoff_ms
    assert (data.eval.as_of_ms, data.eval.end_ms) == (protocol.eval_start_ms, protocol.eval_end_ms)
    for split in (data.train, data.eval):
        inside = (ev["ts_ms"] >= split.as_of_ms) & (ev["ts_ms"] < split.end_ms)
        assert len(split) == inside.sum() > 0
        rows = sorted(zip(data.user_ids[split.user].tolist(), data.item_ids[split.item].tolist()))
        assert rows == sorted(zip(ev["user_id"][inside].tolist(), ev["item_id"][inside].tolist()))
        for k, h in enumerate(HEADS):
            assert split.labels[:, k].sum() == ((ev["action_mask"][inside] & HEAD_BITS[h]) != 0).sum()
        positive = inside & ((ev["action_mask"] & POSITIVE_BITS) != 0)
        expected_pairs = set(zip(ev["user_id"][positive].tolist(), ev["item_id"][positive].tolist()))
        got_pairs = list(zip(data.user_ids[split.pair_user].tolist(), data.item_ids[split.pair_item].tolist()))
        assert len(got_pairs) == len(set(got_pairs)) and set(got_pairs) == expected_pairs
        # Count features: from the events strictly before the split's start only.
        for u in (0, data.user_ids.size - 1):
            mine = ev["user_id"] == data.user_ids[u]
            before = mine & (ev["ts_ms"] < split.as_of_ms)
            recent = before & (ev["ts_ms"] >= split.as_of_ms - RECENT_MS)
            click = (ev["action_mask"] & HEAD_BITS["click"]) != 0
            assert split.user_dense[u, 0] == pytest.approx(np.log1p(before.sum()) / 10)
            assert split.user_dense[u, 1] == pytest.approx((before & click).sum() / max(before.sum(), 1))
            assert split.user_dense[u, 6] == pytest.approx((recent & click).sum() / max(recent.sum(), 1))
    # Item popularity counts the training window only.
    in_train = (ev["ts_ms"] >= data.train.as_of_ms) & (ev["ts_ms"] < data.train.end_ms)
    item0 = ev["item_id"][in_train][0]
    row = int(np.searchsorted(data.item_ids, item0))
    assert data.item_dense[row, 2] == pytest.approx(np.log1p((ev["item_id"][in_train] == item0).sum()) / 10)


def test_rows_are_subsampled_pairs_are_not_and_bad_input_is_refused(world, tmp_path):
    full = load_downstream_data(world, DownstreamDataConfig(max_train_rows=None, max_eval_rows=None))
    sub = load_downstream_data(world, DownstreamDataConfig(max_train_rows=50, max_eval_rows=20))
    assert (len(sub.train), len(sub.eval)) == (50, 20)
    assert sub.train.pair_user.size == full.train.pair_user.size
    with pytest.raises(ConfigError, match="max_eval_rows"):
        DownstreamDataConfig(max_eval_rows=0)
    (tmp_path / "world.json").write_text(json.dumps({"kind": "world"}))
    with pytest.raises(DataError, match="protocol"):
        load_downstream_data(tmp_path)


def test_a_whole_run_writes_results_and_plot_with_embeddings_as_of_each_split(world, tmp_path):
    calls = []

    def embeddings(user_ids: np.ndarray, as_of_ms: int) -> np.ndarray:
        calls.append(as_of_ms)
        rng = np.random.default_rng(as_of_ms % 1000)
        return rng.standard_normal((user_ids.size, 2, 4)).astype(np.float32) * 7.0

    cfg = DownstreamConfig(data=DownstreamDataConfig(max_train_rows=2000, max_eval_rows=1000), seeds=(0, 1),
                           ranker_epochs=1, retrieval_epochs=1, batch_size=256, max_queries=200)
    results = run_downstream(world, embeddings, tmp_path / "out", cfg, log=lambda line: None,
                             provenance={"tower": "random"})
    assert sorted(calls) == sorted([results["splits"]["train"]["as_of_ms"], results["splits"]["eval"]["as_of_ms"]])
    summary = results["summary"]
    for h in HEADS:
        s = summary["ranker"][h]
        expected = np.mean([(w[h]["ne"] - b[h]["ne"]) / b[h]["ne"] for w, b in
                            zip(results["per_seed"]["ranker"]["with"], results["per_seed"]["ranker"]["without"])])
        assert s["relative_ne_delta"]["mean"] == pytest.approx(expected)
        assert s["ne_without"]["mean"] > 0
    for v in ("none", "linear", "gatenet"):
        assert 0 <= summary["retrieval"][v]["hit@1"]["mean"] <= summary["retrieval"][v]["hit@10"]["mean"] <= 1
    assert results["embedding_shape"] == [2, 4] and results["embedding_rms"] == pytest.approx(7.0, rel=0.2)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["tower"] == "random" and on_disk["summary"] == json.loads(json.dumps(summary))
    assert (tmp_path / "out" / "downstream.png").stat().st_size > 10_000


def test_embeddings_of_the_wrong_shape_are_refused(world, tmp_path):
    cfg = DownstreamConfig(data=DownstreamDataConfig(max_train_rows=100, max_eval_rows=100), seeds=(0,))
    with pytest.raises(ConfigError, match="embeddings"):
        run_downstream(world, lambda ids, t: np.zeros((ids.size - 1, 2, 2), np.float32), tmp_path, cfg, log=lambda s: None)


@pytest.mark.slow  # two CLI processes: a tower trained, then the experiment (~40 s on two busy cores)
def test_cli_runs_the_experiment_with_a_trained_tower_through_the_4bit_codec(world, tmp_path):
    run = tmp_path / "tower"
    trained = run_cli("dv365", "train", "--data", str(world), "--out", str(run), "--encoders", "lce", "--out-cols", "3",
                      "--train-days", "2", "--per-group", "4", "--epochs", "1", "--max-users", "0")
    assert trained.returncode == 0, trained.stderr
    res = run_cli("dv365", "downstream", "--run", str(run), "--out", str(tmp_path / "down"), "--train-rows", "1500",
                  "--eval-rows", "500", "--seeds", "1", "--ranker-epochs", "1", "--retrieval-epochs", "1",
                  "--queries", "100")
    assert res.returncode == 0, res.stderr
    assert "| **average** |" in res.stdout and "HitRate@10" in res.stdout
    results = json.loads((tmp_path / "down" / "results.json").read_text())
    assert results["quantized_4bit"] is True and results["embedding_shape"] == [33, 3]
    bad = run_cli("dv365", "downstream", "--run", str(tmp_path), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_cached_embeddings_compute_once_per_time_and_user_set(tmp_path):
    calls = []

    def embed(user_ids, as_of_ms):
        calls.append((tuple(user_ids), as_of_ms))
        return np.full((len(user_ids), 2, 3), as_of_ms, dtype=np.float32)

    cached = cached_embeddings(embed, tmp_path / "cache")
    users = np.array([3, 5])
    first = cached(users, 10)
    np.testing.assert_array_equal(cached(users, 10), first)
    assert cached(users, 20)[0, 0, 0] == 20 and cached(users[:1], 10).shape == (1, 2, 3)
    assert calls == [((3, 5), 10), ((3, 5), 20), ((3,), 10)]
