"""`lifelong bench serve-features` on a tiny world: all four variants (`user_tokens+pushes` included) served by a
real `lifelong serve`, pushes applied during the load, versions monotone per client, the JSON report; its refusals
of bad input (exit 2); and a service that refuses to start stopping the run with its reason."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lifelong.data.protocol import DAY_MS
from lifelong.data.world import load_config, simulate_to
from lifelong.dv365.export import ExportConfig, export_embeddings
from lifelong.store.feature_store import load_store
from lifelong.transact.sequence_layout import SequenceLayout
from lifelong.transact.trainer import TrainConfig, train
from lifelong.transact.training_rows import BuildConfig, build_rows
from tests.dv365.export_support import FakeTower

ENV = {"LIFELONG_QUIET": "1", "COLUMNS": "200", "PATH": "/usr/bin:/bin"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny world, its rows and LMDB store, a FakeTower DV365 export, and two short TransAct V2 runs:
    one plain, one with user tokens (in-process, as the commands would write them)."""
    root = tmp_path_factory.mktemp("serve_features")
    simulate_to(load_config("tiny", overrides=["users.n_users=16"]), root / "world")
    build_rows(root / "world", root / "ds", BuildConfig(layout=SequenceLayout(ll_nn=8, rt=8, rt_nn=4, imp_nn=4),
                                                        ll_cap=40, imp_cap=10))
    users = np.unique(np.concatenate([np.load(root / "ds" / s / "user_id.npy") for s in ("train", "eval")]))
    emb = f"lmdb://{root / 'emb'}"
    export_embeddings(FakeTower(), root / "world", emb, 100 * DAY_MS, ExportConfig(), user_ids=users)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, user_emb in (("run", None), ("token_run", emb)):
            train(root / "ds", root / name, TrainConfig(model="transact_v2", nal="none", epochs=1, max_rows=300,
                                                        batch_size=128, user_emb=user_emb), log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    store = f"lmdb://{root / 'store'}"
    load_store(root / "ds", store, progress=False)
    return SimpleNamespace(ds=root / "ds", run=root / "run", token_run=root / "token_run", emb=emb, store=store)


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lifelong.cli", "bench", "serve-features", *args],
                          capture_output=True, text=True, env=ENV, timeout=240)


def test_every_variant_is_served_and_compared_to_plain(world, tmp_path):
    report = tmp_path / "features.json"
    res = bench("--run", str(world.run), "--token-run", str(world.token_run), "--user-emb", world.emb,
                "--store", world.store, "--data", str(world.ds), "--concurrency", "1", "--seconds", "1",
                "--warmup", "0.5", "--push-every", "0.3", "--json", str(report))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    result = json.loads(report.read_text())
    steps = {s["variant"]: s for s in result["steps"]}
    assert result["variants"] == list(steps) == ["plain", "user_tokens", "pushes", "user_tokens+pushes"]
    assert "skipped" not in result
    assert result["failures"] == []
    for name, s in steps.items():
        assert s["concurrency"] == 1 and s["requests"] > 0 and s["errors"] == 0, s
        assert s["versions_monotone"], s
        assert s["throughput_ratio"] > 0 and s["p99_ratio"] > 0
        assert (s["pushes"] is not None) == name.endswith("pushes")
    assert steps["plain"]["throughput_ratio"] == pytest.approx(1.0) and steps["plain"]["p99_ratio"] == pytest.approx(1.0)
    assert steps["plain"]["versions_distinct"] == 1
    for name in ("pushes", "user_tokens+pushes"):
        pushes = steps[name]["pushes"]
        assert 1 <= pushes["applied"] == pushes["sent"] and pushes["push_ms"] > 0 and pushes["apply_ms"] >= 0, name
        assert steps[name]["versions_distinct"] >= 2, name  # answers scored with pushed parameters
    for name in steps:
        assert f"| {name} | 1 |" in res.stdout
    assert "checks: every /rank answer 200" in res.stdout and "skipped" not in res.stdout


@pytest.mark.parametrize(("args", "message"), [
    (lambda w, tmp: ["--run", str(w.run), "--token-run", str(w.token_run)], "--token-run needs --user-emb URL"),
    (lambda w, tmp: ["--run", str(tmp / "missing")], "not a finished run (no model.pt)"),
    (lambda w, tmp: ["--run", str(w.token_run)], "reads DV365 user tokens: give it as --token-run"),
], ids=["token-run-without-user-emb", "no-run", "token-run-as-run"])
def test_bad_input_is_one_line_and_exit_2(world, tmp_path, args, message):
    res = bench(*args(world, tmp_path), "--store", world.store, "--data", str(world.ds))
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_a_refused_service_is_a_config_error_and_other_failures_stay_errors(monkeypatch, tmp_path):
    """A variant's service that refuses its command line (exit 2, one error line) stops the run with its reason,
    whichever the variant; a service that broke stays a RuntimeError."""
    from lifelong.bench import serve_features
    from lifelong.core.errors import ConfigError

    def refusing(port, args, log=None):
        raise RuntimeError("lifelong serve exited with 2: Usage: ...\nerror: --user-emb lmdb://x: no such store\n")

    monkeypatch.setattr(serve_features, "start_server", refusing)
    with pytest.raises(ConfigError) as refused:
        serve_features._start("user_tokens+pushes", 1, [], tmp_path / "log")
    assert str(refused.value) == ("lifelong serve refused the user_tokens+pushes variant: "
                                  "--user-emb lmdb://x: no such store")

    def crashing(port, args, log=None):
        raise RuntimeError("lifelong serve exited with 1: Traceback ...")

    monkeypatch.setattr(serve_features, "start_server", crashing)
    with pytest.raises(RuntimeError, match="exited with 1"):
        serve_features._start("user_tokens+pushes", 1, [], tmp_path / "log")
