"""The command line: output, exit codes, and no tracebacks for user errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lifelong.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={"LIFELONG_QUIET": "1", "COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_inspect_prints_lengths_and_writes_png(tiny_dataset, tmp_path):
    png = tmp_path / "h.png"
    res = run_cli("inspect", str(tiny_dataset), "--png", str(png))
    assert res.returncode == 0, res.stderr
    assert "LL length / user (explicit)" in res.stdout
    assert "p50 2  p90 3  max 3" in res.stdout  # explicit counts per user are 3 and 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _truncate(d):
    path = d / "events.parquet"
    path.write_bytes(path.read_bytes()[:200])


def _wrong_type(d):
    table = pq.read_table(d / "items.parquet")
    pq.write_table(table.set_column(2, "author_id", table.column("author_id").cast("string")), d / "items.parquet")


def _nan_embedding(d):
    table = pq.read_table(d / "items.parquet")
    emb = np.asarray(table.column("embedding").combine_chunks().flatten()).astype(np.float32)
    emb[3 * 32 + 5] = np.nan
    col = pa.FixedSizeListArray.from_arrays(pa.array(emb), 32)
    pq.write_table(table.set_column(1, "embedding", col), d / "items.parquet")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_truncate, "events.parquet: not a readable Parquet file"),
        (_wrong_type, "column 'author_id': wrong type string, expected int64"),
        (_nan_embedding, "column 'embedding', row 3: NaN or infinite embedding value"),
    ],
)
def test_corrupted_input_is_one_clear_line(tiny_dataset, corrupt, message):
    corrupt(tiny_dataset)
    res = run_cli("inspect", str(tiny_dataset))
    assert res.returncode == 2
    assert message in " ".join(res.stderr.split())
    assert "Traceback" not in res.stderr
    assert not (tiny_dataset / "history_lengths.png").exists()


def test_simulate_twice_gives_identical_bytes(tmp_path):
    for name in ("a", "b"):
        res = run_cli("simulate", "--preset", "tiny", "--out", str(tmp_path / name), "--set", "users.n_users=20")
        assert res.returncode == 0, res.stderr
    for f in ("items.parquet", "events.parquet", "users.parquet", "oracle.parquet", "world.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_simulate_seed_flag_is_the_seed_key(tmp_path):
    for name, args in (("flag", ("--seed", "3")), ("key", ("--set", "seed=3")), ("other", ("--seed", "4"))):
        res = run_cli("simulate", "--preset", "tiny", "--out", str(tmp_path / name), "--set", "users.n_users=20", *args)
        assert res.returncode == 0, res.stderr
    events = {name: (tmp_path / name / "events.parquet").read_bytes() for name in ("flag", "key", "other")}
    assert events["flag"] == events["key"] != events["other"]


@pytest.mark.parametrize(("old", "new"), [(("train",), "transact train"), (("online-experiment", "drift"), "monolith experiment")])
def test_old_spellings_say_where_the_command_moved(tmp_path, old, new):
    res = run_cli(*old, "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"),
                  *(("--model", "bst") if old == ("train",) else ()))
    assert f"moved to `lifelong {new}`" in " ".join(res.stderr.split())
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_simulate_bad_override_is_a_clear_error(tmp_path):
    res = run_cli("simulate", "--preset", "tiny", "--out", str(tmp_path / "w"), "--set", "users.n_userz=3")
    assert res.returncode == 2
    assert "n_userz" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("args", [("inspect", "/nonexistent/dir"), ("frobnicate",)])
def test_user_errors_exit_nonzero_without_traceback(args):
    res = run_cli(*args)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr + res.stdout


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("loop")
    res = run_cli("simulate", "--preset", "tiny", "--out", str(d / "w"), "--set", "users.n_users=20")
    assert res.returncode == 0, res.stderr
    res = run_cli("transact", "build", "--data", str(d / "w"), "--out", str(d / "rows"), "--neg-rate", "0.5", "--ll-cap", "300")
    assert res.returncode == 0, res.stderr
    assert "train" in res.stdout and "eval" in res.stdout
    return d


def test_train_evaluate_and_experiment(tiny_rows):
    d = tiny_rows
    res = run_cli("transact", "train", "--data", str(d / "rows"), "--model", "transact_v2", "--nal", "impression",
                  "--out", str(d / "run"), "--epochs", "1", "--max-rows", "600")
    assert res.returncode == 0, res.stderr
    assert "examples/s" in res.stdout and (d / "run" / "model.pt").exists()
    res = run_cli("transact", "evaluate", "--run", str(d / "run"), "--data", str(d / "rows"))
    assert res.returncode == 0, res.stderr
    assert "repin" in res.stdout and "oracle" in res.stdout
    res = run_cli("transact", "experiment", "quickstart", "--data", str(d / "rows"), "--out", str(d / "rep"), "--seeds", "2",
                  "--epochs", "1", "--max-rows", "300")
    assert res.returncode == 0, res.stderr
    report = (d / "rep" / "report.md").read_text()
    assert "TransAct V2" in report and "± " in report
    assert (d / "rep" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_tables_share_runs_of_equal_configurations(tiny_rows, tmp_path):
    common = ("--data", str(tiny_rows / "rows"), "--seeds", "1", "--epochs", "1", "--max-rows", "200",
              "--runs", str(tmp_path / "runs"))
    assert run_cli("transact", "experiment", "table7", "--out", str(tmp_path / "t7"), *common).returncode == 0
    first = {p.parent.parent.name for p in (tmp_path / "runs").glob("*/seed0/evaluation.json")}
    assert len(first) == 2  # softmax and BCE
    res = run_cli("transact", "experiment", "table4", "--out", str(tmp_path / "t4"), *common)
    assert res.returncode == 0, res.stderr
    runs = {p.parent.parent.name for p in (tmp_path / "runs").glob("*/seed0/evaluation.json")}
    # table 4's impression-NAL row is table 7's softmax row: trained once, two new runs.
    assert first < runs and len(runs) == 4
    assert res.stdout.count("seed 0: HIT@3") == 2


def test_train_config_file_and_set_reach_the_model(tiny_rows, tmp_path):
    import json

    from lifelong.transact.trainer import load_model

    f = tmp_path / "train.yaml"
    f.write_text("model: {name: bst, d_model: 8, attn_heads: 2}\nepochs: 3\nmax_rows: 300\n")
    run = tmp_path / "run"
    res = run_cli("transact", "train", "--data", str(tiny_rows / "rows"), "--out", str(run), "--config", str(f),
                  "--set", "model.d_model=16", "--set", "model.mlp_dims=[32,16]", "--epochs", "1")
    assert res.returncode == 0, res.stderr
    train = json.loads((run / "run.json").read_text())["train"]  # the effective config
    assert (train["model"], train["nal"], train["epochs"], train["max_rows"]) == ("bst", "none", 1, 300)
    assert train["model_overrides"] == {"d_model": 16, "attn_heads": 2, "mlp_dims": [32, 16]}
    model, _ = load_model(run)
    assert model.cfg.d_model == 16 and model.cfg.mlp_dims == (32, 16) and model.cfg.attn_heads == 2
    res = run_cli("transact", "train", "--data", str(tiny_rows / "rows"), "--out", str(tmp_path / "bad"),
                  "--config", str(f), "--set", "model.d_modle=16")
    assert res.returncode == 2 and "model.d_modle: no such key (did you mean d_model?)" in " ".join(res.stderr.split())


def test_experiment_yaml_file_with_an_added_row(tiny_rows, tmp_path):
    import json

    from lifelong.transact.experiments import EXPERIMENTS_DIR

    f = tmp_path / "mine.yaml"
    f.write_text((EXPERIMENTS_DIR / "table7.yaml").read_text()
                 + "  - label: BCE, w_NAL 0.1\n    config: {model: transact_v2, nal: impression, nal_loss: bce, w_nal: 0.1}\n")
    res = run_cli("transact", "experiment", str(f), "--data", str(tiny_rows / "rows"), "--out", str(tmp_path / "rep"),
                  "--seeds", "1", "--epochs", "1", "--max-rows", "200")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["table"] == "mine"
    assert [r["label"] for r in report["rows"]] == ["sampled softmax", "BCE", "BCE, w_NAL 0.1"]
    f.write_text("title: t\nrows:\n  - label: a\n    config: {model: bst, nal: none, w_nall: 1}\n")
    res = run_cli("transact", "experiment", str(f), "--data", str(tiny_rows / "rows"), "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "rows[0].config (a): w_nall: no such key" in " ".join(res.stderr.split())


def test_store_load_and_serve_user_errors(tiny_rows, tmp_path):
    res = run_cli("store", "load", "--data", str(tmp_path / "nothing"), "--store", str(tmp_path / "s"))
    assert res.returncode == 2 and "build.json" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("store", "load", "--data", str(tiny_rows / "rows"), "--store", "redis://127.0.0.1:1/0")
    assert res.returncode == 2 and "cannot reach Redis" in res.stderr
    res = run_cli("serve", "--run", str(tmp_path / "norun"), "--store", str(tmp_path / "s"))
    assert res.returncode == 2 and "not a finished run" in res.stderr
    res = run_cli("serve", "--run", str(tmp_path / "norun"), "--store", str(tmp_path / "s"), "--precision", "fp16")
    assert res.returncode == 2 and "precision must be one of fp32, bf16" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("bench", "serve", "--run", str(tmp_path / "norun"), "--store", str(tmp_path / "s"),
                  "--data", str(tiny_rows / "rows"), "--candidates", "32,many")
    assert res.returncode == 2 and "comma-separated integers" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("transact", "train", "--data", "{rows}", "--model", "gpt", "--out", "{tmp}/r"), "unknown model 'gpt'"),
        (("transact", "train", "--data", "{tmp}/nothing", "--model", "bst", "--out", "{tmp}/r"), "not a rows directory"),
        (("transact", "train", "--data", "{rows}", "--model", "bst", "--nal", "impression", "--out", "{tmp}/r"), "needs a causal"),
        (("transact", "train", "--data", "{rows}", "--model", "wide_deep", "--user-emb", "lmdb://{tmp}/e", "--out", "{tmp}/r"),
         "wide_deep has none"),
        (("transact", "train", "--data", "{rows}", "--model", "transact_v2", "--user-emb", "lmdb://{tmp}/e", "--out", "{tmp}/r"),
         "no LMDB feature store"),
        (("transact", "train", "--data", "{rows}", "--model", "bst", "--precision", "fp8", "--out", "{tmp}/r"),
         "precision must be one of fp32, bf16"),
        (("transact", "build", "--data", "{tmp}/nothing", "--out", "{tmp}/rows2"), "dataset directory not found"),
        (("transact", "experiment", "table9", "--data", "{rows}", "--out", "{tmp}/rep"), "unknown experiment"),
    ],
)
def test_training_user_errors(tiny_rows, tmp_path, args, message):
    res = run_cli(*(a.format(rows=tiny_rows / "rows", tmp=tmp_path) for a in args))
    assert res.returncode == 2
    assert message in " ".join(res.stderr.split())
    assert "Traceback" not in res.stderr


def test_build_with_missing_file_leaves_no_output(tiny_rows, tmp_path):
    import shutil

    world = tmp_path / "w"
    shutil.copytree(tiny_rows / "w", world)
    (world / "items.parquet").unlink()
    res = run_cli("transact", "build", "--data", str(world), "--out", str(tmp_path / "rows"))
    assert res.returncode == 2 and "items.parquet: file not found" in res.stderr
    assert not (tmp_path / "rows").exists()
