"""`lifelong bench … --json FILE`: each command writes its figures there, the ratios it prints included."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lifelong.bench.serve import ratios, render

ENV = {"LIFELONG_QUIET": "1", "COLUMNS": "200", "PATH": "/usr/bin:/bin"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lifelong.cli", "bench", *args], capture_output=True, text=True,
                          env=ENV, timeout=240)


def test_bench_ops_writes_its_figures_and_ratios(tmp_path):
    path = tmp_path / "ops.json"
    res = cli("ops", "--lengths", "64", "--candidates", "8", "--json", str(path))
    assert res.returncode == 0, res.stderr
    doc = json.loads(path.read_text())
    [nn], [enc] = doc["nn_search"], doc["encoder"]
    assert (nn["L"], nn["N"], nn["identical"]) == (64, 8, True)
    assert nn["speedup"] == pytest.approx(nn["naive_ms"] / nn["cpu_ms"])
    assert nn["bytes_ratio"] == pytest.approx(nn["naive_bytes"] / nn["optimized_bytes"]) and nn["bytes_ratio"] > 1
    assert enc["N"] == 8 and enc["speedup"] == pytest.approx(enc["reference_ms"] / enc["cpu_ms"])
    assert f"{nn['speedup']:.1f}x" in res.stdout  # the printed ratio is the one written
    assert doc["torch_threads"] >= 1 and doc["cpu"]


def _step(path: str, clients: int, examples_per_s: float, p99_ms: float) -> dict:
    return {"path": path, "concurrency": clients, "requests_per_s": examples_per_s / 10, "examples_per_s": examples_per_s,
            "p50_ms": p99_ms / 2, "p90_ms": p99_ms / 1.5, "p99_ms": p99_ms, "errors": 0, "server_errors": 0}


def test_bench_serve_json_holds_the_ratios_it_prints():
    steps = [_step("naive", 1, 100.0, 90.0), _step("naive", 4, 120.0, 300.0),
             _step("optimized", 1, 250.0, 30.0), _step("optimized", 4, 480.0, 60.0)]
    r = json.loads(json.dumps(ratios(steps)))  # what run_serve_bench writes under "ratios"
    assert r["best"]["throughput"] == pytest.approx(4.0)  # optimized at 4 clients over naive at 4
    assert [(c["naive_concurrency"], c["throughput"], c["p99"]) for c in r["by_concurrency"]] == [
        (1, pytest.approx(2.5), pytest.approx(1 / 3)), (4, pytest.approx(4.0), pytest.approx(0.2))]
    text = render({"steps": steps, "sustained": None, "requests": 2, "mean_candidates": 5.0})
    assert "4.0x" in text and "at 1 clients: 2.5x throughput, p99 30.0 vs 90.0 ms" in text
    assert ratios(steps[:2]) == {}  # one path only: nothing to compare


def test_bench_serve_takes_json_not_report():
    res = cli("serve", "--help")
    assert res.returncode == 0 and "--json" in res.stdout and "--report" not in res.stdout
