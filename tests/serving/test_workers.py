"""``lifelong serve --workers N``: N serving processes behind one port, sharing the store.

Two workers answer one port and both serve a burst of requests, each answer naming its worker;
SIGTERM stops every worker; a worker that dies stops the service loudly; a worker that cannot
start is one line; a busy port, a bad count and pushes that would reach one worker only are
refused in one line (before any model loads, or, for a run with id tables, when it loads).
Also the bench's worker ratios.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from lifelong.bench.serve import eval_requests, ratios, render, worker_ratios
from lifelong.cli import app
from lifelong.cli.service import build_service
from lifelong.core.errors import ConfigError
from lifelong.core.processes import free_port
from lifelong.serving.app import WORKER_HEADER

ENV = {"LIFELONG_QUIET": "1", "COLUMNS": "200", "PATH": "/usr/bin:/bin"}
# The test measures the spread over workers, not the load shedder: bounds far above 40 requests.
UNBOUNDED = ["--max-latency-ms", "600000", "--max-queue-examples", "10000000"]


def invoke(*args: str) -> None:
    res = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output


def serve_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lifelong.cli", "serve", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny world, its rows, a TransAct V2 trained for one short epoch, and an LMDB store."""
    d = tmp_path_factory.mktemp("workers")
    invoke("simulate", "--preset", "tiny", "--out", str(d / "w"), "--set", "users.n_users=20")
    invoke("transact", "build", "--data", str(d / "w"), "--out", str(d / "rows"), "--neg-rate", "0.5",
           "--ll-cap", "300")
    invoke("transact", "train", "--data", str(d / "rows"), "--model", "transact_v2", "--out", str(d / "run"),
           "--epochs", "1", "--max-rows", "300")
    invoke("store", "load", "--data", str(d / "rows"), "--store", str(d / "store"))
    return d


def start_workers(served, log, n: int = 2) -> tuple[subprocess.Popen, int, list[int]]:
    """``lifelong serve --workers n``, its port and its workers' pids, once it printed that all serve."""
    port = free_port()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lifelong.cli", "serve", "--run", str(served / "run"),
                                 "--store", str(served / "store"), "--port", str(port), "--workers", str(n),
                                 *UNBOUNDED], stdout=subprocess.DEVNULL, stderr=err, env=ENV)
    deadline = time.monotonic() + 120
    while (banner := re.search(r"with \d+ workers \(pids ([\d, ]+)\)", log.read_text())) is None:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    return proc, port, [int(p) for p in banner.group(1).split(", ")]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_two_workers_serve_one_port_and_stop_on_sigterm(served, tmp_path):
    log = tmp_path / "serve.log"
    proc, port, pids = start_workers(served, log)
    try:
        url = f"http://127.0.0.1:{port}"
        assert len(pids) == 2 and proc.pid not in pids
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["pid"] in pids and ready.json()["worker"] in (0, 1)
        bodies = (eval_requests(served / "rows") * 40)[:40]

        async def burst() -> list[httpx.Response]:  # 40 requests at once, each on a connection of its own
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=40)) as http:
                return await asyncio.gather(*(http.post(f"{url}/rank", json=b) for b in bodies))

        answers = asyncio.run(burst())
        assert [r.status_code for r in answers] == [200] * 40
        named = {r.headers[WORKER_HEADER] for r in answers}
        assert named == {f"0; pid={pids[0]}", f"1; pid={pids[1]}"}  # both workers served the burst
        scrape = httpx.get(f"{url}/metrics", timeout=10)
        index, pid = scrape.headers[WORKER_HEADER].split("; pid=")
        assert f'lifelong_worker_info{{worker="{index}",pid="{pid}"}} 1' in scrape.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGTERM, log.read_text()  # as one uvicorn process ends on SIGTERM
    assert all(gone(p) for p in pids) and "Traceback" not in log.read_text()


def test_a_worker_that_dies_stops_the_service_and_nothing_restarts(served, tmp_path):
    log = tmp_path / "serve.log"
    proc, _, pids = start_workers(served, log)
    try:
        os.kill(pids[1], signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = log.read_text().strip().splitlines()
    assert proc.returncode == 2 and all(gone(p) for p in pids)
    assert lines[-1] == (f"error: worker 1 of 2 (pid {pids[1]}) was killed by SIGKILL while serving; "
                         "the other workers were stopped (nothing is restarted)")


def test_a_worker_that_cannot_start_is_the_one_line_one_process_prints(served, tmp_path):
    res = serve_cli("--run", str(tmp_path / "nope"), "--store", str(served / "store"), "--port", str(free_port()),
                    "--workers", "2")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"error: {tmp_path / 'nope'}: not a finished run (no model.pt)")  # the worker's own line


def test_a_busy_port_is_one_line_before_any_worker_starts(served):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        start = time.monotonic()
        res = serve_cli("--run", str(served / "run"), "--store", str(served / "store"),
                        "--port", str(busy.getsockname()[1]), "--workers", "2")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "already in use" in lines[0], res.stderr
    assert time.monotonic() - start < 20  # no model loaded: the supervisor does not even import torch


@pytest.mark.parametrize(("args", "words"), [
    (["--workers", "0"], "at least 1, got 0"),
    (["--workers", "-2"], "at least 1, got -2"),
    (["--accept-sync", "--workers", "2"], "--accept-sync takes parameter pushes"),
])
def test_bad_worker_counts_and_pushes_to_replicas_are_refused(served, args, words):
    res = serve_cli("--run", str(served / "run"), "--store", str(served / "store"), "--port", str(free_port()), *args)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and words in res.stderr, res.stderr


def test_online_with_workers_is_refused(served):
    res = serve_cli("--online", "--data", str(served / "w"), "--port", str(free_port()), "--workers", "2")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "a push reaches only the one worker" in lines[0], res.stderr


def test_a_run_with_id_tables_takes_pushes_so_a_replica_refuses_it(served, tmp_path):
    invoke("transact", "train", "--data", str(served / "rows"), "--model", "transact_v2", "--out", str(tmp_path / "ids"),
           "--epochs", "1", "--max-rows", "100", "--set", "model.row.tables.item=collisionless")
    build_service(tmp_path / "ids", str(served / "store"))  # one process takes its pushes
    with pytest.raises(ConfigError, match="collision-less id tables .* serve it with --workers 1"):
        build_service(tmp_path / "ids", str(served / "store"), worker=0)


def test_only_a_replica_names_itself(served):
    single, _ = build_service(served / "run", str(served / "store"))
    replica, _ = build_service(served / "run", str(served / "store"), worker=3)
    with TestClient(single) as one, TestClient(replica) as three:
        assert WORKER_HEADER not in one.get("/healthz").headers and "lifelong_worker_info" not in one.get("/metrics").text
        assert one.get("/healthz").json()["worker"] is None and one.get("/healthz").json()["pid"] == os.getpid()
        health = three.get("/healthz")
        assert health.headers[WORKER_HEADER] == f"3; pid={os.getpid()}" and health.json()["worker"] == 3
        assert three.post("/rank", json={"user_id": 1, "candidates": [-1]}).headers[WORKER_HEADER].startswith("3;")


def _step(workers: int, clients: int, examples_per_s: float, p99_ms: float, path: str = "optimized") -> dict:
    return {"path": path, "workers": workers, "concurrency": clients, "requests_per_s": examples_per_s / 10,
            "examples_per_s": examples_per_s, "p50_ms": p99_ms / 2, "p90_ms": p99_ms / 1.5, "p99_ms": p99_ms,
            "errors": 0, "server_errors": 0}


def test_bench_worker_ratios_compare_each_count_with_the_fewest():
    steps = [_step(1, 1, 100.0, 50.0, "naive"), _step(1, 1, 200.0, 20.0), _step(1, 8, 300.0, 80.0),
             _step(2, 1, 210.0, 19.0), _step(2, 8, 540.0, 60.0)]
    w = worker_ratios(steps)
    assert w["baseline_workers"] == 1
    assert [(c["workers"], c["concurrency"], c["throughput"], c["p99"]) for c in w["by_concurrency"]] == [
        (2, 1, pytest.approx(1.05), pytest.approx(0.95)), (2, 8, pytest.approx(1.8), pytest.approx(0.75))]
    assert w["best"][0]["throughput"] == pytest.approx(1.8)
    assert ratios(steps)["best"]["throughput"] == pytest.approx(3.0)  # optimized at 1 worker over naive
    text = render({"steps": steps, "sustained": None, "requests": 2, "mean_candidates": 5.0})
    assert "| optimized | 2 | 8 |" in text and "2 workers over 1 at 8 clients: 1.80x throughput, p99 60.0 vs 80.0 ms" in text
    assert worker_ratios(steps[:3]) == {}  # one worker count: nothing to compare
