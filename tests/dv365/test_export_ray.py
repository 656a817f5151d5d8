"""`lifelong dv365 export --engine ray`: the batches of users embedded as Ray tasks give the same
records as the single-process export; a bad engine or an unreachable cluster writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lifelong.core.engines import map_ray
from lifelong.data.protocol import DAY_MS
from lifelong.dv365.export import POINTER_KEY, ExportConfig, export_embeddings, version_prefix
from lifelong.store.feature_store import open_store, user_key
from tests.dv365.export_support import FakeTower

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
USERS = np.arange(1, 12)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module; its workers import the fake tower from tests/ as the driver does."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


def _records(url: str) -> list[bytes]:
    """The served version's record of every user, in order."""
    with open_store(url) as store, store.reader() as r:
        version = json.loads(bytes(r.values([POINTER_KEY])[0]))["version"]
        return [bytes(v) for v in r.values([version_prefix(version) + user_key(u) for u in USERS.tolist()])]


def test_ray_export_writes_the_local_exports_records(local_ray, tmp_path):
    cfg = ExportConfig(batch_users=4)  # 11 users: three batches, three Ray tasks
    urls = {name: f"lmdb://{tmp_path / name}" for name in ("local", "ray")}
    local = export_embeddings(FakeTower(), tmp_path, urls["local"], 100 * DAY_MS, cfg, user_ids=USERS)
    done = []
    on_ray = export_embeddings(FakeTower(), tmp_path, urls["ray"], 100 * DAY_MS, cfg, user_ids=USERS,
                               on_batch=done.append, shard_map=map_ray)
    assert done == [4, 8, 11]
    assert (on_ray.users, on_ray.rows, on_ray.dim, on_ray.bytes_per_user) == (local.users, local.rows, local.dim, local.bytes_per_user)
    assert _records(urls["ray"]) == _records(urls["local"])
    assert all(_records(urls["ray"]))


@pytest.mark.parametrize(("flags", "message"), [
    (["--engine", "ray", "--ray-address", "127.0.0.1:1"], "no Ray cluster answers"),
    (["--engine", "spark"], "engine must be one of local, ray"),
])
def test_bad_engine_or_unreachable_cluster_is_one_line_and_writes_nothing(tmp_path, flags, message):
    store = tmp_path / "emb"
    res = subprocess.run([sys.executable, "-m", "lifelong.cli", "dv365", "export", "--run", str(tmp_path / "run"),
                          "--data", str(tmp_path), "--as-of-ms", "0", "--store", f"lmdb://{store}", *flags],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not store.exists()
