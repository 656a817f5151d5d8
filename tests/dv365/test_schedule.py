"""The DV365 recurring job: several cycles on simulated time, failures, overruns, the cache."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from lifelong.core.errors import ConfigError, DataError
from lifelong.data.protocol import DAY_MS
from lifelong.data.world import load_config, simulate_to
from lifelong.dv365.export import (
    EmbeddingReader,
    ExportConfig,
    active_users,
    default_as_of_ms,
)
from lifelong.dv365.schedule import (
    ScheduleConfig,
    SimulatedClock,
    SystemClock,
    parse_every,
    read_cache,
    run_schedule,
)
from lifelong.dv365.tower import load_tower
from tests.dv365.export_support import (
    FakeTower,
    assert_served,
    bound_4bit,
    fake_embeddings,
    listed_versions,
)

HOUR = 3_600_000
T0 = 1_800_000_000_000  # the clock's start: any time; the data's time comes from the world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world") / "w"
    simulate_to(load_config("tiny", overrides=["users.n_users=8"]), d)
    return d


class FakeTrainer:
    """Makes a run directory per cycle and lets ``hours`` of simulated time pass; fails on request."""

    def __init__(self, clock: SimulatedClock, hours: float = 1, fail_cycles: tuple[int, ...] = ()):
        self.clock, self.hours, self.fail_cycles, self.calls = clock, hours, fail_cycles, []

    def __call__(self, world_dir, as_of_ms, out_dir):
        self.calls.append((as_of_ms, out_dir))
        self.clock.advance(int(self.hours * HOUR))
        if len(self.calls) - 1 in self.fail_cycles:
            raise RuntimeError("the trainer ran out of memory")
        out_dir.mkdir(parents=True)
        return out_dir


def test_the_system_clock_sleeps_until_the_time():
    clock = SystemClock()
    start = clock.now_ms()
    assert abs(start - time.time() * 1000) < 50
    clock.sleep_until(start + 30)
    assert clock.now_ms() >= start + 30
    clock.sleep_until(start)  # passed: returns at once
    assert clock.now_ms() - start < 1_000


@pytest.mark.parametrize("text, ms", [("6h", 6 * HOUR), ("30m", 1_800_000), ("1d", DAY_MS), ("45s", 45_000)])
def test_parse_every(text, ms):
    assert parse_every(text) == ms


@pytest.mark.parametrize("text", ["6x", "0h", "", "1.5h", "-1h", "6 h", "h", 6])
def test_bad_intervals_are_config_errors(text):
    with pytest.raises(ConfigError, match=r"interval .* is not a positive <integer><unit> with unit one of ms, s, m"):
        parse_every(text)


def test_cycles_on_simulated_time(world, store_url, tmp_path):
    clock = SimulatedClock(T0)
    trainer = FakeTrainer(clock, hours=1)
    towers = []

    def load(run_dir):
        towers.append((run_dir, FakeTower()))
        return towers[-1][1]

    lines = []
    config = ScheduleConfig(every_ms=parse_every("6h"), cycles=4)
    records = run_schedule(world, store_url, tmp_path / "out", config, trainer=trainer, tower_loader=load, clock=clock,
                           log=lines.append)
    first = default_as_of_ms(world) - 3 * 6 * HOUR  # the last cycle sees the whole world
    as_of = [first + i * 6 * HOUR for i in range(4)]
    assert [(r.cycle, r.status, r.version, r.served_version) for r in records] == [(i, "ok", i + 1, i + 1) for i in range(4)]
    assert [r.as_of_ms for r in records] == as_of and [a for a, _ in trainer.calls] == as_of
    assert [r.due_ms for r in records] == [r.started_ms for r in records] == [T0 + i * 6 * HOUR for i in range(4)]
    assert clock.waits == [0, 5 * HOUR, 5 * HOUR, 5 * HOUR]  # each cycle took an hour; nothing really slept
    assert [run for run, _ in towers] == [out for _, out in trainer.calls] == \
        [tmp_path / "out" / "cycles" / f"{i:04d}" / "run" for i in range(4)]
    assert listed_versions(store_url) == [3, 4]
    users = active_users(world, as_of[-1])
    assert records[-1].users == users.size > 0 and records[-1].compression_ratio == pytest.approx(4 * 40 / 32)
    assert_served(store_url, users, as_of[-1], 4)

    for record, t in zip(records, as_of):  # the cache keeps every version, as served
        cached_users, emb, meta = read_cache(record.cache)
        assert meta == {"version": record.version, "as_of_ms": t, "rows": 3, "dim": 40}
        assert np.array_equal(cached_users, active_users(world, t))
        want = fake_embeddings(cached_users, t)
        assert np.all(np.abs(emb.astype(np.float64) - want) <= bound_4bit(want))
    with EmbeddingReader(store_url) as reader:
        assert np.array_equal(reader.get(users)[0], read_cache(records[-1].cache)[1])
    logged = [json.loads(line) for line in (tmp_path / "out" / "schedule.jsonl").read_text().splitlines()]
    assert [(d["cycle"], d["version"], d["cache"]) for d in logged] == [(r.cycle, r.version, r.cache) for r in records]
    assert sum("exported version" in line for line in lines) == 4


class NaNTower(FakeTower):
    def embed_users(self, world_dir, user_ids, as_of_ms, gap_ms=None):
        return np.full((len(user_ids), 3, 40), np.nan, dtype=np.float32)


def test_a_failed_cycle_is_logged_and_the_previous_version_stays_served(world, store_url, tmp_path):
    clock = SimulatedClock(T0)
    trainer = FakeTrainer(clock, fail_cycles=(1,))
    lines = []
    records = run_schedule(world, store_url, tmp_path / "out", ScheduleConfig(every_ms=6 * HOUR, cycles=4),
                           trainer=trainer, clock=clock, log=lines.append,
                           tower_loader=lambda run: NaNTower() if len(trainer.calls) == 3 else FakeTower())
    assert [(r.status, r.step, r.version, r.served_version) for r in records] == [
        ("ok", None, 1, 1), ("failed", "train", None, 1), ("failed", "export", None, 1), ("ok", None, 3, 3)]
    assert records[1].error == "RuntimeError: the trainer ran out of memory" and records[1].run is None
    assert "NaN or infinite" in records[2].error and records[2].run.endswith("0002/run")
    assert any("Traceback" in line for line in lines)  # an unexpected error is logged whole
    assert records[3].users > 0 and listed_versions(store_url) == [1, 3]  # the failed version 2 was collected
    assert_served(store_url, active_users(world, records[3].as_of_ms), records[3].as_of_ms, 3)


def test_overrunning_cycles_start_late_never_twice(world, tmp_path):
    clock = SimulatedClock(T0)
    records = run_schedule(world, f"lmdb://{tmp_path / 'emb'}", tmp_path / "out",
                           ScheduleConfig(every_ms=6 * HOUR, cycles=3, first_as_of_ms=default_as_of_ms(world) - DAY_MS),
                           trainer=FakeTrainer(clock, hours=8), tower_loader=lambda run: FakeTower(), clock=clock,
                           log=lambda line: None)
    assert [r.started_ms - r.due_ms for r in records] == [0, 2 * HOUR, 4 * HOUR] and clock.waits == [0, 0, 0]
    assert [r.as_of_ms for r in records] == [default_as_of_ms(world) - DAY_MS + i * 6 * HOUR for i in range(3)]
    assert [r.version for r in records] == [1, 2, 3]


def test_reusing_one_run_without_training(world, tmp_path):
    loaded = []
    records = run_schedule(world, f"lmdb://{tmp_path / 'emb'}", tmp_path / "out",
                           ScheduleConfig(every_ms=DAY_MS, cycles=2, export=ExportConfig(keep=1)), run=tmp_path / "run",
                           tower_loader=lambda run: loaded.append(run) or FakeTower(), clock=SimulatedClock(),
                           log=lambda line: None)
    assert loaded == [tmp_path / "run"] and [r.status for r in records] == ["ok", "ok"]  # loaded once
    assert listed_versions(f"lmdb://{tmp_path / 'emb'}") == [2]
    with pytest.raises(ConfigError, match="a trainer .* or a run to reuse, not both"):
        run_schedule(world, "unused", tmp_path, ScheduleConfig(every_ms=1), clock=SimulatedClock())


@pytest.mark.parametrize("kwargs, message", [({"every_ms": 0}, "every_ms must be a positive integer"),
                                             ({"every_ms": 1, "cycles": 0}, "cycles must be an integer >= 1")])
def test_bad_schedule_config_is_a_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ScheduleConfig(**kwargs)


def test_read_cache_of_a_non_cache_file_is_a_data_error(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(2))
    with pytest.raises(DataError, match="not a DV365 embedding cache file"):
        read_cache(tmp_path / "x.npz")


def test_tower_trainer_trains_and_exports_a_real_tower_each_cycle(world, tmp_path):
    from lifelong.dv365.fsa import FSAConfig
    from lifelong.dv365.schedule import TowerTrainer
    from lifelong.dv365.train import DV365TrainConfig

    cfg = DV365TrainConfig(fsa=FSAConfig(out_cols=16), train_days=2, per_group=8, eval_per_group=8, epochs=1)
    url = f"lmdb://{tmp_path / 'emb'}"
    trainer = TowerTrainer(cfg, log=lambda line: None)
    records = run_schedule(world, url, tmp_path / "out", ScheduleConfig(every_ms=DAY_MS, cycles=2), trainer=trainer,
                           tower_loader=trainer.load_tower, clock=SimulatedClock(), log=lambda line: None)
    assert [(r.status, r.version) for r in records] == [("ok", 1), ("ok", 2)], [r.error for r in records]
    for record in records:
        run = json.loads((tmp_path / "out" / "cycles" / f"{record.cycle:04d}" / "run" / "run.json").read_text())
        assert run["as_of_ms"] == record.as_of_ms
    users, emb, meta = read_cache(records[-1].cache)
    # The export read the trainer's index of the world; a tower indexing it anew agrees.
    want = load_tower(records[-1].run).embed_users(world, users, meta["as_of_ms"])
    assert emb.shape == want.shape and emb.shape[2] == 16 and np.all(np.abs(emb.astype(np.float64) - want) <= bound_4bit(want))
    with EmbeddingReader(url) as reader:
        assert reader.current()["run"] == records[-1].run


def test_cli_export_and_schedule(world, tmp_path):
    from typer.testing import CliRunner

    from lifelong.cli import app
    from lifelong.dv365.fsa import FSAConfig
    from lifelong.dv365.schedule import TowerTrainer
    from lifelong.dv365.train import DV365TrainConfig

    cfg = DV365TrainConfig(fsa=FSAConfig(out_cols=16), train_days=2, per_group=8, eval_per_group=8, epochs=1)
    run = TowerTrainer(cfg, log=lambda line: None)(world, default_as_of_ms(world), tmp_path / "run")
    store = f"lmdb://{tmp_path / 'emb'}"
    cli = CliRunner(env={"LIFELONG_QUIET": "1"})
    res = cli.invoke(app, ["dv365", "export", "--run", str(run), "--store", store])
    assert res.exit_code == 0, res.output
    printed = res.output
    users = active_users(world, default_as_of_ms(world))
    # (66, 16) rows: 1 code word + 1 scale/offset word = 16 bytes a row for 64 bytes of fp32.
    assert f"exported version 1 to {store}" in printed and f"{users.size} users x (66, 16)" in printed
    assert "1,056 bytes a user vs 4,224 in fp32: compression 4.00x" in printed

    res = cli.invoke(app, ["dv365", "schedule", "--every", "6h", "--data", str(world), "--store", store, "--out",
                           str(tmp_path / "sched"), "--cycles", "3", "--run", str(run), "--no-train", "--simulated-clock"])
    assert res.exit_code == 0, res.output
    assert "done: 3 of 3 cycles ok; serving version 4" in res.output
    with EmbeddingReader(store) as reader:
        assert reader.current()["as_of_ms"] == default_as_of_ms(world) and reader.current()["history"] == [3]

    # As of a rows split's start (the rows directory only lends its protocol).
    start = default_as_of_ms(world) - 2 * DAY_MS
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "build.json").write_text(json.dumps({"protocol": {
        "train_start_ms": start, "cutoff_ms": start + DAY_MS, "eval_start_ms": start + DAY_MS, "eval_end_ms": start + 2 * DAY_MS}}))
    early = f"lmdb://{tmp_path / 'emb_early'}"
    res = cli.invoke(app, ["dv365", "export", "--run", str(run), "--store", early, "--before-split", f"{tmp_path / 'rows'}:train"])
    assert res.exit_code == 0, res.output
    assert time.strftime("(as of %Y-%m-%d %H:%M UTC)", time.gmtime(start / 1000)) in res.output
    with EmbeddingReader(early) as reader:
        assert reader.current()["as_of_ms"] == start
    for bad, error in ((["--before-split", "rows-without-split"], "--before-split takes ROWS:SPLIT"),
                       (["--before-split", f"{tmp_path / 'rows'}:test"], "no split 'test'"),
                       (["--before-split", f"{tmp_path}:train"], "not a rows directory")):
        res = cli.invoke(app, ["dv365", "export", "--run", str(run), "--store", early, *bad])
        assert res.exception is not None and error in str(res.exception), res.output

    res = cli.invoke(app, ["dv365", "export", "--run", str(tmp_path / "nothing"), "--store", store])
    assert isinstance(res.exception, DataError) and "no run.json naming its data" in str(res.exception)
    for args, error in ((["--every", "6 hours"], "interval '6 hours' is not a positive"),
                        (["--no-train"], "--no-train reuses a tower: give it with --run")):
        res = cli.invoke(app, ["dv365", "schedule", "--data", str(world), "--store", store, "--out", str(tmp_path / "x"),
                               *args])
        assert isinstance(res.exception, ConfigError) and error in str(res.exception)
