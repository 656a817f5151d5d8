"""Parameter sync from the online trainer to a running service: the wire format, the serving
ranker's parity with the trainer, refusals, zero failed requests and one consistent version per
response under load during syncs, and the `lifelong monolith online` job (resumed producer included)."""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

from lifelong.bench.serve import serve_in_thread
from lifelong.cli.service import build_online_service
from lifelong.core.errors import ConfigError, DataError
from lifelong.core.metrics import DEFAULT_HEAD_WEIGHTS
from lifelong.core.processes import free_port
from lifelong.data.io import read_table
from lifelong.data.schema import HEADS, SURFACES
from lifelong.data.world import load_config, simulate_to
from lifelong.monolith.job import OnlineJob, run_online_job, stream_records
from lifelong.monolith.joiner import EXAMPLE_DTYPE, JoinerConfig, OnlineJoiner
from lifelong.monolith.online import ExampleAudit, OnlineConfig, OnlineTrainer
from lifelong.monolith.ranker import SLOTS, ItemCatalog, OnlineBatch, OnlineRankerConfig, default_table
from lifelong.monolith.serving import NoModelYet, OnlineServingRanker, online_version
from lifelong.monolith.sync import Syncer, decode_delta, encode_delta
from lifelong.store.stream import LogStream, replay, to_records
from lifelong.transact.serving import RankRequest


def small_table(seed: int):
    cfg = default_table(seed)
    return dataclasses.replace(cfg, filter=dataclasses.replace(cfg.filter, width=2**14))


MODEL = OnlineRankerConfig(**{slot: small_table(i + 1) for i, slot in enumerate(SLOTS)})
CFG = OnlineConfig(model=MODEL, joiner=JoinerConfig(window_ms=30 * 60_000), read_records=512, batch_size=256,
                   checkpoint_every=10**9, metrics_window_ms=86_400_000, delta_format="fp32", dense_every=1)
WEIGHTS = np.array([DEFAULT_HEAD_WEIGHTS[h] for h in HEADS], np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync")
    simulate_to(load_config("tiny", overrides=["users.n_users=12"]), root / "world")
    log = LogStream(root / "log")
    replay(root / "world", log)
    catalog = ItemCatalog.from_dataset(root / "world")
    yield SimpleNamespace(root=root, dir=root / "world", log=log, catalog=catalog, end=log.end_offset())
    log.close()


def expected_scores(model, catalog: ItemCatalog, user: int, items: np.ndarray, surface: int) -> np.ndarray:
    """What the trainer's own model, in eval mode, scores for a request."""
    ex = np.zeros(len(items), EXAMPLE_DTYPE)
    ex["user_id"], ex["item_id"], ex["surface"] = user, items, surface
    model.eval()
    with torch.no_grad():
        probs = torch.sigmoid(model(OnlineBatch.from_examples(ex, catalog))).numpy()
    model.train()
    return probs @ WEIGHTS


def requests_for(world, rng: np.random.Generator, n: int) -> list[tuple[int, np.ndarray, int]]:
    users = np.unique(world.log.read(0, 10**6)[0]["user_id"])
    out = []
    for _ in range(n):
        items = rng.choice(world.catalog.item_ids, size=int(rng.integers(1, 9)), replace=False)
        out.append((int(rng.choice(np.append(users, 10**9))), items, int(rng.integers(len(SURFACES)))))
    return out


# -- the wire format -------------------------------------------------------------------------------


def test_wire_round_trip_and_refusals(world, tmp_path):
    with OnlineTrainer(CFG, world.log, world.catalog, tmp_path / "ckpt") as trainer:
        trainer.run(max_events=3000)
        full = trainer.delta()
        trainer.run(max_events=2000)
        inc = trainer.delta()
    for delta in (full, inc):
        back, model = decode_delta(encode_delta(delta, MODEL))
        assert model == MODEL and (back.version, back.base_version, back.offset) == (
            delta.version, delta.base_version, delta.offset)
        assert (back.dense is None) == (delta.dense is None)
        for slot in SLOTS:
            for name in ("ids", "values", "removed", "default"):
                np.testing.assert_array_equal(getattr(back.tables[slot], name), getattr(delta.tables[slot], name))
    assert full.full and not inc.full and inc.base_version == full.version
    payload = encode_delta(full, MODEL)
    for bad in (b"", b"garbage", payload[: len(payload) // 2]):
        with pytest.raises(DataError, match="sync payload: not a delta"):
            decode_delta(bad)
    with pytest.raises(DataError, match="must carry every table and the dense weights"):
        decode_delta(encode_delta(dataclasses.replace(full, dense=None), MODEL))
    wrong = dataclasses.replace(full, tables={**full.tables, "user_id": dataclasses.replace(
        full.tables["user_id"], values=full.tables["user_id"].values[:, :3])})
    with pytest.raises(DataError, match="do not fit rows of width 16"):
        decode_delta(encode_delta(wrong, MODEL))


# -- the serving ranker ----------------------------------------------------------------------------


def test_served_scores_equal_the_trainers_after_every_sync(world, tmp_path):
    ranker = OnlineServingRanker(world.catalog)
    with pytest.raises(NoModelYet):
        ranker.rank([RankRequest(1, np.array([0]), 0)])
    reqs = requests_for(world, np.random.default_rng(0), 12)
    with OnlineTrainer(CFG, world.log, world.catalog, tmp_path / "ckpt") as trainer:
        for step in range(4):
            trainer.run(max_events=2500)
            applied = ranker.apply_sync(encode_delta(trainer.delta(), MODEL))
            assert applied["full"] == (step == 0) and applied["version"] == ranker.version
            results = ranker.rank([RankRequest(u, ranker.item_rows(items)[0], s) for u, items, s in reqs])
            for (u, items, s), res in zip(reqs, results):
                np.testing.assert_allclose(res.scores, expected_scores(trainer.model, world.catalog, u, items, s),
                                           rtol=1e-5, atol=1e-6)
                assert res.model_version == ranker.version
                assert res.cold_start == (trainer.model.tables["user_id"].table.lookup(np.array([u]))[0] < 0)
        # A delta that skips a version is refused and changes nothing; the next full one applies.
        trainer.run(max_events=500)
        trainer.delta()  # lost on the way
        skipped = trainer.delta()
        before = ranker.version
        with pytest.raises(DataError, match="based on version"):
            ranker.apply_sync(encode_delta(skipped, MODEL))
        assert ranker.version == before
        assert ranker.apply_sync(encode_delta(trainer.delta(full=True), MODEL))["full"]
    _, unknown = ranker.item_rows(np.array([world.catalog.item_ids[0], -5]))
    assert unknown.tolist() == [-5]


# -- a live service under load ----------------------------------------------------------------------


@pytest.fixture
def live_online(world):
    with serve_in_thread(build_online_service(world.dir, max_wait_ms=5.0)) as url:
        yield url


def test_syncs_under_load_fail_no_request_and_each_response_has_one_version(world, live_online, tmp_path):
    url = live_online
    with httpx.Client(base_url=url) as http:
        r = http.post("/rank", json={"user_id": 1, "candidates": [int(world.catalog.item_ids[0])]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert http.get("/healthz").json()["model_version"] is None
    reqs = requests_for(world, np.random.default_rng(1), 40)
    models: dict[str, object] = {}
    responses: list[tuple[int, int, dict]] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stop.is_set():
                i = int(rng.integers(len(reqs)))
                u, items, s = reqs[i]
                r = http.post("/rank", json={"user_id": u, "candidates": items.tolist(), "surface": SURFACES[s]})
                responses.append((i, r.status_code, r.json()))

    with OnlineTrainer(CFG, world.log, world.catalog, tmp_path / "ckpt") as trainer:
        syncer = Syncer(trainer, url)
        trainer.run(max_events=2000)
        first = syncer.sync()
        assert first.applied and first.full, first.error
        models[online_version(first.version)] = copy.deepcopy(trainer.model)
        clients = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
        for t in clients:
            t.start()
        replies = []
        for _ in range(5):
            trainer.run(max_events=1500)
            reply = syncer.sync()
            replies.append(reply)
            models[online_version(reply.version)] = copy.deepcopy(trainer.model)
            time.sleep(0.3)
        stop.set()
        for t in clients:
            t.join()
        syncer.close()
    assert all(r.applied and not r.full for r in replies) and any(r.rows for r in replies)
    assert len(responses) > 50
    assert [code for _, code, _ in responses if code != 200] == []  # zero failed requests
    seen = {body["model_version"] for _, _, body in responses}
    assert len(seen) >= 3 and seen <= set(models)  # requests were served across several syncs
    for i, _, body in responses:
        u, items, s = reqs[i]
        model = models[body["model_version"]]
        want = dict(zip(items.tolist(), expected_scores(model, world.catalog, u, items, s)))
        got = {it["item_id"]: it["score"] for it in body["items"]}
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-5, atol=1e-6)
    with httpx.Client(base_url=url) as http:
        metrics = http.get("/metrics").text
        assert 'lifelong_syncs_total{outcome="applied"} 6' in metrics
        assert http.post("/admin/sync", content=b"junk").status_code == 422


def test_a_restarted_service_gets_a_full_snapshot(world, live_online, tmp_path):
    with OnlineTrainer(CFG, world.log, world.catalog, tmp_path / "ckpt") as trainer:
        syncer = Syncer(trainer, live_online)
        trainer.run(max_events=1000)
        assert syncer.sync().applied
        # Another trainer lineage pushes to the same service: its incremental delta is refused (409)...
        with OnlineTrainer(CFG, world.log, world.catalog, tmp_path / "other") as other:
            other.run(max_events=500)
            other_syncer = Syncer(other, live_online)
            assert other_syncer.sync().applied  # a full snapshot replaces everything
            other_syncer.close()
        trainer.run(max_events=500)
        refused = syncer.sync()
        assert not refused.applied and not refused.full and "HTTP 409" in refused.error
        # ... and the next push is a full snapshot, which applies.
        again = syncer.sync()
        assert again.applied and again.full
        syncer.close()
    unreachable = Syncer(SimpleNamespace(delta=lambda full, dense=False: trainer.delta(full=True), cfg=CFG),
                         f"http://127.0.0.1:{free_port()}", timeout_s=2)
    reply = unreachable.sync()
    assert not reply.applied and "Connect" in reply.error
    unreachable.close()


# -- the job ----------------------------------------------------------------------------------------


def test_job_resumes_a_partial_replay_without_losing_or_repeating_events(world, live_online, tmp_path):
    stream = tmp_path / "stream"
    events = to_records(read_table(world.dir / "events.parquet", "events"))
    ordered = events[np.lexsort((events["user_id"], events["ts_ms"]))]
    with LogStream(stream) as log:  # a producer killed after a third of the replay
        log.append(ordered[: len(ordered) // 3])
    job = OnlineJob(data=world.dir, stream=str(stream), ckpt_dir=tmp_path / "ckpt", serve=live_online,
                    sync_every_s=0.5, training=CFG)
    lines: list[str] = []
    summary = run_online_job(job, log=lines.append)
    assert summary.skipped == len(ordered) // 3 and summary.replayed == len(ordered) - summary.skipped
    # An idle machine may train it all in one slice: one push at least, every push applied.
    assert summary.events == len(ordered) and summary.failed_syncs == 0 and len(summary.syncs) >= 1
    assert summary.syncs[0].full and lines[0].startswith(f"sync v{summary.syncs[0].version}: full")
    with LogStream(stream) as log:
        assert stream_records(log) == len(ordered)
        records = log.read(0, 10**7)[0]
    np.testing.assert_array_equal(records["ts_ms"], ordered["ts_ms"])
    np.testing.assert_array_equal(records["item_id"], ordered["item_id"])
    single = ExampleAudit()
    single.add(OnlineJoiner(CFG.joiner).push(records))
    with OnlineTrainer(CFG, str(stream), world.catalog, tmp_path / "ckpt") as trainer:
        assert trainer.audit == single  # every joined example applied exactly once
    again = run_online_job(job)  # nothing left: one full push of the restored state
    assert (again.replayed, again.events, len(again.syncs)) == (0, 0, 1) and again.syncs[0].full
    with httpx.Client(base_url=live_online) as http:
        assert http.get("/healthz").json()["model_version"] == online_version(again.syncs[0].version)


def test_job_over_redis_streams_resumes_without_repeating(world, redis_url, tmp_path):
    import uuid

    stream = f"{redis_url}?key=lifelong-job-{uuid.uuid4().hex}"
    job = OnlineJob(data=world.dir, stream=stream, ckpt_dir=tmp_path / "ckpt", training=CFG, last_days=10)
    first = run_online_job(job)
    assert first.replayed == first.events > 0 and first.skipped == 0 and first.syncs == []
    again = run_online_job(job)
    assert (again.skipped, again.replayed, again.events) == (first.replayed, 0, 0)


def test_job_refuses_bad_input(world, tmp_path):
    with pytest.raises(ConfigError, match="has no events.parquet"):
        OnlineJob(data=tmp_path, stream=str(tmp_path / "s"), ckpt_dir=tmp_path / "c")
    with pytest.raises(ConfigError, match="sync_every_s must be > 0"):
        OnlineJob(data=world.dir, stream=str(tmp_path / "s"), ckpt_dir=tmp_path / "c", sync_every_s=0)
    with LogStream(tmp_path / "big") as log:
        log.append(np.concatenate([world.log.read(0, 10**7)[0]] * 2))
    with pytest.raises(ConfigError, match="another replay's stream"):
        run_online_job(OnlineJob(data=world.dir, stream=str(tmp_path / "big"), ckpt_dir=tmp_path / "c"))


def run_cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "lifelong.cli", *args], capture_output=True, text=True,
                          env={"LIFELONG_QUIET": "1", "COLUMNS": "200", "PATH": "/usr/bin:/bin"}, timeout=300)


def test_cli_online_trains_and_serves_and_refuses_bad_combinations(world, live_online, tmp_path):
    res = run_cli("monolith", "online", "--data", str(world.dir), "--ckpt", str(tmp_path / "ckpt"), "--serve", live_online,
                  "--sync-every", "0.5", "--delta-format", "fp32")
    assert res.returncode == 0, res.stderr
    assert f"replayed {world.end:,} events (0 already in the stream)" in res.stdout
    assert "pushes applied, serving v" in res.stdout
    with httpx.Client(base_url=live_online) as http:
        version = http.get("/healthz").json()["model_version"]
        assert version is not None and res.stdout.split("serving v")[1].startswith(version.removeprefix("online-v"))
    for args, message in ((("serve", "--online"), "--online serves pushed parameters"),
                          (("serve", "--run", "r"), "serve needs --run RUN and --store URL"),
                          (("monolith", "online", "--data", str(tmp_path), "--ckpt", str(tmp_path / "c")), "has no events.parquet")):
        res = run_cli(*args)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_kill_9_of_the_job_mid_replay_loses_and_repeats_nothing(world, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    ckpt = tmp_path / "ckpt"
    all_events = world.log.read(0, 10**7)[0]
    expected = all_events[all_events["ts_ms"] >= all_events["ts_ms"].max() + 1 - 8 * 86_400_000]
    span = int(expected["ts_ms"][-1] - expected["ts_ms"][0])
    base = [sys.executable, "-m", "lifelong.cli", "monolith", "online", "--data", str(world.dir), "--ckpt", str(ckpt),
            "--last-days", "8"]
    env = {"LIFELONG_QUIET": "1", "COLUMNS": "200", "PATH": "/usr/bin:/bin"}
    # Paced so that the replay takes ~30 s: the kill lands while the producer is still appending.
    proc = subprocess.Popen([*base, "--sync-every", "0.2", "--speedup", str(span / 30_000)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while not list(ckpt.glob("ckpt-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the job ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with LogStream(ckpt / "stream") as log:
        partial = stream_records(log)
    assert 0 < partial < len(expected)
    res = subprocess.run([*base, "--sync-every", "5"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"({partial:,} already in the stream)" in res.stdout
    with LogStream(ckpt / "stream") as log:
        records = log.read(0, 10**7)[0]
    for name in ("ts_ms", "user_id", "item_id", "action_mask"):
        np.testing.assert_array_equal(records[name], expected[name])
    single = ExampleAudit()
    single.add(OnlineJoiner(CFG.joiner).push(records))
    with OnlineTrainer(OnlineConfig(), str(ckpt / "stream"), world.catalog, ckpt) as trainer:
        assert trainer.audit == single and trainer.counters.events == len(expected)
