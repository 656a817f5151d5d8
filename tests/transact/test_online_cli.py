"""`lifelong monolith online --model-run RUN --store URL --serve URL` end to end: a TransAct V2 run
trained online from the stream, in its own process, pushing to a real `lifelong serve --run RUN
--store URL --accept-sync` process, while a client ranks without a single failed request and
sees the served version only grow; and its refusal of a directory that is not a run (exit 2)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import torch

from lifelong.bench.serve import eval_requests
from lifelong.core.processes import free_port, start_server, stop_process
from lifelong.data.world import load_config, simulate_to
from lifelong.store.feature_store import load_store
from lifelong.transact.sequence_layout import SequenceLayout
from lifelong.transact.trainer import build_train_config, train
from lifelong.transact.training_rows import BuildConfig, build_rows

ENV = {"LIFELONG_QUIET": "1", "COLUMNS": "200", "PATH": "/usr/bin:/bin"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny world, its rows, a short TransAct V2 run with collision-less user and item tables, its LMDB store
    (what `simulate`, `transact build`, `transact train` and `store load` write, in-process to save time)."""
    root = tmp_path_factory.mktemp("online_cli")
    simulate_to(load_config("tiny", overrides=["users.n_users=20"]), root / "world")
    build_rows(root / "world", root / "ds", BuildConfig(layout=SequenceLayout(ll_nn=8, rt=8, rt_nn=4, imp_nn=4),
                                                        ll_cap=40, imp_cap=10))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = build_train_config({"model": "transact_v2", "epochs": 1, "max_rows": 300, "batch_size": 128},
                                 ["model.row.tables.item=collisionless", "model.row.tables.user=collisionless"])
        train(root / "ds", root / "run", cfg, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    store = f"lmdb://{root / 'store'}"
    load_store(root / "ds", store, progress=False)
    return SimpleNamespace(root=root, dir=root / "world", ds=root / "ds", run=root / "run", store=store)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lifelong.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def test_online_v2_job_pushes_to_a_live_service_that_never_fails_a_request(world, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(port, ["--run", str(world.run), "--store", world.store, "--accept-sync"],
                          log=tmp_path / "serve.log")
    bodies = [{k: b[k] for k in ("user_id", "candidates", "surface")} for b in eval_requests(world.ds, limit=20)]
    seen: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            i = 0
            while not stop.is_set():
                try:
                    r = http.post("/rank", json=bodies[i % len(bodies)])
                    seen.append((r.status_code, r.json()["model_version"] if r.status_code == 200 else r.text))
                except httpx.HTTPError as exc:  # a failed request, not a dead poller
                    seen.append((-1, repr(exc)))
                i += 1
                time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    try:
        with httpx.Client(base_url=url) as http:
            run_version = http.get("/healthz").json()["model_version"]
        assert run_version and "+v" not in run_version
        poller.start()
        while len(seen) < 3 and poller.is_alive():  # answers before the job starts
            time.sleep(0.05)
        before = len(seen)
        res = run_cli("monolith", "online", "--data", str(world.dir), "--ckpt", str(tmp_path / "ckpt"),
                      "--model-run", str(world.run), "--store", world.store, "--serve", url,
                      "--sync-every", "0.5", "--last-days", "1", "--speedup", "30000", "--batch-size", "128",
                      "--delta-format", "fp32")  # paced over ~3 s: several pushes
        during = len(seen) - before
        time.sleep(0.3)  # answers after it
        stop.set()
        poller.join(timeout=30)
        after = len(seen) - before - during
        with httpx.Client(base_url=url) as http:
            final = http.get("/healthz").json()["model_version"]
    finally:
        stop.set()
        stop_process(server)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    applied, pushes = (int(n) for n in res.stdout.split(" pushes applied")[0].rsplit(";", 1)[1].split(" of "))
    assert 1 <= applied == pushes, res.stdout
    served = int(res.stdout.split("serving v")[1].split(";")[0])
    assert final == f"{run_version}+v{served}"
    assert "sync v1: full" in res.stderr
    assert before >= 3 and during > 0 and after > 0  # answers before, during and after the job
    assert [(code, body) for code, body in seen if code != 200] == []  # zero failed requests
    versions = [0 if v == run_version else int(v.removeprefix(f"{run_version}+v")) for _, v in seen]
    assert versions[0] == 0 and versions[-1] == served and len(set(versions)) >= 2  # the run's, then pushed
    assert versions == sorted(versions)  # never decreases


def test_model_run_that_is_not_a_run_exits_2(world, tmp_path):
    (tmp_path / "not-a-run").mkdir()
    res = run_cli("monolith", "online", "--data", str(world.dir), "--ckpt", str(tmp_path / "ckpt"),
                  "--model-run", str(tmp_path / "not-a-run"), "--store", world.store)
    assert res.returncode == 2 and "not a finished run (no model.pt)" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ckpt").exists()  # refused before anything is written
