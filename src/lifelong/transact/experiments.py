"""The TransAct V2 paper's tables, reproduced on a rows directory (``lifelong transact experiment``).

Each table is a YAML file of rows (a label and a training configuration), packaged in
``lifelong/configs/experiments/NAME.yaml`` (:data:`EXPERIMENTS_DIR`, docs/configs.md); a path to
another such file runs it instead. Every row is trained and evaluated once per seed, then summarised as mean ± std over seeds, absolute and relative to the
table's baseline row (``(m − m_base) / m_base`` per seed, as the paper reports). Runs are kept
under ``OUT/runs/<row>/seed<k>`` and an evaluated run is never trained again, so an interrupted
experiment resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lifelong.core.config import build, load_file
from lifelong.core.errors import ConfigError
from lifelong.core.metrics import mean_std
from lifelong.core.report import Column, Figure, Report, hbars, pyplot
from lifelong.core.report import Table as ReportTable
from lifelong.data.io import write_json
from lifelong.transact.evaluate import evaluate_run
from lifelong.transact.rank_data import RankData
from lifelong.transact.trainer import TrainConfig, build_train_config, model_config, train


@dataclass(frozen=True)
class Row:
    """One row of a table: a label, the TrainConfig fields it sets, and whether it reads the
    experiment's DV365 user embedding (``run_experiment(user_emb=...)``)."""

    label: str
    config: dict = field(default_factory=dict)
    user_emb: bool = False


@dataclass(frozen=True)
class Table:
    """An experiment file: the report's title and its rows, the first being the baseline."""

    title: str
    rows: tuple[Row, ...]

    def __post_init__(self) -> None:
        if not self.rows:
            raise ConfigError("rows: an experiment needs at least one row")
        labels = [row.label for row in self.rows]
        if len(set(labels)) < len(labels):
            raise ConfigError(f"rows: labels must be distinct, got {labels}")


EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "configs" / "experiments"
"""The packaged experiment files (package data of ``lifelong``): ``NAME.yaml`` per table."""


def table_names() -> list[str]:
    """Names of the packaged experiments (``quickstart``, ``table2``, ...)."""
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def load_table(name: str | os.PathLike[str]) -> Table:
    """The experiment ``name`` (a packaged one, or a path to a YAML file), every row's config checked.

    Raises:
        ConfigError: no such experiment, an unknown key (``rows[1].config.w_nall``) or value.

    Example::

        >>> [row.label for row in load_table("quickstart").rows][0]
        'wide&deep'
    """
    path = Path(name)
    if path.suffix not in (".yaml", ".yml", ".json"):
        path = EXPERIMENTS_DIR / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown experiment {str(name)!r}; choose one of {', '.join(table_names())} "
                              "or give the path of a YAML file")
    try:
        table = build(Table, load_file(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for i, row in enumerate(table.rows):
        try:
            build_train_config(row.config)
        except ConfigError as exc:
            raise ConfigError(f"{path}: rows[{i}].config ({row.label}): {exc}") from None
    return table


def run_name(cfg: TrainConfig, resolved_model: Mapping[str, Any] | None = None) -> str:
    """Directory name of a run's configuration, seed aside: equal configurations share runs.

    The name hashes every model setting (``resolved_model``, default :func:`model_config` of
    ``cfg``), not only the ones ``cfg`` changes: a changed default names a new run, and a
    setting made explicit at its default names the same one.

    Example::

        >>> run_name(TrainConfig(model="bst", nal="none", seed=0)) == run_name(TrainConfig(model="bst", nal="none", seed=4))
        True
    """
    key = {k: v for k, v in asdict(cfg).items() if k not in ("seed", "model_overrides")}
    key["model_config"] = model_config(cfg) if resolved_model is None else resolved_model
    return f"{cfg.model}-{hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]}"


def run_experiment(table: str | os.PathLike[str], data_dir: str | os.PathLike[str], out: str | os.PathLike[str], seeds: int = 3,
                   epochs: int = 2, max_rows: int | None = None, log=print,
                   runs: str | os.PathLike[str] | None = None, user_emb: str | None = None,
                   eval_user_emb: str | None = None, sets: Iterable[str] = (), head: str = "repin",
                   **train_overrides) -> dict:
    """Train and evaluate every row of ``table`` for ``seeds`` seeds; write the report to ``out``.

    ``table`` names a packaged experiment (:func:`table_names`) or is the path of a YAML file
    of the same form (:func:`load_table`).

    ``train_overrides`` are TrainConfig fields applied to every row (e.g. ``batch_size``), and
    ``sets`` ``key=value`` overrides of every row's config as ``lifelong transact train --set``
    takes them (e.g. ``val_days=1``, ``model.token_similarity=false``). ``head`` is the head
    the report ranks by (HIT@3, NE, AUC and the plot; ``hide`` is always the second): ``repin``,
    or ``click`` for rows without saves (MIND). Runs
    live in ``runs`` (default ``out/runs``), one directory per configuration and seed; a run
    already evaluated is reused, so tables pointed at one ``runs`` directory share their common
    rows (TransAct V2 with impression NAL is a row of tables 2, 4, 6 and 7).

    Rows that read a DV365 user embedding (the ``dv365`` table) train with the export in the
    store ``user_emb`` and are evaluated with the one in ``eval_user_emb`` (default: the
    same). Export the first as of the training split's start, so that no training row's
    embedding has seen its label (``lifelong dv365 export --before-split DS:train``).

    Returns the summary written to ``out/report.json`` (also ``report.md`` and ``report.png``).

    Example::

        summary = run_experiment("table2", "datasets/small", "reports/table2", seeds=3)
    """
    if seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    spec = load_table(table)
    title, rows = spec.title, list(spec.rows)
    table = Path(table).stem if Path(table).suffix in (".yaml", ".yml", ".json") else str(table)
    if any(row.user_emb for row in rows) and user_emb is None:
        raise ConfigError(f"the {table} table trains with a DV365 user embedding: give --user-emb "
                          "(a `lifelong dv365 export` store)")
    out = Path(out)
    runs_dir = Path(runs) if runs is not None else out / "runs"
    data = RankData(data_dir, "eval")  # fails early on a bad rows directory
    if head not in data.heads or head == "hide":
        raise ConfigError(f"--head {head!r}: rank by one of {', '.join(h for h in data.heads if h != 'hide')}")
    results: dict[str, list[dict]] = {}
    for row in rows:
        results[row.label] = []
        for seed in range(seeds):
            emb = {"user_emb": user_emb} if row.user_emb else {}
            cfg = build_train_config({**row.config, "seed": seed, "epochs": epochs, "max_rows": max_rows,
                                      **train_overrides, **emb}, sets)
            eval_emb = (eval_user_emb or user_emb) if row.user_emb else None
            run = runs_dir / run_name(cfg) / f"seed{seed}"
            done = run / "evaluation.json"
            if done.exists():
                previous = json.loads(done.read_text())
                if previous.get("train") == json.loads(json.dumps(asdict(cfg))) and previous.get("eval_user_emb") == eval_emb:
                    results[row.label].append(previous)
                    continue
                shutil.rmtree(run)  # a hash collision or a hand-edited run: redo it
            meta = train(data_dir, run, cfg, log=lambda s: None)
            ev = evaluate_run(run, data_dir, user_emb=eval_emb).to_dict()
            ev["examples_per_s"] = meta["examples_per_s"]
            ev["parameters"] = meta["parameters"]
            ev["train"] = json.loads(json.dumps(asdict(cfg)))
            ev["eval_user_emb"] = eval_emb
            write_json(ev, done)
            results[row.label].append(ev)
            log(f"{row.label} seed {seed}: HIT@3 {head} {ev['per_head'][head]['hit@3']:.4f}, "
                f"hide {ev['per_head']['hide']['hit@3']:.4f}")
    summary = summarise(table, title, rows, results, data.oracle is not None, head)
    build_report(summary).write(out)
    return summary


def summarise(table: str, title: str, rows: list[Row], results: dict[str, list[dict]], has_oracle: bool,
              head: str = "repin") -> dict:
    """Mean ± std per row of HIT@3 (``head`` and hide), NE, AUC, relative figures and oracle lift.

    The summary's keys keep the names ``*_repin`` whichever head ``head`` is; ``summary["head"]``
    names it.
    """
    ranked = {"repin": head, "hide": "hide"}
    base = results[rows[0].label]
    out_rows = []
    for row in rows:
        res = results[row.label]
        entry: dict = {"label": row.label, "config": row.config, "seeds": len(res)}
        for key, name in ranked.items():
            hits = [r["per_head"][name]["hit@3"] for r in res]
            base_hits = [b["per_head"][name]["hit@3"] for b in base]
            rel = [(h - b) / b if b else float("nan") for h, b in zip(hits, base_hits)]  # no base hit: undefined
            entry[f"hit_{key}"] = mean_std(hits)
            entry[f"rel_{key}"] = mean_std(rel)
            entry[f"ne_{key}"] = mean_std([r["per_head"][name]["ne"] for r in res])
            entry[f"auc_{key}"] = mean_std([r["per_head"][name]["auc"] for r in res])
        # NE of every head, and its gain over the base row per seed (DV365's figure: positive helps).
        entry["ne"] = {h: mean_std([r["per_head"][h]["ne"] for r in res]) for h in res[0]["per_head"]}
        entry["ne_gain"] = {h: mean_std([(b["per_head"][h]["ne"] - r["per_head"][h]["ne"]) / b["per_head"][h]["ne"]
                                         for r, b in zip(res, base)]) for h in res[0]["per_head"]}
        if has_oracle:
            entry["lift_repin"] = mean_std([r["lift_fraction"][head] for r in res])
        entry["examples_per_s"] = mean_std([r["examples_per_s"] for r in res])
        out_rows.append(entry)
    summary = {"table": table, "title": title, "head": head, "rows": out_rows}
    if has_oracle:
        first = base[0]
        summary["oracle"] = {k: first["oracle_hit"][name] for k, name in ranked.items()}
        summary["random"] = {k: first["random_hit"][name] for k, name in ranked.items()}
        if "oracle_ne" in first:  # evaluations kept from before the oracle's NE was recorded lack it
            summary["oracle_ne"] = first["oracle_ne"]
    return summary


def _ms(pair, pct=False, digits=4, pct_digits=1) -> str:
    m, s = pair
    return f"{100 * m:+.{pct_digits}f}% ± {100 * s:.{pct_digits}f}" if pct else f"{m:.{digits}f} ± {s:.{digits}f}"


def build_report(summary: dict) -> Report:
    """The report of a summary: ``report.md`` (mean ± std over seeds), ``report.json`` (the
    summary) and ``report.png`` (:func:`plot_report`)."""
    oracle = "oracle" in summary
    head = summary.get("head", "repin")
    columns = [Column("row", "label"), Column(f"HIT@3/{head}", "hit_repin", _ms),
               Column(f"Δ {head} vs base", "rel_repin", lambda p: _ms(p, True)), Column("HIT@3/hide", "hit_hide", _ms),
               Column("Δ hide vs base", "rel_hide", lambda p: _ms(p, True)), Column(f"NE/{head}", "ne_repin", _ms),
               Column(f"AUC/{head}", "auc_repin", _ms)]
    if oracle:
        columns.append(Column(f"oracle lift ({head})", "lift_repin", lambda p: _ms(p, digits=3)))
    columns.append(Column("train ex/s", "examples_per_s", lambda p: f"{p[0]:,.0f}"))
    rows = list(summary["rows"])
    if oracle:
        rows += [{"label": label, "hit_repin": f"{summary[key]['repin']:.4f}", "hit_hide": f"{summary[key]['hide']:.4f}",
                  "lift_repin": lift} for label, key, lift in (("oracle", "oracle", "1.000"),
                                                               ("random order", "random", "0.000"))]
    blocks: list = [ReportTable(columns, rows)]
    heads = list(summary["rows"][0].get("ne", {}))
    if heads:
        blocks += ["NE per head, and its gain over the first row (−ΔNE / NE_base; positive is better):",
                   ReportTable([Column("row", "label"),
                                *(Column(f"NE/{h}", None, lambda r, h=h: _ms(r["ne"][h])) for h in heads),
                                *(Column(f"gain {h}", None, lambda r, h=h: _ms(r["ne_gain"][h], True, pct_digits=2))
                                  for h in heads)], summary["rows"])]
        if "oracle_ne" in summary:
            blocks.append("The oracle's NE (its true probabilities; the floor on this split): "
                          + ", ".join(f"{h} {summary['oracle_ne'][h]:.4f}" for h in heads) + ".")
    n = summary["rows"][0]["seeds"]
    blocks.append(f"{n} seed{'s' if n > 1 else ''} per row; ± is the standard deviation over seeds.")
    return Report("report", data=summary, blocks=blocks, title=summary["title"],
                  figures=[Figure(lambda: plot_report(summary))])


def render_markdown(summary: dict) -> str:
    """The report as a markdown table (mean ± std over seeds)."""
    return build_report(summary).markdown()


def plot_report(summary: dict):
    """Bar chart of HIT@3 for repin and hide per row, with std error bars and oracle/random lines (a
    matplotlib figure)."""
    rows = summary["rows"]
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 0.6 * len(rows) + 2.2))
    for ax, key in zip(axes, ("repin", "hide")):
        hbars(ax, [r["label"] for r in rows], [r[f"hit_{key}"][0] for r in rows], [r[f"hit_{key}"][1] for r in rows],
              color="#3b6ea8", fontsize=8)
        if "oracle" in summary:
            ax.axvline(summary["oracle"][key], color="#27ae60", linestyle="--", label="oracle")
            ax.axvline(summary["random"][key], color="#c0392b", linestyle=":", label="random order")
            ax.legend(fontsize=8, loc="lower right")
        name = summary.get("head", "repin") if key == "repin" else key
        ax.set_xlabel(f"HIT@3/{name} ({'higher' if key == 'repin' else 'lower'} is better)")
    fig.suptitle(summary["title"], fontsize=11)
    fig.tight_layout()
    return fig
