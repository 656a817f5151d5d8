"""Wall time of world simulation per preset, Parquet writing included (docs/world.md, "Presets").

Runs :func:`lifelong.data.world.simulate_to` for each preset into a temporary directory and
prints seconds, events, events/s and the ratio to the preset's target time (≤ 1 meets it),
plus the explicit-history percentiles from ``world.json``.

Usage::

    .venv/bin/python benchmarks/bench_simulate.py [--presets tiny small bench lifelong] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from lifelong.data.world import PRESETS, load_config, simulate_to

TARGET_S = {"tiny": 2.0, "small": 60.0, "bench": 120.0, "lifelong": 300.0}
"""Target generation time on a 2-core machine (docs/world.md, "Presets")."""


def bench(preset: str, overrides: list[str], workdir: Path) -> dict[str, float]:
    """Simulate one preset into ``workdir`` and return its figures."""
    cfg = load_config(preset, overrides=overrides)
    start = time.perf_counter()
    meta = simulate_to(cfg, workdir / preset)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in (workdir / preset).iterdir())
    return {"seconds": seconds, "events": meta["counts"]["events"], "explicit": meta["counts"]["explicit"],
            "bytes": size, **{f"ll_{k}": v for k, v in meta["explicit_per_user"].items()},
            "ll_before_eval_min": meta["explicit_before_eval_per_user"]["min"],
            "events_p50": meta["events_per_user"]["p50"], "events_max": meta["events_per_user"]["max"],
            "lt_not_recent": meta["retrieval_mix"]["long_term_not_recent"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(TARGET_S), choices=list(PRESETS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = parser.parse_args()
    os.environ.setdefault("LIFELONG_QUIET", "1")
    print(f"{'preset':9s} {'seconds':>8s} {'target':>7s} {'ratio':>6s} {'events':>12s} {'events/s':>11s} "
          f"{'explicit':>11s} {'MiB':>7s}  events/user p50 / max  explicit/user p50 / p90 / max (min before eval)"
          f"  LT-not-recent")
    with tempfile.TemporaryDirectory(prefix="bench_simulate.") as tmp:
        for preset in args.presets:
            r = bench(preset, args.overrides, Path(tmp))
            target = TARGET_S.get(preset, float("nan"))
            print(f"{preset:9s} {r['seconds']:8.1f} {target:7.0f} {r['seconds'] / target:6.2f} {r['events']:12,d} "
                  f"{r['events'] / r['seconds']:11,.0f} {r['explicit']:11,d} {r['bytes'] / 2**20:7.0f}  "
                  f"{r['events_p50']:,} / {r['events_max']:,}  "
                  f"{r['ll_p50']:,} / {r['ll_p90']:,} / {r['ll_max']:,} ({r['ll_before_eval_min']:,})"
                  f"  {r['lt_not_recent']:.3f}", flush=True)


if __name__ == "__main__":
    main()
