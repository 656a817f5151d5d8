"""``lifelong bench serve-features``: the serving cost of each feature of TransAct V2 (docs/benchmarks.md).

Mounted by :mod:`lifelong.cli` under ``bench``; the benchmark itself is :mod:`lifelong.bench.serve_features`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lifelong.cli.options import STORE_HELP
from lifelong.core.console import err, out
from lifelong.core.errors import ConfigError


def bench_serve_features(
    run: Annotated[Path, typer.Option("--run", help="A TransAct V2 run without user tokens (lifelong transact train).")],
    store: Annotated[str, typer.Option("--store", help=STORE_HELP)],
    data: Annotated[Path, typer.Option("--data", help="Rows directory: requests are replayed from its eval split.")],
    token_run: Annotated[Path | None, typer.Option("--token-run", help=(
        "A TransAct V2 run trained with --user-emb: adds the user_tokens and user_tokens+pushes variants."))] = None,
    user_emb: Annotated[str | None, typer.Option("--user-emb", help=(
        "With --token-run: the DV365 export store (URL) its user tokens are read from."))] = None,
    concurrency: Annotated[str, typer.Option(help="Comma-separated client counts.")] = "1,8",
    seconds: Annotated[float, typer.Option(help="Duration of each load step.")] = 10.0,
    push_every: Annotated[float, typer.Option("--push-every", help=(
        "Seconds between two parameter pushes (the run's dense weights) in the push variants."))] = 1.0,
    warmup: Annotated[float, typer.Option(help="Seconds of unreported load before each server's first step.")] = 2.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
) -> None:
    """Serving cost of TransAct V2's features (user tokens, parameter pushes) vs the plain run, over HTTP."""
    from lifelong.bench.serve_features import render, run_serve_features

    try:
        levels = [int(c) for c in concurrency.split(",")]
    except ValueError:
        raise ConfigError(f"--concurrency takes comma-separated client counts, e.g. 1,8; got {concurrency!r}") from None
    result = run_serve_features(run, store, data, levels, token_run=token_run, user_emb=user_emb, seconds=seconds,
                                push_every=push_every, warmup_s=warmup, report=json_out)
    out.print(render(result), markup=False, highlight=False)
    if result["failures"]:
        err.print(f"[bold red]failed:[/bold red] {len(result['failures'])} check(s), listed above", highlight=False)
        raise typer.Exit(1)
