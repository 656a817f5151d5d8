"""A served run's version names its model and configuration: ``<model>-<config hash>/<run>@<weights>``."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict

import torch

from lifelong.transact.experiments import run_name
from lifelong.transact.serving import model_version
from lifelong.transact.trainer import TrainConfig, build_train_config, model_config


def _fake_run(path, cfg: TrainConfig, with_run_json: bool = True, with_model_config: bool = True):
    """A run directory as ``train`` leaves it, as far as ``model_version`` reads it (without
    ``model_config``: as runs were saved before they recorded it)."""
    path.mkdir(parents=True)
    resolved = {"model_config": model_config(cfg)} if with_model_config else {}
    torch.save({"name": cfg.model, "train": asdict(cfg), **resolved, "state_dict": {"w": torch.arange(3.0)}},
               path / "model.pt")
    if with_run_json:
        (path / "run.json").write_text(json.dumps({"kind": "run", "train": asdict(cfg), **resolved}))
    return path


def test_version_names_model_config_run_and_weights(tmp_path):
    cfg = build_train_config({"model": {"name": "bst", "mlp_dims": [64, 32]}, "nal": "none", "seed": 2})
    run = _fake_run(tmp_path / run_name(cfg) / "seed2", cfg)
    version = model_version(run)
    weights = hashlib.sha256((run / "model.pt").read_bytes()).hexdigest()[:12]
    assert version == f"{run.parent.name}/seed2@{weights}"  # the experiment harness's directory name
    assert re.fullmatch(r"bst-[0-9a-f]{10}/seed2@[0-9a-f]{12}", version)


def test_config_hash_ignores_the_seed_and_follows_the_config(tmp_path):
    base = dict(model="transact_v2", nal="impression")
    a = model_version(_fake_run(tmp_path / "a" / "seed0", TrainConfig(**base, seed=0)))
    b = model_version(_fake_run(tmp_path / "b" / "seed0", TrainConfig(**base, seed=1)))
    c = model_version(_fake_run(tmp_path / "c" / "seed0", TrainConfig(**base, lr=1e-3)))
    assert a.startswith("transact_v2-")
    assert a.split("/")[0] == b.split("/")[0] != c.split("/")[0]


def test_run_without_run_json_reads_the_config_from_model_pt(tmp_path):
    cfg = TrainConfig(model="wide_deep", nal="none")
    with_json = model_version(_fake_run(tmp_path / "a" / "seed0", cfg))
    without = model_version(_fake_run(tmp_path / "b" / "seed0", cfg, with_run_json=False))
    assert with_json.split("@")[0] == without.split("@")[0] == f"{run_name(cfg)}/seed0"


def test_the_name_follows_every_model_setting_and_old_runs_keep_theirs(tmp_path):
    # The default of token_similarity is on; a run that sets it is named as one that does not.
    default = TrainConfig(model="transact_v2", nal="impression")
    explicit = build_train_config({"model": {"name": "transact_v2", "token_similarity": True}, "nal": "impression"})
    concatenation = build_train_config({"model": {"name": "transact_v2", "token_similarity": False},
                                        "nal": "impression"})
    assert run_name(default) == run_name(explicit) != run_name(concatenation)
    # A run saved before runs recorded model_config was trained when concatenation was the default.
    old = model_version(_fake_run(tmp_path / "old" / "seed0", default, with_model_config=False))
    assert old.split("/")[0] == run_name(concatenation)
