"""The ``lifelong`` command line.

User errors (bad input files, unknown presets or keys) print one red line and exit with
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lifelong.console import err, out
from lifelong.dv365.cli import dv365_app
from lifelong.errors import LifelongError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="lifelong: recommendation with lifelong user action sequences.")


@app.command()
def simulate(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write the world into.")],
    preset: Annotated[str | None, typer.Option(help="tiny | small | bench | lifelong [default: the config file's, else small]")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML/JSON config file layered over the preset.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key, e.g. --set seed=3.")] = None,
) -> None:
    """Simulate a world with ground-truth oracle probabilities (see WORLD.md)."""
    from lifelong.data.world import load_config, simulate_to

    cfg = load_config(preset=preset, config_file=config, overrides=list(set_ or []))
    start = time.perf_counter()
    meta = simulate_to(cfg, out_dir)
    seconds = time.perf_counter() - start
    counts = meta["counts"]
    out.print(f"[green]wrote[/green] {out_dir}  ({counts['events']:,} events, {counts['users']:,} users, "
              f"{counts['items']:,} items) in {seconds:.1f} s")


@app.command()
def ingest(
    source: Annotated[str, typer.Argument(help="kuairand | movielens | mind | taobao")],
    src: Annotated[Path, typer.Argument(help="The dataset folder, e.g. ../shared/data/kuairand27k-likehate")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write the dataset into.")],
) -> None:
    """Convert a real public dataset into lifelong's schema (items, events, users)."""
    from lifelong.data.ingest import ingest as run_ingest

    start = time.perf_counter()
    report = run_ingest(source, src, out_dir)
    table = Table(title=f"ingest {source} -> {out_dir}  ({time.perf_counter() - start:.1f} s)", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for label, value in report.summary():
        table.add_row(label, value)
    out.print(table)


@app.command()
def inspect(
    directory: Annotated[Path, typer.Argument(help="A world or an ingested dataset directory.")],
    png: Annotated[Path | None, typer.Option(help="Histogram path [default: DIR/history_lengths.png].")] = None,
) -> None:
    """Print a dataset's sizes, action rates, history lengths and surfaces; plot history lengths."""
    from lifelong.data.inspect import inspect_dataset, plot_history_lengths

    report = inspect_dataset(directory)
    png = plot_history_lengths(report, png or directory / "history_lengths.png")
    _print_inspection(report, png)


@app.command()
def build(
    data: Annotated[Path, typer.Option("--data", help="A world or an ingested dataset directory.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Rows directory to write.")],
    neg_rate: Annotated[float, typer.Option(help="Share of label-free training rows kept (weighted 1/rate).")] = 1.0,
    ll_cap: Annotated[int, typer.Option(help="Most S_LL tokens searched per request.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Seed of the negative down-sampling.")] = 0,
    protocol: Annotated[str | None, typer.Option(
        help="TRAIN_DAYS,GAP_DAYS,EVAL_DAYS placed at the end of the data [default: the dataset's dates].")] = None,
) -> None:
    """Build training and evaluation rows with NN feature logging (S_all per candidate)."""
    from lifelong.errors import ConfigError
    from lifelong.features.training_rows import BuildConfig, build_rows

    days = None
    if protocol is not None:
        try:
            days = tuple(float(x) for x in protocol.split(","))
        except ValueError:
            days = ()
        if len(days) != 3 or min(days) < 0 or days[0] <= 0 or days[2] <= 0:
            raise ConfigError(f"--protocol expects TRAIN_DAYS,GAP_DAYS,EVAL_DAYS (positive train/eval), got {protocol!r}")
    meta = build_rows(data, out_dir, BuildConfig(ll_cap=ll_cap, train_negative_rate=neg_rate, seed=seed,
                                                 protocol_days=days))
    table = Table(title=f"rows {out_dir}  ({meta['seconds']:.1f} s)")
    for col in ("split", "rows", "requests", "rows/s", "label rates"):
        table.add_column(col, justify="right")
    for split, m in meta["splits"].items():
        rates = "  ".join(f"{h} {v:.3f}" for h, v in m["label_rates"].items())
        table.add_row(split, f"{m['rows']:,}", f"{m['requests']:,}", f"{m['rows_per_s']:,}", rates)
    out.print(table)


@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", help="Rows directory (lifelong build).")],
    model: Annotated[str, typer.Option(help="wide_deep | bst | transact | transact_v2")],
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory.")],
    nal: Annotated[str, typer.Option(help="none | in_batch | impression")] = "none",
    nal_loss: Annotated[str, typer.Option(help="softmax | bce")] = "softmax",
    w_nal: Annotated[float, typer.Option(help="Weight of the Next Action Loss.")] = 0.01,
    epochs: Annotated[int, typer.Option()] = 2,
    batch_size: Annotated[int, typer.Option()] = 512,
    lr: Annotated[float, typer.Option()] = 2e-3,
    seed: Annotated[int, typer.Option()] = 0,
    max_rows: Annotated[int | None, typer.Option(help="Train on a seeded subset of this many rows.")] = None,
    user_emb: Annotated[str | None, typer.Option(help="A `lifelong dv365 export` store: prepend each row's frozen user "
                                                      "embedding as tokens (transact models).")] = None,
) -> None:
    """Train a ranker (L = L_CE + w_NAL * L_NAL); prints losses and examples/s."""
    from lifelong.train.trainer import TrainConfig
    from lifelong.train.trainer import train as run_train

    cfg = TrainConfig(model=model, nal=nal, nal_loss=nal_loss, w_nal=w_nal, epochs=epochs, batch_size=batch_size,
                      lr=lr, seed=seed, max_rows=max_rows, user_emb=user_emb)
    meta = run_train(data, out_dir, cfg, log=out.print)
    out.print(f"[green]wrote[/green] {out_dir}  ({meta['parameters']:,} parameters, "
              f"{meta['examples_per_s']:,.0f} examples/s)")


@app.command()
def evaluate(
    run: Annotated[Path, typer.Option("--run", help="Run directory (lifelong train).")],
    data: Annotated[Path, typer.Option("--data", help="Rows directory (lifelong build).")],
    user_emb: Annotated[str | None, typer.Option(help="For a run trained with --user-emb: the store to read the "
                                                      "users' embeddings from [default: the run's].")] = None,
) -> None:
    """HIT@3, NE, AUC and GAUC per head; on simulated worlds the oracle and the lift fraction."""
    from lifelong.eval.evaluate import evaluate_run

    ev = evaluate_run(run, data, user_emb=user_emb)
    table = Table(title=f"{run} on {data}: {ev.rows:,} rows, {ev.requests:,} requests, {ev.users:,} users")
    cols = ["head", "HIT@3", "NE", "AUC", "GAUC"] + (["oracle HIT@3", "random HIT@3", "oracle lift"] if ev.oracle_hit else [])
    for col in cols:
        table.add_column(col, justify="right")
    for head, m in ev.per_head.items():
        cells = [head, f"{m['hit@3']:.4f}", f"{m['ne']:.4f}", f"{m['auc']:.4f}", f"{m['gauc']:.4f}"]
        if ev.oracle_hit:
            cells += [f"{ev.oracle_hit[head]:.4f}", f"{ev.random_hit[head]:.4f}", f"{ev.lift_fraction[head]:.3f}"]
        table.add_row(*cells)
    out.print(table)


@app.command()
def experiment(
    table: Annotated[str, typer.Argument(help="quickstart | table2 | table4 | table6 | table7 | dv365")],
    data: Annotated[Path, typer.Option("--data", help="Rows directory (lifelong build).")],
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
) -> None:
    """Reproduce one of the TransAct V2 paper's tables (or the dv365 one): markdown, JSON and a bar chart."""
    from lifelong.eval.experiments import render_markdown, run_experiment

    summary = run_experiment(table, data, out_dir, seeds=seeds, epochs=epochs, max_rows=max_rows, log=out.print,
                             runs=runs, user_emb=user_emb, eval_user_emb=eval_user_emb)
    out.print(render_markdown(summary))
    out.print(f"report: {out_dir / 'report.md'}, {out_dir / 'report.json'}, {out_dir / 'report.png'}")


@app.command("online-experiment")
def online_experiment(
    kind: Annotated[str, typer.Argument(help="hashing | drift | sync")],
    data: Annotated[Path, typer.Option("--data", help="World directory (lifelong simulate).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Report directory (KIND.json, KIND.md, KIND.png).")],
    days: Annotated[int | None, typer.Option(help="Keep the world's first N days.")] = None,
    users: Annotated[int | None, typer.Option(help="Keep the events of the N smallest user ids.")] = None,
    seed: Annotated[int, typer.Option(help="Seeds the dense weights and the tables.")] = 0,
    threads: Annotated[int, typer.Option(help="torch intra-op threads (the steps are small).")] = 1,
) -> None:
    """Monolith experiments on a replayed world: collision-less vs modulo tables, online vs frozen, sync interval."""
    import torch

    from lifelong.errors import ConfigError
    from lifelong.monolith.experiments import EXPERIMENTS, load_stream, render_markdown, seeded_config, write_report

    if kind not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {kind!r}; choose one of {', '.join(EXPERIMENTS)}")
    torch.set_num_threads(threads)
    report = EXPERIMENTS[kind](load_stream(data, days=days, users=users), cfg=seeded_config(seed))
    paths = write_report(report, out_dir)
    out.print(render_markdown(report))
    out.print("report: " + ", ".join(str(p) for p in paths))


store_app = typer.Typer(no_args_is_help=True, help="The serving feature store (LMDB or Redis).")
app.add_typer(store_app, name="store")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print side-by-side ratios.")
app.add_typer(bench_app, name="bench")
app.add_typer(dv365_app, name="dv365")

STORE_HELP = "lmdb:///PATH (or a plain path) or redis://HOST:PORT/DB."


@store_app.command("load")
def store_load(
    data: Annotated[Path, typer.Option("--data", help="Rows directory (lifelong build) whose source data to load.")],
    store: Annotated[str, typer.Option("--store", help=STORE_HELP)],
) -> None:
    """Load every user's sequences and the item table of a dataset into a feature store."""
    from lifelong.serving.store import load_store

    summary = load_store(data, store)
    out.print(f"[green]loaded[/green] {store}: {summary['users']:,} users, {summary['items']:,} items, "
              f"{summary['explicit_tokens']:,} explicit tokens, {summary['impressions']:,} impressions, "
              f"{summary['bytes'] / 2**20:,.1f} MiB in {summary['seconds']:.1f} s")


@app.command()
def serve(
    run: Annotated[Path | None, typer.Option("--run", help="Run directory (lifelong train).")] = None,
    store: Annotated[str | None, typer.Option("--store", help=STORE_HELP)] = None,
    online: Annotated[bool, typer.Option("--online", help=(
        "Serve the Monolith online ranker, its parameters pushed by `lifelong online --serve` "
        "(POST /admin/sync); needs --data instead of --run/--store."))] = False,
    data: Annotated[Path | None, typer.Option("--data", help="With --online: the world whose item catalog to serve.")] = None,
    path: Annotated[str, typer.Option(help="optimized | naive")] = "optimized",
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    backend: Annotated[str | None, typer.Option(
        help="Op backend: reference | cpu | triton [default: triton with CUDA, else cpu].")] = None,
    max_batch: Annotated[int, typer.Option(help="Most candidates per model batch.")] = 2048,
    max_wait_ms: Annotated[float, typer.Option(help="Longest a request waits for its batch to fill.")] = 2.0,
    max_candidates: Annotated[int, typer.Option(help="Most candidates per request (more: 413).")] = 1000,
) -> None:
    """Serve a trained ranker over HTTP: POST /rank, GET /healthz, GET /metrics, /docs."""
    import uvicorn

    from lifelong.errors import ConfigError
    from lifelong.serving.service import build_online_service, build_service

    if online:
        if data is None or run is not None or store is not None:
            raise ConfigError("--online serves pushed parameters: give --data WORLD, and neither --run nor --store")
        app_ = build_online_service(data, max_batch=max_batch, max_wait_ms=max_wait_ms, max_candidates=max_candidates)
        err.print(f"serving the online ranker on http://{host}:{port}: waiting for `lifelong online --serve "
                  f"http://{host}:{port}` to push parameters  (OpenAPI: /docs)")
    else:
        if run is None or store is None or data is not None:
            raise ConfigError("serve needs --run RUN and --store URL (or --online --data WORLD)")
        app_, version = build_service(run, store, path=path, backend=backend, max_batch=max_batch,
                                      max_wait_ms=max_wait_ms, max_candidates=max_candidates)
        err.print(f"serving {version} ({path} path) on http://{host}:{port}  (OpenAPI: /docs, /openapi.json)")
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command("online")
def online_(
    data: Annotated[Path, typer.Option("--data", help="The world whose events are replayed (lifelong simulate).")],
    ckpt: Annotated[Path, typer.Option("--ckpt", help="Checkpoint directory (resumed when it holds one).")],
    stream: Annotated[str | None, typer.Option("--stream", help=(
        "Event stream: a path or log:///PATH (embedded append-only log) or redis://HOST:PORT/DB[?key=K] "
        "\\[default: CKPT/stream]."))] = None,
    serve: Annotated[str | None, typer.Option("--serve", help=(
        "Base URL of a running `lifelong serve --online` to push parameters to (default: no sync)."))] = None,
    sync_every: Annotated[float, typer.Option(help="Seconds between two pushes of the touched rows.")] = 10.0,
    dense_every: Annotated[int, typer.Option(help="Pushes between two pushes of the dense weights.")] = 10,
    last_days: Annotated[float | None, typer.Option(help="Replay only the world's last N days.")] = None,
    speedup: Annotated[float | None, typer.Option(help="Pace the replay: event-ms per wall-ms \\[default: as fast as possible].")] = None,
    replay_events: Annotated[bool, typer.Option("--replay/--no-replay", help=(
        "Replay the world into the stream (resuming a partial replay), or only consume it."))] = True,
    batch_size: Annotated[int, typer.Option(help="Examples per optimizer step.")] = 512,
    lr: Annotated[float, typer.Option(help="Dense learning rate.")] = 0.01,
    delta_format: Annotated[str, typer.Option(help="Rows on the wire: fp16 | fp32.")] = "fp16",
) -> None:
    """Online training: replay a world into a stream, join, train continuously, push deltas to serving."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lifelong.monolith.job import OnlineJob, run_online_job
    from lifelong.monolith.online import OnlineConfig

    job = OnlineJob(data=data, stream=stream or str(ckpt / "stream"), ckpt_dir=ckpt, serve=serve,
                    sync_every_s=sync_every, last_days=last_days, speedup=speedup, replay_events=replay_events,
                    training=OnlineConfig(batch_size=batch_size, lr=lr, dense_every=dense_every,
                                          delta_format=delta_format))
    columns = (TextColumn("[bold]online[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("events"),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task("online", total=None, status="")

        def progress(consumed: int, total: int, summary) -> None:
            last = summary.syncs[-1] if summary.syncs else None
            status = f"{summary.examples:,} examples" + (f", served v{last.version}" if last and last.applied else "")
            bar.update(task, completed=consumed, total=total, status=status)

        summary = run_online_job(job, log=lambda line: bar.console.print(line, highlight=False), progress=progress)
    applied = [s for s in summary.syncs if s.applied]
    out.print(f"[green]done[/green] in {summary.seconds:.1f} s: replayed {summary.replayed:,} events "
              f"({summary.skipped:,} already in the stream), trained {summary.examples:,} examples from "
              f"{summary.events:,} events ({summary.examples / max(summary.seconds, 1e-9):,.0f} examples/s); "
              f"{len(applied)} of {len(summary.syncs)} pushes applied"
              + (f", serving v{applied[-1].version}" if applied else "")
              + f"; checkpoint at offset {summary.checkpoint_offset} in {ckpt}")


@bench_app.command("ops")
def bench_ops(
    lengths: Annotated[str, typer.Option(help="Comma-separated sequence lengths L.")] = "1000,10000",
    candidates: Annotated[str, typer.Option(help="Comma-separated candidate counts N.")] = "100,500,1000",
) -> None:
    """NN search and encoder: naive vs reference vs optimized, side by side."""
    from lifelong.bench.ops import render, run as run_ops

    rows = run_ops(L_values=tuple(int(x) for x in lengths.split(",")),
                   N_values=tuple(int(x) for x in candidates.split(",")))
    out.print(render(rows))


@bench_app.command("serve")
def bench_serve(
    run: Annotated[Path, typer.Option("--run", help="Run directory (lifelong train).")],
    store: Annotated[str, typer.Option("--store", help=STORE_HELP)],
    data: Annotated[Path, typer.Option("--data", help="Rows directory: requests are replayed from its eval split.")],
    concurrency: Annotated[str, typer.Option(help="Comma-separated client counts.")] = "1,4,16,64",
    seconds: Annotated[float, typer.Option(help="Duration of each load step.")] = 10.0,
    sustain: Annotated[float, typer.Option(help="Duration of the final run at the best concurrency (0: skip).")] = 60.0,
    paths: Annotated[str, typer.Option(help="Comma-separated serving paths to compare.")] = "naive,optimized",
    report: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
) -> None:
    """Closed-loop HTTP load against real servers of each path: examples/s, p50/p90/p99, errors."""
    from lifelong.bench.serve import render, run_serve_bench

    results = run_serve_bench(run, store, data, concurrency=[int(c) for c in concurrency.split(",")],
                              seconds=seconds, sustain_seconds=sustain, paths=paths.split(","), report=report)
    out.print(render(results))


def _print_inspection(report, png: Path) -> None:
    kind = report.meta.get("kind", "?")
    name = report.meta.get("preset") or report.meta.get("source") or ""
    sizes = Table(title=f"{report.path}  ({kind} {name})", show_header=False)
    sizes.add_column(style="bold")
    sizes.add_column(justify="right")
    rows = [("users", f"{report.users:,}"), ("items", f"{report.items:,}"), ("events", f"{report.events:,}"),
            ("impressions", f"{report.impressions:,}"), ("explicit actions", f"{report.explicit:,}"),
            ("span", f"{report.span_days:.1f} days")]
    for label, lengths in (("LL length / user (explicit)", report.history_lengths),
                           ("bare impressions / user", report.impression_lengths)):
        p50, p90, mx = report.percentiles(lengths)
        rows.append((label, f"p50 {p50:,}  p90 {p90:,}  max {mx:,}"))
    for label, value in rows:
        sizes.add_row(label, value)
    out.print(sizes)
    rates = Table(title="action rates (share of events)")
    for name in report.action_rates:
        rates.add_column(name, justify="right")
    rates.add_row(*(f"{v:.3f}" for v in report.action_rates.values()))
    out.print(rates)
    surfaces = Table(title="surfaces (share of events)")
    for name in report.surface_shares:
        surfaces.add_column(name, justify="right")
    surfaces.add_row(*(f"{v:.3f}" for v in report.surface_shares.values()))
    out.print(surfaces)
    if report.oracle is not None:
        o = report.oracle
        t = Table(title=f"oracle check: HIT@{o.k} on the evaluation day ({o.requests:,} requests, {o.users:,} users)")
        for col in ("head", "oracle", "random", "oracle / random"):
            t.add_column(col, justify="right")
        for head in o.oracle:
            ratio = o.oracle[head] / o.random[head] if o.random[head] else float("nan")
            t.add_row(head, f"{o.oracle[head]:.4f}", f"{o.random[head]:.4f}", f"{ratio:.2f}x")
        out.print(t)
    out.print(f"history-length histogram: {png}")


def main() -> None:
    """Entry point: run the app, turning user errors into one clear line and exit status 2."""
    try:
        app()
    except LifelongError as exc:
        err.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
