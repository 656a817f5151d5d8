"""What each offline job costs as users, items and history length grow: measured at 3 sizes per
axis on this machine, fitted as power laws, and extrapolated (docs/scaling.md).

Simulates worlds of the ``small`` preset varied along one axis at a time around a base
(``--users``, ``--items``, ``--days``; the base is the first value of each), and on each world
runs, as a user would, in its own process:

- ``lifelong simulate``;
- ``lifelong transact build`` (NN feature logging: the training rows);
- ``lifelong store load`` into LMDB (the serving feature store: int8 S_LL and the other sequences);
- ``lifelong dv365 export`` into LMDB of one DV365 tower trained once on the base world (embedding
  every user is the job DV365 runs daily).

For each it records the seconds the command reports for its own work (without the start-up of
the interpreter and imports, ~1.5 s here), the peak RSS (``wait4``'s ``ru_maxrss`` of that process) and
the bytes it wrote (blocks on disk). On the base world it also times ``lifelong transact train``
of TransAct V2 (``--max-rows`` rows, one epoch): per-example cost does not depend on the world's
size because every row holds a fixed number of selected tokens.

For every job, figure and axis it fits ``cost = a * size^b`` by least squares in log-log space;
``b`` is the slope (1: linear; 0: does not grow). Prints one table of figures per world, one of
slopes, and writes both as JSON with ``--json``.

    LIFELONG_QUIET=1 .venv/bin/python benchmarks/bench_cost_slopes.py [--users 1000,2000,4000] \\
        [--items 20000,5000,80000] [--days 365,91,182] [--json FILE] [--plot PNG]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lifelong.bench.machine import cpu_model

JOBS = ("simulate", "build", "store load", "dv365 export")


def sizes(text: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if len(values) < 3 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: give at least 3 distinct sizes, the base first")
    return values


def disk_bytes(path: Path) -> int:
    """Bytes the files under ``path`` take on disk (blocks, so LMDB's sparse map counts what it uses)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def run(*args: str) -> tuple[float, str]:
    """``lifelong ARGS`` in its own process: its peak RSS in GB and its output. A failure stops the run."""
    env = {**os.environ, "LIFELONG_QUIET": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "lifelong.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"lifelong {' '.join(args)} failed ({proc.returncode}):\n{out}")
    return usage.ru_maxrss / 1e6, out  # ru_maxrss is in KB on Linux


def number(pattern: str, text: str) -> int:
    return int(re.search(pattern, text).group(1).replace(",", ""))


def job_seconds(text: str) -> float:
    """The seconds a command reports for its own work ("in 2.1 s" or "(5.9 s)"): its wall time
    without the interpreter's start-up and imports, which would flatten the slopes of small worlds."""
    return float(re.search(r"(?:in |\()([\d.]+) s\b", text).group(1))


def measure_world(tmp: Path, name: str, sets: list[str], tower: Path) -> dict[str, float]:
    """Every job on one world; its figures."""
    world, rows = tmp / name, tmp / f"{name}-rows"
    fig: dict[str, float] = {}
    rss, out = run("simulate", "--preset", "small", "--out", str(world), *sum((["--set", s] for s in sets), []))
    fig["events"] = number(r"\(([\d,]+) events", out)
    fig["simulate s"], fig["simulate GB"] = job_seconds(out), rss
    fig["world MB"] = disk_bytes(world) / 1e6
    rss, out = run("transact", "build", "--data", str(world), "--out", str(rows))
    fig["train rows"] = number(r"train\s*│\s*([\d,]+)", out)
    fig["build s"], fig["build GB"], fig["rows MB"] = job_seconds(out), rss, disk_bytes(rows) / 1e6
    store = tmp / f"{name}-store"
    rss, out = run("store", "load", "--data", str(rows), "--store", f"lmdb://{store}")
    fig["store load s"], fig["store load GB"], fig["store MB"] = job_seconds(out), rss, disk_bytes(store) / 1e6
    emb = tmp / f"{name}-emb"
    rss, out = run("dv365", "export", "--run", str(tower), "--data", str(world), "--store", f"lmdb://{emb}")
    fig["users embedded"] = number(r"([\d,]+) users x", out)
    fig["dv365 export s"], fig["dv365 export GB"], fig["export MB"] = job_seconds(out), rss, disk_bytes(emb) / 1e6
    for path in (world, rows, store, emb):  # keep the disk use of a long run to one world
        subprocess.run(["rm", "-rf", str(path)], check=True)
    return fig


def slope(x: list[int], y: list[float], floor: float) -> float:
    """b of y = a x^b, least squares in log-log space; NaN when a y is below ``floor`` (seconds
    are printed to 0.1 s, so below 0.3 s their rounding, not the job, would set the slope)."""
    if min(y) < floor:
        return float("nan")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def plot(worlds: dict[tuple[int, int, int], dict[str, float]], axes: dict[str, list[int]],
         base: dict[str, int], path: str) -> None:
    """One log-log panel per axis: each job's seconds and each output's MB against the axis' size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(2, len(axes), figsize=(4.2 * len(axes), 7), sharey="row")
    for col, (axis, values) in enumerate(axes.items()):
        order = sorted(values)
        keys = [tuple({**base, axis: v}[a] for a in ("users", "items", "days")) for v in order]
        for row, unit in enumerate((" s", " MB")):
            ax = panels[row][col]
            for name in [k for k in worlds[keys[0]] if k.endswith(unit)]:
                ax.loglog(order, [worlds[k][name] for k in keys], "o-", label=name.removesuffix(unit))
            ax.set_xlabel(axis)
            ax.grid(True, which="both", alpha=0.3)
            if col == 0:
                ax.set_ylabel("seconds (the job's own)" if unit == " s" else "MB on disk")
                ax.legend(fontsize=8)
    fig.suptitle("cost of each offline job against one size (the others at the base)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=sizes, default=sizes("1000,2000,4000"), help="users.n_users, base first")
    parser.add_argument("--items", type=sizes, default=sizes("20000,5000,80000"), help="items.n_items, base first")
    parser.add_argument("--days", type=sizes, default=sizes("365,91,182"), help="days of history, base first")
    parser.add_argument("--max-rows", type=int, default=4000, help="rows of the TransAct V2 training timed on the base")
    parser.add_argument("--json", help="also write the figures and slopes to this file")
    parser.add_argument("--plot", help="also draw seconds and MB against each size, log-log, into this PNG")
    args = parser.parse_args()
    base = {"users": args.users[0], "items": args.items[0], "days": args.days[0]}
    keys = {"users": "users.n_users", "items": "items.n_items", "days": "days"}
    worlds: dict[tuple[int, int, int], dict[str, float]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-slopes-") as name:
        tmp = Path(name)
        sets = [f"{keys[a]}={v}" for a, v in base.items()]
        run("simulate", "--preset", "small", "--out", str(tmp / "tower-world"), *sum((["--set", s] for s in sets), []))
        run("dv365", "train", "--data", str(tmp / "tower-world"), "--out", str(tmp / "tower"), "--epochs", "1",
            "--per-group", "1", "--train-days", "7")
        run("transact", "build", "--data", str(tmp / "tower-world"), "--out", str(tmp / "base-rows"))
        _, out = run("transact", "train", "--data", str(tmp / "base-rows"), "--out", str(tmp / "v2"), "--model",
                        "transact_v2", "--epochs", "1", "--max-rows", str(args.max_rows))
        train_rate = number(r"([\d,]+) examples/s\)", out)
        subprocess.run(["rm", "-rf", str(tmp / "tower-world"), str(tmp / "base-rows"), str(tmp / "v2")], check=True)
        for axis, values in (("users", args.users), ("items", args.items), ("days", args.days)):
            for v in values:
                size = {**base, axis: v}
                key = (size["users"], size["items"], size["days"])
                if key not in worlds:
                    label = f"u{key[0]}-i{key[1]}-d{key[2]}"
                    print(f"world {label} ...", flush=True)
                    worlds[key] = measure_world(tmp, label, [f"{keys[a]}={size[a]}" for a in keys], tmp / "tower")
    runtime = time.perf_counter() - started

    figures = [k for k in next(iter(worlds.values())) if k not in ("users embedded",)]
    print(f"\nper world (small preset; base users={base['users']}, items={base['items']}, days={base['days']})")
    print("| users | items | days | " + " | ".join(figures) + " |")
    print("|---:|---:|---:|" + "---:|" * len(figures))
    for (u, i, d), fig in worlds.items():
        print(f"| {u:,} | {i:,} | {d} | " + " | ".join(f"{fig[k]:,.1f}" for k in figures) + " |")

    slopes: dict[str, dict[str, float]] = {}
    for axis, values in (("users", args.users), ("items", args.items), ("days", args.days)):
        keys_of = [tuple({**base, axis: v}[a] for a in ("users", "items", "days")) for v in values]
        slopes[axis] = {k: slope(values, [worlds[key][k] for key in keys_of], 0.3 if k.endswith(" s") else 1e-9)
                        for k in figures}
    print("\nslopes b of cost = a * size^b (least squares in log-log over the sizes of each axis; "
          "- where a job took under 0.3 s)")
    print("| figure | " + " | ".join(slopes) + " |")
    print("|---|" + "---:|" * len(slopes))
    for k in figures:
        print(f"| {k} | " + " | ".join("-" if np.isnan(slopes[a][k]) else f"{slopes[a][k]:.2f}" for a in slopes) + " |")
    machine = f"nproc {os.cpu_count()}, {cpu_model()}"
    print(f"\nTransAct V2 training on the base world: {train_rate:,} examples/s ({args.max_rows:,} rows, 1 epoch)")
    print(f"machine: {machine}; whole run {runtime:.0f} s")
    if args.plot:
        plot(worlds, {"users": args.users, "items": args.items, "days": args.days}, base, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "machine": machine, "runtime_s": runtime, "train_examples_per_s": train_rate,
            "worlds": [{"users": u, "items": i, "days": d, **fig} for (u, i, d), fig in worlds.items()],
            "slopes": slopes}, indent=2))


if __name__ == "__main__":
    main()
