"""The one-shot GPU suite (benchmarks/gpu_suite.sh) without a GPU: its dry run writes one table with
every section, a broken kernel fails its parity check by name, a missing triton skips the kernel
sections, and without --dry-run it refuses in one line."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"


def suite(*args: str, **env: str) -> subprocess.CompletedProcess:
    # A fresh process without TRITON_INTERPRET: the suite must set it before triton is imported. The
    # wrapper runs this interpreter (the one with lifelong installed), not necessarily .venv's.
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(["bash", str(SUITE), *args],
                          env={**base, "LIFELONG_QUIET": "1", "PYTHON": sys.executable, **env},
                          capture_output=True, text=True, timeout=300)


def table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[1:]]  # the header left out


def test_dry_run_writes_one_table_with_every_section(tmp_path):
    out = tmp_path / "gpu.md"
    res = suite("--dry-run", "--out", str(out))
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert text.startswith("**DRY RUN") and text in res.stdout
    rows = table_rows(text)
    assert {row[0][0] for row in rows} == set("abcd")
    assert len(text.split("\n\n")) == 2  # one caption, one table
    parity = [row[-1] for row in rows if row[-1] != "n/a"]
    if importlib.util.find_spec("triton") is not None:
        assert {row[0][0] for row in rows if row[-1] != "n/a"} == set("abc")  # a check per kernel, and serving's
    assert parity and all(" ok" in cell for cell in parity)


def test_a_broken_kernel_fails_its_parity_check_by_name(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "gpu.md"
    res = suite("--dry-run", "--sections", "a", "--out", str(out), LIFELONG_GPU_SUITE_BREAK="skut")
    assert res.returncode == 1, res.stderr
    assert "parity FAILED: skut" in res.stderr
    assert "**FAIL**" in out.read_text()  # the table is written all the same


def test_without_triton_the_kernel_sections_are_skipped(tmp_path):
    fake = tmp_path / "fake" / "triton"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("triton hidden by the test")\n')
    out = tmp_path / "gpu.md"
    res = suite("--dry-run", "--sections", "ab", "--out", str(out), PYTHONPATH=str(fake.parent))
    assert res.returncode == 0, res.stderr
    rows = table_rows(out.read_text())
    assert [row[0][0] for row in rows] == ["a", "b"]
    assert all(row[2].startswith("skipped: triton does not import") for row in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_cuda_or_dry_run_it_says_so_in_one_line(tmp_path):
    res = suite("--out", str(tmp_path / "gpu.md"))
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "no CUDA device" in res.stderr
    assert not (tmp_path / "gpu.md").exists()


def test_host_to_device_bytes_are_counted(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the repository and benchmarks/ first
    spec.loader.exec_module(module)
    device = torch.device("meta")  # a device other than the host, present without a GPU
    with module.HostToDevice(device) as h2d:
        torch.ones(10).to(device)  # 40 bytes
        torch.empty(3, 4, dtype=torch.int64, device=device).copy_(torch.zeros(3, 4, dtype=torch.int64))  # 96
        torch.ones(5).clone()  # host to host: not counted
    assert h2d.bytes == 136
