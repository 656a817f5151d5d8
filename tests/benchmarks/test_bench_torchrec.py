"""The TorchRec comparison's --dry-run: both halves on a tiny synthetic stream (the TorchRec half only if installed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_torchrec.py"
HAS_TORCHREC = importlib.util.find_spec("torchrec") is not None


def test_dry_run_writes_every_variant(tmp_path):
    out_json = tmp_path / "torchrec.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json", str(out_json)], capture_output=True,
                         text=True, timeout=300, check=True)
    report = json.loads(out_json.read_text())
    names = set(report["quality"])
    assert {"collision-less", "modulo x 1"} <= names
    assert all(0.0 <= r["auc"] <= 1.0 for r in report["quality"].values())
    if HAS_TORCHREC:
        assert report["torchrec_error"] is None
        assert {"torchrec MCH x 1", "torchrec MCH x 0.5"} <= names
        # At f = 1 TorchRec holds exactly the collision-less table's admitted ids, plus its shared miss row.
        for slot, rows in report["collisionless_rows"].items():
            mem = report["quality"]["torchrec MCH x 1"]["memory"][slot]
            assert mem["rows_capacity"] == rows + 1 and mem["ids"] <= rows
    else:
        assert "pip install torchrec==1.8.0 --no-deps" in run.stderr
        assert not any(n.startswith("torchrec") for n in names)
