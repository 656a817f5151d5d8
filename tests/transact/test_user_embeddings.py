"""Training and evaluating a transact ranker with a frozen DV365 user embedding read from an export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lifelong.core.errors import ConfigError, DataError
from lifelong.data.protocol import DAY_MS
from lifelong.data.world import load_config, simulate_to
from lifelong.dv365.export import EmbeddingReader, ExportConfig, export_embeddings
from lifelong.transact.evaluate import evaluate_run
from lifelong.transact.rank_data import RankData
from lifelong.transact.sequence_layout import SequenceLayout
from lifelong.transact.trainer import TrainConfig, load_model, predict, train
from lifelong.transact.training_rows import BuildConfig, build_rows
from tests.dv365.export_support import DIM, ROWS, FakeTower

T0 = 100 * DAY_MS


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("user_emb")
    simulate_to(load_config("tiny", overrides=["users.n_users=12"]), d / "w")
    build_rows(d / "w", d / "rows", BuildConfig(layout=SequenceLayout(8, 8, 4, 4), ll_cap=100, nal_negatives=4))
    return d


def _export(rows, name: str, as_of_ms: int, drop_first: int = 0) -> str:
    """Export fake embeddings of the rows' users (less the first ``drop_first``) into a new store."""
    users = np.unique(np.concatenate([np.load(rows / "rows" / s / "user_id.npy") for s in ("train", "eval")]))
    url = f"lmdb://{rows / name}"
    export_embeddings(FakeTower(), rows / "w", url, as_of_ms, ExportConfig(), user_ids=users[drop_first:])
    return url


def test_batches_carry_each_rows_served_embedding_and_zeros_for_missing_users(rows):
    url = _export(rows, "emb_missing", T0, drop_first=1)
    data = RankData(rows / "rows", "train", user_emb=url)
    users = np.unique(np.asarray(data.arrays["user_id"]))
    assert data.user_tokens == (ROWS, DIM)
    assert data.user_emb_info["version"] == 1 and data.user_emb_info["users"] == users.size
    assert data.user_emb_info["users_found"] == users.size - 1
    idx = np.arange(min(len(data), 300))
    batch = data.batch(idx)
    with EmbeddingReader(url, default=0.0) as reader:
        want, _ = reader.get(batch.user_id.numpy())
    assert batch.user_emb.shape == (idx.size, ROWS, DIM)
    torch.testing.assert_close(batch.user_emb, torch.from_numpy(want), rtol=0, atol=0)
    missing = batch.user_id == int(users[0])
    assert missing.any() and bool((batch.user_emb[missing] == 0).all())
    assert bool((batch.user_emb[~missing].abs().sum(dim=(1, 2)) > 0).all())
    assert RankData(rows / "rows", "train").batch(idx).user_emb is None


def test_a_ranker_trained_with_the_embedding_reads_it_at_evaluation(rows, tmp_path):
    url = _export(rows, "emb_train", T0)
    cfg = TrainConfig(model="transact_v2", nal="impression", epochs=1, max_rows=300, batch_size=64, user_emb=url)
    logs = []
    meta = train(rows / "rows", tmp_path / "run", cfg, log=logs.append)
    assert meta["user_emb"]["version"] == 1 and meta["user_emb"]["shape"] == [ROWS, DIM]
    assert any("user embedding: version 1" in line for line in logs)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["train"]["user_emb"] == url
    model, _ = load_model(tmp_path / "run")
    assert model.cfg.user_tokens == (ROWS, DIM)

    ev = evaluate_run(tmp_path / "run", rows / "rows")  # the store it was trained with
    assert np.isfinite(ev.per_head["click"]["ne"]) and ev.rows == len(RankData(rows / "rows", "eval"))
    # Another export (later, different values) changes the scores: the tokens are read.
    later = _export(rows, "emb_later", T0 + 3 * DAY_MS)
    data_now, data_later = RankData(rows / "rows", "eval", user_emb=url), RankData(rows / "rows", "eval", user_emb=later)
    assert not np.allclose(predict(model, data_now), predict(model, data_later))
    assert evaluate_run(tmp_path / "run", rows / "rows", user_emb=later).per_head["click"]["ne"] != ev.per_head["click"]["ne"]


def test_bad_user_embedding_settings_are_refused(rows, tmp_path):
    with pytest.raises(ConfigError, match="wide_deep has none"):
        TrainConfig(model="wide_deep", nal="none", user_emb="lmdb:///nowhere")
    with pytest.raises(DataError, match="no LMDB feature store"):
        RankData(rows / "rows", "train", user_emb=f"lmdb://{tmp_path / 'empty'}")
    train(rows / "rows", tmp_path / "plain", TrainConfig(model="transact_v2", nal="none", epochs=1, max_rows=100),
          log=lambda s: None)
    with pytest.raises(ConfigError, match="trained without a user embedding"):
        evaluate_run(tmp_path / "plain", rows / "rows", user_emb=f"lmdb://{tmp_path / 'empty'}")


def test_dv365_table_trains_with_one_export_and_evaluates_with_the_other(rows, tmp_path):
    from lifelong.transact.experiments import run_experiment

    before, fresh = _export(rows, "emb_before", T0), _export(rows, "emb_fresh", T0 + DAY_MS)
    with pytest.raises(ConfigError, match="give --user-emb"):
        run_experiment("dv365", rows / "rows", tmp_path / "rep", seeds=1)
    kw = dict(seeds=1, epochs=1, max_rows=200, batch_size=64, user_emb=before, eval_user_emb=fresh, log=lambda s: None)
    summary = run_experiment("dv365", rows / "rows", tmp_path / "rep", **kw)
    base, tokens = summary["rows"]
    assert tokens["label"] == "TransAct V2 + DV365 user tokens" and set(tokens["ne_gain"]) == set(base["ne"])
    assert base["ne_gain"]["click"] == (0.0, 0.0)
    evaluations = sorted((tmp_path / "rep" / "runs").glob("*/seed0/evaluation.json"))
    [ev_base] = [p for p in evaluations if json.loads(p.read_text())["train"]["user_emb"] is None]
    [ev_tok] = [p for p in evaluations if p != ev_base]
    tok = json.loads(ev_tok.read_text())
    assert tok["train"]["user_emb"] == before and tok["eval_user_emb"] == fresh
    assert json.loads(ev_base.read_text())["eval_user_emb"] is None
    assert "NE per head" in (tmp_path / "rep" / "report.md").read_text()
    # Evaluated runs are reused; another evaluation store re-runs only the token row.
    stamp = {p: p.stat().st_mtime_ns for p in (ev_base, ev_tok)}
    run_experiment("dv365", rows / "rows", tmp_path / "rep", **kw)
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    run_experiment("dv365", rows / "rows", tmp_path / "rep", **{**kw, "eval_user_emb": before})
    assert ev_base.stat().st_mtime_ns == stamp[ev_base] and json.loads(ev_tok.read_text())["eval_user_emb"] == before
