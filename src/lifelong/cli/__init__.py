"""The ``lifelong`` command line, grouped by system.

- shared: ``simulate``, ``inspect``, ``ingest``, ``store …``, ``serve``, ``bench …``;
- ``lifelong transact …`` (:mod:`lifelong.cli.transact`), ``lifelong dv365 …``
  (:mod:`lifelong.cli.dv365`), ``lifelong monolith …`` (:mod:`lifelong.cli.monolith`).

The old top-level spellings (``build``, ``train``, ``online``, ...) still work for one release,
hidden, and say where the command moved.

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

from lifelong.cli import monolith as monolith_cli
from lifelong.cli import transact as transact_cli
from lifelong.cli.bench_features import bench_serve_features
from lifelong.cli.dv365 import dv365_app
from lifelong.cli.loop import abtest
from lifelong.cli.options import PROTOCOL_HELP, STORE_HELP, int_list, moved_alias, protocol_days
from lifelong.core.console import err, out
from lifelong.core.errors import LifelongError
from lifelong.store.urls import STREAM_HELP

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="lifelong: recommendation with lifelong user action sequences.")


@app.command()
def simulate(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write the world into.")],
    preset: Annotated[str | None, typer.Option(help="tiny | small | bench | lifelong [default: the config file's, else small]")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML/JSON config file layered over the preset.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key, e.g. --set users.n_users=500.")] = None,
    seed: Annotated[int | None, typer.Option(help="The world's seed (the same as --set seed=N) [default: the config's].")] = None,
) -> None:
    """Simulate a world with ground-truth oracle probabilities (docs/world.md)."""
    from lifelong.data.world import load_config, simulate_to

    overrides = list(set_ or []) + ([] if seed is None else [f"seed={seed}"])
    cfg = load_config(preset=preset, config_file=config, overrides=overrides)
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
    requests: Annotated[str, typer.Option(help="What one request is: native (the source's own unit) or day (a "
                                               "user's UTC day: coarser, for HIT@3 where native requests hold 1-2 "
                                               "labelled items, e.g. KuaiRand).")] = "native",
    embedding_lag_days: Annotated[float, typer.Option(help="Learn item embeddings from events before the training "
                                                           "cutoff minus N days, so that items first seen late in "
                                                           "training are cold there as new items are in evaluation.")] = 3.0,
    protocol: Annotated[str | None, typer.Option(help=PROTOCOL_HELP + " Item embeddings are learned before its "
                                                 "cutoff; `transact build` refuses an earlier cutoff.")] = None,
) -> None:
    """Convert a real public dataset into lifelong's schema (items, events, users)."""
    from lifelong.data.ingest import ingest as run_ingest

    start = time.perf_counter()
    report = run_ingest(source, src, out_dir, requests=requests, embedding_lag_days=embedding_lag_days,
                        protocol_days=protocol_days(protocol))
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


store_app = typer.Typer(no_args_is_help=True, help="The serving feature store (LMDB or Redis).")
app.add_typer(store_app, name="store")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print side-by-side ratios.")
app.add_typer(bench_app, name="bench")
app.add_typer(transact_cli.transact_app, name="transact")
app.add_typer(dv365_app, name="dv365")
app.add_typer(monolith_cli.monolith_app, name="monolith")
app.command("abtest")(abtest)
for _old, _new, _command in (("build", "transact build", transact_cli.build), ("train", "transact train", transact_cli.train),
                             ("evaluate", "transact evaluate", transact_cli.evaluate),
                             ("experiment", "transact experiment", transact_cli.experiment),
                             ("online", "monolith online", monolith_cli.online),
                             ("online-experiment", "monolith experiment", monolith_cli.experiment)):
    moved_alias(app, _old, _new, _command)

@store_app.command("load")
def store_load(
    data: Annotated[Path, typer.Option("--data", help="Rows directory (lifelong transact build) whose source data to load.")],
    store: Annotated[str, typer.Option("--store", help=STORE_HELP)],
    drop_embeddings: Annotated[bool, typer.Option("--drop-embeddings", help=(
        "Also delete the DV365 user embeddings the store holds (kept by default)."))] = False,
) -> None:
    """Load a dataset into a feature store as a new version, and switch readers to it.

    The served version stays readable while the new one is written; a second load of the same
    store at the same time fails at once (exit 2). The previous version is kept, older ones
    are deleted.
    """
    from lifelong.store.feature_store import load_store

    summary = load_store(data, store, drop_embeddings=drop_embeddings)
    kept = f"; kept {', '.join(summary['kept'])}" if summary["kept"] else ""
    deleted = f"; deleted {', '.join(summary['deleted'])}" if summary["deleted"] else ""
    dropped = f"; dropped {summary['embeddings_dropped']:,} embedding keys" if drop_embeddings else ""
    out.print(f"[green]loaded[/green] {store} version {summary['version']}{kept}{deleted}{dropped}: "
              f"{summary['users']:,} users, {summary['items']:,} items, "
              f"{summary['explicit_tokens']:,} explicit tokens, {summary['impressions']:,} impressions, "
              f"{summary['bytes'] / 2**20:,.1f} MiB in {summary['seconds']:.1f} s")


@store_app.command("follow")
def store_follow(
    store: Annotated[str, typer.Option("--store", help=STORE_HELP)],
    stream: Annotated[str, typer.Option("--stream", help=STREAM_HELP)],
    once: Annotated[bool, typer.Option("--once", help="Apply what the stream holds now, then exit.")] = False,
    batch: Annotated[int, typer.Option("--batch", help="Most events per batch (one lock, one atomic write).")] = 4096,
    poll_ms: Annotated[float, typer.Option("--poll-ms", help="Pause when caught up before reading again.")] = 50.0,
) -> None:
    """Append a stream's new events to the served store version: real-time S_RT, S_LL, S_imp (docs/serving.md)."""
    from lifelong.store.realtime import RealtimeConsumer

    def report(s) -> None:
        lag = f", newest event {time.time() - s.newest_ms / 1000:.1f} s old" if s.newest_ms is not None else ""
        new = f" (new version: re-applying from offset {s.start_offset})" if s.new_version else ""
        err.print(f"{s.version}{new}: {s.events:,} events -> +{s.explicit:,} explicit, +{s.impressions:,} impressions "
                  f"({s.users:,} users, {s.late:,} late; skipped {s.in_load:,} in the load, {s.unknown_item:,} "
                  f"unknown items, {s.other:,} other) offset {s.offset}{lag}", highlight=False)

    with RealtimeConsumer(store, stream, batch=batch) as consumer:
        if once:
            done = consumer.run_until_caught_up(on_batch=report)
            out.print(f"[green]followed[/green] {store} {done[-1].version}: {sum(s.events for s in done):,} events "
                      f"in {sum(s.seconds for s in done):.1f} s, offset {done[-1].offset}")
            return
        err.print(f"following {stream} into {store} (Ctrl-C to stop)")
        try:
            consumer.run(poll_s=poll_ms / 1000, on_batch=report,
                         on_error=lambda exc: err.print(f"[yellow]waiting:[/yellow] {exc}", highlight=False))
        except KeyboardInterrupt:
            consumer.stop.set()


@app.command()
def serve(
    run: Annotated[Path | None, typer.Option("--run", help="Run directory (lifelong transact train).")] = None,
    store: Annotated[str | None, typer.Option("--store", help=STORE_HELP)] = None,
    online: Annotated[bool, typer.Option("--online", help=(
        "Serve the Monolith online ranker, its parameters pushed by `lifelong monolith online --serve` "
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
    max_latency_ms: Annotated[float, typer.Option(help=(
        "Every request's deadline from its arrival; one not scored by then is dropped unscored (504). "
        "A client's timeout_ms can only shorten it."))] = 1000.0,
    max_queue_examples: Annotated[int, typer.Option(help=(
        "Candidates waiting for the model at most; beyond it the service sheds load (503). "
        "Default: what the optimized path scores in ~0.5 s (docs/serving.md)."))] = 640,
    body_timeout_s: Annotated[float, typer.Option(help="Longest a request body may take to arrive whole (408).")] = 5.0,
    user_emb: Annotated[str | None, typer.Option("--user-emb", help=(
        "For a run trained with --user-emb: the DV365 export store (URL) whose users' embeddings each batch reads "
        "[default: the store in the run's run.json]."))] = None,
    accept_sync: Annotated[bool, typer.Option("--accept-sync", help=(
        "Take parameter pushes of `lifelong monolith online --model-run RUN --serve URL` (POST /admin/sync), applied "
        "in place between batches; always on for a run with collision-less id tables."))] = False,
    workers: Annotated[int, typer.Option("--workers", help=(
        "Serving processes behind the one port, each with its own copy of the model, sharing the store; "
        "1: this process serves (docs/serving.md, Serving replicas)."))] = 1,
    precision: Annotated[str, typer.Option("--precision", help=(
        "fp32 | bf16: the model's forward under bfloat16 autocast, fast on CPUs with bfloat16 units "
        "(docs/serving.md, Precision)."))] = "fp32",
) -> None:
    """Serve a trained ranker over HTTP: POST /rank, GET /healthz, /readyz, /metrics, /docs."""
    from lifelong.core.errors import ConfigError
    from lifelong.core.precision import check_precision

    limits = dict(max_batch=max_batch, max_wait_ms=max_wait_ms, max_candidates=max_candidates,
                  max_latency_ms=max_latency_ms, max_queue_examples=max_queue_examples, body_timeout_s=body_timeout_s)
    if online:
        if data is None or run is not None or store is not None:
            raise ConfigError("--online serves pushed parameters: give --data WORLD, and neither --run nor --store")
    elif run is None or store is None or data is not None:
        raise ConfigError("serve needs --run RUN and --store URL (or --online --data WORLD)")
    if online and user_emb is not None:
        raise ConfigError("--user-emb serves a run trained with one: not with --online")
    if workers < 1:
        raise ConfigError(f"--workers is the number of serving processes: at least 1, got {workers}")
    if online and precision != "fp32":
        raise ConfigError("--precision applies to a TransAct run (--run): not with --online")
    check_precision(precision)
    if workers > 1 and (online or accept_sync):
        # Fanning a push out to every worker is not implemented: refused rather than served stale.
        raise ConfigError(f"{'--online' if online else '--accept-sync'} takes parameter pushes (POST /admin/sync), "
                          f"and a push reaches only the one worker of --workers {workers} that accepts it: "
                          "serve it with --workers 1")
    if workers > 1:
        from lifelong.cli.service import bind_replicas, serve_replicas

        socks = bind_replicas(host, port, workers)  # a busy port is one line and exit 2, before any model loads

        def ready(version: str, pids: list[int]) -> None:
            err.print(f"serving {version} ({path} path) on http://{host}:{port} with {workers} workers "
                      f"(pids {', '.join(map(str, pids))})  (OpenAPI: /docs, /openapi.json)")

        serve_replicas(socks, dict(run=str(run), store=store, path=path, backend=backend, user_emb=user_emb,
                                   precision=precision, **limits),
                       on_ready=ready)
        return
    from lifelong.cli.service import bind_port, build_online_service, build_service, run_server

    sock = bind_port(host, port)  # a busy port is one line and exit 2, before the model loads
    try:
        if online:
            app_ = build_online_service(data, **limits)
            err.print(f"serving the online ranker on http://{host}:{port}: waiting for `lifelong monolith online "
                      f"--serve http://{host}:{port}` to push parameters  (OpenAPI: /docs)")
        else:
            app_, version = build_service(run, store, path=path, backend=backend, user_emb=user_emb,
                                          accept_sync=accept_sync, precision=precision, **limits)
            err.print(f"serving {version} ({path} path) on http://{host}:{port}  (OpenAPI: /docs, /openapi.json)")
    except BaseException:
        sock.close()
        raise
    run_server(app_, sock)


@bench_app.command("ops")
def bench_ops(
    lengths: Annotated[str, typer.Option(help="Comma-separated sequence lengths L.")] = "1000,10000",
    candidates: Annotated[str, typer.Option(help="Comma-separated candidate counts N.")] = "100,500,1000",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON here (ratios included).")] = None,
) -> None:
    """NN search and encoder: naive vs reference vs optimized, side by side."""
    from lifelong.bench.ops import render, write_json
    from lifelong.bench.ops import run as run_ops

    rows = run_ops(L_values=tuple(int(x) for x in lengths.split(",")),
                   N_values=tuple(int(x) for x in candidates.split(",")))
    out.print(render(rows))
    if json_out is not None:
        write_json(rows, json_out)


@bench_app.command("serve")
def bench_serve(
    run: Annotated[Path, typer.Option("--run", help="Run directory (lifelong transact train).")],
    store: Annotated[str, typer.Option("--store", help=STORE_HELP)],
    data: Annotated[Path, typer.Option("--data", help="Rows directory: requests are replayed from its eval split.")],
    concurrency: Annotated[str, typer.Option(help="Comma-separated client counts.")] = "1,4,16,64",
    seconds: Annotated[float, typer.Option(help="Duration of each load step.")] = 10.0,
    sustain: Annotated[float, typer.Option(help="Duration of the final run at the best concurrency (0: skip).")] = 60.0,
    paths: Annotated[str, typer.Option(help="Comma-separated serving paths to compare.")] = "naive,optimized",
    workers: Annotated[str, typer.Option("--workers", help=(
        "Comma-separated worker counts (lifelong serve --workers) to serve the optimized path with, one after the "
        "other: 1,2 compares one process with two replicas at every concurrency."))] = "1",
    candidates: Annotated[str | None, typer.Option("--candidates", help=(
        "Comma-separated candidates per request, one group of steps each (e.g. 32,128,512): each request keeps "
        "its own candidates and draws the rest from the eval split's others [default: the requests as logged]."))] = None,
    max_requests: Annotated[int, typer.Option("--max-requests", help="Replay the eval split's first N requests.")] = 5000,
    precision: Annotated[str, typer.Option("--precision", help=(
        "fp32 | bf16: the optimized path's forward (lifelong serve --precision); naive stays fp32."))] = "fp32",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here (ratios included).")] = None,
) -> None:
    """Closed-loop HTTP load against real servers of each path: examples/s, p50/p90/p99, errors, time per stage."""
    from lifelong.bench.serve import render, run_serve_bench
    from lifelong.core.precision import check_precision

    results = run_serve_bench(run, store, data, concurrency=list(int_list(concurrency, "--concurrency")),
                              seconds=seconds, sustain_seconds=sustain, paths=paths.split(","), report=json_out,
                              workers=int_list(workers, "--workers"),
                              candidates=(None,) if candidates is None else int_list(candidates, "--candidates"),
                              max_requests=max_requests, precision=check_precision(precision))
    out.print(render(results))


bench_app.command("serve-features")(bench_serve_features)


@bench_app.command("train")
def bench_train(
    data: Annotated[Path | None, typer.Option("--data", help="Rows directory (lifelong transact build): TransAct V2 "
                                                             "trains on its train split, NE on its eval split.")] = None,
    dv365: Annotated[Path | None, typer.Option("--dv365", help="A world: the DV365 tower trains on its users' examples.")] = None,
    rows: Annotated[int, typer.Option(help="Training rows of TransAct V2 (a seeded draw).")] = 20_000,
    eval_rows: Annotated[int, typer.Option("--eval-rows", help="Held-out rows the NE is measured on.")] = 20_000,
    dv365_users: Annotated[int, typer.Option("--dv365-users", help="Users whose examples the DV365 tower trains on.")] = 200,
    epochs: Annotated[int, typer.Option(help="Epochs of every run.")] = 1,
    rounds: Annotated[int, typer.Option(help="Runs of each variant, alternating; the median examples/s is reported.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the rows, the weights and the shuffling.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here (ratios included).")] = None,
) -> None:
    """Training examples/s of today's step vs the optimized one on the same rows, with the NE each reaches."""
    from lifelong.bench.train import render, run_train_bench

    result = run_train_bench(data, dv365, rows=rows, eval_rows=eval_rows, dv365_users=dv365_users, epochs=epochs,
                             seed=seed, rounds=rounds, report=json_out, log=err.print)
    out.print(render(result))


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

