"""DV365 slice spec: each rule type against a per-event reference, windows, parsing and its errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lifelong.core.errors import ConfigError
from lifelong.data.schema import Action
from lifelong.dv365.slices import (
    ID_TYPES,
    RULE_TYPES,
    ActionRule,
    DwellRule,
    ScoreRule,
    SimpleEvents,
    Slice,
    SliceSpec,
    SourceRule,
    WatchRatioRule,
    Window,
    debiased_score,
    watch_ratio,
)

DAY_MS = 86_400_000


# -- the definitions, one event at a time ---------------------------------------------------------

def _bit(name: str) -> int:
    every = [a for a in Action]
    groups = {"explicit": [a for a in every if a is not Action.IMPRESSION],
              "positive": [a for a in every if a not in (Action.IMPRESSION, Action.HIDE)],
              "negative": [Action.HIDE]}
    return sum(int(a) for a in groups[name]) if name in groups else int(Action[name.upper()])


def reference_score(dwell_ms: int, duration_ms: int, gamma: float) -> float:
    return math.log1p(dwell_ms / 1000) / math.log1p(gamma * duration_ms / 1000)


def reference_ratio(dwell_ms: int, duration_ms: int, beta: float) -> float:
    return (dwell_ms / 1000) / (duration_ms / 1000) ** beta


def reference_rule(rule, mask: int, dwell_ms: int, media: int, duration_ms: int) -> bool:
    """Whether one event passes ``rule``, straight from the rule's documented definition."""
    if isinstance(rule, ActionRule):
        any_bits = 0
        for name in rule.any_of:
            any_bits |= _bit(name)
        none_bits = 0
        for name in rule.none_of:
            none_bits |= _bit(name)
        return bool(mask & any_bits) and not mask & none_bits
    if isinstance(rule, SourceRule):
        return media == {"image": 0, "video": 1}[rule.media]
    if isinstance(rule, DwellRule):
        return (rule.min_ms is None or dwell_ms >= rule.min_ms) and (rule.max_ms is None or dwell_ms <= rule.max_ms)
    if duration_ms <= 0:
        return False
    if isinstance(rule, WatchRatioRule):
        ratio = reference_ratio(dwell_ms, duration_ms, rule.beta)
        return (rule.min is None or ratio >= rule.min) and (rule.max is None or ratio <= rule.max)
    assert isinstance(rule, ScoreRule)
    return reference_score(dwell_ms, duration_ms, rule.gamma) > rule.threshold


def reference_weight(s: Slice, dwell_ms: int, duration_ms: int) -> float:
    if s.weight is None:
        return 1.0
    if s.weight == "score":
        return reference_score(dwell_ms, duration_ms, next(r.gamma for r in s.rules if isinstance(r, ScoreRule)))
    return dwell_ms / 1000 if s.weight == "dwell" else math.log1p(dwell_ms / 1000)


def near_tie(rule, dwell_ms: int, duration_ms: int) -> bool:
    """numpy and math may round a value differently in the last bit: then a bound within 1e-9
    of it may fall either way. Exact ties, where both agree, are decided (and checked)."""
    if duration_ms <= 0:
        return False
    if isinstance(rule, WatchRatioRule):
        value, bounds = reference_ratio(dwell_ms, duration_ms, rule.beta), (rule.min, rule.max)
        vector = watch_ratio(np.array([dwell_ms]), np.array([duration_ms]), rule.beta)[0]
    elif isinstance(rule, ScoreRule):
        value, bounds = reference_score(dwell_ms, duration_ms, rule.gamma), (rule.threshold,)
        vector = debiased_score(np.array([dwell_ms]), np.array([duration_ms]), rule.gamma)[0]
    else:
        return False
    return value != vector and any(b is not None and abs(value - b) < 1e-9 for b in bounds)


# -- strategies -------------------------------------------------------------------------------------

ACTIONS = [*(a.name.lower() for a in Action), "explicit", "positive", "negative"]
DWELLS = [0, 1, 400, 999, 1000, 1200, 3000, 4999, 5000, 10000, 29999, 30000, 200_000]
DURATIONS = [0, 1000, 3000, 5000, 10000, 30000]
BOUNDS = [None, 0, 0.2, 0.5, 0.8, 1.0, 1.5]

rules = st.one_of(
    st.builds(ActionRule, any_of=st.lists(st.sampled_from(ACTIONS), min_size=1, max_size=3).map(tuple),
              none_of=st.lists(st.sampled_from(ACTIONS), max_size=2).map(tuple)),
    st.builds(SourceRule, st.sampled_from(["image", "video"])),
    st.tuples(st.sampled_from([None, *DWELLS]), st.sampled_from([None, *DWELLS]))
    .filter(lambda b: b != (None, None) and (None in b or b[0] <= b[1])).map(lambda b: DwellRule(*b)),
    st.tuples(st.sampled_from(BOUNDS), st.sampled_from(BOUNDS), st.sampled_from([0.5, 1.0, 2.0]))
    .filter(lambda b: b[:2] != (None, None) and (None in b[:2] or b[0] <= b[1])).map(lambda b: WatchRatioRule(*b)),
    st.builds(ScoreRule, st.sampled_from([-1.0, 0.0, 0.3, 0.5, 1.0, 1.2]), st.sampled_from([0.5, 1.0, 2.0])),
)


@st.composite
def event_columns(draw, max_size: int = 40) -> SimpleEvents:
    n = draw(st.integers(0, max_size))
    masks = st.one_of(st.integers(0, 2047), st.sampled_from([1, 3, 5, 65, 129, 2]))
    media = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), dtype=np.int8)
    duration = np.array(draw(st.lists(st.sampled_from(DURATIONS), min_size=n, max_size=n)), dtype=np.int32)
    return SimpleEvents(action_mask=np.array(draw(st.lists(masks, min_size=n, max_size=n)), dtype=np.uint16),
                        dwell_ms=np.array(draw(st.lists(st.sampled_from(DWELLS), min_size=n, max_size=n)),
                                          dtype=np.int32),
                        media_type=media, duration_ms=np.where(media == 1, duration, 0).astype(np.int32))


# -- rules ------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(rule=rules, events=event_columns())
def test_every_rule_type_matches_the_per_event_reference(rule, events):
    got = rule.mask(events)
    assert got.dtype == bool and got.shape == events.dwell_ms.shape
    for i, (m, d, med, dur) in enumerate(zip(events.action_mask.tolist(), events.dwell_ms.tolist(),
                                             events.media_type.tolist(), events.duration_ms.tolist())):
        if near_tie(rule, d, dur):
            continue
        assert got[i] == reference_rule(rule, m, d, med, dur), (rule, m, d, med, dur)


@settings(max_examples=100, deadline=None)
@given(first=rules, second=rules, events=event_columns())
def test_a_slice_keeps_the_events_passing_all_its_rules(first, second, events):
    s = Slice("s", (first, second), Window.parse("all"), "media")
    assume(not any(near_tie(r, d, dur) for r in (first, second)
                   for d, dur in zip(events.dwell_ms.tolist(), events.duration_ms.tolist())))
    assert np.array_equal(s.mask(events), first.mask(events) & second.mask(events))


def test_rule_boundaries():
    dwell = DwellRule(min_ms=1000, max_ms=2000)
    assert dwell.mask(SimpleEvents(dwell_ms=np.array([999, 1000, 2000, 2001]))).tolist() == [False, True, True, False]
    # Watch ratio: closed at both ends; exactly 0.5 (500 / 1000 ms) is inside [0.5, 0.5].
    events = SimpleEvents(dwell_ms=np.array([500, 499, 501, 500]), duration_ms=np.array([1000, 1000, 1000, 0]))
    assert WatchRatioRule(min=0.5, max=0.5).mask(events).tolist() == [True, False, False, False]
    # beta < 1 discounts long videos: 2 s of a 4 s video is a ratio of 1 at beta 0.5.
    assert WatchRatioRule(min=1.0, beta=0.5).mask(SimpleEvents(dwell_ms=np.array([2000]),
                                                               duration_ms=np.array([4000]))).tolist() == [True]
    # Score: strict; a full watch of a video at gamma = 1 scores exactly 1.
    full = SimpleEvents(dwell_ms=np.array([7000, 7000]), duration_ms=np.array([7000, 0]))
    assert ScoreRule(threshold=1.0).mask(full).tolist() == [False, False]
    assert ScoreRule(threshold=0.999).mask(full).tolist() == [True, False]
    assert debiased_score(np.array([7000]), np.array([7000]), 1.0).tolist() == [1.0]
    # An image (duration 0) never has a watch ratio or score, whatever its dwell.
    image = SimpleEvents(dwell_ms=np.array([10**6]), duration_ms=np.array([0]))
    assert not WatchRatioRule(min=0.0).mask(image).any() and not ScoreRule(threshold=-5.0).mask(image).any()


def test_action_names_and_groups():
    imp, click, hide = int(Action.IMPRESSION), int(Action.CLICK), int(Action.HIDE)
    events = SimpleEvents(action_mask=np.array([imp, imp | click, imp | hide, 0]))
    assert ActionRule(("explicit",)).mask(events).tolist() == [False, True, True, False]
    assert ActionRule(("positive",)).mask(events).tolist() == [False, True, False, False]
    assert ActionRule(("impression",), none_of=("explicit",)).mask(events).tolist() == [True, False, False, False]
    assert ActionRule("click") == ActionRule(("click",))  # a bare name is one action, not its letters


def test_stream_polarity_and_table():
    def table(*rules, **kw) -> str:
        return Slice("s", rules, Window.parse("3d"), "topic", **kw).table

    assert table(ActionRule(("hide",))) == "explicit_negative_topic_mean"
    assert table(ActionRule(("click", "repin"))) == "explicit_positive_topic_mean"
    assert table(ActionRule(("click", "hide"))) == "explicit_positive_topic_mean"
    assert table(ActionRule(("impression", "click"))) == "implicit_positive_topic_mean"
    assert table(ActionRule(("click",)), SourceRule("video")) == "explicit_positive_topic_mean"
    assert table(DwellRule(max_ms=999), polarity="negative") == "implicit_negative_topic_mean"
    assert table(ScoreRule(0.5), weight="score") == "implicit_positive_topic_weighted"


def test_weights():
    events = SimpleEvents(dwell_ms=np.array([0, 2000, 9000]), duration_ms=np.array([1000, 4000, 3000]))
    window = Window.parse("all")
    score = Slice("s", (ScoreRule(0.0, gamma=2.0),), window, "media", weight="score").weights(events)
    assert np.allclose(score, [reference_score(d, u, 2.0) for d, u in [(0, 1000), (2000, 4000), (9000, 3000)]])
    assert np.allclose(Slice("s", (DwellRule(0),), window, "media", weight="dwell").weights(events), [0, 2, 9])
    assert np.allclose(Slice("s", (DwellRule(0),), window, "media", weight="log_dwell").weights(events),
                       np.log1p([0, 2, 9]))
    assert Slice("s", (DwellRule(0),), window, "media").weights(events) is None


@pytest.mark.parametrize("text, ms", [("3d", 3 * DAY_MS), ("7d", 7 * DAY_MS), ("12h", 12 * 3_600_000),
                                      ("90m", 90 * 60_000), ("45s", 45_000), ("250ms", 250), ("2w", 14 * DAY_MS),
                                      ("all", None)])
def test_window_parse(text, ms):
    window = Window.parse(text)
    assert (window.ms, window.label) == (ms, text)


@pytest.mark.parametrize("text", ["3days", "0d", "-1d", "d", "3.5d", "", 3, None, "ALL"])
def test_window_parse_rejects(text):
    with pytest.raises(ConfigError, match="is not 'all' or a positive"):
        Window.parse(text)


# -- the default spec -------------------------------------------------------------------------------

def test_default_spec_has_about_200_unique_slices():
    spec = SliceSpec.default()
    assert 180 <= len(spec) <= 220
    assert len(set(spec.names)) == len(spec)
    semantics = {(s.rules, s.window, s.id_type, s.weight, s.polarity) for s in spec.slices}
    assert len(semantics) == len(spec), "two slices of the default spec pool the same thing"
    assert [w.label for w in spec.windows] == ["3d", "7d", "all"]
    assert {s.id_type for s in spec.slices} == set(ID_TYPES)
    assert {type(r).TYPE for s in spec.slices for r in s.rules} == set(RULE_TYPES)
    assert {s.weight for s in spec.slices} == {None, "score", "log_dwell"}
    assert len(spec.tables) == 15 and set(spec.tables.values()) == set(ID_TYPES)
    assert {s.stream for s in spec.slices} == {"explicit", "implicit"}
    assert {s.polarity for s in spec.slices} == {"positive", "negative"}
    assert spec.names[:4] == ["click/3d/media", "click/3d/author", "click/3d/topic", "click/7d/media"]


def test_default_dwell_buckets_tile_every_dwell():
    spec = SliceSpec.default()
    buckets = [s for s in spec.slices if s.name.startswith("dwell_") and s.name.endswith("/all/media")]
    dwell = np.arange(0, 100_000, 7)
    hits = sum(s.mask(SimpleEvents(dwell_ms=dwell)).astype(int) for s in buckets)
    assert len(buckets) == 4 and np.all(hits == 1)


# -- YAML -------------------------------------------------------------------------------------------

def test_yaml_file_entries_expand_and_override(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("""
windows: [1h, all]
id_types: [topic]
slices:
  - name: hides
    rules: [{type: action, any_of: hide}]
  - name: long_videos
    rules:
      - {type: source, media: video}
      - {type: watch_ratio, min: 0.8, max: null}
    windows: [7d]
    id_types: [media, author]
    weight: log_dwell
""")
    spec = SliceSpec.from_yaml(path)
    assert spec.names == ["hides/1h/topic", "hides/all/topic", "long_videos/7d/media", "long_videos/7d/author"]
    assert spec.slices[0].rules == (ActionRule(("hide",)),)
    assert spec.slices[2].rules == (SourceRule("video"), WatchRatioRule(min=0.8))
    assert spec.slices[2].weight == "log_dwell" and spec.slices[2].window.ms == 7 * DAY_MS
    assert [w.label for w in spec.windows] == ["1h", "7d", "all"]


def _spec(**entry) -> dict:
    return {"slices": [{"name": "e", "rules": [{"type": "dwell", "min_ms": 1}], **entry}]}


def _rule(**rule) -> dict:
    return {"slices": [{"name": "e", "rules": [rule]}]}


@pytest.mark.parametrize("data, message", [
    ([1, 2], "slice spec <dict>: expected a mapping"),
    ({"slice": []}, "unknown key 'slice' (did you mean 'slices'?)"),
    ({"windows": ["3d"]}, "missing key 'slices'"),
    ({"slices": []}, "'slices' must be a non-empty list"),
    ({"slices": [{"rules": []}]}, "slices[0]: missing key 'name'"),
    ({"slices": [{"name": "a/b", "rules": []}]}, "slices[0]: 'name' must be"),
    ({"slices": [{"name": "a", "rules": [{"type": "dwell", "min_ms": 1}], "weigth": "score"}]},
     "slices[0]: unknown key 'weigth' (did you mean 'weight'?)"),
    ({"slices": [{"name": "a", "rules": [{"type": "dwell", "min_ms": 1}]}] * 2}, "slices[1] ('a'): duplicate entry"),
    (_spec(rules={"type": "dwell"}), "slices[0] ('e'): 'rules' must be a non-empty list"),
    (_spec(rules=["click"]), "slices[0] ('e'): rules[0]: expected a mapping with a 'type'"),
    (_rule(min_ms=5), "rules[0]: rule type None is not one of action, source, dwell, watch_ratio, score"),
    (_rule(type="dwel", min_ms=5), "rule type 'dwel' (did you mean 'dwell'?)"),
    (_rule(type="dwell", max=5), "rules[0] (dwell): unknown key 'max' (did you mean 'max_ms'?)"),
    (_rule(type="score", gamma=1.0), "rules[0] (score): missing key 'threshold'"),
    (_rule(type="dwell", min_ms="1s"), "rules[0] (dwell): 'min_ms' must be an integer, got '1s'"),
    (_rule(type="dwell", min_ms=True), "'min_ms' must be an integer, got True"),
    (_rule(type="dwell", min_ms=5, max_ms=1), "rules[0] (dwell): 'min_ms' (5) exceeds 'max_ms' (1)"),
    (_rule(type="dwell", min_ms=-1), "'min_ms' must be >= 0"),
    (_rule(type="dwell"), "set at least one of 'min_ms' and 'max_ms'"),
    (_rule(type="dwell", min_ms=None, max_ms=None), "set at least one of 'min_ms' and 'max_ms'"),
    (_rule(type="watch_ratio", min="high"), "'min' must be a number, got 'high'"),
    (_rule(type="watch_ratio", min=0.5, beta=0), "'beta' must be > 0"),
    (_rule(type="score", threshold=0.5, gamma=-1), "'gamma' must be > 0"),
    (_rule(type="score", threshold=float("nan")), "'threshold' must be finite"),
    (_rule(type="action", any_of=["clik"]), "rules[0] (action): unknown action 'clik' (did you mean 'click'?)"),
    (_rule(type="action", any_of=[]), "'any_of' must name at least one action"),
    (_rule(type="action", any_of=[1]), "'any_of' must be a name or a list of names, got [1]"),
    (_rule(type="source", media="photo"), "unknown media 'photo'; valid: image, video"),
    (_spec(weight="scores"), "slices[0] ('e'): unknown weight 'scores' (did you mean 'score'?)"),
    (_spec(weight="score"), "slices[0] ('e'): weight 'score' needs exactly one rule of type 'score'"),
    (_spec(polarity="neg"), "slices[0] ('e'): unknown polarity 'neg'"),
    (_spec(windows=["3days"]), "slices[0] ('e'): windows: window '3days' is not 'all'"),
    (_spec(windows=[]), "slices[0] ('e'): windows: expected a non-empty list"),
    (_spec(windows=["3d", "72h"]), "duplicate windows"),
    (_spec(id_types=["item"]), "slices[0] ('e'): id_types: unknown id type 'item'"),
    ({**_spec(), "id_types": ["media", "media"]}, "slice spec <dict>: id_types: duplicate id types"),
    ({**_spec(), "windows": "3d"}, "slice spec <dict>: windows: expected a non-empty list"),
])
def test_spec_errors_name_the_entry_and_key(data, message):
    with pytest.raises(ConfigError) as info:
        SliceSpec.from_dict(data)
    assert message in str(info.value)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="slice spec file not found"):
        SliceSpec.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("slices: [ {name: a\n")
    with pytest.raises(ConfigError, match=r"slice spec .*bad\.yaml is not valid YAML"):
        SliceSpec.from_yaml(bad)
    bad.write_text("slices:\n  - name: a\n    rules: [{type: dwell, min_ms: 5, max_ms: 1}]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: slices\[0\] \('a'\): rules\[0\] \(dwell\)"):
        SliceSpec.from_yaml(bad)


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="duplicate slice name"):
        s = Slice("x", (DwellRule(1),), Window.parse("all"), "media")
        SliceSpec((s, s))
    with pytest.raises(ConfigError, match="unknown id type"):
        Slice("x", (DwellRule(1),), Window.parse("all"), "item")
    with pytest.raises(ConfigError, match="at least one rule"):
        Slice("x", (), Window.parse("all"), "media")
    with pytest.raises(ConfigError, match="at least one slice"):
        SliceSpec(())
