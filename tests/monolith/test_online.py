"""The online trainer: it learns (progressive validation), every joined example is applied exactly
once across crashes (in-process faults, kill -9 of a child process, Redis Streams offsets), a
resumed run equals the uninterrupted one, and deltas rebuild the trainer's tables on a replica."""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
import redis
import torch

from lifelong.core.errors import ConfigError, DataError
from lifelong.data.world import load_config, simulate_to
from lifelong.monolith.joiner import JoinerConfig, OnlineJoiner
from lifelong.monolith.online import (
    ExampleAudit,
    OnlineConfig,
    OnlineTrainer,
    ParameterReplica,
    latest_checkpoint,
)
from lifelong.monolith.ranker import SLOTS, ItemCatalog, OnlineRankerConfig, default_table
from lifelong.store.stream import LogStream, RedisStream, replay


def small_table(seed: int, **changes):
    # A 2**14-counter filter keeps each checkpoint small (the default sketch is 1.5 MB per table).
    cfg = default_table(seed)
    return dataclasses.replace(cfg, filter=dataclasses.replace(cfg.filter, width=2**14), **changes)


MODEL = OnlineRankerConfig(**{slot: small_table(i + 1) for i, slot in enumerate(SLOTS)})
CFG = OnlineConfig(model=MODEL, joiner=JoinerConfig(window_ms=30 * 60_000), read_records=512, batch_size=256,
                   checkpoint_every=2048, metrics_window_ms=86_400_000)
DAY = 86_400_000


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two intra-op threads on a busy 2-core machine spend most of a small step waiting for each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A replayed tiny world: the log, the catalog, and the examples a single join of the whole stream emits."""
    root = tmp_path_factory.mktemp("online")
    simulate_to(load_config("tiny", overrides=["users.n_users=20"]), root / "world")
    log = LogStream(root / "log")
    replay(root / "world", log)
    records, end = log.read(0, 10**7)
    examples = OnlineJoiner(CFG.joiner).push(records)
    audit = ExampleAudit()
    audit.add(examples)
    yield SimpleNamespace(root=root, dir=root / "world", log=log, end=end, records=records, examples=examples,
                          audit=audit, catalog=ItemCatalog.from_dataset(root / "world"))
    log.close()


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    """One run over the whole stream without a fault (checkpointing only at the end)."""
    ckpt = tmp_path_factory.mktemp("uninterrupted")
    with OnlineTrainer(dataclasses.replace(CFG, checkpoint_every=10**9), world.log, world.catalog, ckpt) as trainer:
        stats = trainer.run()
    return SimpleNamespace(trainer=trainer, stats=stats, ckpt=ckpt)


def assert_exactly_once(trainer: OnlineTrainer, world, end: object = None) -> None:
    ids, counts = np.unique(world.examples["item_id"], return_counts=True)
    np.testing.assert_array_equal(trainer.audit.item_ids, ids)
    np.testing.assert_array_equal(trainer.audit.item_counts, counts)
    assert trainer.audit == world.audit  # and the same examples, labels included
    assert trainer.counters.examples == len(world.examples) and trainer.counters.events == len(world.records)
    assert trainer.offset == (world.end if end is None else end)


def assert_same_model(a: OnlineTrainer, b: OnlineTrainer) -> None:
    for slot in SLOTS:
        ta, tb = a.model.tables[slot].table, b.model.tables[slot].table
        ids_a, rows_a = ta.index.items()
        ids_b, rows_b = tb.index.items()
        oa, ob = np.argsort(ids_a), np.argsort(ids_b)
        np.testing.assert_array_equal(ids_a[oa], ids_b[ob])
        np.testing.assert_array_equal(ta.weights[rows_a[oa]], tb.weights[rows_b[ob]])
    for (name, x), (_, y) in zip(a.model.dense.state_dict().items(), b.model.dense.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    assert a.metrics == b.metrics


# -- learning ------------------------------------------------------------------------------------------


def test_learns_from_the_replayed_world(world, uninterrupted):
    trainer, stats = uninterrupted.trainer, uninterrupted.stats
    assert stats.caught_up and stats.events == len(world.records) and stats.examples == len(world.examples)
    assert stats.steps == trainer.counters.steps and stats.examples_per_s > 0
    assert_exactly_once(trainer, world)
    windows = trainer.metrics
    assert len(windows) >= 25 and all(w.end_ms - w.start_ms == DAY for w in windows)
    assert [w.start_ms for w in windows] == sorted({w.start_ms for w in windows})
    assert sum(w.examples for w in windows) <= len(world.examples)
    # Progressive validation: each prediction came before training on its example.
    assert windows[0].loss > 1.5 * np.mean([w.loss for w in windows[-10:]])
    assert np.mean([w.auc["click"] for w in windows[-15:]]) > 0.55
    assert all(len(emb.table) > 0 for emb in trainer.model.tables.values())


def test_restored_checkpoint_exports_the_trained_tables(world, uninterrupted):
    with OnlineTrainer(CFG, world.log, world.catalog, uninterrupted.ckpt) as restored:
        assert_same_model(restored, uninterrupted.trainer)
        assert restored.run().events == 0  # nothing left to read
        delta = restored.delta()
    assert delta.full and delta.base_version is None and delta.dense is not None and delta.offset == world.end
    for slot in SLOTS:
        table = uninterrupted.trainer.model.tables[slot].table
        rows = delta.tables[slot]
        assert rows.values.dtype == np.float16 and len(rows.ids) == len(table)
        np.testing.assert_allclose(rows.values, table.vectors(table.lookup(rows.ids)), rtol=1e-3, atol=1e-4)


# -- exactly once --------------------------------------------------------------------------------------


def test_faults_in_process_lose_and_repeat_nothing(world, uninterrupted, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    train_batch, calls = OnlineTrainer._train_batch, []

    def crash_after_29_batches(self, examples, now_ms):
        train_batch(self, examples, now_ms)
        calls.append(len(examples))
        if len(calls) == 29:
            raise RuntimeError("injected: crash after a trained batch")

    monkeypatch.setattr(OnlineTrainer, "_train_batch", crash_after_29_batches)
    with pytest.raises(RuntimeError, match="injected"), OnlineTrainer(CFG, world.log, world.catalog, ckpt) as first:
        first.run()
    monkeypatch.undo()
    assert first.counters.examples == sum(calls)

    with OnlineTrainer(CFG, world.log, world.catalog, ckpt) as second:
        saved = dataclasses.replace(second.counters)  # a copy: training updates the counters in place
        assert 0 < saved.examples < first.counters.examples and saved.checkpoints >= 2
        assert second.audit.examples == saved.examples
        # A whole number of reads: the reads (hence batches) stay those of the uninterrupted run.
        step = 6 * CFG.read_records
        assert second.run(until_offset=second.offset + step).offset == saved.events + step
        kept = sorted(ckpt.glob("ckpt-*"))
        real_save = torch.save
        monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("injected: disk full")))
        with pytest.raises(OSError, match="injected"):
            second.checkpoint()
        monkeypatch.setattr(torch, "save", real_save)
        # The failed checkpoint left nothing behind, and the previous ones are intact.
        assert sorted(ckpt.glob("ckpt-*")) == kept and not list(ckpt.glob(".tmp-*"))

    with OnlineTrainer(CFG, world.log, world.catalog, ckpt) as third:
        assert third.offset == saved.events + step
        third.run()
    assert_exactly_once(third, world)
    assert_same_model(third, uninterrupted.trainer)  # bit for bit: same batches, same state
    assert len(list(ckpt.glob("ckpt-*"))) == CFG.keep_checkpoints


CHILD = """
import json, sys, torch
torch.set_num_threads(1)
from lifelong.monolith.online import OnlineConfig, OnlineTrainer
from lifelong.monolith.ranker import ItemCatalog
cfg = OnlineConfig.from_dict(json.loads(sys.argv[1]))
with OnlineTrainer(cfg, sys.argv[2], ItemCatalog.from_dataset(sys.argv[3]), sys.argv[4],
                   log=lambda line: print(line, flush=True)) as trainer:
    trainer.run()
print("done", flush=True)
"""


def test_kill_9_and_restart_apply_every_example_exactly_once(world, uninterrupted, tmp_path):
    ckpt = tmp_path / "ckpt"
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(CFG.to_dict()), f"log://{world.root / 'log'}",
                              str(world.dir), str(ckpt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, deadline = [], time.monotonic() + 60
    with selectors.DefaultSelector() as sel:
        sel.register(child.stdout, selectors.EVENT_READ)
        while sum(line.startswith("checkpoint") for line in lines) < 2:
            assert time.monotonic() < deadline and sel.select(timeout=deadline - time.monotonic()), "child timed out"
            line = child.stdout.readline()
            if not line:
                pytest.fail(f"the child exited early: {child.wait()} {child.stderr.read()}")
            lines.append(line)
    os.kill(child.pid, signal.SIGKILL)  # mid-stream: training on after its 2nd checkpoint
    assert child.wait(timeout=30) == -signal.SIGKILL
    child.stdout.close()
    child.stderr.close()
    assert "done\n" not in lines

    with OnlineTrainer(CFG, world.log, world.catalog, ckpt) as restarted:
        assert restarted.counters.checkpoints >= 2 and 0 < restarted.offset < world.end
        restarted.run()
    assert_exactly_once(restarted, world)
    assert_same_model(restarted, uninterrupted.trainer)


def test_redis_stream_offsets_resume_exactly_once(world, redis_url, tmp_path):
    key = f"lifelong:test:online:{uuid.uuid4().hex}"
    try:
        with RedisStream(redis_url, key=key, entry_records=1000) as stream:
            replay(world.dir, stream)
            with OnlineTrainer(CFG, stream, world.catalog, tmp_path / "ckpt") as trainer:
                with pytest.raises(ConfigError, match="until_offset needs record-number offsets"):
                    trainer.run(until_offset=10)
                stats = trainer.run(max_events=15_100)
                assert stats.events == 15_100 and not stats.caught_up
                assert isinstance(stats.offset, str) and ":" in stats.offset  # inside an entry
            with OnlineTrainer(CFG, f"{redis_url}?key={key}", world.catalog, tmp_path / "ckpt") as resumed:
                assert resumed.offset == stats.offset
                resumed.run()
            assert_exactly_once(resumed, world, end=stream.end_offset())
    finally:
        redis.Redis.from_url(redis_url).delete(key)


# -- guards --------------------------------------------------------------------------------------------


def test_one_trainer_per_directory_and_checkpoints_bound_to_config_and_stream(world, tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / ".tmp-000000000009-1").mkdir(parents=True)  # left by a trainer killed while checkpointing
    with OnlineTrainer(CFG, world.log, world.catalog, ckpt) as trainer:
        assert not (ckpt / ".tmp-000000000009-1").exists()
        with pytest.raises(ConfigError, match="another online trainer is using"):
            OnlineTrainer(CFG, world.log, world.catalog, ckpt)
        trainer.run(max_events=600)
    with pytest.raises(ConfigError, match=r"another configuration \(lr differ\)"):
        OnlineTrainer(dataclasses.replace(CFG, lr=0.5), world.log, world.catalog, ckpt)
    with OnlineTrainer(dataclasses.replace(CFG, read_records=100, dense_every=3), world.log, world.catalog, ckpt) as t:
        assert t.offset == 600  # cadence and batching may change
    with LogStream(tmp_path / "other") as other, pytest.raises(ConfigError, match="its offset means nothing"):
        OnlineTrainer(CFG, other, world.catalog, ckpt)
    (latest_checkpoint(ckpt) / "state.json").write_text("{")
    with pytest.raises(DataError, match="not an online-training checkpoint"):
        OnlineTrainer(CFG, world.log, world.catalog, ckpt)


# -- deltas --------------------------------------------------------------------------------------------


def table_snapshot(trainer: OnlineTrainer, slot: str) -> dict[int, np.ndarray]:
    table = trainer.model.tables[slot].table
    ids, rows = table.index.items()
    return dict(zip(ids.tolist(), table.weights[rows].copy()))


def assert_replica_matches(replica: ParameterReplica, trainer: OnlineTrainer, dense: bool = True) -> None:
    for slot in SLOTS:
        table = trainer.model.tables[slot].table
        ids, rows = table.index.items()
        np.testing.assert_array_equal(replica.ids[slot], np.sort(ids))
        np.testing.assert_array_equal(replica.vectors(slot, ids), table.weights[rows])
        np.testing.assert_array_equal(replica.vectors(slot, [-12345]), table.default[None])
    for name, value in trainer.model.dense.state_dict().items():
        assert np.array_equal(replica.dense[name], value.numpy()) == dense, name


def test_deltas_carry_exactly_the_touched_rows_and_rebuild_the_tables(world, tmp_path):
    # Items expire two days after their last update, so deltas also remove rows.
    model = dataclasses.replace(MODEL, item_id=small_table(2, ttl_ms=2 * DAY))
    cfg = dataclasses.replace(CFG, model=model, delta_format="fp32", dense_every=2, expire_every_ms=DAY)
    replica = ParameterReplica()
    with OnlineTrainer(cfg, world.log, world.catalog, tmp_path / "ckpt") as trainer:
        trainer.run(max_events=8_000)
        first = trainer.delta()
        replica.apply(first)
        assert first.full and first.version == 1 and first.dense is not None
        assert_replica_matches(replica, trainer)
        versions, with_dense = [first.version], []
        for _ in range(3):
            before = {slot: table_snapshot(trainer, slot) for slot in SLOTS}
            trainer.run(max_events=6_000)
            delta = trainer.delta()
            assert delta.base_version == versions[-1] and delta.version > versions[-1]
            versions.append(delta.version)
            for slot in SLOTS:
                after, rows = table_snapshot(trainer, slot), delta.tables[slot]
                changed = {i for i, w in after.items()
                           if i not in before[slot] or not np.array_equal(w, before[slot][i])}
                assert set(rows.ids.tolist()) == changed and 0 < len(changed) <= len(after)
                assert set(before[slot]) - set(after) <= set(rows.removed.tolist())
                assert not set(rows.removed.tolist()) & set(after)
            replica.apply(delta)
            with_dense.append(delta.dense is not None)
            assert_replica_matches(replica, trainer, dense=delta.dense is not None)
        assert with_dense == [False, True, False]  # dense_every=2
        assert trainer.counters.expired_rows > 0 and len(delta.tables["item_id"].removed) > 0
        last = trainer.delta(dense=True)  # a job's last push carries them whatever dense_every says
        assert not last.full and last.dense is not None
        replica.apply(last)
        assert_replica_matches(replica, trainer, dense=True)
        stale = trainer.delta()
    with pytest.raises(DataError, match="wait for a full snapshot"):
        replica.apply(dataclasses.replace(stale, base_version=stale.base_version - 1))
    # A restarted trainer starts with a full snapshot, numbered after everything published before.
    with OnlineTrainer(cfg, world.log, world.catalog, tmp_path / "ckpt") as restarted:
        again = restarted.delta()
    assert again.full and again.version == stale.version + 1
    replica.apply(again)
    assert_replica_matches(replica, restarted)


def test_adam_dense_optimizer_state_is_checkpointed(world, tmp_path):
    cfg = dataclasses.replace(CFG, optimizer="adam", lr=0.003)
    with OnlineTrainer(cfg, world.log, world.catalog, tmp_path / "ckpt") as trainer:
        trainer.run(max_events=1024)
        saved = trainer.optimizer.state_dict()
    with OnlineTrainer(cfg, world.log, world.catalog, tmp_path / "ckpt") as restored:
        state = restored.optimizer.state_dict()
    assert isinstance(restored.optimizer, torch.optim.Adam) and state["param_groups"] == saved["param_groups"]
    for k, v in saved["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(state["state"][k][name], v[name], rtol=0, atol=0)


def test_late_examples_count_in_the_oldest_open_window(tmp_path):
    from lifelong.store.stream import EVENT_DTYPE

    ev = np.zeros(4, EVENT_DTYPE)
    ev["item_id"], ev["request_id"] = [1, 2, 3, 1], [1, 2, 3, 4]
    ev["action_mask"] = [1, 1, 3, 1]
    ev["ts_ms"] = [0, 2 * DAY, 10, 5 * DAY]  # the third arrives two days late
    catalog = ItemCatalog([1, 2, 3], author_ids=[0, 0, 0], topic_ids=[0, 0, 0], embeddings=np.zeros((3, 32)))
    lines = []
    with LogStream(tmp_path / "log") as log, OnlineTrainer(CFG, log, catalog, tmp_path / "ckpt", log=lines.append) as t:
        log.append(ev)
        assert t.run(max_events=2).examples == 1 and [w.examples for w in t.metrics] == [1]
        t.run()
    assert [(w.start_ms // DAY, w.examples, w.positive_rate["click"]) for w in t.metrics] == [
        (0, 1, 0.0), (1, 1, 1.0), (2, 1, 0.0)]
    assert sum(line.startswith("window") for line in lines) == 3 and t.metrics[0].auc["click"] is None
