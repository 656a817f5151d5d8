"""``lifelong dv365 …``: the DV365 foundation user embedding's commands.

Each command is one function on :data:`dv365_app`; :mod:`lifelong.cli` mounts the app as
``dv365``. User errors raise :class:`~lifelong.core.errors.LifelongError` and the main CLI prints
them as one line.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from lifelong.cli.options import STORE_HELP
from lifelong.core.console import out

dv365_app = typer.Typer(no_args_is_help=True, help="DV365 foundation user embedding: train, experiments.")

HOUR_MS = 3_600_000


@dv365_app.command("train")
def train(
    data: Annotated[Path, typer.Option("--data", help="A world or ingested dataset directory.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory (model.pt, run.json, tokens/).")],
    config: Annotated[Path | None, typer.Option("--config", help="YAML/JSON file of DV365TrainConfig keys "
                                                                 "(docs/configs.md); flags and --set win over it.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Set a key (repeatable), e.g. --set fsa.n_heads=2 "
                                                                 "--set backbone.mlp_dims=[128,64]; wins over flags.")] = None,
    view: Annotated[str | None, typer.Option(help="token | dim [default: token]")] = None,
    encoders: Annotated[str | None, typer.Option(help="Comma list of lce, mlp, transformer, funnel; or none "
                                                      "[default: funnel,lce].")] = None,
    out_cols: Annotated[int | None, typer.Option(help="Compressed length C of the tower output (R, C) [default: 32].")] = None,
    gap_hours: Annotated[float | None, typer.Option(help="Hide the last N hours before each example from the tower "
                                                         "(0: off) [default: 24].")] = None,
    train_days: Annotated[int | None, typer.Option(help="Days of impressions before the protocol cutoff to train on "
                                                        "[default: 14].")] = None,
    per_group: Annotated[int | None, typer.Option(help="Training impressions kept per (user, day) [default: 64].")] = None,
    max_users: Annotated[int | None, typer.Option(help="Seeded subset of users (0: all) [default: 1000].")] = None,
    epochs: Annotated[int | None, typer.Option(help="[default: 4]")] = None,
    lr: Annotated[float | None, typer.Option(help="[default: 0.002]")] = None,
    seed: Annotated[int | None, typer.Option(help="[default: 0]")] = None,
    slices: Annotated[Path | None, typer.Option(help="Slice spec YAML [default: the packaged 207-slice spec].")] = None,
    threads: Annotated[int, typer.Option(help="torch intra-op threads (steps are small; more threads only "
                                              "contend on a busy machine); per process with --nproc.")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Write checkpoint.pt after every epoch and, rerun, "
                                                          "continue after the last one.")] = False,
    nproc: Annotated[int | None, typer.Option(help="Train data-parallel (DDP) in N local processes, each taking "
                                                   "groups_per_batch / N groups of every batch (docs/scaling.md). "
                                                   "Not under torchrun, which starts the ranks itself.")] = None,
) -> None:
    """Train the user tower in the backbone simulation network; prints NE per task on the evaluation day.

    Settings are layered: DV365TrainConfig's defaults, the --config file, the flags given, then --set.
    """
    import json

    import torch

    from lifelong.core.config import build, load_file
    from lifelong.core.distributed import launch, ranks_from_env
    from lifelong.dv365.slices import SliceSpec
    from lifelong.dv365.train import DV365TrainConfig, train_dv365

    flags = {"fsa.view": view, "fsa.out_cols": out_cols, "train_days": train_days, "per_group": per_group,
             "epochs": epochs, "lr": lr, "seed": seed,
             "fsa.encoders": None if encoders is None else [e.strip() for e in encoders.split(",")],
             "gap_ms": None if gap_hours is None else round(gap_hours * HOUR_MS)}
    sets = [(key, value) for key, value in flags.items() if value is not None]
    if max_users is not None:
        sets.append(("max_users", max_users or None))
    cfg = build(DV365TrainConfig, load_file(config) if config is not None else {}, [*sets, *(set_ or [])])
    spec = SliceSpec.from_yaml(slices) if slices is not None else None
    torch.set_num_threads(threads)
    if nproc is None:  # one process, or one rank of a torchrun launch
        meta = train_dv365(data, out_dir, cfg, log=out.print, spec=spec, resume=resume)
        if not ranks_from_env().main:
            return
    else:
        launch(train_dv365, (data, out_dir, cfg, print, spec, resume), nproc,
               batches={"groups_per_batch": cfg.groups_per_batch}, threads=threads,
               hint="rerun the same command to resume after the last finished epoch" if resume else "")
        meta = json.loads((out_dir / "run.json").read_text())
    ne = "  ".join(f"{t} {v:.4f}" for t, v in meta["eval"]["ne"].items())
    out.print(f"[green]wrote[/green] {out_dir}  (tower output {tuple(meta['tower_out_shape'])}, "
              f"{meta['parameters']['fsa']:,} FSA parameters, {meta['examples_per_s']:,.0f} examples/s); "
              f"eval NE: {ne}")




def _run_data(run: Path) -> Path:
    """The world a run was trained on (its run.json)."""
    import json

    from lifelong.core.errors import DataError

    try:
        return Path(json.loads((run / "run.json").read_text())["data"])
    except (OSError, ValueError, KeyError):
        raise DataError(run, "no run.json naming its data: give the world with --data") from None


@dv365_app.command("export")
def export(
    run: Annotated[Path, typer.Option("--run", help="A `lifelong dv365 train` run directory.")],
    store: Annotated[str, typer.Option("--store", help=STORE_HELP)],
    data: Annotated[Path | None, typer.Option("--data", help="The world to embed [default: the run's].")] = None,
    as_of_ms: Annotated[int | None, typer.Option(help="Embed from the events before this time [default: the data's end].")] = None,
    before_split: Annotated[str | None, typer.Option(help="ROWS:SPLIT: embed as of the start of a `lifelong transact build` "
                                                          "split (train or eval), for a ranker trained with --user-emb.")] = None,
    keep: Annotated[int, typer.Option(help="Versions kept after the switch (the new one included).")] = 2,
    active_days: Annotated[int, typer.Option(help="A user is active with an event in the last N days.")] = 30,
    batch_users: Annotated[int, typer.Option(help="Users embedded and written per batch.")] = 4096,
    engine: Annotated[str, typer.Option(help="local (this process) | ray (one Ray task per batch of users; the "
                                             "`distributed` extra). Both write the same records.")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="With --engine ray: the cluster, HOST:PORT "
                                                         "[default: a local Ray].")] = None,
) -> None:
    """Embed every active user with the run's tower, 4-bit quantize, write a new version and switch to it."""
    from lifelong.core.engines import open_engine
    from lifelong.data.protocol import DAY_MS
    from lifelong.dv365.export import ExportConfig, default_as_of_ms, export_embeddings
    from lifelong.dv365.tower import load_tower

    world = data or _run_data(run)
    if before_split is not None:
        from lifelong.core.errors import ConfigError
        from lifelong.transact.rank_data import split_window_ms

        rows, sep, split = before_split.rpartition(":")
        if not sep or as_of_ms is not None:
            raise ConfigError("--before-split takes ROWS:SPLIT (e.g. datasets/small:train), and not with --as-of-ms")
        as_of_ms = split_window_ms(rows, split)[0]
    as_of = default_as_of_ms(world) if as_of_ms is None else as_of_ms
    cfg = ExportConfig(batch_users=batch_users, keep=keep, active_window_ms=active_days * DAY_MS)
    with open_engine(engine, ray_address) as shard_map:  # before the store is written: a bad cluster writes nothing
        s = export_embeddings(load_tower(run), world, store, as_of, cfg, run=str(run.resolve()), shard_map=shard_map)
    as_of_utc = datetime.fromtimestamp(s.as_of_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
    out.print(f"[green]exported[/green] version {s.version} to {s.url} (as of {as_of_utc}) in {s.seconds:.1f} s: {s.users:,} users x "
              f"({s.rows}, {s.dim}), {s.bytes_per_user:,} bytes a user vs {4 * s.rows * s.dim:,} in fp32: "
              f"compression {s.compression_ratio:.2f}x; deleted versions: {list(s.deleted) or 'none'}")


@dv365_app.command("schedule")
def schedule(
    data: Annotated[Path, typer.Option("--data", help="The world the towers train on and embed.")],
    store: Annotated[str, typer.Option("--store", help=STORE_HELP)],
    out_dir: Annotated[Path, typer.Option("--out", help="Cycles' runs, cache/ and schedule.jsonl.")],
    every: Annotated[str, typer.Option(help="Interval between cycles: 6h, 30m, 1d ...")] = "6h",
    cycles: Annotated[int | None, typer.Option(help="Cycles to run [default: until interrupted].")] = None,
    run: Annotated[Path | None, typer.Option("--run", help="Train like this run (its settings and slices); "
                                                           "with --no-train, reuse it in every cycle.")] = None,
    no_train: Annotated[bool, typer.Option("--no-train", help="Reuse --run's tower instead of training.")] = False,
    simulated_clock: Annotated[bool, typer.Option(help="Run the cycles back to back on simulated time.")] = False,
    first_as_of_ms: Annotated[int | None, typer.Option(help="Data time of the first cycle [default: the world's end "
                                                            "minus cycles - 1 intervals].")] = None,
    keep: Annotated[int, typer.Option(help="Versions kept in the store.")] = 2,
) -> None:
    """Every interval: data (the as-of time advances) -> train -> export -> cache; failed cycles keep the old version."""
    import json

    from lifelong.core.errors import ConfigError
    from lifelong.dv365.export import ExportConfig
    from lifelong.dv365.schedule import (
        ScheduleConfig,
        SimulatedClock,
        SystemClock,
        TowerTrainer,
        parse_every,
        run_schedule,
    )
    from lifelong.dv365.tower import load_tower
    from lifelong.dv365.train import DV365TrainConfig

    if no_train and run is None:
        raise ConfigError("--no-train reuses a tower: give it with --run")
    cfg = ScheduleConfig(every_ms=parse_every(every), cycles=cycles, first_as_of_ms=first_as_of_ms,
                         export=ExportConfig(keep=keep))
    trainer = None
    if not no_train:
        settings = DV365TrainConfig() if run is None else \
            DV365TrainConfig.from_dict(json.loads((run / "run.json").read_text())["train"])
        trainer = TowerTrainer(settings, spec=None if run is None else load_tower(run).spec, log=out.print)
    clock = SimulatedClock(SystemClock().now_ms()) if simulated_clock else SystemClock()
    records = run_schedule(data, store, out_dir, cfg, trainer=trainer, run=run if no_train else None, clock=clock,
                           tower_loader=load_tower if trainer is None else trainer.load_tower, log=out.print)
    ok = [r for r in records if r.status == "ok"]
    out.print(f"[green]done[/green]: {len(ok)} of {len(records)} cycles ok; serving version "
              f"{records[-1].served_version if records else None}; log {out_dir / 'schedule.jsonl'}")


@dv365_app.command("experiment")
def experiment(
    data: Annotated[Path, typer.Option("--data", help="A world directory (e.g. worlds/lifelong).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Report directory (resumable; tokens/ cached there).")],
    users: Annotated[int, typer.Option(help="Seeded subset of users.")] = 1000,
    epochs: Annotated[int, typer.Option()] = 4,
    train_days: Annotated[int, typer.Option(help="Days of training impressions before the cutoff.")] = 4,
    per_group: Annotated[int, typer.Option(help="Training impressions per (user, day).")] = 64,
    seeds: Annotated[int, typer.Option(help="Seeds per row (weights and shuffling).")] = 1,
    threads: Annotated[int, typer.Option(help="torch intra-op threads.")] = 1,
) -> None:
    """Encoder comparison (NE per task, parameters, examples/s), staleness 0/1/3/7 days, with vs without the 24 h gap."""
    import torch

    torch.set_num_threads(threads)
    from lifelong.dv365.experiments import ExperimentConfig, render_markdown, run_experiment

    cfg = ExperimentConfig(users=users, epochs=epochs, train_days=train_days, per_group=per_group, seeds=seeds)
    report = run_experiment(data, out_dir, cfg, log=out.print)
    out.print(render_markdown(report))
    out.print(f"report: {out_dir / 'report.md'}, {out_dir / 'report.json'}, {out_dir / 'encoders.png'}, "
              f"{out_dir / 'staleness.png'}")


@dv365_app.command("downstream")
def downstream(
    run: Annotated[Path, typer.Option("--run", help="A `lifelong dv365 train` run directory (the tower).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Report directory (results.json, results.md, downstream.png).")],
    data: Annotated[Path | None, typer.Option("--data", help="The world (default: the run's).")] = None,
    train_days: Annotated[float, typer.Option(help="Days of training impressions before the cutoff.")] = 3.0,
    train_rows: Annotated[int, typer.Option(help="Seeded subset of training impressions (0: all).")] = 300_000,
    eval_rows: Annotated[int, typer.Option(help="Seeded subset of evaluation impressions (0: all).")] = 150_000,
    seeds: Annotated[int, typer.Option(help="Seeds per variant.")] = 2,
    user_id: Annotated[bool, typer.Option(help="The baselines embed the user id.")] = True,
    ranker_epochs: Annotated[int, typer.Option()] = 2,
    retrieval_epochs: Annotated[int, typer.Option()] = 4,
    queries: Annotated[int, typer.Option(help="Evaluation (user, item) pairs scored for HitRate (0: all).")] = 0,
    quantize: Annotated[bool, typer.Option(help="Pass the embedding through the export's 4-bit codec.")] = True,
    threads: Annotated[int, typer.Option(help="torch intra-op threads.")] = 1,
    cache: Annotated[Path | None, typer.Option(help="Keep the embeddings here for reruns (one directory per tower).")] = None,
) -> None:
    """Downstream value: DLRM ranker with vs without the frozen embedding, retrieval none/linear/GateNet."""
    import torch

    torch.set_num_threads(threads)
    from lifelong.dv365.downstream_data import DownstreamDataConfig
    from lifelong.dv365.downstream_experiment import (
        DownstreamConfig,
        cached_embeddings,
        render_markdown,
        run_downstream,
        tower_embeddings,
    )

    world = data or _run_data(run)
    cfg = DownstreamConfig(data=DownstreamDataConfig(train_days=train_days, max_train_rows=train_rows or None,
                                                     max_eval_rows=eval_rows or None),
                           seeds=tuple(range(seeds)), user_id=user_id, ranker_epochs=ranker_epochs,
                           retrieval_epochs=retrieval_epochs, max_queries=queries or None)
    embeddings = tower_embeddings(run, world, quantize=quantize)
    if cache is not None:
        embeddings = cached_embeddings(embeddings, cache)
    results = run_downstream(world, embeddings, out_dir, cfg, log=out.print,
                             provenance={"run": str(run.resolve()), "quantized_4bit": quantize})
    out.print(render_markdown(results))
    out.print(f"report: {out_dir / 'results.md'}, {out_dir / 'results.json'}, {out_dir / 'downstream.png'} "
              f"({results['seconds']:.0f} s)")
