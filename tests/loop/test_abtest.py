"""``lifelong abtest``: random vs oracle on the tiny world, the paired design against the split one,
a served run over HTTP end to end in both designs, a service that dies mid-test, and bad input as
one line with exit status 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from lifelong.cli import app
from lifelong.core.processes import free_port, stop_process

KEYS = ("repin_volume", "hide_volume", "impression_diversity", "time_spent")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lifelong.cli", *args], capture_output=True, text=True,
                          env={"LIFELONG_QUIET": "1", "COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def invoke(*args: str) -> str:
    res = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny preset with 300 users, so that two arms of ~150 users separate oracle from random."""
    d = tmp_path_factory.mktemp("abtest") / "w"
    invoke("simulate", "--preset", "tiny", "--out", str(d), "--set", "users.n_users=300")
    return d


def test_random_vs_oracle_report(world, tmp_path):
    out = tmp_path / "rep"
    start = time.perf_counter()
    res = run_cli("abtest", "--world", str(world), "--arm", "random=random", "--arm", "oracle=oracle",
                  "--days", "3", "--out", str(out), "--stream", str(tmp_path / "stream"))
    assert res.returncode == 0, res.stderr
    assert time.perf_counter() - start < 120
    data = json.loads((out / "report.json").read_text())
    arms = data["arms"]
    assert data["baseline"] == "random" and data["arm_names"] == ["random", "oracle"]
    assert data["design"] == "paired" and arms["random"]["users"] == arms["oracle"]["users"] == 300
    for name in arms:
        assert all(isinstance(arms[name][k], float) for k in KEYS) and arms[name]["complete"]
        assert len(arms[name]["daily"]) == 3
    assert "delta" not in arms["random"]
    for k in KEYS:
        d = arms["oracle"]["delta"][k]
        assert d["ci"][0] <= d["rel"] <= d["ci"][1] and isinstance(d["significant"], bool)
    assert arms["oracle"]["repin_volume"] > arms["random"]["repin_volume"]
    assert arms["oracle"]["hide_volume"] < arms["random"]["hide_volume"]
    assert arms["oracle"]["delta"]["repin_volume"]["significant"]
    assert arms["oracle"]["oracle_lift_fraction"]["repin_volume"] == 1.0
    md = (out / "report.md").read_text()
    assert "| oracle |" in md and "repin volume" in md and "[" in md and "paired design" in md
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    # Paired: each arm's events went to its own stream (the same users act in both arms).
    from lifelong.store.stream import open_stream

    for name, arm in arms.items():
        assert arm["stream"] == f"{tmp_path / 'stream'}-{name}"
        with open_stream(arm["stream"]) as stream:
            assert stream.end_offset() == arm["impressions"]


def _report(world, out, *args: str) -> dict:
    invoke("abtest", "--world", str(world), "--out", str(out), "--bootstrap", "400", *args)
    return json.loads((out / "report.json").read_text())


def test_paired_same_policy_is_exactly_zero(world, tmp_path):
    data = _report(world, tmp_path / "rep", "--arm", "a=random", "--arm", "b=random", "--days", "2",
                   "--users-per-arm", "80")
    b = data["arms"]["b"]
    assert data["design"] == "paired" and data["bootstrap"]["resampling"] == "joint" and b["users"] == 80
    for rows in ([b["delta"]], b["daily_delta"]):
        for row in rows:
            for k in KEYS:
                assert row[k] == {"rel": 0.0, "ci": [0.0, 0.0], "significant": False}


def test_paired_is_tighter_than_split_on_as_many_users(world, tmp_path):
    arms = ("--arm", "random=random", "--arm", "oracle=oracle", "--days", "3", "--users-per-arm", "100")
    paired = _report(world, tmp_path / "paired", *arms)["arms"]
    split = _report(world, tmp_path / "split", *arms, "--design", "split")["arms"]
    assert paired["oracle"]["users"] == split["oracle"]["users"] == split["random"]["users"] == 100
    p, s = paired["oracle"]["delta"]["repin_volume"], split["oracle"]["delta"]["repin_volume"]
    assert p["significant"] and p["rel"] > 0 and p["ci"][0] > 0
    assert p["ci"][1] - p["ci"][0] < s["ci"][1] - s["ci"][0]
    assert (tmp_path / "split" / "report.md").read_text().count("split design") == 1


DYING_SERVICE = """
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
left = [int(sys.argv[2])]
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200); self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data))); self.end_headers(); self.wfile.write(data)
    def do_GET(self): self._send({"status": "ok"})
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        left[0] -= 1
        if left[0] < 0: os._exit(0)  # the service dies mid-test
        self._send({"items": [{"item_id": i, "score": 0.0} for i in reversed(body["candidates"])]})
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_a_service_that_dies_is_reported_not_dropped(world, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", DYING_SERVICE, str(port), "40"])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        out = tmp_path / "rep"
        invoke("abtest", "--world", str(world), "--arm", "base=random", "--arm", f"dying=http://127.0.0.1:{port}",
               "--days", "2", "--out", str(out), "--users-per-arm", "60")
    finally:
        stop_process(proc)
    arms = json.loads((out / "report.json").read_text())["arms"]
    dying = arms["dying"]
    assert arms["base"]["complete"] and arms["base"]["users"] == dying["users"] == 60
    assert not dying["complete"] and 0 < dying["requests"] <= 40 and dying["requests_failed"] > 0
    assert dying["service"]["dead"] and dying["service"]["answered"] == dying["requests"]
    assert "incomplete" in (out / "report.md").read_text()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny world, its rows, a TransAct V2 trained for one short epoch, and an LMDB store."""
    d = tmp_path_factory.mktemp("served")
    invoke("simulate", "--preset", "tiny", "--out", str(d / "w"), "--set", "users.n_users=20")
    invoke("transact", "build", "--data", str(d / "w"), "--out", str(d / "rows"), "--neg-rate", "0.5",
           "--ll-cap", "300")
    invoke("transact", "train", "--data", str(d / "rows"), "--model", "transact_v2", "--out", str(d / "run"),
           "--epochs", "1", "--max-rows", "300")
    invoke("store", "load", "--data", str(d / "rows"), "--store", str(d / "store"))
    return d


@pytest.mark.parametrize("design", ["paired", "split"])
def test_a_served_run_arm_over_http(served, tmp_path, design):
    d, out = served, tmp_path / "rep"
    # Split follows into the store it is given: a copy of its own, so the shared one stays unfollowed.
    store = d / "store" if design == "paired" else tmp_path / "store"
    if design == "split":
        shutil.copytree(d / "store", store)
    invoke("abtest", "--world", str(d / "w"), "--arm", "random=random", "--arm", f"v2={d / 'run'}",
           "--store", str(store), "--stream", str(tmp_path / "stream"), "--days", "2", "--out", str(out),
           "--design", design)
    data = json.loads((out / "report.json").read_text())
    v2 = data["arms"]["v2"]
    assert data["design"] == design
    if design == "paired":  # its own copy of the store, followed from its own stream
        assert v2["store"] == str(d / "store-v2") and (d / "store-v2" / ".abtest-copy").exists()
        assert v2["stream"] == f"{tmp_path / 'stream'}-v2" and all(f["arm"] == "v2" for f in data["followed"])
        assert data["arms"]["random"]["users"] == v2["users"] == 20
    assert v2["kind"] == "run" and v2["complete"] and v2["requests"] > 0
    assert v2["service"]["answered"] == v2["service"]["sent"] == v2["requests"]
    assert all(k in v2 for k in KEYS) and "repin_volume" in v2["delta"]
    # The real-time consumer appended each day's events to the store between days.
    assert len(data["followed"]) == 2 and data["followed"][0]["events"] > 0
    assert "serving" in (out / "serve-v2.log").read_text()
    if design == "split":  # the followed store now holds this test's events: a new test must not read them
        res = run_cli("abtest", "--world", str(d / "w"), "--arm", "random=random", "--arm", f"v2={d / 'run'}",
                      "--store", str(store), "--stream", str(tmp_path / "stream2"), "--days", "1", "--out",
                      str(tmp_path / "rep2"), "--design", "split")
        assert res.returncode == 2 and "already holds real-time appends" in res.stderr
        assert "Traceback" not in res.stderr


def test_an_online_arm_trains_from_its_stream_and_pushes_after_every_window(served, tmp_path):
    """``online:RUN``: served with --accept-sync, trained by Monolith's online trainer from the arm's
    own stream after each window of simulated time, each push applied before the next window."""
    d, out = served, tmp_path / "rep"
    store = tmp_path / "store"
    shutil.copytree(d / "store", store)
    invoke("abtest", "--world", str(d / "w"), "--arm", f"frozen={d / 'run'}", "--arm", f"online=online:{d / 'run'}",
           "--store", str(store), "--stream", str(tmp_path / "stream"), "--days", "2", "--window-minutes", "60",
           "--out", str(out), "--bootstrap", "200")
    data = json.loads((out / "report.json").read_text())
    frozen, online = data["arms"]["frozen"], data["arms"]["online"]
    assert data["window_minutes"] == 60 and online["kind"] == "online" and frozen["kind"] == "run"
    assert frozen["complete"] and online["complete"] and online["requests"] > 0
    learner = online["learner"]
    assert learner["examples"] > 0 and learner["pushes"] > 1 and learner["pushes_applied"] == learner["pushes"]
    assert learner["last_version"] == learner["pushes"]  # every push followed the one before
    assert "learner" not in frozen
    # The consumer followed each arm's store after every window: one entry per arm and day.
    assert sorted((f["arm"], f["day"]) for f in data["followed"]) == sorted(
        (a, day) for a in ("frozen", "online") for day in data["days"])
    assert any((out / "online-online").glob("ckpt-*"))  # the learner checkpointed when the test ended
    md = (out / "report.md").read_text()
    assert "Online arms" in md and "pushes applied" in md


@pytest.mark.parametrize("args, message", [
    (("--arm", "a=random", "--arm", "b=nothing-here"), "unknown SPEC 'nothing-here'"),
    (("--arm", "a=random", "--arm", "b=oracle", "--days", "9999"), "can be simulated up to day"),
    (("--arm", "a=random", "--arm", "b={run}"), "give --store"),
    (("--arm", "a=random"), "at least two --arm"),
    (("--arm", "a=random", "--arm", "b=oracle", "--design", "both"), "--design must be one of paired, split"),
    (("--arm", "a=random", "--arm", "b={run}", "--store", "redis://127.0.0.1:1/0", "--stream", "{run}/s"),
     "a Redis store (redis://127.0.0.1:1/0) cannot be copied"),
    (("--arm", "a=random", "--arm", "b=online:{run}", "--store", "{run}/st"), "learns online from its own users"),
    (("--arm", "a=random", "--arm", "b=oracle", "--window-minutes", "0"), "--window-minutes must be in (0, 1440]"),
])
def test_bad_input_is_one_line_and_exit_2(world, tmp_path, args, message):
    run = tmp_path / "run"  # looks like a run directory; never served: the missing --store stops the test first
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "model.pt").write_bytes(b"")
    args = tuple(a.format(run=run) for a in args)
    days = () if "--days" in args else ("--days", "1")
    res = run_cli("abtest", "--world", str(world), *args, *days, "--out", str(tmp_path / "rep"))
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "rep").exists()


def test_a_world_without_an_oracle_exits_2(tiny_dataset, tmp_path):
    res = run_cli("abtest", "--world", str(tiny_dataset), "--arm", "a=random", "--arm", "b=oracle", "--days", "1",
                  "--out", str(tmp_path / "rep"))
    assert res.returncode == 2 and "not a simulated world with an oracle" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
