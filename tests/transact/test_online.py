"""TransAct V2 with collision-less id tables: batch training, online training from the stream (rows
read from the store at each impression's time), and pushes to the served optimized path: served
scores equal the trainer's model after every push, and a push under load fails no request."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

from lifelong.bench.serve import eval_requests, serve_in_thread
from lifelong.cli.service import build_service
from lifelong.core.errors import DataError
from lifelong.data.schema import SURFACE_CODES
from lifelong.data.world import load_config, simulate_to
from lifelong.monolith.joiner import JoinerConfig
from lifelong.monolith.online import OnlineConfig, OnlineModel, OnlineTrainer
from lifelong.monolith.sync import Syncer
from lifelong.serving.ranking import MalformedDelta, RankRequest, SyncedRanker
from lifelong.serving.sync import encode_delta
from lifelong.store.feature_store import load_store, open_store
from lifelong.store.stream import LogStream, replay
from lifelong.transact.online import SyncedTransActRanker, TransActOnline, id_tables
from lifelong.transact.rank_data import RankData
from lifelong.transact.sequence_layout import SequenceLayout
from lifelong.transact.serving import Ranker
from lifelong.transact.trainer import build_train_config, load_model, predict, train
from lifelong.transact.training_rows import BuildConfig, build_rows

LAYOUT = SequenceLayout(ll_nn=8, rt=8, rt_nn=4, imp_nn=4)
CFG = OnlineConfig(joiner=JoinerConfig(window_ms=30 * 60_000), read_records=512, batch_size=128,
                   checkpoint_every=10**9, delta_format="fp32", dense_every=1, optimizer="adam", lr=1e-3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny world, its rows, a TransAct V2 run with collision-less user and item tables, its store and stream."""
    root = tmp_path_factory.mktemp("online_v2")
    simulate_to(load_config("tiny", overrides=["users.n_users=20"]), root / "world")
    build_rows(root / "world", root / "ds", BuildConfig(layout=LAYOUT, ll_cap=40, imp_cap=10, nal_negatives=6))
    torch.set_num_threads(1)
    cfg = build_train_config({"model": "transact_v2", "nal": "impression", "epochs": 1, "max_rows": 400,
                              "batch_size": 128},
                             ["model.row.tables.item=collisionless", "model.row.tables.user=collisionless"])
    train(root / "ds", root / "run", cfg, log=lambda *_: None)
    load_store(root / "ds", str(root / "store"), progress=False)
    log = LogStream(root / "log")
    replay(root / "world", log)
    yield SimpleNamespace(root=root, run=root / "run", ds=root / "ds", store=str(root / "store"), log=log)
    log.close()


def _requests(world, ranker: Ranker, limit: int = 20) -> list[RankRequest]:
    out = []
    for body in eval_requests(world.ds, limit=limit):
        items, unknown = ranker.item_rows(np.array(body["candidates"]))
        assert unknown.size == 0
        out.append(RankRequest(body["user_id"], items, SURFACE_CODES[body["surface"]], body["request_time"]))
    return out


def _expected(model: torch.nn.Module, ranker: Ranker, requests: list[RankRequest]) -> np.ndarray:
    """The trainer's model, in eval mode, on the features the optimized path assembles."""
    was = model.training
    model.eval()
    with torch.no_grad():
        probs = torch.sigmoid(model(ranker.gather_batch(requests)).logits).numpy()
    model.train(was)
    return probs


def test_batch_training_fills_the_collisionless_tables_and_serves_them(world):
    model, _ = load_model(world.run)
    tables = id_tables(model)
    assert sorted(tables) == ["item", "user"] and all(len(t.table) > 0 for t in tables.values())
    assert model.cfg.row.kinds == {"user": "collisionless", "item": "collisionless", "author": "hashed",
                                   "topic": "hashed"}
    data = RankData(world.ds, "eval")
    offline = predict(model, data)
    with open_store(world.store) as store:
        ranker = Ranker(model, store)
        reqs = _requests(world, ranker, limit=None)
        online = np.concatenate([r.probs for a in range(0, len(reqs), 7) for r in ranker.rank(reqs[a:a + 7])])
    req = np.asarray(data.arrays["request"])
    rows = np.concatenate([np.flatnonzero(req == r) for r in range(len(reqs))])
    assert np.abs(online - offline[rows]).max() <= 1e-5


def test_online_v2_pushes_reach_the_served_model_exactly(world, tmp_path):
    with open_store(world.store) as store, open_store(world.store) as served_store:
        online = TransActOnline.from_run(world.run, store)
        assert isinstance(online, OnlineModel)
        served = SyncedTransActRanker.from_run(world.run, served_store)
        assert isinstance(served, SyncedRanker) and served.version == served.run_version
        reqs = _requests(world, served)
        before = np.concatenate([r.probs for r in served.rank(reqs)])
        with OnlineTrainer(CFG, world.log, None, tmp_path / "ckpt", model=online) as trainer:
            for step in range(3):
                stats = trainer.run(max_events=3000)
                assert stats.examples > 0
                applied = served.apply_sync(encode_delta(trainer.delta(), *online.wire_model()))
                assert applied["full"] == (step == 0) and applied["dense"]
                results = served.rank(reqs)
                assert {r.model_version for r in results} == {f"{served.run_version}+v{step + 1}"}
                got = np.concatenate([r.probs for r in results])
                want = _expected(online.model, served, reqs)
                assert np.abs(got - want).max() <= 1e-5
            assert trainer.counters.steps > 0 and sum(len(t.table) for t in online.tables.values()) > 0
        assert np.abs(got - before).max() > 1e-4  # online training moved the served scores
        # A delta that skips a version is refused (409), another model's is malformed (422).
        skipped = trainer_delta = None
        with OnlineTrainer(CFG, world.log, None, tmp_path / "ckpt", model=online) as trainer:
            trainer.run(max_events=500)
            trainer_delta = trainer.delta(full=True)
            trainer.delta()
            skipped = trainer.delta()
        assert served.apply_sync(encode_delta(trainer_delta, *online.wire_model()))["full"]
        with pytest.raises(DataError, match="based on version"):
            served.apply_sync(encode_delta(skipped, *online.wire_model()))
        with pytest.raises(MalformedDelta, match="another model"):
            served.apply_sync(encode_delta(trainer_delta, "transact", {"name": "bst"}))


def test_push_under_concurrent_rank_load_fails_nothing_and_versions_only_grow(world, tmp_path):
    app, version = build_service(world.run, world.store, max_wait_ms=1.0)  # a run with tables: takes pushes
    bodies = eval_requests(world.ds, limit=30)
    responses: dict[int, list[tuple[int, str | None]]] = {seed: [] for seed in range(4)}
    stop = threading.Event()
    with serve_in_thread(app) as url, open_store(world.store) as store:

        def client(seed: int) -> None:
            rng = np.random.default_rng(seed)
            with httpx.Client(base_url=url, timeout=30) as http:
                while not stop.is_set():
                    body = bodies[int(rng.integers(len(bodies)))]
                    r = http.post("/rank", json={k: body[k] for k in ("user_id", "candidates", "surface")})
                    responses[seed].append((r.status_code, r.json().get("model_version")))

        online = TransActOnline.from_run(world.run, store)
        with OnlineTrainer(CFG, world.log, None, tmp_path / "ckpt", model=online) as trainer:
            syncer = Syncer(trainer, url)
            clients = [threading.Thread(target=client, args=(seed,)) for seed in responses]
            for t in clients:
                t.start()
            replies = []
            for _ in range(4):
                trainer.run(max_events=1500)
                replies.append(syncer.sync())
                time.sleep(0.3)
            stop.set()
            for t in clients:
                t.join()
            syncer.close()
    assert all(r.applied for r in replies), [r.error for r in replies]
    codes = [code for seq in responses.values() for code, _ in seq]
    assert len(codes) > 20 and [c for c in codes if c != 200] == []
    for seq in responses.values():
        pushed = [0 if v == version else int(v.rsplit("+v", 1)[1]) for _, v in seq]
        assert all(v.startswith(version) for _, v in seq)
        assert pushed == sorted(pushed)  # monotone per client
    assert len({v for seq in responses.values() for _, v in seq}) >= 3  # served across several pushes
