"""The Monolith experiments on a tiny drifting world: the serving simulation's sync logic, and each
experiment's rows, report files and command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from lifelong.cli import app
from lifelong.core.errors import ConfigError
from lifelong.data.world import load_config, simulate_to
from lifelong.monolith.experiments import (
    HOUR_MS,
    MINUTE_MS,
    build_model,
    drift_experiment,
    hashing_experiment,
    load_stream,
    quality,
    render_markdown,
    serve_and_train,
    sync_experiment,
    write_report,
)
from lifelong.monolith.joiner import OnlineJoiner
from lifelong.monolith.online import OnlineConfig
from lifelong.tables.hashed import ModuloEmbedding

CFG = OnlineConfig(batch_size=256)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("experiments") / "world"
    simulate_to(load_config("tiny", overrides=["users.n_users=12", "days=12", "drift.enabled=true", "drift.day=8"]), d)
    return d


@pytest.fixture(scope="module")
def world(world_dir):
    return load_stream(world_dir)


def test_load_stream_keeps_the_order_days_and_users_asked_for(world_dir, world):
    ts = world.records["ts_ms"]
    assert len(ts) and (np.diff(ts) >= 0).all() and world.drift_day == 8 and world.days == 12
    short = load_stream(world_dir, days=6, users=5)
    assert short.drift_day is None  # the drift is past the days kept
    assert short.users == 5 and short.records["ts_ms"].max() < short.day_ms(6)
    with pytest.raises(ConfigError, match="days must be in 1..12"):
        load_stream(world_dir, days=13)


def test_served_models_follow_their_sync_interval(world):
    eval_from = world.day_ms(6)
    syncs = {"1 min": MINUTE_MS, "1 min again": MINUTE_MS, "1 h": HOUR_MS, "never": None}
    run = serve_and_train(world, CFG, syncs, eval_from_ms=eval_from)
    reference = OnlineJoiner(CFG.joiner)
    labelled = np.concatenate([reference.push(world.records), reference.flush()])
    assert len(run.examples) == (labelled["ts_ms"] >= eval_from).sum() and run.examples["ts_ms"].min() >= eval_from
    assert run.trained == len(OnlineJoiner(CFG.joiner).push(world.records))  # each example the stream closes, once
    np.testing.assert_array_equal(run.probs["1 min"], run.probs["1 min again"])
    assert not np.array_equal(run.probs["1 min"], run.probs["never"])
    # Within one hour the hourly copy is a snapshot at the hour: the minute copy equals it in
    # the first minute of the hour and departs from it later.
    ts = run.examples["ts_ms"]
    first_minute = ts % HOUR_MS < MINUTE_MS
    np.testing.assert_array_equal(run.probs["1 h"][first_minute], run.probs["1 min"][first_minute])
    assert not np.array_equal(run.probs["1 h"][~first_minute], run.probs["1 min"][~first_minute])
    # "never" is the snapshot at eval_from: with training stopped there, every sync serves it.
    stopped = serve_and_train(world, CFG, {"1 min": MINUTE_MS, "never": None}, eval_from_ms=eval_from,
                              train_until_ms=eval_from)
    np.testing.assert_array_equal(stopped.probs["1 min"], stopped.probs["never"])
    np.testing.assert_array_equal(stopped.probs["never"], run.probs["never"])
    with pytest.raises(ConfigError, match="multiple of 60000"):
        serve_and_train(world, CFG, {"odd": 90_000}, eval_from_ms=eval_from)


def test_build_model_hashes_only_the_slots_asked_for():
    model = build_model(CFG, {"item_id": 7, "topic_id": 2})
    assert [type(model.tables[s]) is ModuloEmbedding for s in model.tables] == [False, True, False, True]
    assert model.tables["item_id"].buckets == 7
    with pytest.raises(ConfigError, match="unknown slot"):
        build_model(CFG, {"item": 7})


def test_quality_counts_hits_per_user_by_request(world):
    run = serve_and_train(world, CFG, {"never": None}, eval_from_ms=world.day_ms(9), train_until_ms=world.day_ms(9),
                          grid_ms=HOUR_MS)
    q = quality(run.examples, run.probs["never"])
    assert q.examples == len(run.examples) and q.loss > 0
    assert all(a is None or 0 <= a <= 1 for a in q.auc.values())
    assert set(q.hit3) == {"repin", "hide"} and all(v >= 0 for v in q.hit3.values())


def test_hashing_rows(world, tmp_path):
    report = hashing_experiment(world, fractions=(0.25, 1.0), eval_days=3, cfg=CFG)
    rows = report["rows"]
    assert [r["table"] for r in rows] == ["collision-less", "modulo 25%", "modulo 100%"]
    assert rows[0]["buckets"] is None
    distinct = report["distinct_ids"]
    assert rows[1]["buckets"] == {s: max(1, round(0.25 * n)) for s, n in distinct.items()}
    assert len({r["quality"]["examples"] for r in rows}) == 1 and rows[0]["quality"]["examples"] > 0
    assert len({r["quality"]["loss"] for r in rows}) == 3  # the tables differ
    paths = write_report(report, tmp_path)
    assert [p.name for p in paths] == ["hashing.json", "hashing.md", "hashing.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert json.loads(paths[0].read_text())["rows"][2]["table"] == "modulo 100%"
    assert "| modulo 25% |" in paths[1].read_text()


def test_drift_rows_per_day_from_the_freeze(world, tmp_path):
    report = drift_experiment(world, freeze_days_before=3, cfg=CFG)
    assert report["freeze_day"] == 5
    assert [r["day"] for r in report["rows"]] == list(range(5, 12))
    assert set(report["overall"]) == {"before drift", "after drift"}
    first = report["rows"][0]
    assert first["online"]["examples"] == first["frozen"]["examples"] > 0
    write_report(report, tmp_path)
    assert "| after drift | frozen |" in render_markdown(report)
    with pytest.raises(ConfigError, match="at least one day"):
        drift_experiment(world, freeze_days_before=8, cfg=CFG)


def test_sync_rows_per_interval(world):
    intervals = {"10 min": 10 * MINUTE_MS, "6 h": 6 * HOUR_MS, "never": None}
    report = sync_experiment(world, intervals=intervals, cfg=CFG)
    assert report["eval_from_day"] == 3 and report["grid_ms"] == 10 * MINUTE_MS
    assert [r["sync"] for r in report["rows"]] == list(intervals)
    assert report["periods"] == ["all", "3 days after drift"]
    for r in report["rows"]:
        assert r["all"]["examples"] > r["3 days after drift"]["examples"] > 0
    assert len(report["windows"]["never"]) == 12 - 3
    with pytest.raises(ConfigError, match="eval_from_day"):
        sync_experiment(world, eval_from_day=12, cfg=CFG)


def test_the_command_writes_the_report(world_dir, tmp_path):
    result = CliRunner().invoke(app, ["monolith", "experiment", "drift", "--data", str(world_dir), "--out",
                                      str(tmp_path), "--days", "10", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "after drift" in result.output and (tmp_path / "drift.png").is_file()
    world = json.loads((tmp_path / "drift.json").read_text())["world"]
    assert (world["seed"], world["days"]) == (2, 10)
    result = CliRunner().invoke(app, ["monolith", "experiment", "nope", "--data", str(world_dir), "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown experiment" in str(result.exception)
