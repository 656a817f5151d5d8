"""DV365 slice pooling against a brute-force per-user, per-slice, per-event reference."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.core.errors import ConfigError, DataError
from lifelong.data.io import load_dataset
from lifelong.data.schema import Action
from lifelong.dv365.featurize import SliceEmbeddings, SliceFeaturizer, TimelineSource, UserTimelines, pool_slices
from lifelong.dv365.slices import SliceSpec
from tests.dv365.test_slices import near_tie, reference_rule, reference_weight

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
T0 = 1_700_000_000_000
IMP, CLICK, HIDE = int(Action.IMPRESSION), int(Action.CLICK), int(Action.HIDE)


def reference(spec: SliceSpec, tl: UserTimelines, tables: dict[str, np.ndarray], id_rows: dict[str, int]):
    """Per user, per slice, per event: (means (U, S, D), weight sums (U, S))."""
    dim = next(iter(tables.values())).shape[1]
    means = np.zeros((tl.n_users, len(spec), dim))
    totals = np.zeros((tl.n_users, len(spec)))
    for u in range(tl.n_users):
        for j, s in enumerate(spec.slices):
            acc, total = np.zeros(dim), 0.0
            for e in range(tl.offsets[u], tl.offsets[u + 1]):
                age = int(tl.t_ms[u]) - int(tl.ts_ms[e])
                if age <= 0 or (s.window.ms is not None and age > s.window.ms):
                    continue
                d, dur = int(tl.dwell_ms[e]), int(tl.duration_ms[e])
                if all(reference_rule(r, int(tl.action_mask[e]), d, int(tl.media_type[e]), dur) for r in s.rules):
                    w = reference_weight(s, d, dur)
                    acc += w * tables[s.table][int(tl.ids[s.id_type][e]) % id_rows[s.id_type]]
                    total += w
            totals[u, j] = total
            if total > 0:
                means[u, j] = acc / total
    return means, totals


def run(spec: SliceSpec, tl: UserTimelines, id_rows: dict[str, int], dim: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tables = {key: torch.randn(id_rows[t], dim, generator=gen, dtype=torch.float64) for key, t in spec.tables.items()}
    out = pool_slices(SliceFeaturizer(spec, id_rows).membership(tl), tables)
    return out, reference(spec, tl, {k: v.numpy() for k, v in tables.items()}, id_rows)


# -- random worlds ----------------------------------------------------------------------------------

AGES = [-5, 0, 1, HOUR_MS, HOUR_MS + 1, 3 * DAY_MS - 1, 3 * DAY_MS, 3 * DAY_MS + 1, 7 * DAY_MS, 7 * DAY_MS + 1,
        30 * DAY_MS]
DWELLS = [0, 400, 999, 1000, 1200, 3000, 5000, 10000, 30000]
DURATIONS = [0, 3000, 10000, 30000]
ENTRIES = [
    {"name": "click", "rules": [{"type": "action", "any_of": ["click"]}]},
    {"name": "hide", "rules": [{"type": "action", "any_of": ["hide"]}]},
    {"name": "bare", "rules": [{"type": "action", "any_of": ["impression"], "none_of": ["explicit"]}],
     "polarity": "negative"},
    {"name": "video", "rules": [{"type": "source", "media": "video"}]},
    {"name": "dwell", "rules": [{"type": "dwell", "min_ms": 1000, "max_ms": 5000}]},
    {"name": "ratio", "rules": [{"type": "watch_ratio", "min": 0.3, "max": 1.0}]},
    {"name": "ratio_half", "rules": [{"type": "watch_ratio", "min": 0.5, "beta": 0.5}]},
    {"name": "score", "rules": [{"type": "score", "threshold": 0.5, "gamma": 1.0}], "weight": "score"},
    {"name": "score_mean", "rules": [{"type": "score", "threshold": 0.3, "gamma": 0.5}]},
    {"name": "log_dwell", "rules": [{"type": "dwell", "min_ms": 0}], "weight": "log_dwell"},
    {"name": "dwell_w", "rules": [{"type": "action", "any_of": ["positive"]}, {"type": "source", "media": "video"}],
     "weight": "dwell"},
]
WINDOWS = ["1h", "3d", "7d", "all"]


@st.composite
def batches(draw):
    """A few users' timelines around their t (ages on every window edge), and a random spec."""
    t_ms, ts, cols = [], [], {k: [] for k in ("mask", "dwell", "media", "duration", "media_id", "author", "topic")}
    for _ in range(draw(st.integers(1, 3))):
        t = T0 + draw(st.integers(0, 10)) * DAY_MS
        n = draw(st.integers(0, 10))
        ages = sorted(draw(st.lists(st.sampled_from(AGES), min_size=n, max_size=n)), reverse=True)
        t_ms.append(t)
        ts.append([t - a for a in ages])
        media = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
        cols["media"].append(media)
        cols["duration"].append([m * draw(st.sampled_from(DURATIONS)) for m in media])
        cols["mask"].append(draw(st.lists(st.sampled_from([IMP, IMP | CLICK, IMP | HIDE, CLICK, IMP | CLICK | 4, 0]),
                                          min_size=n, max_size=n)))
        cols["dwell"].append(draw(st.lists(st.sampled_from(DWELLS), min_size=n, max_size=n)))
        for key, ids in (("media_id", st.integers(-20, 40)), ("author", st.integers(0, 5)),
                         ("topic", st.integers(0, 3))):
            cols[key].append(draw(st.lists(ids, min_size=n, max_size=n)))
    tl = UserTimelines.from_rows(t_ms, ts, cols["mask"], cols["dwell"], cols["media"], cols["duration"],
                                 media=cols["media_id"], author=cols["author"], topic=cols["topic"])
    entries = draw(st.lists(st.sampled_from(ENTRIES), min_size=1, max_size=4, unique_by=lambda e: e["name"]))
    windows = draw(st.lists(st.sampled_from(WINDOWS), min_size=1, max_size=3, unique=True))
    id_types = draw(st.lists(st.sampled_from(["media", "author", "topic"]), min_size=1, max_size=3, unique=True))
    return tl, SliceSpec.from_dict({"windows": windows, "id_types": id_types, "slices": entries})


@settings(max_examples=120, deadline=None)
@given(batch=batches())
def test_pooling_matches_bruteforce(batch):
    tl, spec = batch
    for s in spec.slices:  # the value sets above are chosen so that numpy and math agree on every bound
        assert not any(near_tie(r, int(d), int(u)) for r in s.rules for d, u in zip(tl.dwell_ms, tl.duration_ms))
    id_rows = {"media": 7, "author": 6, "topic": 4}  # 7 rows for ids -20..40: hashed, colliding, negative
    out, (means, totals) = run(spec, tl, id_rows)
    assert out.embeddings.shape == (tl.n_users, len(spec), 3)
    assert np.allclose(out.weight.numpy(), totals, rtol=1e-6)
    assert np.array_equal(out.mask.numpy(), totals > 0)
    # Weights travel as float32: weighted means agree to float32 precision.
    assert np.allclose(out.embeddings.numpy(), means, rtol=1e-5, atol=1e-6)
    assert np.all(out.embeddings.numpy()[~out.mask.numpy()] == 0)


def test_time_window_boundaries():
    """(0, W] on the age t - ts: an event at t is out, one exactly W old is in, W + 1 ms is out."""
    t = T0 + 30 * DAY_MS
    ages = [30 * DAY_MS, 7 * DAY_MS + 1, 7 * DAY_MS, 3 * DAY_MS + 1, 3 * DAY_MS, 1, 0, -1]
    ts = [[t - a for a in ages]]
    spec = SliceSpec.from_dict({"windows": ["3d", "7d", "all"], "id_types": ["media"],
                                "slices": [{"name": "any", "rules": [{"type": "action", "any_of": ["impression"]}]}]})
    tl = UserTimelines.from_rows([t], ts, [[IMP] * len(ages)], media=[list(range(len(ages)))])
    out = pool_slices(SliceFeaturizer(spec, {"media": len(ages)}).membership(tl),
                      {"implicit_positive_media_mean": torch.eye(len(ages))})
    members = (out.embeddings[0] * out.weight[0, :, None] > 0.5).numpy()
    assert members[0].tolist() == [False, False, False, False, True, True, False, False]  # 3d
    assert members[1].tolist() == [False, False, True, True, True, True, False, False]  # 7d
    assert members[2].tolist() == [True, True, True, True, True, True, False, False]  # all
    assert out.weight[0].tolist() == [2, 4, 6]

    # Without an "all" window, events older than the longest window are out.
    spec = SliceSpec.from_dict({"windows": ["7d", "3d"], "id_types": ["media"],
                                "slices": [{"name": "any", "rules": [{"type": "action", "any_of": ["impression"]}]}]})
    out = pool_slices(SliceFeaturizer(spec, {"media": len(ages)}).membership(tl),
                      {"implicit_positive_media_mean": torch.eye(len(ages))})
    assert spec.names == ["any/7d/media", "any/3d/media"] and out.weight[0].tolist() == [4, 2]


def test_weighted_pooling_equals_a_weighted_mean():
    day = DAY_MS
    dwell, duration = [3000, 12000, 500, 6000], [10000, 10000, 10000, 0]
    tl = UserTimelines.from_rows([T0], [[T0 - 4 * day, T0 - 3 * day, T0 - 2 * day, T0 - day]], [[IMP] * 4], [dwell],
                                 [[1, 1, 1, 0]], [duration], topic=[[0, 1, 2, 3]])
    spec = SliceSpec.from_dict({"windows": ["all"], "id_types": ["topic"], "slices": [
        {"name": "s", "rules": [{"type": "score", "threshold": 0.2, "gamma": 1.0}], "weight": "score"}]})
    table = torch.randn(4, 5, dtype=torch.float64)
    out = pool_slices(SliceFeaturizer(spec, {"topic": 4}).membership(tl), {"implicit_positive_topic_weighted": table})
    s = np.log1p(np.array(dwell[:3]) / 1000) / np.log1p(np.array(duration[:3]) / 1000)
    keep = s > 0.2  # the 500 ms view scores 0.17; the image has no score
    assert keep.tolist() == [True, True, False]
    expected = (s[keep, None] * table.numpy()[:3][keep]).sum(0) / s[keep].sum()
    assert np.allclose(out.embeddings[0, 0].numpy(), expected, rtol=1e-6)
    assert out.weight[0, 0].item() == pytest.approx(s[keep].sum(), rel=1e-6)


def test_empty_slices_are_masked_and_zero():
    spec = SliceSpec.from_dict({"windows": ["3d", "all"], "id_types": ["media", "topic"], "slices": [
        {"name": "click", "rules": [{"type": "action", "any_of": ["click"]}]},
        {"name": "zero_dwell", "rules": [{"type": "dwell", "max_ms": 0}], "weight": "log_dwell"}]})
    # User 0: no events; user 1: only events at or after t; user 2: one old click with dwell 0,
    # which is a member of zero_dwell but weighs ln(1) = 0, so that slice is empty too.
    tl = UserTimelines.from_rows([T0, T0, T0], [[], [T0, T0 + 5], [T0 - 5 * DAY_MS]], [[], [CLICK, CLICK], [CLICK]],
                                 [[], [0, 0], [0]], media=[[], [1, 2], [3]], topic=[[], [1, 1], [2]])
    out = pool_slices(SliceFeaturizer(spec, {"media": 8, "topic": 4}).membership(tl),
                      {k: torch.ones(8 if "media" in k else 4, 2) for k in spec.tables})
    nonempty = [name for name, m in zip(spec.names, out.mask[2].tolist()) if m]
    assert nonempty == ["click/all/media", "click/all/topic"]
    assert not out.mask[:2].any()
    assert torch.all(out.embeddings[~out.mask] == 0) and torch.all(out.embeddings[out.mask] == 1)
    assert out.weight[2].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]


def test_default_spec_end_to_end_matches_bruteforce():
    rng = np.random.default_rng(0)
    lengths = [300, 0, 120]
    t = [T0, T0, T0 + DAY_MS]
    ts = [sorted((ti - rng.integers(1, 10 * DAY_MS, n)).tolist()) for ti, n in zip(t, lengths)]
    masks = [[IMP | (int(rng.choice([0, 0, 0, 2, 4, 8, 64, 128, 512]))) for _ in range(n)] for n in lengths]
    media = [rng.integers(0, 2, n).tolist() for n in lengths]
    tl = UserTimelines.from_rows(t, ts, masks, [rng.integers(0, 60_000, n).tolist() for n in lengths], media,
                                 [[m * int(rng.integers(3_000, 60_000)) for m in row] for row in media],
                                 media=[rng.integers(0, 1000, n).tolist() for n in lengths],
                                 author=[rng.integers(0, 50, n).tolist() for n in lengths],
                                 topic=[rng.integers(0, 16, n).tolist() for n in lengths])
    spec = SliceSpec.default()
    out, (means, totals) = run(spec, tl, {"media": 1000, "author": 50, "topic": 16}, dim=4)
    assert out.embeddings.shape == (3, 207, 4) and not out.mask[1].any()
    assert out.mask[0].sum() > 100
    assert np.allclose(out.weight.numpy(), totals, rtol=1e-6)
    assert np.allclose(out.embeddings.numpy(), means, rtol=1e-5, atol=1e-6)


def test_gradients_flow_to_the_tables():
    spec = SliceSpec.from_dict({"windows": ["3d", "all"], "id_types": ["media", "topic"], "slices": [
        {"name": "click", "rules": [{"type": "action", "any_of": ["click"]}]},
        {"name": "video", "rules": [{"type": "score", "threshold": 0.1}], "weight": "score"}]})
    tl = UserTimelines.from_rows([T0, T0], [[T0 - 5 * DAY_MS, T0 - 2, T0 - 1], [T0 - 1]], [[CLICK, IMP, CLICK], [IMP]],
                                 [[100, 5000, 9000], [0]], [[0, 1, 1], [0]], [[0, 8000, 20000], [0]],
                                 media=[[0, 1, 2], [3]], topic=[[0, 0, 1], [1]])
    membership = SliceFeaturizer(spec, {"media": 4, "topic": 2}).membership(tl)
    keys = list(spec.tables)
    gen = torch.Generator().manual_seed(0)
    tables = [torch.randn(4 if "media" in k else 2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
              for k in keys]
    assert torch.autograd.gradcheck(lambda *ts: pool_slices(membership, dict(zip(keys, ts))).embeddings, tables)
    pool_slices(membership, dict(zip(keys, tables))).embeddings.sum().backward()
    media_click = tables[keys.index("explicit_positive_media_mean")]
    # Items 0 and 2 were clicked; 1 was only seen, 3 only by another user without a click.
    assert media_click.grad.abs().sum(1).gt(0).tolist() == [True, False, True, False]


def test_slice_embeddings_module_trains():
    spec = SliceSpec.default()
    module = SliceEmbeddings(spec, dim=4, id_rows={"media": 20, "author": 5, "topic": 3})
    assert sorted(module.tables) == sorted(spec.tables)
    assert module.tables["implicit_negative_media_mean"].shape == (20, 4)
    tl = UserTimelines.from_rows([T0], [[T0 - 10, T0 - 5]], [[IMP | CLICK, IMP]], [[4000, 100]], [[1, 0]],
                                 [[8000, 0]], media=[[11, 12]], author=[[1, 2]], topic=[[0, 1]])
    membership = module.featurizer.membership(tl).to("cpu")
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    loss = module(membership).embeddings.pow(2).sum()
    loss.backward()
    opt.step()
    assert module(membership).embeddings.pow(2).sum() < loss


# -- inputs and errors ------------------------------------------------------------------------------

def test_featurizer_and_pooling_errors():
    spec = SliceSpec.from_dict({"id_types": ["media", "topic"], "slices": [
        {"name": "click", "rules": [{"type": "action", "any_of": ["click"]}]}]})
    with pytest.raises(ConfigError, match=r"id_rows\['topic'\] must be a positive integer"):
        SliceFeaturizer(spec, {"media": 5})
    with pytest.raises(ConfigError, match=r"id_rows\['media'\] must be a positive integer"):
        SliceFeaturizer(spec, {"media": 0, "topic": 2})
    featurizer = SliceFeaturizer(spec, {"media": 5, "topic": 2})
    tl = UserTimelines.from_rows([T0], [[T0 - 1]], [[CLICK]], media=[[1]])
    with pytest.raises(DataError, match="no 'topic' ids"):
        featurizer.membership(tl)
    tl = UserTimelines.from_rows([T0], [[T0 - 1]], [[CLICK]], media=[[1]], topic=[[0]])
    membership = featurizer.membership(tl)
    good = {"explicit_positive_media_mean": torch.zeros(5, 3), "explicit_positive_topic_mean": torch.zeros(2, 3)}
    with pytest.raises(ConfigError, match="no embedding table 'explicit_positive_topic_mean'"):
        pool_slices(membership, {"explicit_positive_media_mean": torch.zeros(5, 3)})
    with pytest.raises(ConfigError, match=r"'explicit_positive_media_mean' must have shape \(5, D\), got \(4, 3\)"):
        pool_slices(membership, {**good, "explicit_positive_media_mean": torch.zeros(4, 3)})
    with pytest.raises(ConfigError, match=r"share one width D, got \[3, 4\]"):
        pool_slices(membership, {**good, "explicit_positive_topic_mean": torch.zeros(2, 4)})


@pytest.mark.parametrize("kwargs, message", [
    ({"t_ms": [T0, T0]}, "need 1-D t_ms"),
    ({"offsets": [0, 2]}, "offsets must rise from 0 to the number of events"),
    ({"dwell_ms": [1]}, "column 'dwell_ms'"),
    ({"ids": {"item": [1, 2, 3]}}, "unknown id type 'item'"),
    ({"ids": {"media": [1]}}, "column \"ids['media']\""),
    ({"ts_ms": [5, 4, 6]}, "sorted by ts_ms within each user"),
])
def test_timelines_are_validated(kwargs, message):
    base = dict(t_ms=[T0], offsets=[0, 3], ts_ms=[1, 2, 3], action_mask=[1, 1, 1], dwell_ms=[0, 0, 0],
                media_type=[0, 0, 0], duration_ms=[0, 0, 0], ids={"media": [1, 2, 3]})
    with pytest.raises(DataError) as info:
        UserTimelines(**{k: np.asarray(v) if k != "ids" else v for k, v in {**base, **kwargs}.items()})
    assert message in str(info.value)
    # A new user may start earlier than the previous one ended.
    UserTimelines(np.array([T0, T0]), np.array([0, 2, 3]), np.array([5, 6, 1]), *(np.zeros(3),) * 4, {})


def _events(user, ts, item, mask=None, dwell=None) -> pa.Table:
    n = len(user)
    return pa.table({"user_id": np.asarray(user, dtype=np.int64), "item_id": np.asarray(item, dtype=np.int64),
                     "ts_ms": np.asarray(ts, dtype=np.int64),
                     "action_mask": np.asarray(mask if mask is not None else [IMP] * n, dtype=np.uint16),
                     "dwell_ms": np.asarray(dwell if dwell is not None else range(n), dtype=np.int32)})


ITEMS = pa.table({"item_id": np.array([30, 10, 20], dtype=np.int64), "author_id": np.array([3, 1, 2], dtype=np.int64),
                  "topic_id": np.array([0, 1, 0], dtype=np.int32), "media_type": np.array([1, 0, 1], dtype=np.int8),
                  "duration_ms": np.array([5000, 0, 7000], dtype=np.int32)})


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_timeline_source_cuts_events_before_t(data):
    n = data.draw(st.integers(0, 40))
    user = sorted(data.draw(st.lists(st.sampled_from([2, 4, 6]), min_size=n, max_size=n)))
    ts = data.draw(st.lists(st.integers(0, 15), min_size=n, max_size=n))
    order = np.lexsort((ts, user))
    user, ts = np.asarray(user)[order], np.asarray(ts)[order]
    item = data.draw(st.lists(st.sampled_from([10, 20, 30]), min_size=n, max_size=n))
    events = _events(user, ts, item)
    m = data.draw(st.integers(1, 5))
    req_user = data.draw(st.lists(st.integers(1, 7), min_size=m, max_size=m))
    req_t = data.draw(st.lists(st.integers(-1, 17), min_size=m, max_size=m))
    cap = data.draw(st.sampled_from([None, 0, 1, 3]))
    tl = TimelineSource(events, ITEMS).batch(req_user, req_t, max_events=cap)
    by_item = {i: k for k, i in enumerate(ITEMS.column("item_id").to_pylist())}
    for k, (u, t) in enumerate(zip(req_user, req_t)):
        rows = [i for i in range(n) if user[i] == u and ts[i] < t]
        rows = rows[max(0, len(rows) - cap):] if cap is not None else rows
        got = slice(tl.offsets[k], tl.offsets[k + 1])
        assert tl.ts_ms[got].tolist() == [int(ts[i]) for i in rows]
        assert tl.dwell_ms[got].tolist() == rows  # dwell_ms is the row number in _events
        assert tl.ids["media"][got].tolist() == [item[i] for i in rows]
        for name, column in (("author", "author_id"), ("topic", "topic_id")):
            assert tl.ids[name][got].tolist() == [ITEMS.column(column)[by_item[item[i]]].as_py() for i in rows]
        assert tl.duration_ms[got].tolist() == [ITEMS.column("duration_ms")[by_item[item[i]]].as_py() for i in rows]


def test_timeline_source_from_a_dataset_directory(tiny_dataset):
    source = TimelineSource.from_dataset(load_dataset(tiny_dataset))
    tl = source.batch([1, 2, 3], [2_500, 2_500, 2_500])
    assert tl.offsets.tolist() == [0, 3, 4, 4]  # user 2's event at 2,500 is not before t
    assert tl.ids["media"].tolist() == [0, 1, 2, 4] and tl.ids["topic"].tolist() == [0, 1, 2, 1]
    out = SliceEmbeddings(SliceSpec.default(), 4, {"media": 6, "author": 1, "topic": 3})
    pooled = out(out.featurizer.membership(tl))
    assert pooled.mask[0].any() and not pooled.mask[2].any()


def test_timeline_source_errors():
    with pytest.raises(DataError, match=r"row 1: events must be sorted by \(user_id, ts_ms\)"):
        TimelineSource(_events([1, 1], [5, 4], [10, 10]), ITEMS)
    with pytest.raises(DataError, match="column 'item_id', row 1: unknown item_id 99"):
        TimelineSource(_events([1, 1], [4, 5], [10, 99]), ITEMS)
    with pytest.raises(ValueError, match="max_events must be >= 0"):
        TimelineSource(_events([1], [4], [10]), ITEMS).batch([1], [9], max_events=-1)
    empty = TimelineSource(_events([], [], []), ITEMS).batch([1, 2], [5, 5])
    assert empty.offsets.tolist() == [0, 0, 0]


def test_membership_is_reused_across_batches_of_any_size():
    """One featurizer, batches of different users: results do not depend on the batch."""
    spec = SliceSpec.default()
    featurizer = SliceFeaturizer(spec, {"media": 50, "author": 10, "topic": 4})
    rng = np.random.default_rng(1)
    rows = [sorted((T0 - rng.integers(1, 9 * DAY_MS, 40)).tolist()) for _ in range(3)]
    args = dict(action_mask=[rng.choice([IMP, IMP | CLICK, IMP | HIDE], 40).tolist() for _ in range(3)],
                dwell_ms=[rng.integers(0, 40_000, 40).tolist() for _ in range(3)],
                media_type=[[1] * 40] * 3, duration_ms=[[20_000] * 40] * 3,
                media=[rng.integers(0, 50, 40).tolist() for _ in range(3)], author=[[1] * 40] * 3,
                topic=[[2] * 40] * 3)
    tables = {k: torch.randn(50 if "media" in k else 10 if "author" in k else 4, 2) for k in spec.tables}
    whole = pool_slices(featurizer.membership(UserTimelines.from_rows([T0] * 3, rows, **args)), tables)
    one = pool_slices(featurizer.membership(UserTimelines.from_rows([T0], rows[1:2],
                                                                     **{k: v[1:2] for k, v in args.items()})), tables)
    assert torch.allclose(whole.embeddings[1:2], one.embeddings, atol=1e-6)
    assert torch.equal(whole.mask[1:2], one.mask)
