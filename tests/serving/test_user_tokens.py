"""Serving TransAct V2 with DV365 user tokens: each batch reads its users' exported embeddings.

Train/serve parity on both paths, the training's fallback for users the export lacks, a new
export served without a restart, and ``lifelong serve`` of a ``--user-emb`` run over HTTP.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch

from lifelong.bench.serve import eval_requests
from lifelong.core.errors import ConfigError, StoreUnavailable
from lifelong.core.processes import free_port, stop_process
from lifelong.data.protocol import DAY_MS
from lifelong.data.schema import SURFACE_CODES
from lifelong.data.world import load_config, simulate_to
from lifelong.dv365.export import ExportConfig, export_embeddings
from lifelong.store.embeddings import EmbeddingReader
from lifelong.store.feature_store import load_store, open_store
from lifelong.transact.rank_data import RankData
from lifelong.transact.sequence_layout import SequenceLayout
from lifelong.transact.serving import Ranker, RankRequest
from lifelong.transact.trainer import TrainConfig, load_model, predict, train
from lifelong.transact.training_rows import BuildConfig, build_rows
from tests.dv365.export_support import DIM, ROWS, FakeTower

T0 = 100 * DAY_MS


def _users(root) -> np.ndarray:
    return np.unique(np.concatenate([np.load(root / "ds" / s / "user_id.npy") for s in ("train", "eval")]))


def _missing(root) -> int:
    """The user the exports lack: the eval split's first."""
    return int(np.load(root / "ds" / "eval" / "user_id.npy").min())


def _export(root, store, as_of_ms: int) -> None:
    """FakeTower embeddings of every user but :func:`_missing` (the one served the fallback)."""
    users = _users(root)
    export_embeddings(FakeTower(), root / "world", store, as_of_ms, ExportConfig(),
                      user_ids=users[users != _missing(root)])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny world, its rows, an export lacking one user, a TransAct V2 trained on it, and a feature store."""
    root = tmp_path_factory.mktemp("svc_tokens")
    simulate_to(load_config("tiny", overrides=["users.n_users=16"]), root / "world")
    build_rows(root / "world", root / "ds", BuildConfig(layout=SequenceLayout(8, 8, 4, 4), ll_cap=40, imp_cap=10,
                                                        nal_negatives=6))
    _export(root, f"lmdb://{root / 'emb'}", T0)
    torch.set_num_threads(1)
    train(root / "ds", root / "run", TrainConfig(model="transact_v2", nal="impression", epochs=1, max_rows=300,
                                                 batch_size=128, user_emb=f"lmdb://{root / 'emb'}"), log=lambda s: None)
    load_store(root / "ds", str(root / "store"), progress=False)
    return root


def _requests(root, data: RankData, ranker: Ranker) -> tuple[list[RankRequest], np.ndarray]:
    """The eval split's requests, and the row order their candidates come in."""
    req = np.asarray(data.arrays["request"])
    reqs, rows = [], []
    for r, body in enumerate(eval_requests(root / "ds")):
        items, unknown = ranker.item_rows(np.array(body["candidates"]))
        assert unknown.size == 0
        reqs.append(RankRequest(body["user_id"], items, SURFACE_CODES[body["surface"]], body["request_time"]))
        rows.append(np.flatnonzero(req == r))
    return reqs, np.concatenate(rows)


def _serve(ranker: Ranker, reqs: list[RankRequest]) -> tuple[np.ndarray, set]:
    """Probabilities of ``reqs`` in batches of 7 requests, and the embedding versions named."""
    results = [res for a in range(0, len(reqs), 7) for res in ranker.rank(reqs[a:a + 7])]
    return np.concatenate([r.probs for r in results]), {r.user_emb_version for r in results}


@pytest.mark.parametrize("path", ["optimized", "naive"])
def test_served_scores_equal_offline_scores_with_the_same_embeddings(served, path):
    net, _ = load_model(served / "run")
    assert net.abilities.user_tokens and net.abilities.token_table
    data = RankData(served / "ds", "eval", user_emb=f"lmdb://{served / 'emb'}")
    offline = predict(net, data)
    with open_store(str(served / "store")) as store, EmbeddingReader(f"lmdb://{served / 'emb'}") as emb:
        ranker = Ranker(net, store, path=path, user_emb=emb)
        reqs, rows = _requests(served, data, ranker)
        online, versions = _serve(ranker, reqs)
    assert versions == {1} and ranker.user_emb_version == 1
    assert online.shape == offline[rows].shape
    assert np.abs(online - offline[rows]).max() <= 1e-5


def test_a_user_the_export_lacks_gets_the_training_fallback(served):
    """A user without an embedding: training read zeros for it, and so does serving (both paths)."""
    net, _ = load_model(served / "run")
    missing = _missing(served)
    data = RankData(served / "ds", "eval", user_emb=f"lmdb://{served / 'emb'}")
    rows_of_missing = np.flatnonzero(np.asarray(data.arrays["user_id"]) == missing)
    assert rows_of_missing.size and bool((data.batch(rows_of_missing).user_emb == 0).all())
    offline = predict(net, data)
    with open_store(str(served / "store")) as store, EmbeddingReader(f"lmdb://{served / 'emb'}") as emb:
        opt, naive = Ranker(net, store, user_emb=emb), Ranker(net, store, path="naive", user_emb=emb)
        reqs, rows = _requests(served, data, opt)
        mine = [k for k, r in enumerate(reqs) if r.user_id == missing]
        want = np.concatenate([offline[np.flatnonzero(np.asarray(data.arrays["request"]) == k)] for k in mine])
        for ranker in (opt, naive):
            got = np.concatenate([r.probs for r in ranker.rank([reqs[k] for k in mine])])
            assert np.abs(got - want).max() <= 1e-5
        # A user unknown to both stores: cold start, fallback embedding, the same on both paths.
        cold = [RankRequest(10**12, np.arange(4), 1, None)]
        a, b = opt.rank(cold)[0], naive.rank(cold)[0]
    assert a.cold_start and b.cold_start and a.user_emb_version == 1
    assert np.abs(a.probs - b.probs).max() <= 1e-5


def test_a_new_export_is_served_from_the_next_batch_without_a_restart(served, tmp_path):
    net, _ = load_model(served / "run")
    url = f"lmdb://{tmp_path / 'live'}"
    with open_store(url, writable=True) as live:  # the exporter's store, shared in this process
        _export(served, live, T0)
        reader = EmbeddingReader(live)
        with open_store(str(served / "store")) as store:
            opt, naive = Ranker(net, store, user_emb=reader), Ranker(net, store, path="naive", user_emb=reader)
            data = RankData(served / "ds", "eval")
            reqs, rows = _requests(served, data, opt)
            before, v1 = _serve(opt, reqs)
            _export(served, live, T0 + 2 * DAY_MS)  # version 2, while serving
            after, v2 = _serve(opt, reqs)
            after_naive, _ = _serve(naive, reqs)
            assert (v1, v2) == ({1}, {2}) and opt.readiness() == (True, "ok")
    assert np.abs(after - before).max() > 1e-4  # the new embeddings changed the scores
    assert np.abs(after - after_naive).max() <= 1e-5
    offline = predict(net, RankData(served / "ds", "eval", user_emb=url))  # version 2, read offline
    assert np.abs(after - offline[rows]).max() <= 1e-5


def test_the_export_store_is_required_checked_and_failures_are_503s(served, tmp_path):
    net, _ = load_model(served / "run")
    with open_store(str(served / "store")) as store:
        with pytest.raises(ConfigError, match="give the export store"):
            Ranker(net, store)
        with EmbeddingReader(f"lmdb://{served / 'emb'}") as emb:
            import dataclasses

            from lifelong.transact.model import TransAct

            no_tokens = TransAct(dataclasses.replace(net.cfg, user_tokens=None))
            with pytest.raises(ConfigError, match="drop --user-emb"):
                Ranker(no_tokens, store, user_emb=emb)
            other_shape = TransAct(dataclasses.replace(net.cfg, user_tokens=(ROWS, DIM + 1)))
            with pytest.raises(ConfigError, match=f"holds {ROWS} x {DIM} embeddings"):
                Ranker(other_shape, store, user_emb=emb)
        url = f"lmdb://{tmp_path / 'later'}"
        with open_store(url, writable=True) as later:
            _export(served, later, T0)
            ranker = Ranker(net, store, user_emb=EmbeddingReader(later))
            later.delete_prefix(b"dv365:")  # the export store emptied while serving
            with pytest.raises(StoreUnavailable, match="no DV365 embeddings"):
                ranker.rank([RankRequest(1, np.arange(3), 0, None)])
            ranker._health = (True, "ok", 0.0)  # the readiness probe's cache expired
            ok, reason = ranker.readiness()
            assert not ok and "no DV365 embeddings" in reason


def test_lifelong_serve_of_a_user_emb_run_answers_curl(served):
    """``lifelong serve --run RUN --store URL``: the export store comes from run.json."""
    curl = shutil.which("curl")
    port = free_port()
    cmd = [sys.executable, "-c", "from lifelong.cli import main; main()", "serve", "--run", str(served / "run"),
           "--store", str(served / "store"), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, ready = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1.0)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert ready is not None, proc.stderr.read() if proc.poll() is not None else "no answer in 60 s"
        assert ready.status_code == 200 and ready.json()["user_emb_version"] == 1, ready.text
        items = np.load(served / "ds" / "items" / "item_id.npy")[:5].tolist()
        body = json.dumps({"user_id": int(_users(served)[-1]), "candidates": items, "surface": "homefeed"})
        url = f"http://127.0.0.1:{port}/rank"
        if curl is not None:
            out = subprocess.run([curl, "-s", "-f", url, "-H", "content-type: application/json", "-d", body],
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            answer = json.loads(out.stdout)
        else:  # the same request without curl
            answer = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30).json()
        assert answer["user_emb_version"] == 1 and answer["store_version"] == "v1"
        assert sorted(it["item_id"] for it in answer["items"]) == sorted(items)
    finally:
        stop_process(proc)


def test_online_training_of_a_token_run_reaches_the_served_model_exactly(served, tmp_path):
    """The one model: a run with DV365 user tokens, trained online from the stream (each example's
    embedding read from the export its service reads) and pushed into the served optimized path
    of ``lifelong serve --accept-sync``'s ranker: served scores equal the trainer's model."""
    from lifelong.cli.service import build_service
    from lifelong.monolith.joiner import JoinerConfig
    from lifelong.monolith.online import OnlineConfig, OnlineTrainer
    from lifelong.serving.sync import encode_delta
    from lifelong.store.stream import LogStream, replay
    from lifelong.transact.online import SyncedTransActRanker, TransActOnline

    cfg = OnlineConfig(joiner=JoinerConfig(window_ms=30 * 60_000), read_records=512, batch_size=128,
                       checkpoint_every=10**9, delta_format="fp32", dense_every=1, optimizer="adam", lr=1e-3)
    log = LogStream(tmp_path / "log")
    replay(served / "world", log)
    emb = f"lmdb://{served / 'emb'}"
    with open_store(str(served / "store")) as store, open_store(str(served / "store")) as served_store:
        online = TransActOnline.from_run(served / "run", store)  # the export store named by run.json
        assert online.features.user_emb is not None
        with EmbeddingReader(emb) as reader:
            ranker = SyncedTransActRanker.from_run(served / "run", served_store, user_emb=reader)
            reqs, _ = _requests(served, RankData(served / "ds", "eval"), ranker)
            before, _ = _serve(ranker, reqs)
            with OnlineTrainer(cfg, log, None, tmp_path / "ckpt", model=online) as trainer:
                stats = trainer.run(max_events=3000, checkpoint=False)
                assert stats.steps > 0 and not any((tmp_path / "ckpt").glob("ckpt-*"))  # no checkpoint asked
                ranker.apply_sync(encode_delta(trainer.delta(), *online.wire_model()))
                got, versions = _serve(ranker, reqs)
                online.model.eval()
                with torch.no_grad():
                    want = torch.sigmoid(online.model(ranker.gather_batch(reqs)).logits).numpy()
        assert versions == {1} and {r.model_version for r in ranker.rank(reqs[:2])} == {f"{ranker.run_version}+v1"}
        assert np.abs(got - want).max() <= 1e-5 and np.abs(got - before).max() > 1e-4
        # The gathered rows carry each user's exported embedding (the training fallback for one without).
        rows = ranker.gather_batch(reqs[:3])
        assert rows.user_emb is not None and rows.user_emb.shape[0] == sum(len(r.items) for r in reqs[:3])
    log.close()
    app, _ = build_service(served / "run", str(served / "store"), accept_sync=True)  # pushes and tokens together
    assert app is not None
