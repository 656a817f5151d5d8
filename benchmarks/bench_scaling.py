"""Scale-out on one machine: 1 process vs 2 processes, side by side in one run.

Builds a synthetic world (``--preset``, default ``tiny``) in a temporary directory, then times:

- **train**: ``lifelong transact train`` (transact, 1 epoch, ``--max-rows`` rows, the same global
  batch) without and with ``--nproc 2``; the examples/s the command prints;
- **build**: ``lifelong transact build`` with ``--engine local`` vs ``--engine ray`` (a local Ray
  with 2 CPUs, started by the command); training rows / whole-command wall time;
- **export**: ``lifelong dv365 export`` of a quickly trained tiny DV365 tower with ``--engine local``
  vs ``--engine ray``; users / whole-command wall time;
- **lookups**: :class:`CollisionlessEmbedding` in 1 process vs :class:`ShardedCollisionlessEmbedding`
  over 2 gloo ranks (:func:`lifelong.core.distributed.launch`), the same global id stream; each
  step is a training lookup (forward, backward of a sum, optimizer step), ids / s of the timed steps.

Whole-command wall times include each command's start-up (imports, Ray or rank start), which is
what a user waits for; on small data that start-up dominates. Prints a markdown table with the
1-process and 2-process figures, the speedup (2 / 1) and the efficiency (speedup / 2).

    LIFELONG_QUIET=1 .venv/bin/python benchmarks/bench_scaling.py [--preset tiny] [--max-rows 4000] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lifelong.bench.machine import cpu_model
from lifelong.core.distributed import launch, process_group, ranks_from_env
from lifelong.tables.embedding import CollisionlessEmbedding
from lifelong.tables.sharded import ShardedCollisionlessEmbedding
from lifelong.tables.table import TableConfig

ROOT = Path(__file__).resolve().parents[1]
LOOKUP_CFG = TableConfig(dim=16)


def cli(*args: str) -> tuple[float, str]:
    """Run ``lifelong ARGS``; its wall time and stdout + stderr. A failure stops the benchmark."""
    env = {**os.environ, "LIFELONG_QUIET": "1", "COLUMNS": "200"}
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "lifelong.cli", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        sys.exit(f"lifelong {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return wall, res.stdout + res.stderr


def id_stream(steps: int, batch: int, n_ids: int) -> np.ndarray:
    """Global id batches (steps, 2, batch / 2), Zipf-like over ``n_ids`` ids."""
    rng = np.random.default_rng(0)
    skew = 1.0 / np.arange(1, n_ids + 1)
    return rng.choice(n_ids, size=(steps, 2, batch // 2), p=skew / skew.sum()).astype(np.int64)


def lookup_steps(emb, ids: np.ndarray, warmup: int) -> float:
    """Seconds of the timed steps (after ``warmup``) of forward + backward + step over ``ids``."""
    t = 0.0
    for k, batch in enumerate(ids):
        if k == warmup:
            t = time.perf_counter()
        vecs = emb(torch.from_numpy(batch), now_ms=(k + 1) * 1_000)
        vecs.sum().backward()
        emb.step((k + 1) * 1_000)
    return time.perf_counter() - t


def lookup_rank(out: str, steps: int, batch: int, n_ids: int, warmup: int) -> None:
    """One rank of the sharded run: its half of every global batch; rank 0 writes the slowest rank's time."""
    torch.set_num_threads(1)
    ranks = ranks_from_env()
    ids = id_stream(steps, batch, n_ids)[:, ranks.rank]
    with process_group(ranks):
        emb = ShardedCollisionlessEmbedding(LOOKUP_CFG, ranks)
        seconds = torch.tensor([lookup_steps(emb, ids, warmup)])
        torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
    if ranks.rank == 0:
        Path(out).write_text(json.dumps({"seconds": float(seconds[0])}))


def bench_lookups(tmp: Path, steps: int, batch: int, n_ids: int, warmup: int) -> tuple[float, float]:
    """ids/s of the single table (whole global batches) and of the 2-rank sharded table."""
    torch.set_num_threads(1)
    ids = id_stream(steps, batch, n_ids).reshape(steps, batch)
    one = (steps - warmup) * batch / lookup_steps(CollisionlessEmbedding(LOOKUP_CFG), ids, warmup)
    out = tmp / "lookups.json"
    # The ranks unpickle the function by its module name: this file imported as ``bench_scaling``.
    rank_fn = importlib.import_module(Path(__file__).stem).lookup_rank
    launch(rank_fn, (str(out), steps, batch, n_ids, warmup), 2)
    two = (steps - warmup) * batch / json.loads(out.read_text())["seconds"]
    return one, two


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="world preset simulated for every measurement")
    parser.add_argument("--max-rows", type=int, default=4000, help="rows trained on (1 epoch)")
    parser.add_argument("--batch-size", type=int, default=256, help="global training batch")
    parser.add_argument("--model", default="transact")
    parser.add_argument("--lookup-steps", type=int, default=60)
    parser.add_argument("--lookup-batch", type=int, default=8192, help="global ids a lookup step")
    parser.add_argument("--lookup-ids", type=int, default=200_000, help="distinct ids of the lookup stream")
    parser.add_argument("--batch-users", type=int, default=8, help="users a DV365 export batch (a Ray task)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    started = time.perf_counter()
    results: dict[str, dict[str, float | str]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as name:
        tmp = Path(name)
        world, rows = tmp / "world", tmp / "rows"
        cli("simulate", "--preset", args.preset, "--out", str(world))

        walls = {}
        for engine in ("local", "ray"):
            walls[engine], text = cli("transact", "build", "--data", str(world), "--out", str(tmp / f"rows-{engine}"),
                                      "--engine", engine)
            n_rows = int(re.search(r"train\s*│\s*([\d,]+)", text).group(1).replace(",", ""))
        (tmp / "rows-local").rename(rows)
        results["build (rows/s, whole command)"] = {"one": n_rows / walls["local"], "two": n_rows / walls["ray"],
                                                   "how": "--engine local vs ray"}

        rates = {}
        for nproc in (1, 2):
            _, text = cli("transact", "train", "--data", str(rows), "--out", str(tmp / f"run{nproc}"), "--model",
                          args.model, "--epochs", "1", "--max-rows", str(args.max_rows), "--batch-size",
                          str(args.batch_size), "--nproc", str(nproc))
            rates[nproc] = float(re.search(r"([\d,]+) examples/s\)", text).group(1).replace(",", ""))
        results["train (examples/s, printed)"] = {"one": rates[1], "two": rates[2], "how": "--nproc 1 vs 2"}

        cli("dv365", "train", "--data", str(world), "--out", str(tmp / "dv"), "--epochs", "1", "--per-group", "1",
            "--train-days", "2")
        walls = {}
        for engine in ("local", "ray"):
            walls[engine], text = cli("dv365", "export", "--run", str(tmp / "dv"), "--data", str(world), "--store",
                                      f"lmdb://{tmp / ('emb-' + engine)}", "--batch-users", str(args.batch_users),
                                      "--engine", engine)
            users = int(re.search(r"([\d,]+) users x", text).group(1).replace(",", ""))
        results["DV365 export (users/s, whole command)"] = {"one": users / walls["local"], "two": users / walls["ray"],
                                                           "how": "--engine local vs ray"}

        one, two = bench_lookups(tmp, args.lookup_steps, args.lookup_batch, args.lookup_ids, warmup=5)
        results["table lookups (ids/s, fwd+bwd+step)"] = {"one": one, "two": two,
                                                          "how": "CollisionlessEmbedding vs Sharded over 2 gloo ranks"}
    runtime = time.perf_counter() - started

    print(f"preset {args.preset} ({n_rows:,} training rows), train: {args.model}, {args.max_rows:,} rows, global batch "
          f"{args.batch_size}, 1 epoch; DV365 export: {users} users, batches of {args.batch_users}; lookups: "
          f"{args.lookup_steps - 5} steps of {args.lookup_batch:,} ids over {args.lookup_ids:,} ids, dim {LOOKUP_CFG.dim}")
    print("| measurement | 1 vs 2 | 1 process | 2 processes | speedup | efficiency |")
    print("|---|---|---:|---:|---:|---:|")
    for key, r in results.items():
        speedup = r["two"] / r["one"]
        r["speedup"], r["efficiency"] = speedup, speedup / 2
        print(f"| {key} | {r['how']} | {r['one']:,.0f} | {r['two']:,.0f} | {speedup:.2f}x | {speedup / 2:.0%} |")
    machine = f"nproc {os.cpu_count()}, {cpu_model()}, torch {torch.__version__}"
    print(f"machine: {machine}; whole run {runtime:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine, "runtime_s": runtime,
                                               "results": results, "rows": n_rows, "users": users}, indent=2))


if __name__ == "__main__":
    main()
