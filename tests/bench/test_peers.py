"""The peers experiment: our rows exported to FuxiCTR's LongCTR format, one FuxiCTR model trained
one epoch with FuxiCTR's own loop, scored beside one of ours on the same evaluation rows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from lifelong.bench.peers import build_peers_report, export_longctr, run_peers
from lifelong.core.errors import ConfigError
from lifelong.data.io import load_dataset
from lifelong.data.schema import POSITIVE_BITS
from lifelong.data.world import load_config, simulate_to
from lifelong.transact.rank_data import RankData
from lifelong.transact.sequence_layout import SequenceLayout
from lifelong.transact.training_rows import BuildConfig, build_rows


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("peers")
    simulate_to(load_config("tiny", overrides=["users.n_users=10"]), d / "w")
    build_rows(d / "w", d / "rows", BuildConfig(layout=SequenceLayout(8, 8, 4, 4), ll_cap=50, nal_negatives=4))
    return d / "rows"


def test_export_holds_each_rows_past_positive_actions_and_label(rows, tmp_path):
    export = export_longctr(rows, tmp_path / "x", head="click", val_days=1)
    data = RankData(rows, "eval")
    test = pq.read_table(tmp_path / "x" / "test.parquet").to_pandas()
    assert len(test) == len(data) == export.rows["test"]
    np.testing.assert_array_equal(test["label"], np.asarray(data.arrays["labels"])[:, data.heads.index("click")])
    np.testing.assert_array_equal(test["item_index"], np.asarray(data.arrays["item"]) + 1)
    users = pq.read_table(tmp_path / "x" / "user_info.parquet").to_pandas()
    items = pq.read_table(tmp_path / "x" / "item_info.parquet").to_pandas()
    assert items["item_index"].tolist() == list(range(len(items))) and len(items) == export.items + 1
    # Brute force: each row's sequence is its user's positive actions strictly before the request.
    ev = load_dataset(data.meta["data"]).events.to_pandas()
    ev = ev[(ev["action_mask"].astype(np.int64) & int(POSITIVE_BITS)) != 0].sort_values(["user_id", "ts_ms"])
    item_index = {int(i): k + 1 for k, i in enumerate(data.item_id.numpy())}
    all_users = np.unique(np.r_[ev["user_id"], RankData(rows, "train").arrays["user_id"], data.arrays["user_id"]])
    req_ts = np.asarray(data.arrays["req_ts"])[np.asarray(data.arrays["request"])]
    for r in range(0, len(test), max(1, len(test) // 25)):
        user = int(np.asarray(data.arrays["user_id"])[r])
        past = ev[(ev["user_id"] == user) & (ev["ts_ms"] < req_ts[r])]
        assert all_users[test["user_index"][r]] == user
        assert test["seq_len"][r] == len(past)
        full = users["full_item_seq"][test["user_index"][r]]
        assert list(full[:test["seq_len"][r]]) == [item_index[int(i)] for i in past["item_id"]]
    with pytest.raises(ConfigError, match="--head 'likes'"):
        export_longctr(rows, tmp_path / "y", head="likes")


def test_one_fuxictr_model_trains_an_epoch_beside_ours(rows, tmp_path):
    pytest.importorskip("fuxictr", reason="the peers extra (make test installs it)")
    summary = run_peers(rows, tmp_path / "out", head="click", fuxictr_models=["DIN"], ours=["wide&deep"],
                        fuxictr_overrides={"epochs": 1, "batch_size": 512, "max_len": 8},
                        train_sets=["epochs=1"], log=lambda s: None)
    labels = [r["label"] for r in summary["results"]]
    assert labels == ["wide&deep", "FuxiCTR DIN (batch_size=512, max_len=8)"]
    din = summary["results"][1]
    assert din["epochs"] == 1 and din["params"]["learning_rate"] == 1e-3 and din["params"]["max_len"] == 8
    for r in summary["results"]:
        assert 0 <= r["auc"] <= 1 and np.isfinite(r["ne"]) and r["hit@3"] >= 0
    # Each model's probabilities are kept beside its scores; the calibration ratio is read from them.
    data = RankData(rows, "eval")
    y = np.asarray(data.arrays["labels"])[:, data.heads.index("click")]
    kept = sorted((tmp_path / "out" / "scores").glob("*.npy"))
    assert len(kept) == 2 and all(np.load(f).shape == (len(data),) for f in kept)
    wide = np.load(tmp_path / "out" / "scores" / "wide_deep.npy")
    assert summary["results"][0]["calibration"] == pytest.approx(wide.mean() / y.mean(), rel=1e-5)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| FuxiCTR DIN (batch_size=512, max_len=8) | FuxiCTR 2.3.10 |" in md and "AUC/click" in md and "mean p / rate" in md
    assert json.loads((tmp_path / "out" / "report.json").read_text())["head"] == "click"
    with pytest.raises(ConfigError, match="unknown peers"):
        run_peers(rows, tmp_path / "bad", fuxictr_models=["DNN"], ours=[])


def test_report_warns_that_unweighted_peers_learn_subsampled_rows():
    entry = {"label": "FuxiCTR DIN", "family": "FuxiCTR 2.3.10", "auc": 0.6, "ne": 1.5, "hit@3": 0.4,
             "calibration": 4.7, "epochs": 3, "seconds": 10.0, "parameters": 100}
    summary = {"head": "repin", "val_days": 1, "seed": 0, "eval_rows": 10, "results": [entry]}
    assert "neg-rate" not in build_peers_report({**summary, "train_negative_rate": 1.0}).markdown()
    md = build_peers_report({**summary, "train_negative_rate": 0.15}).markdown()
    assert "keep 0.15 of the label-free training rows" in md and "6.67x" in md and "| 4.7000 |" in md
