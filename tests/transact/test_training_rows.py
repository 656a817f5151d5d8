"""NN feature logging: brute-force NN selection, point-in-time tokens, train/serve parity."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.core.errors import ConfigError
from lifelong.data.counters import COUNTER_FEATURES, N_COUNTER_FEATURES
from lifelong.data.io import load_dataset
from lifelong.data.schema import EXPLICIT_BITS, Action
from lifelong.data.timelines import EventIndex, Jagged
from lifelong.data.world import load_config, simulate_to
from lifelong.ops.nn_select import nn_topk
from lifelong.transact.rank_data import RankData
from lifelong.transact.registry import build_model
from lifelong.transact.sequence_layout import SequenceLayout
from lifelong.transact.serving import Ranker
from lifelong.transact.training_rows import BuildConfig, ItemTable, _chunk_bounds, build_rows, select_tokens

LAYOUT = SequenceLayout(ll_nn=8, rt=8, rt_nn=4, imp_nn=4)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=6), st.integers(1, 6), st.integers(0, 2**31))
def test_nn_topk_equals_brute_force_with_ties_to_the_newer_token(lengths, k, seed):
    rng = np.random.default_rng(seed)
    palette = rng.standard_normal((4, 3)).astype(np.float32)  # few distinct vectors: many ties
    offsets = np.r_[0, np.cumsum(lengths)]
    values = palette[rng.integers(0, 4, offsets[-1])]
    n_cand = rng.integers(0, 4, len(lengths))
    cand_req = np.repeat(np.arange(len(lengths)), n_cand)
    cand = torch.from_numpy(palette[rng.integers(0, 4, cand_req.size)])
    pos, score = nn_topk(Jagged(values, offsets), cand, cand_req, k, budget=rng.integers(1, 200))
    for i, r in enumerate(cand_req):
        seq = values[offsets[r]:offsets[r + 1]]
        # As nn_topk scores: exact (float64) products rounded once to float32, so near-ties agree.
        s = (seq.astype(np.float64) @ cand[i].numpy().astype(np.float64)).astype(np.float32)
        order = sorted(range(len(seq)), key=lambda p: (-s[p], -p))[:k]  # ties: newer first
        expected = np.full(k, -1)
        expected[: len(order)] = order
        assert pos[i].tolist() == expected.tolist()
        assert np.allclose(score[i][: len(order)], s[order], atol=1e-6)
        assert np.isneginf(score[i][len(order):]).all()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("w") / "tiny"
    simulate_to(load_config("tiny", overrides=["users.n_users=30"]), out)
    return out


@pytest.fixture(scope="module")
def rows_dir(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("rows") / "ds"
    build_rows(world, out, BuildConfig(layout=LAYOUT, ll_cap=200, imp_cap=20, nal_negatives=6))
    return out


@dataclass
class LastDays:
    """Every event of a world's last 5 days as a row, requests de-duplicated: what select_tokens takes."""

    user: np.ndarray
    ts: np.ndarray
    mask: np.ndarray
    index: EventIndex
    emb: torch.Tensor
    item_idx: np.ndarray
    rows: np.ndarray
    row_req: np.ndarray
    first: np.ndarray

    @classmethod
    def of(cls, world) -> LastDays:
        ds = load_dataset(world)
        ev = ds.events
        user, ts = ev.column("user_id").to_numpy(), ev.column("ts_ms").to_numpy()
        mask, req = ev.column("action_mask").to_numpy(), ev.column("request_id").to_numpy()
        items = ItemTable.from_dataset(ds)
        rows = np.flatnonzero(ts >= ts.max() - 5 * 86_400_000)
        new = np.r_[True, (user[rows][1:] != user[rows][:-1]) | (req[rows][1:] != req[rows][:-1])]
        return cls(user, ts, mask, EventIndex(user, ts, mask), items.normalized(),
                   items.index_of(ev.column("item_id").to_numpy()), rows, np.cumsum(new) - 1, rows[new])

    def select(self, cfg: BuildConfig):
        return select_tokens(self.index, self.emb, self.item_idx, self.user[self.first], self.ts[self.first],
                             self.row_req, self.item_idx[self.rows], cfg)


def test_no_token_at_or_after_its_request_time(world):
    last = LastDays.of(world)
    user, ts, mask, rows, row_req, first = last.user, last.ts, last.mask, last.rows, last.row_req, last.first
    tok = last.select(BuildConfig(layout=LAYOUT, ll_cap=50, imp_cap=10, nal_negatives=5, request_chunk=7))
    row_ts, row_user = ts[rows], user[rows]
    for name, ev_rows in tok.nn.items():
        valid = ev_rows >= 0
        assert valid.any(), name
        assert (ts[ev_rows][valid] < np.broadcast_to(row_ts[:, None], ev_rows.shape)[valid]).all(), name
        assert (user[ev_rows][valid] == np.broadcast_to(row_user[:, None], ev_rows.shape)[valid]).all(), name
    for ev_rows in (tok.rt, tok.nal_negatives):
        valid = ev_rows >= 0
        assert (ts[ev_rows][valid] < np.broadcast_to(ts[first][:, None], ev_rows.shape)[valid]).all()
    # LL tokens are explicit and older than every token of the request's S_RT[:r].
    ll = tok.nn["ll_nn"]
    rt_oldest = np.where(tok.rt[:, 0] >= 0, tok.rt[:, 0], np.iinfo(np.int64).max)[row_req]
    assert ((ll < rt_oldest[:, None]) | (ll < 0)).all()
    assert ((mask[ll] & EXPLICIT_BITS != 0) | (ll < 0)).all()
    assert ((mask[tok.nal_negatives] == int(Action.IMPRESSION)) | (tok.nal_negatives < 0)).all()
    # Caps hold.
    assert ll.shape[1] == LAYOUT.ll_nn and tok.rt.shape[1] == LAYOUT.rt


def test_chunks_bounded_by_tokens_select_the_same_tokens(world):
    """Cutting requests by sequence tokens (what bounds the build's memory on long histories)
    changes the chunks, never the selected tokens."""
    last = LastDays.of(world)
    by_requests = BuildConfig(layout=LAYOUT, ll_cap=50, imp_cap=10, nal_negatives=5)
    by_tokens = BuildConfig(layout=LAYOUT, ll_cap=50, imp_cap=10, nal_negatives=5, chunk_tokens=200)
    req_user, req_ts = last.user[last.first], last.ts[last.first]
    bounds = _chunk_bounds(last.index, req_user, req_ts, by_tokens)
    assert len(bounds) > 3 and bounds[0][0] == 0 and bounds[-1][1] == last.first.size
    assert all(b0 == a1 for (_, b0), (a1, _) in zip(bounds[:-1], bounds[1:]))
    assert len(_chunk_bounds(last.index, req_user, req_ts, by_requests)) == 1
    picked = [last.select(cfg) for cfg in (by_requests, by_tokens)]
    for name in picked[0].nn:
        assert np.array_equal(picked[0].nn[name], picked[1].nn[name]), name
    assert np.array_equal(picked[0].rt, picked[1].rt)
    assert np.array_equal(picked[0].nal_negatives, picked[1].nal_negatives)


def test_rows_directory_layout(rows_dir):
    train, evaluation = RankData(rows_dir, "train"), RankData(rows_dir, "eval")
    assert len(train) > 0 and len(evaluation) > 0
    assert evaluation.oracle is not None and not np.isnan(evaluation.oracle).any()
    assert np.asarray(train.arrays["ts_ms"]).max() < train.meta["protocol"]["cutoff_ms"]
    b = evaluation.batch(np.arange(min(64, len(evaluation))))
    assert b.seq_emb.shape == (len(b), LAYOUT.total, 32)
    assert torch.equal(b.seq_valid, b.seq_item >= 0)
    assert (b.seq_emb[~b.seq_valid] == 0).all()


def test_train_serve_parity(world, rows_dir):
    """Scores from logged NN features equal scores from searching the full sequences."""
    logged = RankData(rows_dir, "eval")
    torch.manual_seed(0)
    model = build_model("transact_v2", layout=LAYOUT, n_heads=4).eval()
    ds = load_dataset(world)
    ev = ds.events
    user, ts = ev.column("user_id").to_numpy(), ev.column("ts_ms").to_numpy()
    mask = ev.column("action_mask").to_numpy()
    surface = ev.column("surface").to_numpy().astype(np.int64)
    items = ItemTable.from_dataset(ds)
    item_idx = items.index_of(ev.column("item_id").to_numpy())
    index = EventIndex(user, ts, mask)
    cfg = BuildConfig(**{**logged.meta["config"], "layout": LAYOUT})
    a = logged.arrays
    worst = 0.0
    for r in np.unique(np.asarray(a["request"]))[:12]:
        rows = np.flatnonzero(np.asarray(a["request"]) == r)
        batch = logged.batch(rows)
        # Serving: search the user's full sequences for this request alone.
        req_user, req_ts = np.asarray(a["req_user"])[[r]], np.asarray(a["req_ts"])[[r]]
        tok = select_tokens(index, items.normalized(), item_idx, req_user, req_ts, np.zeros(rows.size, np.int64),
                            np.asarray(a["item"])[rows], cfg)
        ev_rows = np.concatenate([tok.nn["ll_nn"], np.repeat(tok.rt, rows.size, 0), tok.nn["rt_nn"],
                                  tok.nn["imp_nn"]], axis=1)
        valid = ev_rows >= 0
        safe = np.where(valid, ev_rows, 0)
        online_item = torch.from_numpy(np.where(valid, item_idx[safe], -1))
        assert torch.equal(torch.where(online_item >= 0, logged.item_id[online_item.clamp_min(0)], -1), batch.seq_item)
        batch.seq_action = torch.from_numpy(np.where(valid, mask[safe], 0).astype(np.int64))
        batch.seq_surface = torch.from_numpy(np.where(valid, surface[safe], 0))
        batch.seq_emb = logged.item_emb[online_item.clamp_min(0)] * torch.from_numpy(valid).unsqueeze(-1)
        with torch.no_grad():
            online = torch.sigmoid(model(batch).logits)
            offline = torch.sigmoid(model(logged.batch(rows)).logits)
        worst = max(worst, float((online - offline).abs().max()))
    assert worst <= 1e-5


def test_nn_topk_ties_larger_than_the_slack_pick_the_newest():
    values = np.ones((300, 2), dtype=np.float32)
    values[7] = [2.0, 2.0]  # one clear winner, then a 299-way tie
    pos, score = nn_topk(Jagged(values, np.array([0, 300])), torch.tensor([[1.0, 0.0]]), np.array([0]), k=5)
    assert pos.tolist() == [[7, 299, 298, 297, 296]]
    assert score[0].tolist() == [2.0, 1.0, 1.0, 1.0, 1.0]


def test_rows_carry_engagement_counters_as_of_their_request(world, rows_dir):
    """``counters.npy``: each row's item-scope shown count is the item's impressions strictly
    before the row's request (all users); a model configured with counters reads them, one without ignores them."""
    data = RankData(rows_dir, "eval")
    assert data.meta["counters"]["features"] == list(COUNTER_FEATURES)
    ev = load_dataset(world).events
    ts, mask = ev.column("ts_ms").to_numpy(), ev.column("action_mask").to_numpy()
    item_ids = ev.column("item_id").to_numpy()
    shown = (mask & int(Action.IMPRESSION)) != 0
    rows = np.arange(0, len(data), max(1, len(data) // 40))
    batch = data.batch(rows)
    assert batch.counters.shape == (rows.size, N_COUNTER_FEATURES)
    expected = [np.sum(shown & (item_ids == int(i)) & (ts < int(t)))
                for i, t in zip(batch.item_id, np.asarray(data.arrays["req_ts"])[np.asarray(data.arrays["request"])[rows]])]
    got = np.expm1(batch.counters[:, COUNTER_FEATURES.index("item_log_shown")].double().numpy() * np.log1p(1e4))
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert max(expected) > 0
    torch.manual_seed(0)
    reads = build_model("wide_deep", layout=LAYOUT, n_heads=4, row={"counters": True}).eval()
    assert reads.abilities.counters and not build_model("wide_deep", layout=LAYOUT, n_heads=4).abilities.counters
    with torch.no_grad():
        logits = reads(batch).logits
        batch.counters = batch.counters + 1.0
        assert not torch.allclose(reads(batch).logits, logits)
        batch.counters = None
        with pytest.raises(ValueError, match="rebuild them"):
            reads(batch)
    # The feature store keeps no counters: serving refuses the model before it reads a store.
    with pytest.raises(ConfigError, match="engagement counters"):
        Ranker(reads, store=None)
