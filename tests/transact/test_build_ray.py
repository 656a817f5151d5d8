"""`lifelong transact build --engine ray`: Ray tasks over chunks of users' requests write the same
rows as the single-process engine; a bad engine or an unreachable cluster is one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lifelong.data.world import load_config, simulate_to
from lifelong.transact.training_rows import BuildConfig, build_rows

ray = pytest.importorskip("ray")

# Small chunks, so that each split is several shards, hence several Ray tasks to merge in order.
CFG = BuildConfig(ll_cap=200, imp_cap=20, request_chunk=32)
ENV = {**os.environ, "COLUMNS": "200"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("w") / "tiny"
    simulate_to(load_config("tiny", overrides=["users.n_users=16"]), out)
    return out


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (ray.init is slow); build_rows reuses it and leaves it running."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _timeless(meta: dict) -> dict:
    meta = {k: v for k, v in meta.items() if k != "seconds"}
    meta["splits"] = {s: {k: v for k, v in m.items() if k not in ("seconds", "rows_per_s")}
                      for s, m in meta["splits"].items()}
    return meta


def test_ray_engine_writes_the_local_engines_rows(world, local_ray, tmp_path):
    build_rows(world, tmp_path / "local", CFG)
    build_rows(world, tmp_path / "ray", CFG, engine="ray")
    assert ray.is_initialized()  # the module's Ray was reused, not shut down
    files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*.npy"))
    assert files == sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*.npy"))
    assert {f.parts[0] for f in files} == {"items", "train", "eval"}
    n_req = np.load(tmp_path / "local" / "train" / "req_id.npy").size
    assert n_req > 2 * CFG.request_chunk  # the split really was cut into shards
    for f in files:
        assert (tmp_path / "local" / f).read_bytes() == (tmp_path / "ray" / f).read_bytes(), f
    meta = [json.loads((tmp_path / d / "build.json").read_text()) for d in ("local", "ray")]
    assert _timeless(meta[0]) == _timeless(meta[1])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lifelong.cli", "transact", "build", *args],
                          capture_output=True, text=True, env=ENV, timeout=120)


@pytest.mark.parametrize(("flags", "message"), [
    (["--engine", "ray", "--ray-address", "127.0.0.1:1"], "no Ray cluster answers"),
    (["--engine", "spark"], "engine must be one of local, ray"),
])
def test_bad_engine_or_unreachable_cluster_is_one_line_and_writes_nothing(world, tmp_path, flags, message):
    res = _cli("--data", str(world), "--out", str(tmp_path / "ds"), *flags)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "ds").exists() and list(tmp_path.iterdir()) == []


def test_the_local_engine_and_the_cli_never_import_ray():
    code = "import sys, lifelong.cli, lifelong.transact.training_rows; print('ray' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
