"""The HTTP contract matches the behaviour: schemathesis, all checks, against a real uvicorn server.

Every status ``/rank``, ``/healthz``, ``/readyz`` and ``/metrics`` return must be in
``/openapi.json`` with a body of the documented schema, every value the schema allows must be
accepted and every value outside it refused with a 4xx (never a 5xx). Three statuses are
configured rather than assumed, each documented in the schema:

- a schema-valid request naming item ids the catalog does not hold is 422 (``unknown_items``:
  the ids cannot be listed in the schema);
- more candidates than ``maxItems`` is 413;
- a client's own ``timeout_ms`` (1 ms and up is valid) that passes before its request is scored
  is 504, the one 5xx allowed: the request was dropped unscored, as promised.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lifelong.bench.serve import serve_in_thread
from lifelong.cli.service import build_service
from lifelong.data.world import load_config, simulate_to
from lifelong.store.feature_store import load_store
from lifelong.transact.sequence_layout import SequenceLayout
from lifelong.transact.trainer import TrainConfig, train
from lifelong.transact.training_rows import BuildConfig, build_rows

pytest.importorskip("schemathesis", reason="the contract test needs schemathesis (pip install -e '.[dev]')")

CONFIG = """
[checks]
not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "504"]
positive_data_acceptance.expected-statuses = ["2xx", "422", "504"]
negative_data_rejection.expected-statuses = ["400", "413", "422"]
"""


@pytest.fixture(scope="module")
def live_url(tmp_path_factory):
    """A real uvicorn server on 127.0.0.1 over a tiny TransAct V2 run and its LMDB store."""
    root = tmp_path_factory.mktemp("contract")
    simulate_to(load_config("tiny", overrides=["users.n_users=30"]), root / "world")
    build_rows(root / "world", root / "ds", BuildConfig(layout=SequenceLayout(ll_nn=8, rt=8, rt_nn=4, imp_nn=4),
                                                        ll_cap=40, imp_cap=10, nal_negatives=6))
    torch.set_num_threads(1)
    train(root / "ds", root / "v2", TrainConfig(model="transact_v2", nal="impression", epochs=1, max_rows=200,
                                                batch_size=128))
    load_store(root / "ds", str(root / "store"), progress=False)
    app, _ = build_service(root / "v2", str(root / "store"), max_candidates=50, max_latency_ms=5000)
    with serve_in_thread(app) as url:
        yield url


def test_the_server_keeps_its_openapi_contract(live_url, tmp_path):
    """``schemathesis run`` (every phase and check, a bounded number of cases) reports no failure."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{live_url}/openapi.json",
           "--checks", "all", "--max-examples", "100", "--workers", "1", "--request-timeout", "10",
           "--generation-deterministic", "--no-color"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
