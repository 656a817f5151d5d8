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
from rich.console import Console
from rich.table import Table

from lifelong.errors import LifelongError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="lifelong: recommendation with lifelong user action sequences.")
out = Console()
err = Console(stderr=True)


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
