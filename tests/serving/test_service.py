"""The ranking service: train/serve parity of both paths, the HTTP contract, batching, fuzzing."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifelong.bench.serve import eval_requests, serve_in_thread
from lifelong.cli.service import build_service
from lifelong.core.errors import ConfigError, DataError
from lifelong.data.schema import SURFACE_CODES
from lifelong.data.world import load_config, simulate_to
from lifelong.serving.batcher import BatchingConfig, DynamicBatcher
from lifelong.store.feature_store import load_store, open_store
from lifelong.transact.rank_data import RankData
from lifelong.transact.sequence_layout import SequenceLayout
from lifelong.transact.serving import Ranker, RankRequest, model_version
from lifelong.transact.trainer import TrainConfig, load_model, predict, train
from lifelong.transact.training_rows import BuildConfig, build_rows

LAYOUT = SequenceLayout(ll_nn=8, rt=8, rt_nn=4, imp_nn=4)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny world, its rows, TransAct V2, TransAct, wide&deep and DIN runs, and an LMDB store."""
    root = tmp_path_factory.mktemp("svc")
    simulate_to(load_config("tiny", overrides=["users.n_users=30"]), root / "world")
    build_rows(root / "world", root / "ds", BuildConfig(layout=LAYOUT, ll_cap=40, imp_cap=10, nal_negatives=6))
    torch.set_num_threads(1)
    for model in ("transact_v2", "wide_deep", "transact", "din"):
        nal = "impression" if model == "transact_v2" else "none"
        train(root / "ds", root / model, TrainConfig(model=model, nal=nal, epochs=1, max_rows=400, batch_size=128))
    load_store(root / "ds", str(root / "store"), progress=False)
    return root


def _requests(ds, data: RankData, ranker: Ranker) -> tuple[list[RankRequest], np.ndarray]:
    """The eval split's requests, and the row order their candidates come in."""
    bodies = eval_requests(ds)
    reqs, rows = [], []
    req = np.asarray(data.arrays["request"])
    for r, body in enumerate(bodies):
        items, unknown = ranker.item_rows(np.array(body["candidates"]))
        assert unknown.size == 0
        reqs.append(RankRequest(body["user_id"], items, SURFACE_CODES[body["surface"]], body["request_time"]))
        rows.append(np.flatnonzero(req == r))
    return reqs, np.concatenate(rows)


@pytest.mark.parametrize("model", ["transact_v2", "transact", "wide_deep", "din"])
@pytest.mark.parametrize("path", ["optimized", "naive"])
def test_served_scores_equal_offline_scores_on_logged_features(served, model, path):
    net, _ = load_model(served / model)
    data = RankData(served / "ds", "eval")
    offline = predict(net, data)
    with open_store(str(served / "store")) as store:
        ranker = Ranker(net, store, path=path)
        reqs, rows = _requests(served / "ds", data, ranker)
        # Several requests per batch on the optimized path: de-duplication must not mix users up.
        results = [res for a in range(0, len(reqs), 7) for res in ranker.rank(reqs[a:a + 7])]
    online = np.concatenate([r.probs for r in results])
    assert online.shape == offline[rows].shape
    assert np.abs(online - offline[rows]).max() <= 1e-5


def test_optimized_scores_follow_an_in_place_parameter_update(served):
    """The token-table path reads the model's live parameters: no rebuild after an update (a sync)."""
    net, _ = load_model(served / "transact_v2")
    reqs = [RankRequest(u, np.arange(6), 0, None) for u in range(3)]
    with open_store(str(served / "store")) as store:
        optimized, naive = Ranker(net, store), Ranker(net, store, path="naive")
        before = np.concatenate([r.probs for r in optimized.rank(reqs)])
        with torch.no_grad():
            attn = net.encoder.layers[0].self_attn
            for p in (attn.in_proj.weight, net.token_context.position, net.pool_proj.weight):
                p.add_(0.3 * torch.randn_like(p))
        after = np.concatenate([r.probs for r in optimized.rank(reqs)])
        reference = np.concatenate([r.probs for r in naive.rank(reqs)])
    assert np.abs(after - before).max() > 1e-4
    assert np.abs(after - reference).max() <= 1e-5


def test_cold_start_flags_follow_requests_in_a_mixed_batch(served):
    net, _ = load_model(served / "transact_v2")
    with open_store(str(served / "store")) as store:
        res = Ranker(net, store).rank([RankRequest(10**12, np.arange(2), 0, None), RankRequest(0, np.arange(3), 0, None),
                                       RankRequest(10**12 + 1, np.arange(1), 0, None)])
    assert [r.cold_start for r in res] == [True, False, True]
    assert [len(r.scores) for r in res] == [2, 3, 1]


def test_scores_follow_the_final_score_weights(served):
    net, _ = load_model(served / "transact_v2")
    with open_store(str(served / "store")) as store:
        ranker = Ranker(net, store)
        res = ranker.rank([RankRequest(0, np.arange(5), 0, None)])[0]
    w = {"repin": 1.0, "click": 0.5, "long_view": 0.25, "hide": -1.0}
    expected = sum(w[h] * res.probs[:, i] for i, h in enumerate(ranker.heads))
    np.testing.assert_allclose(res.scores, expected, rtol=1e-6)


def test_unknown_user_is_served_cold_start_with_the_same_scores_on_both_paths(served):
    net, _ = load_model(served / "transact_v2")
    with open_store(str(served / "store")) as store:
        opt = Ranker(net, store).rank([RankRequest(10**12, np.arange(4), 1, None)])[0]
        naive = Ranker(net, store, path="naive").rank([RankRequest(10**12, np.arange(4), 1, None)])[0]
    assert opt.cold_start and naive.cold_start
    assert np.abs(opt.probs - naive.probs).max() <= 1e-5


def test_redis_store_serves_the_same_scores_as_lmdb(served, redis_url):
    net, _ = load_model(served / "transact_v2")
    load_store(served / "ds", redis_url, progress=False)
    reqs = [RankRequest(u, np.arange(6), 0, None) for u in range(4)]
    with open_store(str(served / "store")) as lmdb_store, open_store(redis_url) as redis_store:
        a = Ranker(net, lmdb_store).rank(reqs)
        b = Ranker(net, redis_store).rank(reqs)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.probs, y.probs)


def test_chunked_forward_scores_as_one_and_bf16_scores_near_fp32(served):
    """A batch scored in chunks of rows equals one forward over all of them; bfloat16 autocast moves
    scores by about 1e-3, not the order of a request's candidates much."""
    net, _ = load_model(served / "transact_v2")
    data = RankData(served / "ds", "eval")
    with open_store(str(served / "store")) as store:
        reqs, _ = _requests(served / "ds", data, Ranker(net, store))
        probs = {name: np.concatenate([r.probs for r in Ranker(net, store, **kw).rank(reqs)])
                 for name, kw in (("whole", {"forward_rows": 10**6}), ("chunks", {"forward_rows": 7}),
                                  ("bf16", {"precision": "bf16"}))}
        with pytest.raises(ConfigError, match="precision must be one of"):
            Ranker(net, store, precision="fp16")
    assert np.abs(probs["whole"] - probs["chunks"]).max() <= 1e-5
    gap = np.abs(probs["whole"] - probs["bf16"]).max()
    assert 0 < gap < 0.05


def test_arena_is_reused_across_batches(served):
    net, _ = load_model(served / "transact_v2")
    with open_store(str(served / "store")) as store:
        ranker = Ranker(net, store)
        buffers = (ranker.arena.tok_index.data_ptr(), ranker.arena.tok_int8.data_ptr())
        for user in range(5):
            ranker.rank([RankRequest(user, np.arange(20), 0, None), RankRequest(user + 1, np.arange(3), 0, None)])
        assert (ranker.arena.tok_index.data_ptr(), ranker.arena.tok_int8.data_ptr()) == buffers
        assert ranker.arena.grows == 0


def test_store_of_another_layout_is_refused(served, tmp_path):
    other = tmp_path / "ds"
    build_rows(served / "world", other, BuildConfig(layout=SequenceLayout(4, 4, 2, 2), ll_cap=40, imp_cap=10,
                                                    nal_negatives=6))
    load_store(other, str(tmp_path / "store"), progress=False)
    net, _ = load_model(served / "transact_v2")
    with open_store(str(tmp_path / "store")) as store, pytest.raises(ConfigError, match="layout"):
        Ranker(net, store)


def test_model_with_dv365_user_tokens_needs_an_export_store(served):
    """Served with one: tests/serving/test_user_tokens.py."""
    import dataclasses

    from lifelong.transact.model import TransAct

    net, _ = load_model(served / "transact_v2")
    with_tokens = TransAct(dataclasses.replace(net.cfg, user_tokens=(2, 8)))
    with open_store(str(served / "store")) as store, pytest.raises(ConfigError, match="DV365 user tokens"):
        Ranker(with_tokens, store)


# -- HTTP ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(served):
    app, _ = build_service(served / "transact_v2", str(served / "store"), max_candidates=50)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _item_ids(served, n: int) -> list[int]:
    return np.load(served / "ds" / "items" / "item_id.npy")[:n].tolist()


def test_rank_returns_sorted_candidates_with_probabilities(client, served):
    ids = _item_ids(served, 6)
    r = client.post("/rank", json={"user_id": 3, "candidates": ids, "surface": "search"})
    assert r.status_code == 200, r.text
    body = r.json()
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert sorted(it["item_id"] for it in body["items"]) == sorted(ids)
    assert set(body["items"][0]["probs"]) == {"click", "repin", "long_view", "hide"}
    assert body["model_version"] == model_version(served / "transact_v2") and not body["cold_start"]


@pytest.mark.parametrize("payload, field", [
    ({"user_id": "abc", "candidates": [1]}, "user_id"),
    ({"user_id": 1, "candidates": "x"}, "candidates"),
    ({"user_id": 1, "candidates": []}, "candidates"),
    ({"user_id": 1, "candidates": [1.5]}, "candidates"),
    ({"user_id": 2**64, "candidates": [1]}, "user_id"),
    ({"user_id": 1, "candidates": [1], "surface": "moon"}, "surface"),
    ({"user_id": 1, "candidates": [1], "request_time": -5}, "request_time"),
    ({"candidates": [1]}, "user_id"),
    ({"user_id": 1, "candidates": [1], "extra": 1}, "extra"),
])
def test_wrong_types_are_422_naming_the_field(client, payload, field):
    r = client.post("/rank", json=payload)
    assert r.status_code == 422
    assert any(field in map(str, e["loc"]) for e in r.json()["detail"]), r.text


def test_malformed_json_unknown_items_and_too_many_candidates(client, served):
    r = client.post("/rank", content=b'{"user_id": 1, "candidates": [', headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = client.post("/rank", json={"user_id": 1, "candidates": [_item_ids(served, 1)[0], -77, 10**15]})
    assert r.status_code == 422 and sorted(r.json()["detail"][0]["unknown"]) == [-77, 10**15]
    r = client.post("/rank", json={"user_id": 1, "candidates": _item_ids(served, 51)})
    assert r.status_code == 413


def test_unknown_user_is_counted_and_metrics_scrape(client, served):
    r = client.post("/rank", json={"user_id": 987654321, "candidates": _item_ids(served, 3)})
    assert r.status_code == 200 and r.json()["cold_start"]
    text = client.get("/metrics").text
    cold = [line for line in text.splitlines() if line.startswith("lifelong_cold_start_total")]
    assert cold and int(cold[0].split()[1]) >= 1
    assert 'lifelong_requests_total{status="200"}' in text
    assert "lifelong_request_latency_seconds_bucket" in text and "lifelong_batch_examples_count" in text
    assert client.get("/healthz").json()["status"] == "ok"
    assert "/rank" in client.get("/openapi.json").json()["paths"]


def test_dynamic_batcher_merges_concurrent_requests():
    seen: list[int] = []

    def run(items):
        seen.append(len(items))
        return [x * 10 for x in items]

    async def main():
        b = DynamicBatcher(run, size=lambda x: 1, cfg=BatchingConfig(max_examples=8, max_wait_ms=50))
        await b.start()
        out = await asyncio.gather(*(b.submit(i) for i in range(20)))
        await b.stop()
        return out

    assert asyncio.run(main()) == [i * 10 for i in range(20)]
    assert sum(seen) == 20 and max(seen) == 8 and len(seen) < 20


def test_a_failing_batch_fails_its_requests_not_the_batcher():
    calls = []

    def run(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return items

    async def main():
        b = DynamicBatcher(run, size=lambda x: 1, cfg=BatchingConfig(max_examples=100, max_wait_ms=20))
        await b.start()
        first = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
        second = await b.submit(3)
        await b.stop()
        return first, second

    first, second = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) for e in first) and second == 3


# -- a real server, fuzzed ----------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=12)
FIELDS = st.fixed_dictionaries({}, optional={"user_id": JSON | st.integers(), "candidates": JSON | st.lists(st.integers(), max_size=60),
                                             "surface": JSON | st.sampled_from(["homefeed", "search"]),
                                             "request_time": JSON | st.integers()})


@pytest.fixture(scope="module")
def live_server(served):
    app, _ = build_service(served / "transact_v2", str(served / "store"), max_candidates=50)
    with serve_in_thread(app) as url:
        yield url


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=FIELDS | JSON, raw=st.none() | st.binary(max_size=40))
def test_fuzzed_requests_never_get_a_5xx_and_the_server_stays_up(live_server, body, raw):
    with httpx.Client(base_url=live_server, timeout=10) as http:
        if raw is None:
            r = http.post("/rank", content=json.dumps(body), headers={"content-type": "application/json"})
        else:
            r = http.post("/rank", content=raw, headers={"content-type": "application/json"})
        assert r.status_code < 500, r.text
        assert http.get("/healthz").status_code == 200


def test_load_generator_against_a_live_server(live_server, served):
    from lifelong.bench.serve import BATCH_STAGES, closed_loop, render, stage_profile
    from lifelong.serving.metrics import parse_stage_seconds

    bodies = eval_requests(served / "ds", limit=20)
    before = parse_stage_seconds(httpx.get(f"{live_server}/metrics").text)
    step = asyncio.run(closed_loop(f"{live_server}/rank", bodies, concurrency=3, seconds=1.0))
    assert step["requests"] > 0 and step["errors"] == 0 and step["examples_per_s"] > 0
    assert step["p50_ms"] <= step["p90_ms"] <= step["p99_ms"]
    # The server timed every stage of the step's batches, and no more than the step lasted.
    profile = stage_profile(before, parse_stage_seconds(httpx.get(f"{live_server}/metrics").text), step)
    assert all(profile[k] > 0 for k in BATCH_STAGES), profile
    assert 0 < profile["busy"] <= 1.0 and profile["queue"] >= 0
    assert sum(profile[k] for k in BATCH_STAGES) <= step["mean_ms"] * 3  # 3 clients: at most 3 requests a batch
    text = render({"steps": [{"path": "naive", **step}, {"path": "optimized", **step}], "sustained": None,
                   "requests": len(bodies), "mean_candidates": 5.0})
    assert "1.0x" in text and "| optimized | 3 |" in text


def test_replayed_requests_get_exactly_n_distinct_candidates_their_own_first(served):
    logged = eval_requests(served / "ds")
    for n in (2, 40):
        bodies = eval_requests(served / "ds", n_candidates=n)
        assert len(bodies) == len(logged)
        for body, log in zip(bodies, logged):
            assert len(body["candidates"]) == len(set(body["candidates"])) == n
            own = list(dict.fromkeys(log["candidates"]))[:n]
            assert body["candidates"][:len(own)] == own
            assert body["user_id"] == log["user_id"] and body["request_time"] == log["request_time"]
    assert eval_requests(served / "ds", n_candidates=40) == bodies  # seeded: the same draw every time
    with pytest.raises(DataError, match="distinct candidates"):
        eval_requests(served / "ds", n_candidates=10**6)


# -- reliability: failing loudly, bounded work, the contract (a fake ranker, no model) ----------


class FakeRanker:
    """A ranker whose store can be switched off, and whose batches can be made slow."""

    path = "optimized"
    heads = ("click", "repin")

    def __init__(self, n_items: int = 2000, delay_s: float = 0.0):
        self.n_items, self.delay_s = n_items, delay_s
        self.down: str | None = None
        self.scored: list[int] = []  # candidates per scored request
        self.busy = threading.Event()  # set while a batch is being scored

    def item_rows(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        known = (ids >= 0) & (ids < self.n_items)
        return np.where(known, ids, 0), ids[~known]

    def rank(self, requests):
        import time

        from lifelong.core.errors import StoreUnavailable
        from lifelong.serving.ranking import RankResult

        if self.down:
            raise StoreUnavailable("redis://fake/0", self.down)
        self.busy.set()
        time.sleep(self.delay_s)
        self.busy.clear()
        self.scored += [int(r.items.size) for r in requests]
        return [RankResult(np.tile(r.items[:, None] / self.n_items, (1, 2)), r.items / self.n_items, False,
                           store_version="v7") for r in requests]

    def readiness(self):
        return (False, self.down) if self.down else (True, "ok")


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_store_unavailable_is_503_with_retry_after_and_the_service_recovers_by_itself():
    from lifelong.serving.app import create_app

    fake = FakeRanker()
    with TestClient(create_app(fake, "m@1"), raise_server_exceptions=False) as c:
        assert c.post("/rank", json={"user_id": 1, "candidates": [3, 1]}).json()["store_version"] == "v7"
        fake.down = "connection refused"
        r = c.post("/rank", json={"user_id": 1, "candidates": [3, 1]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json() == {"detail": "feature store unavailable: connection refused", "cause": "store_unavailable"}
        live, ready = c.get("/healthz"), c.get("/readyz")
        assert live.status_code == 200 and live.json()["model_version"] == "m@1" and live.json()["store_version"] == "v7"
        assert ready.status_code == 503 and ready.json()["reason"] == "connection refused"
        assert ready.json()["model_version"] == "m@1" and "retry-after" in ready.headers
        text = c.get("/metrics").text
        assert _metric(text, "lifelong_store_errors_total") == 1
        assert _metric(text, 'lifelong_errors_total{cause="store_unavailable"}') == 1
        assert "lifelong_ready 0" in text
        fake.down = None  # the store is back: no restart
        r = c.post("/rank", json={"user_id": 1, "candidates": [3, 1]})
        assert r.status_code == 200 and r.json()["store_version"] == "v7"
        assert c.get("/readyz").json()["ready"] is True


def test_duplicate_candidates_are_scored_once_and_returned_once():
    from lifelong.serving.app import create_app

    fake = FakeRanker()
    with TestClient(create_app(fake, "m@1")) as c:
        r = c.post("/rank", json={"user_id": 1, "candidates": [5, 9, 5, 5, 2, 9]})
    assert r.status_code == 200
    assert [it["item_id"] for it in r.json()["items"]] == [9, 5, 2] and fake.scored == [3]


def test_every_non_200_is_counted_by_cause():
    from lifelong.serving.app import create_app

    with TestClient(create_app(FakeRanker(), "m@1", max_candidates=4), raise_server_exceptions=False) as c:
        c.post("/rank", json={"user_id": 1, "candidates": [1, 2, 3, 4, 5]})
        c.post("/rank", json={"user_id": 1, "candidates": [-1]})
        c.post("/rank", json={"user_id": "x", "candidates": [1]})
        c.post("/rank", content=b'"\xc3\x28"', headers={"content-type": "application/json"})
        text = c.get("/metrics").text
    assert _metric(text, 'lifelong_errors_total{cause="too_many_candidates"}') == 1
    assert _metric(text, 'lifelong_errors_total{cause="unknown_items"}') == 1
    assert _metric(text, 'lifelong_errors_total{cause="invalid"}') == 2
    assert _metric(text, 'lifelong_requests_total{status="400"}') == 0


def test_a_request_past_its_deadline_is_504_and_never_scored():
    from lifelong.serving.app import create_app

    fake = FakeRanker(delay_s=0.3)

    async def main():
        app = create_app(fake, "m@1", max_latency_ms=5000)
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            slow = asyncio.create_task(c.post("/rank", json={"user_id": 1, "candidates": [1, 2]}))
            while not fake.busy.is_set():  # the first batch is being scored
                await asyncio.sleep(0.005)
            late = await c.post("/rank", json={"user_id": 2, "candidates": list(range(10)), "timeout_ms": 100})
            return await slow, late, (await c.get("/metrics")).text

    slow, late, text = asyncio.run(main())
    assert slow.status_code == 200
    assert late.status_code == 504 and late.json()["cause"] == "deadline"
    assert fake.scored == [2]
    assert _metric(text, 'lifelong_dropped_examples_total{cause="deadline"}') == 10


def test_the_queue_is_bounded_in_candidates_not_requests():
    import threading

    gate = threading.Event()

    def run(xs):
        gate.wait(10)
        return xs

    async def main():
        b = DynamicBatcher(run, size=len, cfg=BatchingConfig(max_examples=1, max_queue_examples=10))
        await b.start()
        first = asyncio.create_task(b.submit([0] * 50))  # an empty queue takes any size
        await asyncio.sleep(0.05)
        waiting = [asyncio.create_task(b.submit([i] * 4)) for i in range(2)]
        await asyncio.sleep(0)
        refused = await asyncio.gather(b.submit([9] * 4), return_exceptions=True)
        gate.set()
        done = await asyncio.gather(first, *waiting)
        await b.stop()
        return refused, done

    from lifelong.serving.batcher import QueueFull

    refused, done = asyncio.run(main())
    assert isinstance(refused[0], QueueFull) and [len(d) for d in done] == [50, 4, 4]


def test_the_openapi_schema_states_the_enforced_bounds_and_statuses():
    from lifelong.serving.app import create_app

    with TestClient(create_app(FakeRanker(), "m@1", max_candidates=7)) as c:
        text = c.get("/openapi.json").text
        spec = json.loads(text)
    body = spec["components"]["schemas"]["RankBody"]["properties"]
    assert body["user_id"]["maximum"] == 2**63 - 1 and body["user_id"]["minimum"] == -(2**63)
    assert body["candidates"]["maxItems"] == 7 and body["candidates"]["items"]["maximum"] == 2**63 - 1
    assert body["request_time"]["anyOf"][0]["maximum"] == 2**62 and "9.223372036854776e+18" not in text
    assert set(spec["paths"]["/rank"]["post"]["responses"]) == {"200", "408", "413", "422", "503", "504"}
    assert set(spec["paths"]["/readyz"]["get"]["responses"]) == {"200", "503"}


def test_a_half_sent_body_is_answered_408_and_closed():
    import socket

    from lifelong.serving.app import create_app

    app = create_app(FakeRanker(), "m@1", body_timeout_s=0.5)
    with serve_in_thread(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST /rank HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: 100\r\n\r\n{\"user_id\": 1,")
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"body_timeout" in reply
        text = httpx.get(f"{url}/metrics").text
    assert _metric(text, 'lifelong_errors_total{cause="body_timeout"}') == 1


def test_serve_on_a_busy_port_exits_2_with_one_line(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-c", "from lifelong.cli import main; main()", "serve", "--run",
                               str(tmp_path / "run"), "--store", str(tmp_path / "store"), "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "already in use" in lines[0] and "serving" not in proc.stderr
