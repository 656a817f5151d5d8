"""The layers as docs/architecture.md draws them are the layers the imports make."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_architecture_doc_graph_matches_the_imports():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_graph.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
