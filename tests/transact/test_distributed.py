"""Data-parallel training of a ranker (``lifelong transact train --nproc 2``, DDP over gloo).

Two processes train on the global batches of one, so they reach the same model: the eval
metrics agree within 1e-5 in NE and the predictions within 1e-4. Not to the bit: a rank sums
its half of a batch's gradient and gloo adds the halves, another float order than one process
summing all rows, and AdamW magnifies the rounding of parameters whose true gradient is zero
(an attention key bias, to which softmax is blind), without changing any output. The
two-process run is the one whose rank 1 died in the second epoch, rerun: it resumed after epoch
1. Rank 0 alone wrote it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lifelong.cli import main
from lifelong.core.distributed import FAIL_ENV, launch
from lifelong.core.errors import ConfigError
from lifelong.data.world import load_config, simulate_to
from lifelong.transact.evaluate import evaluate_run
from lifelong.transact.rank_data import RankData
from lifelong.transact.sequence_layout import SequenceLayout
from lifelong.transact.trainer import build_train_config, load_model, predict, train
from lifelong.transact.training_rows import BuildConfig, build_rows

# 301 rows in batches of 64: the last batch of 45 splits 23 + 22, so unequal shares are covered.
SETTINGS = {"model": "transact_v2", "nal": "none", "epochs": 2, "max_rows": 301, "batch_size": 64}
SETS = ["model.row.hash_buckets=1024", "model.row.id_dim=8", "model.mlp_dims=[32]"]
FLAGS = ["--model", "transact_v2", "--epochs", "2", "--max-rows", "301", "--batch-size", "64",
         *(arg for s in SETS for arg in ("--set", s))]

# Records every file opened for writing under AUDIT_ROOT, with the RANK of the process opening it.
AUDIT = textwrap.dedent("""
    import os, sys
    _root, _log = os.environ["AUDIT_ROOT"], os.environ["AUDIT_LOG"]
    def _hook(event, args):
        if event == "open" and isinstance(args[0], (str, os.PathLike)) and isinstance(args[1], str) and "w" in args[1]:
            path = os.fspath(args[0])
            if path.startswith(_root):
                with open(_log, "a") as f:
                    f.write(os.environ.get("RANK", "-") + " " + os.path.basename(path) + "\\n")
    sys.addaudithook(_hook)
""")


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lifelong.cli", *args], capture_output=True, text=True,
                          env={"LIFELONG_QUIET": "1", "COLUMNS": "200", "PATH": "/usr/bin:/bin", **env})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A directory with the rows of a tiny world."""
    root = tmp_path_factory.mktemp("ddp")
    simulate_to(load_config("tiny", overrides=["users.n_users=16"]), root / "w")
    build_rows(root / "w", root / "rows", BuildConfig(layout=SequenceLayout(8, 8, 4, 4), ll_cap=100, nal_negatives=4))
    return root


@pytest.fixture(scope="module")
def runs(root):
    """A one-process run (in this process), and a two-process run (the CLI, its writes audited)
    whose rank 1 dies in the second epoch, then rerun with the same arguments."""
    torch.set_num_threads(1)
    train(root / "rows", root / "one", build_train_config(SETTINGS, SETS), log=lambda *_: None)
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(AUDIT)
    args = ("transact", "train", "--data", str(root / "rows"), "--out", str(root / "two"), *FLAGS, "--nproc", "2")
    audit = {"PYTHONPATH": str(root / "site"), "AUDIT_ROOT": str(root / "two"), "AUDIT_LOG": str(root / "audit.log")}
    killed = _cli(*args, **audit, **{FAIL_ENV: "1:7"})  # 5 steps an epoch: rank 1 dies in the second
    after_kill = {p.name: torch.load(p, weights_only=False)["epoch"] if p.name == "checkpoint.pt" else None
                  for p in (root / "two").iterdir()}
    rerun = _cli(*args, **audit)
    return SimpleNamespace(root=root, killed=killed, after_kill=after_kill, rerun=rerun)


def test_a_killed_rank_is_named_and_a_rerun_resumes(runs):
    assert runs.killed.returncode != 0 and "Traceback" not in runs.killed.stderr
    line = runs.killed.stderr.strip().splitlines()[-1]
    assert line.startswith("error: rank 1 of 2 exited with status 3") and line.endswith("the last finished epoch")
    assert runs.after_kill == {"checkpoint.pt": 1}  # epoch 1's checkpoint, no model
    assert runs.rerun.returncode == 0, runs.rerun.stderr
    assert "resuming" in runs.rerun.stdout and "after epoch 1" in runs.rerun.stdout


def test_two_processes_train_what_one_does(runs):
    one, two = (json.loads((runs.root / r / "run.json").read_text()) for r in ("one", "two"))
    assert "data_parallel" not in one and two["data_parallel"] == {"processes": 2, "backend": "gloo",
                                                                  "batch_per_process": 32}
    for a, b in zip(one["epochs"], two["epochs"], strict=True):  # the global batches' losses
        assert abs(a["loss"] - b["loss"]) < 1e-5
    ev1, ev2 = (evaluate_run(runs.root / r, runs.root / "rows") for r in ("one", "two"))
    for head, m in ev1.per_head.items():
        assert abs(m["ne"] - ev2.per_head[head]["ne"]) < 1e-5 and abs(m["auc"] - ev2.per_head[head]["auc"]) < 1e-4
    data = RankData(runs.root / "rows", "eval")
    p1, p2 = (predict(load_model(runs.root / r)[0], data) for r in ("one", "two"))
    assert np.abs(p1 - p2).max() < 1e-4


def test_rank_0_alone_writes_the_run(runs):
    writes = [line.split() for line in (runs.root / "audit.log").read_text().splitlines()]
    assert {rank for rank, _ in writes} == {"0"}
    names = [name.split(".tmp-")[0] for _, name in writes]  # write_atomic's temporaries, renamed into place
    assert sorted(names) == [".checkpoint.pt"] * 2 + [".model.pt", ".run.json"]  # one checkpoint an epoch
    assert sorted(p.name for p in (runs.root / "two").iterdir()) == ["checkpoint.pt", "model.pt", "run.json"]


def test_nproc_below_one_and_unsplittable_batches_are_refused(root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lifelong", "transact", "train", "--data", str(root / "rows"),
                                      "--out", str(tmp_path / "r"), *FLAGS, "--nproc", "0"])
    with pytest.raises(SystemExit) as exit_:
        main()  # the command line, in this process
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --nproc must be >= 1, got 0"]
    assert not (tmp_path / "r").exists()
    cfg = build_train_config({**SETTINGS, "batch_size": 63}, SETS)
    with pytest.raises(ConfigError, match="batch_size 63 does not split over 2 processes"):
        launch(train, (root / "rows", tmp_path / "r", cfg), 2, batches={"batch_size": cfg.batch_size})
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="under torchrun"):
        launch(train, (root / "rows", tmp_path / "r", cfg), 2)
    assert not (tmp_path / "r").exists()
