"""``lifelong monolith …``: Monolith's commands (online training from a stream, its experiments).

Each command is one function on :data:`monolith_app`; :mod:`lifelong.cli` mounts the app as
``monolith``. ``lifelong serve --online`` serves what ``monolith online`` pushes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lifelong.core.console import err, out
from lifelong.store.urls import STORE_HELP, STREAM_HELP

monolith_app = typer.Typer(no_args_is_help=True, help="Monolith: online training from a stream, collision-less tables.")


@monolith_app.command("online")
def online(
    data: Annotated[Path, typer.Option("--data", help="The world whose events are replayed (lifelong simulate).")],
    ckpt: Annotated[Path, typer.Option("--ckpt", help="Checkpoint directory (resumed when it holds one).")],
    stream: Annotated[str | None, typer.Option("--stream", help=STREAM_HELP + " \\[default: CKPT/stream].")] = None,
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
    model_run: Annotated[Path | None, typer.Option("--model-run", help=(
        "Train this `lifelong transact train` run (TransAct V2) online instead of Monolith's ranker: its rows are "
        "read from --store at each impression's time; push to `lifelong serve --run RUN --accept-sync`."))] = None,
    store: Annotated[str | None, typer.Option("--store", help="With --model-run: the (real-time) feature store. "
                                              + STORE_HELP)] = None,
    user_emb: Annotated[str | None, typer.Option("--user-emb", help=(
        "With --model-run of a run trained with --user-emb: the DV365 export store its service reads "
        "\\[default: the store in the run's run.json]."))] = None,
) -> None:
    """Online training: replay a world into a stream, join, train continuously, push deltas to serving."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lifelong.core.errors import ConfigError
    from lifelong.monolith.job import OnlineJob, run_online_job
    from lifelong.monolith.online import OnlineConfig

    model = None
    if (model_run is None) != (store is None):
        raise ConfigError("--model-run RUN and --store URL go together (the run's rows are read from the store)")
    if user_emb is not None and model_run is None:
        raise ConfigError("--user-emb goes with --model-run (a TransAct run trained with DV365 user tokens)")
    if model_run is not None:
        from lifelong.store.feature_store import open_store
        from lifelong.transact.online import TransActOnline

        model = TransActOnline.from_run(model_run, open_store(store), user_emb=user_emb)

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

        summary = run_online_job(job, log=lambda line: bar.console.print(line, highlight=False), progress=progress,
                                 model=model)
    applied = [s for s in summary.syncs if s.applied]
    out.print(f"[green]done[/green] in {summary.seconds:.1f} s: replayed {summary.replayed:,} events "
              f"({summary.skipped:,} already in the stream), trained {summary.examples:,} examples from "
              f"{summary.events:,} events ({summary.examples / max(summary.seconds, 1e-9):,.0f} examples/s); "
              f"{len(applied)} of {len(summary.syncs)} pushes applied"
              + (f", serving v{applied[-1].version}" if applied else "")
              + f"; checkpoint at offset {summary.checkpoint_offset} in {ckpt}")


@monolith_app.command("experiment")
def experiment(
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

    from lifelong.core.errors import ConfigError
    from lifelong.monolith.experiments import EXPERIMENTS, load_stream, render_markdown, seeded_config, write_report

    if kind not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {kind!r}; choose one of {', '.join(EXPERIMENTS)}")
    torch.set_num_threads(threads)
    report = EXPERIMENTS[kind](load_stream(data, days=days, users=users), cfg=seeded_config(seed))
    paths = write_report(report, out_dir)
    out.print(render_markdown(report))
    out.print("report: " + ", ".join(str(p) for p in paths))
