"""``lifelong transact …``: TransAct V2's commands (rows with NN feature logging, the rankers,
their evaluation and the paper's tables).

Each command is one function on :data:`transact_app`; :mod:`lifelong.cli` mounts the app as
``transact``. User errors raise :class:`~lifelong.core.errors.LifelongError` and the main CLI
prints them as one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lifelong.cli.options import PROTOCOL_HELP, protocol_days
from lifelong.core.console import out

transact_app = typer.Typer(no_args_is_help=True, help="TransAct V2: build rows, train and evaluate rankers, the paper's tables.")


@transact_app.command()
def build(
    data: Annotated[Path, typer.Option("--data", help="A world or an ingested dataset directory.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Rows directory to write.")],
    neg_rate: Annotated[float, typer.Option(help="Share of label-free training rows kept (weighted 1/rate).")] = 1.0,
    ll_cap: Annotated[int, typer.Option(help="Most S_LL tokens searched per request.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Seed of the negative down-sampling.")] = 0,
    protocol: Annotated[str | None, typer.Option(help=PROTOCOL_HELP)] = None,
    engine: Annotated[str, typer.Option(help="local (this process) | ray (Ray tasks over chunks of users' "
                                             "requests; the `distributed` extra). Both write the same rows.")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="With --engine ray: the cluster, HOST:PORT or "
                                                         "ray://HOST:PORT [default: a local Ray].")] = None,
) -> None:
    """Build training and evaluation rows with NN feature logging (S_all per candidate)."""
    from lifelong.transact.training_rows import BuildConfig, build_rows

    meta = build_rows(data, out_dir, BuildConfig(ll_cap=ll_cap, train_negative_rate=neg_rate, seed=seed,
                                                 protocol_days=protocol_days(protocol)),
                      engine=engine, ray_address=ray_address)
    table = Table(title=f"rows {out_dir}  ({meta['seconds']:.1f} s)")
    for col in ("split", "rows", "requests", "rows/s", "label rates"):
        table.add_column(col, justify="right")
    for split, m in meta["splits"].items():
        rates = "  ".join(f"{h} {v:.3f}" for h, v in m["label_rates"].items())
        table.add_row(split, f"{m['rows']:,}", f"{m['requests']:,}", f"{m['rows_per_s']:,}", rates)
    out.print(table)


CONFIG_HELP = "YAML/JSON file of settings (docs/configs.md); explicit flags and --set win over it."
SET_HELP = "Set a key (repeatable), e.g. --set model.d_model=64 --set model.mlp_dims=[128,64]; wins over flags."


@transact_app.command()
def train(
    data: Annotated[Path, typer.Option("--data", help="Rows directory (lifelong transact build).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory.")],
    model: Annotated[str | None, typer.Option(help="wide_deep | bst | transact | transact_v2 | din "
                                                   "(or model: in --config)")] = None,
    config: Annotated[Path | None, typer.Option("--config", help=CONFIG_HELP)] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    nal: Annotated[str | None, typer.Option(help="none | in_batch | impression [default: none]")] = None,
    nal_loss: Annotated[str | None, typer.Option(help="softmax | bce [default: softmax]")] = None,
    w_nal: Annotated[float | None, typer.Option(help="Weight of the Next Action Loss [default: 0.01].")] = None,
    epochs: Annotated[int | None, typer.Option(help="[default: 2]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="[default: 512]")] = None,
    lr: Annotated[float | None, typer.Option(help="[default: 0.002]")] = None,
    seed: Annotated[int | None, typer.Option(help="[default: 0]")] = None,
    max_rows: Annotated[int | None, typer.Option(help="Train on a seeded subset of this many rows.")] = None,
    user_emb: Annotated[str | None, typer.Option(help="A `lifelong dv365 export` store: prepend each row's frozen user "
                                                      "embedding as tokens (transact models).")] = None,
    nproc: Annotated[int | None, typer.Option(help="Train data-parallel (DDP) in N local processes, each taking "
                                                   "batch_size / N rows of every batch (docs/scaling.md). Not under "
                                                   "torchrun, which starts the ranks itself.")] = None,
    val_days: Annotated[float | None, typer.Option(help="Hold out the last N days of training rows as validation: NE "
                                                        "after every epoch, the best epoch kept [default: 0, off].")] = None,
    patience: Annotated[int | None, typer.Option(help="Stop after N epochs without a lower validation NE; --epochs is "
                                                      "then a maximum [default: 0, off].")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Steps of linear learning-rate warmup [default: 0].")] = None,
    lr_schedule: Annotated[str | None, typer.Option(help="constant | cosine [default: constant].")] = None,
    clip_norm: Annotated[float | None, typer.Option(help="Clip the gradient norm to this [default: 0, off].")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32 | bf16: the forward pass under bfloat16 autocast, fast "
                                                       "on CPUs with bfloat16 units [default: fp32].")] = None,
) -> None:
    """Train a ranker (L = L_CE + w_NAL * L_NAL); prints losses and examples/s.

    Settings are layered: the defaults (nal none), the --config file, the flags given, then --set.
    A rerun of an interrupted run resumes after its last finished epoch.
    """
    import json

    from lifelong.core.config import load_file, merge, parse_set
    from lifelong.core.distributed import launch, ranks_from_env
    from lifelong.core.errors import ConfigError
    from lifelong.transact.trainer import build_train_config
    from lifelong.transact.trainer import train as run_train

    layer = merge({"nal": "none"}, load_file(config) if config is not None else {})
    flags = {"model": model, "nal": nal, "nal_loss": nal_loss, "w_nal": w_nal, "epochs": epochs,
             "batch_size": batch_size, "lr": lr, "seed": seed, "max_rows": max_rows, "user_emb": user_emb,
             "val_days": val_days, "patience": patience, "warmup_steps": warmup_steps, "lr_schedule": lr_schedule,
             "clip_norm": clip_norm, "precision": precision}
    sets = [parse_set(text) for text in set_ or []]
    named = "name" in layer["model"] if isinstance(layer.get("model"), dict) else "model" in layer
    if not (named or model is not None or any(key in ("model", "model.name") for key, _ in sets)):
        raise ConfigError("name the model: --model NAME, model: NAME in --config, or --set model=NAME")
    cfg = build_train_config(layer, [(k, v) for k, v in flags.items() if v is not None] + sets)
    if nproc is None:  # one process, or one rank of a torchrun launch
        meta = run_train(data, out_dir, cfg, log=out.print)
        if not ranks_from_env().main:
            return
    else:
        launch(run_train, (data, out_dir, cfg), nproc, batches={"batch_size": cfg.batch_size},
               hint="rerun the same command to resume after the last finished epoch")
        meta = json.loads((out_dir / "run.json").read_text())
    out.print(f"[green]wrote[/green] {out_dir}  ({meta['parameters']:,} parameters, "
              f"{meta['examples_per_s']:,.0f} examples/s)")


@transact_app.command()
def evaluate(
    run: Annotated[Path, typer.Option("--run", help="Run directory (lifelong transact train).")],
    data: Annotated[Path, typer.Option("--data", help="Rows directory (lifelong transact build).")],
    user_emb: Annotated[str | None, typer.Option(help="For a run trained with --user-emb: the store to read the "
                                                      "users' embeddings from [default: the run's].")] = None,
) -> None:
    """HIT@3, NE, AUC and GAUC per head; on simulated worlds the oracle and the lift fraction."""
    from lifelong.transact.evaluate import evaluate_run

    ev = evaluate_run(run, data, user_emb=user_emb)
    table = Table(title=f"{run} on {data}: {ev.rows:,} rows, {ev.requests:,} requests, {ev.users:,} users")
    cols = ["head", "HIT@3", "NE", "AUC", "GAUC"] + (["oracle HIT@3", "random HIT@3", "oracle lift", "oracle NE"]
                                                     if ev.oracle_hit else [])
    for col in cols:
        table.add_column(col, justify="right")
    for head, m in ev.per_head.items():
        cells = [head, f"{m['hit@3']:.4f}", f"{m['ne']:.4f}", f"{m['auc']:.4f}", f"{m['gauc']:.4f}"]
        if ev.oracle_hit:
            cells += [f"{ev.oracle_hit[head]:.4f}", f"{ev.random_hit[head]:.4f}", f"{ev.lift_fraction[head]:.3f}",
                      f"{ev.oracle_ne[head]:.4f}"]
        table.add_row(*cells)
    out.print(table)


@transact_app.command()
def experiment(
    table: Annotated[str, typer.Argument(help="quickstart | table2 | table4 | table6 | table7 | dv365 | similarity (files in "
                                              "lifelong/configs/experiments/), or the path of an experiment YAML file")],
    data: Annotated[Path, typer.Option("--data", help="Rows directory (lifelong transact build).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Report directory (resumable).")],
    seeds: Annotated[int, typer.Option()] = 3,
    epochs: Annotated[int, typer.Option()] = 2,
    max_rows: Annotated[int | None, typer.Option(help="Train each run on a seeded subset.")] = None,
    runs: Annotated[Path | None, typer.Option(
        help="Run directory shared across tables (rows with equal configurations train once) [default: OUT/runs].")] = None,
    user_emb: Annotated[str | None, typer.Option(help="dv365 table: the DV365 export the user-token rows train "
                                                      "with (exported before the training split).")] = None,
    eval_user_emb: Annotated[str | None, typer.Option(help="dv365 table: the export they are evaluated with "
                                                           "[default: --user-emb].")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value for every row's training config, as "
                                                   "`transact train --set` (e.g. val_days=1, patience=2, "
                                                   "lr_schedule=cosine); repeatable.")] = None,
    head: Annotated[str, typer.Option(help="The head the report ranks by (HIT@3, NE, AUC): repin, or click for "
                                           "data without saves (MIND).")] = "repin",
) -> None:
    """Reproduce one of the TransAct V2 paper's tables (or the dv365 one): markdown, JSON and a bar chart."""
    from lifelong.transact.experiments import render_markdown, run_experiment

    summary = run_experiment(table, data, out_dir, seeds=seeds, epochs=epochs, max_rows=max_rows, log=out.print,
                             runs=runs, user_emb=user_emb, eval_user_emb=eval_user_emb, sets=set_ or (), head=head)
    out.print(render_markdown(summary))
    out.print(f"report: {out_dir / 'report.md'}, {out_dir / 'report.json'}, {out_dir / 'report.png'}")


@transact_app.command()
def peers(
    data: Annotated[Path, typer.Option("--data", help="Rows directory (lifelong transact build).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Report directory (resumable: scored models are kept).")],
    head: Annotated[str, typer.Option(help="The one head exported and scored: repin, or click (MIND).")] = "repin",
    models: Annotated[str | None, typer.Option(help="FuxiCTR models, comma-separated [default: every one of "
                                                    "configs/peers.yaml: DIN, SIM, ETA, TWIN, TransAct].")] = None,
    ours: Annotated[list[str] | None, typer.Option(help="One of our rankers, a label of configs/peers.yaml (labels "
                                                        "hold commas, so repeat the option) [default: all].")] = None,
    val_days: Annotated[float, typer.Option(help="The validation split of both families: the last N training days.")] = 1.0,
    seed: Annotated[int, typer.Option()] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value for our rankers' training config "
                                                   "(e.g. patience=1); repeatable.")] = None,
    fuxictr_epochs: Annotated[int | None, typer.Option(help="At most N epochs for the FuxiCTR models [default: "
                                                            "their templates' 100, cut by their early stopping].")] = None,
    fuxictr_set: Annotated[list[str] | None, typer.Option("--fuxictr-set", help="key=value replacing a template "
                                                          "value of every FuxiCTR model (e.g. batch_size=512); "
                                                          "named in the model's label; repeatable.")] = None,
) -> None:
    """FuxiCTR's LongCTR models (the `peers` extra) and our rankers on the same rows: AUC, NE, HIT@3."""
    from lifelong.bench.peers import run_peers
    from lifelong.core.config import parse_set

    def names(text: str | None) -> list[str] | None:
        return None if text is None else [m.strip() for m in text.split(",") if m.strip()]

    report = run_peers(data, out_dir, head=head, val_days=val_days, fuxictr_models=names(models), ours=ours,
                       seed=seed, train_sets=set_ or (), log=out.print,
                       fuxictr_overrides={**dict(parse_set(text) for text in fuxictr_set or ()),
                                          **({} if fuxictr_epochs is None else {"epochs": fuxictr_epochs})})
    out.print(f"report: {out_dir / 'report.md'}, {out_dir / 'report.json'} ({len(report['results'])} models)")
