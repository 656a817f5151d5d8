"""DV365 experiments (``lifelong dv365 experiment``): the encoder comparison, staleness and the 24 h gap.

One process opens the world once, samples one set of users and examples, and shares one
token cache (``OUT/tokens``) across every run:

- **encoders** (the paper's Table 2): NE per task on the evaluation day, FSA parameters and
  training examples/s for the backbone without a user tower, then token-wise and dim-wise
  LCE, MLP, transformer, funnel and funnel + LCE (the FSA), and the token view without
  compression. The dim view compresses each slice's 33 columns to ``dim_out_cols`` (5), so
  that its output (207 × 5 per encoder) is about as large as the token view's (33 × 32).
- **staleness × gap**: the FSA trained with the 24 h gap and without it, each evaluated with
  embeddings 0, 1, 3 and 7 days old: the tower reads the timeline before
  ``anchor − age − gap``, the backbone is unchanged.

Every run is evaluated once and its result kept in ``OUT/results.json``, so an interrupted
experiment resumes where it stopped. ``OUT/report.md`` holds the tables and ``OUT/*.png``
the plots; the FSA's runs with and without the gap are kept as run directories
(``OUT/runs/fsa_seed<k>``, ``OUT/runs/fsa_no_gap_seed<k>``) for export and downstream use.

Example::

    report = run_experiment("worlds/lifelong", "reports/dv365", ExperimentConfig(users=1000))
    print(render_markdown(report))
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from lifelong.core.errors import ConfigError
from lifelong.core.metrics import mean_std
from lifelong.core.report import Column, Figure, Report, Table, hbars, pyplot
from lifelong.data.io import write_json
from lifelong.data.protocol import DAY_MS
from lifelong.dv365.backbone import TASKS, BackboneConfig
from lifelong.dv365.examples import open_world
from lifelong.dv365.fsa import FSAConfig
from lifelong.dv365.train import DV365TrainConfig, Prepared, evaluate, fit, prepare, save_run

STALENESS_DAYS = (0, 1, 3, 7)


@dataclass(frozen=True)
class ExperimentConfig:
    """Sizes of the experiment (the defaults fit in about 20 CPU minutes on two shared cores).

    Args:
        users: seeded subset of users (train and evaluation).
        epochs: training epochs per run.
        train_days: days of training impressions before the cutoff.
        per_group: training impressions per (user, day).
        out_cols: C of the token view's encoders.
        dim_out_cols: C of the dim view's encoders.
        seeds: seeds per run (weights and shuffling; the users and examples stay those of seed 0).
    """

    users: int = 1000
    epochs: int = 4
    train_days: int = 4
    per_group: int = 64
    out_cols: int = 32
    dim_out_cols: int = 5
    seeds: int = 1

    def __post_init__(self) -> None:
        if min(self.users, self.epochs, self.train_days, self.per_group, self.out_cols, self.dim_out_cols,
               self.seeds) < 1:
            raise ConfigError("every experiment size must be >= 1")


def encoder_rows(cfg: ExperimentConfig) -> dict[str, DV365TrainConfig]:
    """Label -> training config of each row of the encoder comparison (gap 24 h)."""
    base = DV365TrainConfig(train_days=cfg.train_days, per_group=cfg.per_group, max_users=cfg.users,
                            epochs=cfg.epochs)
    rows = {"no user tower": replace(base, backbone=BackboneConfig(user_vectors=0), fsa=FSAConfig(encoders=("lce",)))}
    names = {"lce": "LCE", "mlp": "MLP", "transformer": "transformer", "funnel": "funnel"}
    for view, cols in (("token", cfg.out_cols), ("dim", cfg.dim_out_cols)):
        for encoders in (("lce",), ("mlp",), ("transformer",), ("funnel",), ("funnel", "lce")):
            label = f"{view}-wise " + (" + ".join(names[e] for e in encoders) if encoders != ("funnel", "lce")
                                       else "FSA (funnel + LCE)")
            rows[label] = replace(base, fsa=FSAConfig(view=view, encoders=encoders, out_cols=cols))
    rows["no compression (token view)"] = replace(base, fsa=FSAConfig(view="token", encoders=("none",)))
    return rows


FSA_ROW = "token-wise FSA (funnel + LCE)"


def _ne_summary(ne: dict[str, float]) -> float:
    return float(np.mean([ne[t] for t in TASKS]))


def run_experiment(data_dir: str | os.PathLike[str], out: str | os.PathLike[str],
                   cfg: ExperimentConfig = ExperimentConfig(), log: Callable[[str], None] = print) -> dict:
    """Run (or resume) every row; returns the report (also ``OUT/report.json``, ``report.md``, PNGs)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    rows = encoder_rows(cfg)
    no_gap = replace(rows[FSA_ROW], gap_ms=0)
    world = open_world(data_dir)
    prepared = prepare(world, rows[FSA_ROW], cache_dir=out / "tokens")
    log(f"{prepared.users.size} users, {len(prepared.train):,} training examples in {prepared.train.n_groups:,} "
        f"(user, day) groups, {len(prepared.eval):,} evaluation examples")

    def record(key: str, value: dict) -> None:
        results[key] = value
        write_json(results, results_path)

    for seed in range(cfg.seeds):
        for label, row in rows.items():
            key = f"{label}|seed{seed}"
            if key in results:
                continue
            tower, backbone, meta = fit(prepared, replace(row, seed=seed), log=log)
            entry = {"ne": meta["eval"]["ne"], "auc": meta["eval"]["auc"], "watch_mse": meta["eval"]["watch_mse"],
                     "fsa_parameters": meta["parameters"]["fsa"], "examples_per_s": meta["examples_per_s"],
                     "out_shape": meta["tower_out_shape"]}
            if label == FSA_ROW:
                entry["staleness"] = _staleness(prepared, tower, backbone, row.gap_ms)
                save_run(out / "runs" / f"fsa_seed{seed}", tower, backbone, {**meta, "data": str(world.path.resolve())})
            record(key, entry)
            log(f"{label} (seed {seed}): mean NE {_ne_summary(entry['ne']):.4f}")
        key = f"FSA without the gap|seed{seed}"
        if key not in results:
            tower, backbone, meta = fit(prepared, replace(no_gap, seed=seed), log=log)
            save_run(out / "runs" / f"fsa_no_gap_seed{seed}", tower, backbone, {**meta, "data": str(world.path.resolve())})
            record(key, {"ne": meta["eval"]["ne"], "staleness": _staleness(prepared, tower, backbone, 0)})
    report = summarise(results, rows, cfg, prepared)
    build_report(report).write(out)
    return report


def _staleness(prepared: Prepared, tower, backbone, gap_ms: int) -> dict[str, dict[str, float]]:
    """NE per task on the evaluation day with embeddings ``age`` days old, for each age."""
    ev = prepared.eval
    return {str(age): evaluate(tower, backbone, ev, prepared.cache.tokens(
        ev.group_user, ev.group_anchor_ms - age * DAY_MS - gap_ms))["ne"] for age in STALENESS_DAYS}


def summarise(results: dict, rows: dict[str, DV365TrainConfig], cfg: ExperimentConfig, prepared: Prepared) -> dict:
    """Mean ± std over seeds per row; NE deltas relative to the backbone without a user tower."""
    seeds = range(cfg.seeds)
    base = {t: np.mean([results[f"no user tower|seed{s}"]["ne"][t] for s in seeds]) for t in TASKS}
    table = []
    for label in rows:
        runs = [results[f"{label}|seed{s}"] for s in seeds]
        ne = {t: mean_std([r["ne"][t] for r in runs]) for t in TASKS}
        table.append({"label": label, "ne": ne,
                      "delta_pct": {t: 100 * (ne[t][0] - base[t]) / base[t] for t in TASKS},
                      "mean_ne": mean_std([_ne_summary(r["ne"]) for r in runs]),
                      "parameters": runs[0]["fsa_parameters"], "out_shape": runs[0]["out_shape"],
                      "examples_per_s": float(np.mean([r["examples_per_s"] for r in runs]))})
    staleness = {}
    for name, key in (("24 h gap", FSA_ROW), ("no gap", "FSA without the gap")):
        runs = [results[f"{key}|seed{s}"]["staleness"] for s in seeds]
        staleness[name] = {age: {t: mean_std([r[age][t] for r in runs]) for t in TASKS}
                           for age in map(str, STALENESS_DAYS)}
    return {"config": asdict(cfg), "users": int(prepared.users.size), "train_examples": len(prepared.train),
            "train_groups": prepared.train.n_groups, "eval_examples": len(prepared.eval),
            "eval_positives": {t: int(prepared.eval.labels[:, k].sum()) for k, t in enumerate(TASKS)},
            "encoders": table, "staleness": staleness, "baseline_ne": base}


def build_report(report: dict) -> Report:
    """``report.md`` (the two tables), ``report.json`` (``report``), ``encoders.png`` and ``staleness.png``."""
    seeds = report["config"]["seeds"]
    pm = (lambda m: f"{m[0]:.4f} ± {m[1]:.4f}") if seeds > 1 else (lambda m: f"{m[0]:.4f}")
    encoders = Table([
        Column("tower", "label"),
        Column("output (R × C)", None, lambda r: "—" if r["label"] == "no user tower" else " × ".join(map(str, r["out_shape"]))),
        *(Column(f"NE {t}", None, lambda r, t=t: f"{pm(r['ne'][t])} ({r['delta_pct'][t]:+.2f}%)", right=True)
          for t in TASKS),
        Column("mean Δ NE", "delta_pct", lambda d: f"{np.mean(list(d.values())):+.2f}%", right=True),
        Column("FSA parameters", "parameters", "{:,}", right=True),
        Column("train examples/s", "examples_per_s", "{:,.0f}", right=True)], report["encoders"])
    staleness = Table([
        Column("training", "training"), Column("age (days)", "age", right=True),
        *(Column(f"NE {t}", "ne", lambda ne, t=t: pm(ne[t]), right=True) for t in TASKS),
        Column("mean NE", "ne", lambda ne: f"{np.mean([ne[t][0] for t in TASKS]):.4f}", right=True)],
        [{"training": name, "age": age, "ne": ne} for name, by_age in report["staleness"].items()
         for age, ne in by_age.items()])
    blocks = [f"Encoder comparison: NE per task on the evaluation day ({report['eval_examples']:,} impressions of "
              f"{report['users']:,} users; {report['train_examples']:,} training examples), Δ relative to the "
              f"backbone without a user tower; {seeds} seed(s).", encoders,
              "Staleness × gap: NE per task of the FSA when its embedding is N days old (the tower reads "
              "events before anchor − N days − gap).", staleness]
    return Report("report", data=report, blocks=blocks, figures=[
        Figure(lambda: _plot_encoders(report), "encoders", dpi=120),
        Figure(lambda: _plot_staleness(report), "staleness", dpi=120)])


def render_markdown(report: dict) -> str:
    """The two tables of the report as markdown."""
    return build_report(report).markdown()


def _plot_encoders(report: dict):
    """Mean Δ NE vs no tower per row, ± its std over seeds."""
    rows = report["encoders"]
    fig, ax = pyplot().subplots(figsize=(8, 4.5))
    labels = [r["label"] for r in rows]
    colors = ["#999999" if "no user" in lab else "#1f77b4" if lab.startswith("token") else "#ff7f0e"
              if lab.startswith("dim") else "#2ca02c" for lab in labels]
    # The spread over seeds of the mean NE, in % of the baseline's mean NE (0 with one seed).
    base_mean = np.mean(list(report["baseline_ne"].values()))
    hbars(ax, labels, [np.mean(list(r["delta_pct"].values())) for r in rows],
          [100 * r["mean_ne"][1] / base_mean for r in rows], color=colors)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("mean NE change over the 4 tasks vs no user tower (%; lower is better)")
    ax.set_title("DV365 encoder comparison (lifelong world)")
    fig.tight_layout()
    return fig


def _plot_staleness(report: dict):
    """Mean NE vs embedding age, per gap."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for name, by_age in report["staleness"].items():
        ages = [int(a) for a in by_age]
        ax.plot(ages, [np.mean([ne[t][0] for t in TASKS]) for ne in by_age.values()], marker="o", label=name)
    ax.axhline(np.mean(list(report["baseline_ne"].values())), color="#999999", linestyle="--", label="no user tower")
    ax.set_xlabel("embedding age (days)")
    ax.set_ylabel("mean NE over the 4 tasks (lower is better)")
    ax.set_title("DV365: NE vs embedding staleness")
    ax.legend()
    fig.tight_layout()
    return fig
