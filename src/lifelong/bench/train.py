"""``lifelong bench train``: today's training step against the optimized one, side by side.

Each variant is a set of training settings over the same run: same model, seed, rows, batch
size and epochs (TransAct V2 through :func:`~lifelong.transact.trainer.train`, the DV365 tower
through :func:`~lifelong.dv365.train.fit` on one shared sample of examples). ``today`` is the
step before the optimisations (:data:`TODAY`); ``optimized`` is :data:`OPTIMIZED`. Reported per
variant: the training examples/s the trainer measures (its epoch loop: data loading, forward,
backward, optimizer), and the NE per head on held-out rows (TransAct: a seeded draw of
``eval_rows`` rows of the eval split; DV365: the run's own evaluation examples), so that a
speedup is shown next to what it does to quality. With ``rounds`` > 1 the variants alternate (today, optimized, today, ...) and
the median examples/s of each is reported, which a noisy shared machine needs.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lifelong.bench.machine import cpu_model
from lifelong.core.errors import ConfigError
from lifelong.core.precision import bf16_native

TODAY: dict[str, dict] = {"transact": {"precision": "fp32"}, "dv365": {"precision": "fp32"}}
"""The step as it was before the optimisations (``TrainConfig`` / ``DV365TrainConfig`` fields)."""

OPTIMIZED: dict[str, dict] = {"transact": {"precision": "bf16"}, "dv365": {"precision": "bf16"}}
"""What the optimized step changes. The batch assembly itself (one gather per batch for every
embedding, padding included) is faster for both variants: it is not a setting."""

VARIANTS = ("today", "optimized")


def _quiet(*_: object) -> None:
    return None


def bench_transact(data_dir: str | os.PathLike[str], model: str = "transact_v2", rows: int = 20_000,
                   epochs: int = 1, eval_rows: int = 20_000, seed: int = 0, rounds: int = 1,
                   base: dict | None = None, log: Callable[[str], None] = _quiet) -> dict:
    """Each variant of :data:`VARIANTS` trains ``model`` on the same ``rows`` training rows
    (``base``: further ``TrainConfig`` fields of every variant); returns ``{"model", "rows",
    "eval_rows", "variants": {name: {"examples_per_s", "runs", "ne"}}, "speedup", "ne_change"}``.

    ``runs`` holds each round's examples/s; ``ne`` the NE per head and their ``mean`` of the
    first round's model; ``speedup`` is optimized over today (medians).
    """
    from lifelong.transact.rank_data import RankData
    from lifelong.transact.trainer import TrainConfig, load_model, train, validation_ne

    heldout = RankData(data_dir, "eval")
    if len(heldout) == 0:
        raise ConfigError(f"{data_dir}: the eval split is empty; bench train measures NE on it")
    pick = np.sort(np.random.default_rng(seed).permutation(len(heldout))[:eval_rows])
    out: dict = {"model": model, "rows": rows, "epochs": epochs, "eval_rows": int(pick.size), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="lifelong-bench-train-") as tmp:
        for r in range(rounds):
            for name in VARIANTS:
                overrides = (TODAY if name == "today" else OPTIMIZED)["transact"]
                cfg = TrainConfig(**{**(base or {}), "model": model, "epochs": epochs, "max_rows": rows, "seed": seed,
                                     **overrides})
                run = Path(tmp) / f"{name}-{r}"
                meta = train(data_dir, run, cfg, log=_quiet)
                entry = out["variants"].setdefault(name, {"settings": overrides, "runs": []})
                entry["runs"].append(meta["examples_per_s"])
                if r == 0:
                    entry["ne"] = validation_ne(load_model(run)[0], heldout, pick)
                    entry["train_loss"] = meta["epochs"][-1]["loss"]
                log(f"{model} {name} round {r + 1}/{rounds}: {meta['examples_per_s']:,.0f} examples/s")
    return _finish(out)


def bench_dv365(world: str | os.PathLike[str], users: int = 200, epochs: int = 1, seed: int = 0, rounds: int = 1,
                base: dict | None = None, log: Callable[[str], None] = _quiet) -> dict:
    """Each variant of :data:`VARIANTS` trains the DV365 tower (default slices; ``base``: further
    ``DV365TrainConfig`` fields of every variant) on one shared sample of ``users`` users'
    examples of ``world``; the same figures as :func:`bench_transact`."""
    from lifelong.dv365.examples import open_world
    from lifelong.dv365.train import DV365TrainConfig, fit, prepare

    def config(**fields: object) -> DV365TrainConfig:
        # 4 training days: the sample benchmarks.md records (200 users x 4 days x 64 examples),
        # kept when the tower's own default became 14 days.
        return DV365TrainConfig(**{"train_days": 4, **(base or {}), "max_users": users, "epochs": epochs,
                                   "seed": seed, **fields})

    out: dict = {"model": "dv365", "users": users, "epochs": epochs, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="lifelong-bench-train-dv365-") as tmp:
        prepared = prepare(open_world(world), config(), cache_dir=Path(tmp) / "tokens")
        for r in range(rounds):
            for name in VARIANTS:
                overrides = (TODAY if name == "today" else OPTIMIZED)["dv365"]
                cfg = config(**overrides)
                torch.manual_seed(seed)
                _, _, meta = fit(prepared, cfg, log=_quiet)
                entry = out["variants"].setdefault(name, {"settings": overrides, "runs": []})
                entry["runs"].append(meta["examples_per_s"])
                if r == 0:
                    ne = meta["eval"]["ne"]
                    entry["ne"] = {**ne, "mean": float(np.mean(list(ne.values())))}
                    entry["train_loss"] = meta["epochs"][-1]["loss"]
                out["examples"] = meta["train_examples"]
                log(f"dv365 {name} round {r + 1}/{rounds}: {meta['examples_per_s']:,.0f} examples/s")
    return _finish(out)


def _finish(out: dict) -> dict:
    for entry in out["variants"].values():
        entry["examples_per_s"] = statistics.median(entry["runs"])
    v = out["variants"]
    out["speedup"] = v["optimized"]["examples_per_s"] / max(v["today"]["examples_per_s"], 1e-9)
    out["ne_change"] = v["optimized"]["ne"]["mean"] - v["today"]["ne"]["mean"]
    return out


def run_train_bench(data_dir: str | os.PathLike[str] | None, dv365_world: str | os.PathLike[str] | None = None,
                    rows: int = 20_000, eval_rows: int = 20_000, dv365_users: int = 200, epochs: int = 1,
                    seed: int = 0, rounds: int = 1, report: Path | None = None, transact_base: dict | None = None,
                    dv365_base: dict | None = None, log: Callable[[str], None] = _quiet) -> dict:
    """TransAct V2 on ``data_dir`` (a rows directory) and the DV365 tower on ``dv365_world``, each
    when given; the result (and ``report``, as JSON) holds the machine and one entry per model.
    ``transact_base`` and ``dv365_base`` are further config fields of every variant (the defaults:
    none).

    Raises:
        ConfigError: neither given, or ``rounds``, ``rows``, ``eval_rows`` or ``dv365_users`` below 1.
    """
    if data_dir is None and dv365_world is None:
        raise ConfigError("bench train needs --data (TransAct V2 rows) or --dv365 (a world), or both")
    for key, value in (("rounds", rounds), ("rows", rows), ("eval_rows", eval_rows), ("dv365_users", dv365_users)):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    result: dict = {"machine": {"cpu": cpu_model(), "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "bf16_native": bf16_native(), "torch": torch.__version__},
                    "today": TODAY, "optimized": OPTIMIZED, "models": []}
    if data_dir is not None:
        result["models"].append(bench_transact(data_dir, rows=rows, epochs=epochs, eval_rows=eval_rows, seed=seed,
                                               rounds=rounds, base=transact_base, log=log))
    if dv365_world is not None:
        result["models"].append(bench_dv365(dv365_world, users=dv365_users, epochs=epochs, seed=seed, rounds=rounds,
                                            base=dv365_base, log=log))
    if report is not None:
        Path(report).write_text(json.dumps(result, indent=2))
    return result


def render(result: dict) -> str:
    """A markdown table: examples/s, the speedup and NE per head for every model and variant.

    Example::

        >>> v = {"today": {"examples_per_s": 100.0, "runs": [100.0], "ne": {"click": 0.9, "mean": 0.9}},
        ...      "optimized": {"examples_per_s": 150.0, "runs": [150.0], "ne": {"click": 0.91, "mean": 0.91}}}
        >>> m = {"cpu": "x", "nproc": 2, "torch_threads": 2, "bf16_native": True, "torch": "2"}
        >>> print(render({"machine": m, "models": [{"model": "transact_v2", "variants": v, "speedup": 1.5,
        ...                                          "ne_change": 0.01}]}))  # doctest: +NORMALIZE_WHITESPACE
        x, nproc 2, 2 torch threads, bfloat16 units: yes
        <BLANKLINE>
        | model | variant | examples/s | vs today | NE click | NE mean |
        |---|---|---:|---:|---:|---:|
        | transact_v2 | today | 100 | 1.00x | 0.9000 | 0.9000 |
        | transact_v2 | optimized | 150 | 1.50x | 0.9100 | 0.9100 |
    """
    m = result["machine"]
    lines = [f"{m['cpu']}, nproc {m['nproc']}, {m['torch_threads']} torch threads, bfloat16 units: "
             f"{'yes' if m['bf16_native'] else 'no'}", ""]
    for entry in result["models"]:
        heads = [h for h in entry["variants"]["today"]["ne"] if h != "mean"]
        lines += [f"| model | variant | examples/s | vs today | {' | '.join(f'NE {h}' for h in heads)} | NE mean |",
                  f"|---|---|---:|---:|{'---:|' * len(heads)}---:|"]
        base = entry["variants"]["today"]["examples_per_s"]
        for name, v in entry["variants"].items():
            ne = " | ".join(f"{v['ne'][h]:.4f}" for h in heads)
            lines.append(f"| {entry['model']} | {name} | {v['examples_per_s']:,.0f} | "
                         f"{v['examples_per_s'] / max(base, 1e-9):.2f}x | {ne} | {v['ne']['mean']:.4f} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")
