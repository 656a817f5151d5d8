"""The world simulator: valid, deterministic, calibrated, and faithful to the story of docs/world.md."""

from __future__ import annotations

import contextlib
import importlib
import json

import numpy as np
import pytest

from lifelong.core.errors import ConfigError
from lifelong.data.io import load_dataset
from lifelong.data.protocol import DAY_MS, Protocol
from lifelong.data.schema import HEAD_BITS, HEADS, POSITIVE_BITS, SURFACES, Action
from lifelong.data.users import sort_events
from lifelong.data.world import load_config, simulate, simulate_to, write_world

FILES = ("items.parquet", "events.parquet", "users.parquet", "oracle.parquet", "world.json")


@pytest.fixture(scope="module")
def tiny():
    return simulate(load_config("tiny"))


@pytest.fixture(scope="module")
def crowd():
    """A tiny world with enough users for statistical checks."""
    return simulate(load_config("tiny", overrides=["users.n_users=400"]))


def _read_all(d) -> dict[str, bytes]:
    return {name: (d / name).read_bytes() for name in FILES}


def test_tiny_world_validates_after_write(tiny, tmp_path):
    write_world(tiny, tmp_path / "w")
    ds = load_dataset(tmp_path / "w")
    assert ds.events.num_rows == ds.oracle.num_rows == tiny.events.num_rows > 0
    assert ds.items.num_rows == 500
    assert ds.meta["kind"] == "world" and ds.meta["preset"] == "tiny" and ds.meta["seed"] == 0
    assert ds.meta["config"] == load_config("tiny").to_dict()
    assert ds.meta["counts"]["events"] == ds.events.num_rows
    assert ds.meta["counts"]["users"] == ds.users.num_rows
    explicit = int(ds.users.column("n_explicit").to_numpy().sum())
    assert ds.meta["counts"]["explicit"] == explicit > 0


def test_protocol_spans_whole_days_with_eval_day_last(tiny):
    cfg = load_config("tiny")
    p = Protocol.from_meta(tiny.meta)
    assert p == Protocol.fit(cfg.start_ms, cfg.end_ms)
    assert cfg.start_ms % DAY_MS == 0 and (cfg.end_ms - cfg.start_ms) == cfg.days * DAY_MS
    assert p.eval_end_ms == cfg.end_ms and p.eval_end_ms - p.eval_start_ms == DAY_MS
    assert p.eval_start_ms - p.cutoff_ms == 7 * DAY_MS and p.cutoff_ms - p.train_start_ms == 14 * DAY_MS
    ts = tiny.events.column("ts_ms").to_numpy()
    assert ts.min() >= cfg.start_ms and ts.max() < cfg.end_ms
    assert ((ts >= p.eval_start_ms).sum()) > 0


def test_same_seed_gives_identical_files(tmp_path):
    cfg = load_config("tiny", overrides=["users.n_users=20"])
    write_world(simulate(cfg), tmp_path / "a")
    write_world(simulate(cfg), tmp_path / "b")
    simulate_to(cfg, tmp_path / "c")
    simulate_to(cfg, tmp_path / "d")
    assert _read_all(tmp_path / "a") == _read_all(tmp_path / "b")
    assert _read_all(tmp_path / "c") == _read_all(tmp_path / "d")
    assert (tmp_path / "a" / "world.json").read_bytes() == (tmp_path / "c" / "world.json").read_bytes()
    streamed = load_dataset(tmp_path / "c")
    in_memory = load_dataset(tmp_path / "a")
    for name in ("items", "events", "users", "oracle"):
        assert getattr(streamed, name).equals(getattr(in_memory, name)), name


def test_different_seed_gives_a_different_world(tmp_path):
    a = simulate(load_config("tiny", overrides=["users.n_users=20"]))
    b = simulate(load_config("tiny", overrides=["users.n_users=20", "seed=1"]))
    assert not a.events.equals(b.events)
    assert not a.items.equals(b.items)
    assert a.meta != b.meta


def test_events_sorted_requests_consistent_and_masks_valid(tiny):
    ev = tiny.events
    assert sort_events(ev).equals(ev)
    user, ts, req = (ev.column(c).to_numpy() for c in ("user_id", "ts_ms", "request_id"))
    item = ev.column("item_id").to_numpy()
    # One timestamp, user and surface per request; request ids increase with time per user.
    starts = np.flatnonzero(np.r_[True, req[1:] != req[:-1]])
    assert np.unique(req).size == starts.size
    for col in (user, ts, ev.column("surface").to_numpy()):
        assert (col == np.repeat(col[starts], np.diff(np.r_[starts, req.size]))).all()
    same_user = user[starts][1:] == user[starts][:-1]
    assert (np.diff(req[starts])[same_user] > 0).all() and (np.diff(ts[starts])[same_user] > 0).all()
    # No item twice in a request.
    assert not ((req[1:] == req[:-1]) & (item[1:] == item[:-1])).any()
    mask = ev.column("action_mask").to_numpy()
    assert ((mask & int(Action.IMPRESSION)) != 0).all()
    hidden = (mask & int(Action.HIDE)) != 0
    assert hidden.any() and not ((mask[hidden] & POSITIVE_BITS) != 0).any()
    surface = ev.column("surface").to_numpy()
    assert set(np.unique(surface)) == {SURFACES.index(s) for s in ("homefeed", "search", "related")}


def test_oracle_aligned_with_events(tiny):
    ev, orc = tiny.events, tiny.oracle
    for col in ("user_id", "item_id", "ts_ms", "request_id"):
        assert orc.column(col).equals(ev.column(col)), col
    for h in HEADS:
        p = orc.column(f"p_{h}").to_numpy()
        assert ((p >= 0) & (p <= 1)).all()


def test_oracle_is_calibrated(crowd):
    mask = crowd.events.column("action_mask").to_numpy()
    n = mask.size
    assert n > 500_000
    for h in HEADS:
        p = crowd.oracle.column(f"p_{h}").to_numpy().astype(np.float64)
        bit = (mask & HEAD_BITS[h]) != 0
        sd = np.sqrt((p * (1 - p)).sum())
        assert abs(bit.sum() - p.sum()) < 5 * sd, h
        # Also within probability bins: an oracle, not just a right average.
        edges = np.quantile(p, [0, 0.5, 0.9, 0.99, 1])
        bins = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, 3)
        for b in range(4):
            sel = bins == b
            sd_b = np.sqrt((p[sel] * (1 - p[sel])).sum())
            assert abs(bit[sel].sum() - p[sel].sum()) < 5 * sd_b + 1, (h, b)
    assert crowd.meta["heads"]["click"]["rate"] == pytest.approx(crowd.meta["heads"]["click"]["mean_p"], rel=0.05)


def test_items_embeddings_media_and_dwell(tiny):
    items = tiny.items
    emb = items.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    emb = emb.reshape(-1, 32)
    norms = np.linalg.norm(emb, axis=1)
    assert 0.9 < np.median(norms) < 1.15
    assert np.quantile(np.abs(emb), 0.999) < 0.65
    media = items.column("media_type").to_numpy()
    duration = items.column("duration_ms").to_numpy()
    assert set(np.unique(media)) == {0, 1}
    assert (duration[media == 0] == 0).all() and (duration[media == 1] > 0).all()

    ev = tiny.events
    item, mask, dwell = (ev.column(c).to_numpy() for c in ("item_id", "action_mask", "dwell_ms"))
    cfg = load_config("tiny").dwell
    video = media[item] == 1
    threshold = np.where(video, cfg.long_view_ratio * duration[item], cfg.long_view_ms)
    long_view = (mask & int(Action.LONG_VIEW)) != 0
    assert long_view.any()
    assert (dwell[long_view] >= np.floor(threshold[long_view])).all()
    assert (dwell[~long_view] < threshold[~long_view]).all()
    bare = mask == int(Action.IMPRESSION)
    engaged = (mask & int(Action.CLICK | Action.REPIN)) != 0
    assert np.median(dwell[bare]) < np.median(dwell[engaged]) < np.median(dwell[long_view])
    ratio = dwell[video & long_view] / duration[item][video & long_view]
    assert ratio.min() >= cfg.long_view_ratio - 1e-3 and ratio.max() <= cfg.max_watch_ratio + 1e-3


def test_long_term_not_recent_share_is_material():
    world = simulate(load_config("small", overrides=["users.n_users=120", "days=120"]))
    mix = world.meta["retrieval_mix"]
    assert mix["long_term_not_recent"] >= 0.2
    assert sum(mix["shares"].values()) == pytest.approx(1.0, abs=1e-4)


def test_history_lengths_are_heavy_tailed():
    world = simulate(load_config("small", overrides=["users.n_users=300", "days=180", "items.n_items=5000"]))
    n_explicit = world.users.column("n_explicit").to_numpy()
    assert n_explicit.max() / np.median(n_explicit) > 8
    assert world.meta["explicit_per_user"]["max"] == n_explicit.max()


def _engaged_topics(world, lo_day: int, hi_day: int) -> dict[int, set[int]]:
    start = load_config("tiny").start_ms
    ev = world.events
    topic = world.items.column("topic_id").to_numpy()[ev.column("item_id").to_numpy()]
    day = (ev.column("ts_ms").to_numpy() - start) // DAY_MS
    sel = ((ev.column("action_mask").to_numpy() & POSITIVE_BITS) != 0) & (day >= lo_day) & (day < hi_day)
    users = ev.column("user_id").to_numpy()[sel]
    out: dict[int, set[int]] = {}
    for u, t in zip(users, topic[sel]):
        out.setdefault(int(u), set()).add(int(t))
    return out


def _topic_overlap(world, day: int, width: int) -> float:
    """Mean over users of |topics engaged after ∩ before| / |after| around ``day``."""
    before, after = _engaged_topics(world, day - width, day), _engaged_topics(world, day, day + width)
    shared = [len(after[u] & before[u]) / len(after[u]) for u in after if u in before]
    return float(np.mean(shared))


def test_drift_shifts_interests_abruptly():
    base = ["users.n_users=150", "days=40", "drift.day=20"]
    drifted = simulate(load_config("tiny", overrides=base + ["drift.enabled=true"]))
    steady = simulate(load_config("tiny", overrides=base))
    overlap_drift = _topic_overlap(drifted, 20, 10)
    overlap_steady = _topic_overlap(steady, 20, 10)
    overlap_drift_elsewhere = _topic_overlap(drifted, 10, 10)
    assert overlap_steady - overlap_drift > 0.15
    assert overlap_drift_elsewhere - overlap_drift > 0.15


def test_periodic_interests_are_engaged_in_season_only():
    from lifelong.data.world.simulate import chunk_population, world_draws

    cfg = load_config("tiny", overrides=["users.n_users=200", "days=84", "periodic.topics_min=1",
                                         "periodic.topics_max=2", "periodic.cycle_weeks_min=3",
                                         "periodic.cycle_weeks_max=4"])
    world, draws = simulate(cfg), world_draws(cfg)
    interests = chunk_population(cfg, draws, 0)[0].interests
    k_long = cfg.interests.topics_max
    periodic_topic = interests.topic[:, 0, k_long:]
    # Periodic topics stay put and never share a topic with the user's long-term mixture.
    assert (interests.topic[:, :, k_long:] == periodic_topic[:, None, :]).all()
    assert not (interests.topic[:, :, :k_long, None] == periodic_topic[:, None, None, :]).any()

    ev = world.events
    user, ts = ev.column("user_id").to_numpy(), ev.column("ts_ms").to_numpy()
    topic = world.items.column("topic_id").to_numpy()[ev.column("item_id").to_numpy()]
    positive = (ev.column("action_mask").to_numpy() & POSITIVE_BITS) != 0
    period = interests.period_of((ts - cfg.start_ms) // DAY_MS)
    in_season = np.zeros(ev.num_rows, dtype=bool)
    on_periodic = np.zeros(ev.num_rows, dtype=bool)
    for slot in range(periodic_topic.shape[1]):
        hit = topic == periodic_topic[user, slot]
        on_periodic |= hit
        in_season |= hit & (interests.weight[user, period, k_long + slot] > 0)
    # Positive engagements per user-week on a periodic topic: many in season, few out of it.
    season_weeks = (interests.weight[:, :, k_long:] > 0).sum()
    off_weeks = interests.weight[:, :, k_long:].size - season_weeks
    in_rate = (positive & in_season).sum() / season_weeks
    off_rate = (positive & on_periodic & ~in_season).sum() / off_weeks
    assert season_weeks > 0 and in_rate > 5 * off_rate


def test_next_sessions_follow_the_topic_successor():
    from lifelong.data.world.simulate import chunk_population, world_draws

    def successor_share(focus_next: float) -> float:
        cfg = load_config("tiny", overrides=[
            "users.n_users=100", f"sessions.focus_next={focus_next}",
            f"sessions.focus_long_term={0.6 - focus_next}"])
        draws = world_draws(cfg)
        sched = chunk_population(cfg, draws, 0)[0].schedule
        same_user = sched.user[1:] == sched.user[:-1]
        changed = same_user & (sched.focus[1:] != sched.focus[:-1])  # a new session's focus
        follows = draws.successor[sched.focus[:-1]] == sched.focus[1:]
        return float((follows & changed).sum() / changed.sum())

    # Without "next" sessions a new focus is the successor of the old one by chance only.
    assert successor_share(0.0) < 0.1
    assert successor_share(0.4) > 0.4


def test_packaged_world_configs_load():
    from importlib.resources import files

    configs = sorted(p for p in files("lifelong").joinpath("configs/worlds").iterdir() if p.name.endswith(".yaml"))
    assert [p.name for p in configs] == ["sequential.yaml"]
    cfg = load_config(config_file=configs[0])
    assert cfg.preset == "small" and cfg.sessions.focus_next == 0.5 and cfg.retrieval.homefeed.context > 0


def test_min_explicit_before_eval_is_enforced(tmp_path):
    cfg = load_config("tiny", overrides=["users.n_users=5", "users.min_explicit_before_eval=1000000"])
    with pytest.raises(ConfigError, match="min_explicit_before_eval"):
        simulate_to(cfg, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_progress_bar_covers_every_user(monkeypatch):
    # The package exports the function ``simulate``, which shadows the module's name.
    sim = importlib.import_module("lifelong.data.world.simulate")
    seen = []

    @contextlib.contextmanager
    def fake_progress(description, total=None):
        seen.append([description, total, 0])

        def advance(n=1):
            seen[-1][2] += n

        yield advance

    monkeypatch.setattr(sim, "progress", fake_progress)
    sim.simulate(load_config("tiny", overrides=["users.n_users=7"]))
    assert seen == [["simulating users", 7, 7]]


# --- configuration ---------------------------------------------------------------------------


def test_config_layers_file_then_overrides(tmp_path):
    f = tmp_path / "world.yaml"
    f.write_text("preset: tiny\nseed: 5\nitems:\n  sigma_obs: 0.1\n  n_items: 800\nstart_date: 2023-03-01\n")
    cfg = load_config(config_file=f, overrides=["items.n_items=900", "drift.enabled=true", "affinity.w_session=2"])
    assert cfg.preset == "tiny" and cfg.users.n_users == 50
    assert cfg.seed == 5 and cfg.items.sigma_obs == 0.1 and cfg.items.n_items == 900
    assert cfg.drift.enabled is True and cfg.affinity.w_session == 2.0 and isinstance(cfg.affinity.w_session, float)
    assert cfg.start_date == "2023-03-01"
    j = tmp_path / "world.json"
    j.write_text(json.dumps({"users": {"n_users": 12}}))
    assert load_config("tiny", config_file=j).users.n_users == 12


@pytest.mark.parametrize("override, needle", [
    ("items.sigma_ob=0.3", "items.sigma_ob"),
    ("itemz.n_items=3", "itemz"),
    ("nope=1", "nope"),
])
def test_unknown_key_is_named_with_valid_ones(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=[override])
    assert needle in str(err.value) and "valid keys" in str(err.value)


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("retrieval:\n  homefeed:\n    recnt: 0.3\n")
    with pytest.raises(ConfigError, match=r"retrieval\.homefeed\.recnt.*recent"):
        load_config("tiny", config_file=f)


@pytest.mark.parametrize("override", ["seed=abc", "users.n_users=1.5", "drift.enabled=3", "items.sigma_obs=yes",
                                      "items=3", "seed.x=1", "surfaces.search=0.9", "items.video_share=2",
                                      "drift.enabled=true", "periodic.season_weeks=4", "periodic.topics_min=3"])
def test_bad_values_raise_config_error(override):
    with pytest.raises(ConfigError):
        load_config("tiny", overrides=[override, "drift.day=40"] if override == "drift.enabled=true" else [override])


def test_unknown_preset_and_files(tmp_path):
    with pytest.raises(ConfigError, match="valid presets"):
        load_config("huge")
    f = tmp_path / "c.yaml"
    f.write_text("preset: tiny\n")
    assert load_config("small", config_file=f) == load_config("tiny")  # the file is the later layer
    f.write_text("preset: huge\n")
    with pytest.raises(ConfigError, match="huge"):
        load_config(config_file=f)
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(config_file=f)
    with pytest.raises(ConfigError, match="not found"):
        load_config("tiny", config_file=tmp_path / "missing.yaml")


def test_presets_match_world_md():
    from lifelong.data.world import PRESETS

    sizes = {name: (cfg.users.n_users, cfg.items.n_items) for name, cfg in PRESETS.items()}
    assert sizes == {"tiny": (50, 500), "small": (2000, 20_000), "bench": (2000, 1_000_000),
                     "lifelong": (2000, 200_000)}
    assert PRESETS["bench"].users.min_explicit_before_eval >= 10_100
    for name, cfg in PRESETS.items():
        assert load_config(name) == cfg and cfg.preset == name
