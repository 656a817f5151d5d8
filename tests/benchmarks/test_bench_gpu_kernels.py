"""The GPU-kernel benchmark's --dry-run: every grid's code path, tiny shapes, on the CPU interpreter."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu_kernels.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the dry run would time the GPU, not the interpreter")
def test_dry_run_prints_every_grid_and_the_kernels_agree():
    # A fresh process without TRITON_INTERPRET: the script must set it before importing the kernels.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "DRY RUN" in out and "Triton interpreter" in out
    tables = out.split("\n## ")[1:]
    assert [t.splitlines()[0] for t in tables] == [
        "SKUT vs PyTorch encoder (default (CPU) SDPA), sequence length at B = 3",
        "SKUT vs PyTorch encoder, batch at L = 24",
        "NN search: fused (triton) vs unfused"]
    rows = [line.split("|")[1:-1] for t in tables for line in t.splitlines() if line.startswith("| ") and
            line[2].isdigit()]
    assert len(rows) == 6
    assert all(float(row[-1]) < 1e-2 for row in rows)  # max abs diff: fp16 encoder, fp32 NN search
    assert all(row[-2].strip() == "yes" for row in rows[4:])  # the NN search picks the same tokens


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_cuda_or_dry_run_it_says_so(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_gpu_kernels", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as exit_:
        bench.main([])
    assert exit_.value.code == 2 and "no CUDA device" in capsys.readouterr().err
