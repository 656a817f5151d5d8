"""DV365 training end to end on a tiny simulated world: run files, the tower API, point-in-time cuts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lifelong.core.errors import DataError
from lifelong.data.protocol import DAY_MS
from lifelong.data.world import load_config, simulate_to
from lifelong.dv365.examples import TokenCache, open_world, sample_examples
from lifelong.dv365.fsa import FSAConfig
from lifelong.dv365.slices import SliceSpec
from lifelong.dv365.tower import DV365Tower, content_tables, load_tower
from lifelong.dv365.train import DV365TrainConfig, load_backbone, train_dv365
from tests.test_cli import run_cli

SMALL = dict(fsa=FSAConfig(out_cols=4, funnel_blocks=2, ffn_dim=8), train_days=2, per_group=8, eval_per_group=16,
             max_users=None, epochs=1, groups_per_batch=8)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dv365") / "tiny"
    simulate_to(load_config("tiny", overrides=["users.n_users=20"]), d)
    return d


@pytest.fixture(scope="module")
def world(world_dir):
    return open_world(world_dir)


@pytest.fixture(scope="module")
def run(world_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dv365"
    meta = train_dv365(world_dir, out, DV365TrainConfig(**SMALL), log=lambda _: None)
    return out, meta


def test_examples_are_grouped_by_user_day_and_capped(world):
    ex = sample_examples(world, world.train_window(3), per_group=5)
    sizes = np.diff(ex.offsets)
    assert sizes.min() >= 1 and sizes.max() <= 5
    start = world.protocol.cutoff_ms - 3 * DAY_MS
    assert set(((ex.group_anchor_ms - start) // DAY_MS).tolist()) <= {0, 1, 2}
    assert np.all((ex.group_anchor_ms - start) % DAY_MS == 0)
    # Labels are the impression's own action bits: the rates match the window's.
    ts = world.events.column("ts_ms").to_numpy()
    mask = world.events.column("action_mask").to_numpy()
    window = (ts >= start) & (ts < world.protocol.cutoff_ms)
    everything = sample_examples(world, world.train_window(3), per_group=10**6)
    assert len(everything) == int(window.sum())
    assert everything.labels[:, 0].sum() == int(((mask[window] & 2) != 0).sum())
    features, labels, watch = ex.batch(np.array([0, ex.n_groups - 1]))
    assert features.group.tolist() == [0] * int(sizes[0]) + [1] * int(sizes[-1])
    assert labels.shape == (int(sizes[0] + sizes[-1]), 4) and watch.shape == labels.shape[:1]


def test_token_cache_matches_direct_pooling_and_persists(world, tmp_path):
    tower = DV365Tower(SliceSpec.default(), content_tables(world.items), FSAConfig(encoders=("none",)), gap_ms=0)
    users = world.users[:6]
    cut = world.protocol.cutoff_ms
    cache = TokenCache(tower, world.source, users, tmp_path)
    got = cache.tokens(users[[3, 1]], np.array([cut, cut - DAY_MS]))
    want = tower.tokens(world.source.batch(users[[3, 1]], np.array([cut, cut - DAY_MS]))).half()
    assert torch.equal(got, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"cut_{cut - DAY_MS}.pt", f"cut_{cut}.pt"]
    again = TokenCache(tower, world.source, users, tmp_path)
    tower.user_tokens = None  # a second cache must read the files, not pool again
    assert torch.equal(again.tokens(users[[3]], np.array([cut])), want[:1])
    with pytest.raises(ValueError, match="other users"):
        cache.tokens(np.array([10**9]), np.array([cut]))


def test_run_writes_model_and_metadata(run):
    out, meta = run
    saved = json.loads((out / "run.json").read_text())
    assert saved["eval"]["ne"].keys() == {"click", "repin", "long_view", "hide"}
    assert all(np.isfinite(v) and v > 0 for v in saved["eval"]["ne"].values())
    assert saved["tower_out_shape"] == [66, 4] and saved["train"]["gap_ms"] == DAY_MS
    assert meta["examples_per_s"] > 0 and len(meta["epochs"]) == 1
    assert load_backbone(out).cfg.user_vectors == 4


def test_embed_users_is_the_tower_on_the_timeline_before_as_of_minus_gap(run, world_dir, world):
    out, _ = run
    tower = load_tower(out)
    users = np.r_[world.users[:3], 10**9]  # an unknown user gets the empty-timeline output
    as_of = world.protocol.eval_start_ms
    emb = tower.embed_users(world_dir, users, as_of)
    assert emb.dtype == np.float32 and emb.shape == (4, *tower.out_shape) == (4, 66, 4)
    with torch.no_grad():
        want = tower(tower.tokens(world.source.batch(users, np.full(4, as_of - DAY_MS)))).numpy()
    np.testing.assert_allclose(emb, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tower.embed_users(world.source, users, as_of - DAY_MS, gap_ms=0), emb, atol=1e-6)
    assert not np.allclose(tower.embed_users(world.source, users[:3], as_of, gap_ms=0), emb[:3], atol=1e-4)


def test_load_tower_refuses_a_directory_without_a_run(tmp_path):
    with pytest.raises(DataError, match="no model.pt"):
        load_tower(tmp_path)


def test_cli_train(world_dir, tmp_path):
    f = tmp_path / "dv365.yaml"  # flags and --set win over the file
    f.write_text("train_days: 2\nper_group: 4\nepochs: 3\nfsa: {encoders: [lce], out_cols: 5}\n")
    res = run_cli("dv365", "train", "--data", str(world_dir), "--out", str(tmp_path / "r"), "--config", str(f),
                  "--out-cols", "3", "--set", "epochs=1", "--max-users", "0", "--gap-hours", "0")
    assert res.returncode == 0, res.stderr
    assert "eval NE: click" in res.stdout and "(33, 3)" in res.stdout
    assert load_tower(tmp_path / "r").gap_ms == 0
    train = json.loads((tmp_path / "r" / "run.json").read_text())["train"]
    assert (train["epochs"], train["train_days"], train["max_users"], train["fsa"]["encoders"]) == (1, 2, None, ["lce"])
    bad = run_cli("dv365", "train", "--data", str(world_dir), "--out", str(tmp_path / "x"), "--set", "fsa.encoderz=[lce]")
    assert bad.returncode == 2 and "fsa.encoderz: no such key" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("dv365", "train", "--data", str(world_dir), "--out", str(tmp_path / "x"), "--encoders", "rnn")
    assert bad.returncode == 2 and "unknown FSA encoder 'rnn'" in bad.stderr and "Traceback" not in bad.stderr
