"""The TransAct V2 paper's tables, reproduced on a rows directory (``lifelong transact experiment``).

Each table is a list of rows (a label and a training configuration); every row is trained and
evaluated once per seed, then summarised as mean ± std over seeds, absolute and relative to the
table's baseline row (``(m − m_base) / m_base`` per seed, as the paper reports). Runs are kept
under ``OUT/runs/<row>/seed<k>`` and an evaluated run is never trained again, so an interrupted
experiment resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lifelong.core.errors import ConfigError
from lifelong.core.metrics import mean_std
from lifelong.data.io import write_json
from lifelong.transact.evaluate import evaluate_run
from lifelong.transact.rank_data import RankData
from lifelong.transact.trainer import TrainConfig, train


@dataclass(frozen=True)
class Row:
    """One row of a table: a label, the TrainConfig fields it sets, and whether it reads the
    experiment's DV365 user embedding (``run_experiment(user_emb=...)``)."""

    label: str
    config: dict = field(default_factory=dict)
    user_emb: bool = False


_V2 = {"model": "transact_v2", "nal": "impression"}
TABLES: dict[str, tuple[str, list[Row]]] = {
    "quickstart": ("Quickstart: sequences and the lifelong sequence (relative to wide&deep)", [
        Row("wide&deep", {"model": "wide_deep", "nal": "none"}),
        Row("TransAct (RT)", {"model": "transact", "nal": "none"}),
        Row("TransAct V2 (RT + LL + NAL impression)", _V2),
    ]),
    "table2": ("Table 2: ablation (relative to wide&deep)", [
        Row("wide&deep", {"model": "wide_deep", "nal": "none"}),
        Row("BST", {"model": "bst", "nal": "none"}),
        Row("TransAct", {"model": "transact", "nal": "none"}),
        Row("TransAct + NAL in-batch", {"model": "transact", "nal": "in_batch"}),
        Row("TransAct + NAL impression", {"model": "transact", "nal": "impression"}),
        Row("TransAct V2 (RT + LL + NAL impression)", _V2),
    ]),
    "table4": ("Table 4: NAL negative sampling in TransAct V2 (relative to no NAL)", [
        Row("TransAct V2, no NAL", {"model": "transact_v2", "nal": "none"}),
        Row("NAL in-batch negatives", {"model": "transact_v2", "nal": "in_batch"}),
        Row("NAL impression negatives", _V2),
    ]),
    "table6": ("Table 6: NAL weight (relative to no NAL)", [
        Row("w_NAL = 0", {"model": "transact_v2", "nal": "none"}),
        *[Row(f"w_NAL = {w:g}", {**_V2, "w_nal": w}) for w in (1e-4, 1e-3, 1e-2, 1e-1)],
    ]),
    "table7": ("Table 7: NAL loss (relative to sampled softmax)", [
        Row("sampled softmax", _V2),
        Row("BCE", {**_V2, "nal_loss": "bce"}),
    ]),
    "dv365": ("DV365 user embedding prepended to TransAct V2 (relative to without)", [
        Row("TransAct V2", _V2),
        Row("TransAct V2 + DV365 user tokens", _V2, user_emb=True),
    ]),
}


def run_name(cfg: TrainConfig) -> str:
    """Directory name of a run's configuration, seed aside: equal configurations share runs.

    Example::

        >>> run_name(TrainConfig(model="bst", nal="none", seed=0)) == run_name(TrainConfig(model="bst", nal="none", seed=4))
        True
    """
    key = {k: v for k, v in asdict(cfg).items() if k != "seed"}
    return f"{cfg.model}-{hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]}"


def run_experiment(table: str, data_dir: str | os.PathLike[str], out: str | os.PathLike[str], seeds: int = 3,
                   epochs: int = 2, max_rows: int | None = None, log=print,
                   runs: str | os.PathLike[str] | None = None, user_emb: str | None = None,
                   eval_user_emb: str | None = None, **train_overrides) -> dict:
    """Train and evaluate every row of ``table`` for ``seeds`` seeds; write the report to ``out``.

    ``train_overrides`` are TrainConfig fields applied to every row (e.g. ``batch_size``). Runs
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
    if table not in TABLES:
        raise ConfigError(f"unknown experiment {table!r}; choose one of {', '.join(TABLES)}")
    if seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    title, rows = TABLES[table]
    if any(row.user_emb for row in rows) and user_emb is None:
        raise ConfigError(f"the {table} table trains with a DV365 user embedding: give --user-emb "
                          "(a `lifelong dv365 export` store)")
    out = Path(out)
    runs_dir = Path(runs) if runs is not None else out / "runs"
    data = RankData(data_dir, "eval")  # fails early on a bad rows directory
    results: dict[str, list[dict]] = {}
    for row in rows:
        results[row.label] = []
        for seed in range(seeds):
            emb = {"user_emb": user_emb} if row.user_emb else {}
            cfg = TrainConfig(**{**row.config, "seed": seed, "epochs": epochs, "max_rows": max_rows, **train_overrides,
                                 **emb})
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
            log(f"{row.label} seed {seed}: HIT@3 repin {ev['per_head']['repin']['hit@3']:.4f}, "
                f"hide {ev['per_head']['hide']['hit@3']:.4f}")
    summary = summarise(table, title, rows, results, data.oracle is not None)
    out.mkdir(parents=True, exist_ok=True)
    write_json(summary, out / "report.json")
    (out / "report.md").write_text(render_markdown(summary))
    plot_report(summary, out / "report.png")
    return summary


def summarise(table: str, title: str, rows: list[Row], results: dict[str, list[dict]], has_oracle: bool) -> dict:
    """Mean ± std per row of HIT@3 (repin, hide), NE, AUC, relative figures and oracle lift."""
    base = results[rows[0].label]
    out_rows = []
    for row in rows:
        res = results[row.label]
        entry: dict = {"label": row.label, "config": row.config, "seeds": len(res)}
        for head in ("repin", "hide"):
            hits = [r["per_head"][head]["hit@3"] for r in res]
            base_hits = [b["per_head"][head]["hit@3"] for b in base]
            rel = [(h - b) / b if b else float("nan") for h, b in zip(hits, base_hits)]  # no base hit: undefined
            entry[f"hit_{head}"] = mean_std(hits)
            entry[f"rel_{head}"] = mean_std(rel)
            entry[f"ne_{head}"] = mean_std([r["per_head"][head]["ne"] for r in res])
            entry[f"auc_{head}"] = mean_std([r["per_head"][head]["auc"] for r in res])
        # NE of every head, and its gain over the base row per seed (DV365's figure: positive helps).
        entry["ne"] = {h: mean_std([r["per_head"][h]["ne"] for r in res]) for h in res[0]["per_head"]}
        entry["ne_gain"] = {h: mean_std([(b["per_head"][h]["ne"] - r["per_head"][h]["ne"]) / b["per_head"][h]["ne"]
                                         for r, b in zip(res, base)]) for h in res[0]["per_head"]}
        if has_oracle:
            entry["lift_repin"] = mean_std([r["lift_fraction"]["repin"] for r in res])
        entry["examples_per_s"] = mean_std([r["examples_per_s"] for r in res])
        out_rows.append(entry)
    summary = {"table": table, "title": title, "rows": out_rows}
    if has_oracle:
        first = base[0]
        summary["oracle"] = {h: first["oracle_hit"][h] for h in ("repin", "hide")}
        summary["random"] = {h: first["random_hit"][h] for h in ("repin", "hide")}
    return summary


def render_markdown(summary: dict) -> str:
    """The report as a markdown table (mean ± std over seeds)."""
    oracle = "oracle" in summary
    lines = [f"### {summary['title']}", "",
             "| row | HIT@3/repin | Δ repin vs base | HIT@3/hide | Δ hide vs base | NE/repin | AUC/repin |"
             + (" oracle lift (repin) |" if oracle else "") + " train ex/s |",
             "|---|---|---|---|---|---|---|" + ("---|" if oracle else "") + "---|"]

    def ms(pair, pct=False, digits=4, pct_digits=1):
        m, s = pair
        return f"{100 * m:+.{pct_digits}f}% ± {100 * s:.{pct_digits}f}" if pct else f"{m:.{digits}f} ± {s:.{digits}f}"

    for r in summary["rows"]:
        cells = [r["label"], ms(r["hit_repin"]), ms(r["rel_repin"], True), ms(r["hit_hide"]), ms(r["rel_hide"], True),
                 ms(r["ne_repin"]), ms(r["auc_repin"])]
        if oracle:
            cells.append(ms(r["lift_repin"], digits=3))
        cells.append(f"{r['examples_per_s'][0]:,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    if oracle:
        lines.append(f"| oracle | {summary['oracle']['repin']:.4f} | | {summary['oracle']['hide']:.4f} | | | |"
                     " 1.000 | |")
        lines.append(f"| random order | {summary['random']['repin']:.4f} | | {summary['random']['hide']:.4f} | | | |"
                     " 0.000 | |")
    heads = list(summary["rows"][0].get("ne", {}))
    if heads:
        lines += ["", "NE per head, and its gain over the first row (−ΔNE / NE_base; positive is better):", "",
                  "| row | " + " | ".join(f"NE/{h}" for h in heads) + " | " + " | ".join(f"gain {h}" for h in heads) + " |",
                  "|---|" + "---|" * (2 * len(heads))]
        for r in summary["rows"]:
            lines.append("| " + " | ".join([r["label"], *(ms(r["ne"][h]) for h in heads),
                                            *(ms(r["ne_gain"][h], True, pct_digits=2) for h in heads)]) + " |")
    lines.append("")
    n = summary["rows"][0]["seeds"]
    lines.append(f"{n} seed{'s' if n > 1 else ''} per row; ± is the standard deviation over seeds.")
    return "\n".join(lines) + "\n"


def plot_report(summary: dict, png: Path) -> None:
    """Bar chart of HIT@3 for repin and hide per row, with std error bars and oracle/random lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.6 * len(rows) + 2.2))
    for ax, head in zip(axes, ("repin", "hide")):
        means = [r[f"hit_{head}"][0] for r in rows]
        stds = [r[f"hit_{head}"][1] for r in rows]
        y = np.arange(len(rows))[::-1]
        ax.barh(y, means, xerr=stds, color="#3b6ea8", capsize=3)
        ax.set_yticks(y, [r["label"] for r in rows], fontsize=8)
        if "oracle" in summary:
            ax.axvline(summary["oracle"][head], color="#27ae60", linestyle="--", label="oracle")
            ax.axvline(summary["random"][head], color="#c0392b", linestyle=":", label="random order")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xlabel(f"HIT@3/{head} ({'higher' if head == 'repin' else 'lower'} is better)")
    fig.suptitle(summary["title"], fontsize=11)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
