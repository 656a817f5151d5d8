"""Embedding table: stateful check of admission, expiry and growth; sparse optimizers vs torch;
compressed export; exact save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lifelong.core.errors import ConfigError, DataError
from lifelong.tables.cuckoo import CuckooConfig
from lifelong.tables.filters import FilterConfig
from lifelong.tables.table import EmbeddingTable, OptimizerConfig, TableConfig

TTL = 100
IDS = st.lists(st.one_of(st.integers(-3, 25), st.integers(-2**63, 2**63 - 1)), max_size=16)


def init_vectors(ids: list[int], dim: int) -> np.ndarray:
    """What fresh rows of these ids hold (initialisation depends only on id and seed)."""
    ref = EmbeddingTable(TableConfig(dim=dim))
    return ref.vectors(ref.admit(np.array(ids, dtype=np.int64)))


class TableMachine(RuleBasedStateMachine):
    """Table against a dict id -> (row, last update); zero gradients keep every row at its init."""

    @initialize(buckets=st.integers(1, 2), slots=st.sampled_from([1, 4]), rows=st.integers(1, 3))
    def setup(self, buckets, slots, rows):
        self.table = EmbeddingTable(TableConfig(dim=3, ttl_ms=TTL, initial_rows=rows, row_growth=1.2,
                                                index=CuckooConfig(initial_buckets=buckets, slots=slots)))
        self.model: dict[int, tuple[int, int]] = {}
        self.now = 0

    @rule(ids=IDS)
    def insert(self, ids):
        got = self.table.admit(np.array(ids, dtype=np.int64), now_ms=self.now).tolist()
        for i, row in zip(ids, got):
            self.model.setdefault(i, (row, self.now))
            assert row == self.model[i][0]

    @rule(ids=IDS)
    def lookup(self, ids):
        assert self.table.lookup(np.array(ids, dtype=np.int64)).tolist() == [self.model.get(i, (-1,))[0] for i in ids]

    @rule(ids=IDS)
    def remove(self, ids):
        got = self.table.remove(np.array(ids, dtype=np.int64)).tolist()
        for i, row in zip(ids, got):
            assert row == self.model.pop(i, (-1,))[0]

    @rule(ids=IDS, dt=st.integers(0, 60))
    def update(self, ids, dt):
        self.now += dt
        self.table.apply_gradients(np.array(ids, dtype=np.int64), np.zeros((len(ids), 3), np.float32), self.now)
        for i in ids:
            if i in self.model:
                self.model[i] = (self.model[i][0], self.now)

    @rule(dt=st.integers(0, 120))
    def expire(self, dt):
        self.now += dt
        stale = sorted(i for i, (_, t) in self.model.items() if t <= self.now - TTL)
        assert self.table.expire(self.now).tolist() == stale
        for i in stale:
            del self.model[i]

    @precondition(lambda self: self.table.index.n_buckets < 4096)  # a run of grows must not exhaust memory
    @rule()
    def grow(self):
        self.table.index.grow()

    @invariant()
    def matches_model(self):
        ids, rows = self.table.index.items()
        assert dict(zip(ids.tolist(), rows.tolist())) == {i: r for i, (r, _) in self.model.items()}
        assert len(set(rows.tolist())) == rows.size, "two live ids share a row"
        assert self.table.capacity >= self.table.index.n_rows
        assert self.table.updated_ms[rows].tolist() == [self.model[i][1] for i in ids.tolist()]
        np.testing.assert_array_equal(self.table.vectors(rows), init_vectors(ids.tolist(), 3))


TableMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
TestTableMachine = TableMachine.TestCase


def test_counting_filter_gates_rows_and_default_is_read_until_then():
    table = EmbeddingTable(TableConfig(dim=2, filter=FilterConfig(kind="counting", threshold=3)))
    assert table.admit([7, 8]).tolist() == [-1, -1]
    assert table.admit([7]).tolist() == [-1]
    assert table.vectors(table.lookup([7])).tolist() == [[0.0, 0.0]]
    rows = table.admit([8, 7, 7])  # 7's third occurrence admits it; all its occurrences read the row
    assert rows.tolist() == [-1, 0, 0] and len(table) == 1
    assert table.lookup([7, 8]).tolist() == [0, -1]  # lookups count nothing


def test_expiry_boundary_and_reused_rows_start_fresh():
    table = EmbeddingTable(TableConfig(dim=2, ttl_ms=10, optimizer=OptimizerConfig(kind="adam")))
    table.admit([1, 2], now_ms=0)
    table.apply_gradients([1, 2], np.ones((2, 2), np.float32), now_ms=5)
    assert table.expire(14).tolist() == [] and table.expire(15).tolist() == [1, 2]  # updated exactly ttl ago
    (row,) = table.admit([3], now_ms=20).tolist()
    assert row in (0, 1)  # a freed row, reused
    assert table.state["step"][row] == 0 and not table.state["m"][row].any() and not table.state["v"][row].any()
    np.testing.assert_array_equal(table.vectors([row]), init_vectors([3], 2))
    assert table.updated_ms[row] == 20


def sparse_vs_dense(opt_cfg: OptimizerConfig, torch_opt, steps: int = 6):
    """Row 'x' gets gradients (twice per batch) every step; the table must match torch on a dense copy."""
    table = EmbeddingTable(TableConfig(dim=4, init_scale=0.5, optimizer=opt_cfg))
    ids = np.array([11, 12, 11, 13])
    table.admit(ids)
    x = torch.tensor(table.vectors(table.lookup([11]))[0], requires_grad=True)
    opt = torch_opt([x])
    rng = np.random.default_rng(0)
    for t in range(steps):
        g = rng.standard_normal((4, 4)).astype(np.float32)
        table.apply_gradients(ids, g, now_ms=t)
        x.grad = torch.from_numpy(g[0] + g[2])
        opt.step()
        np.testing.assert_allclose(table.vectors(table.lookup([11]))[0], x.detach().numpy(), rtol=1e-5, atol=1e-6)
    return table


def test_sparse_adagrad_equals_torch_adagrad():
    cfg = OptimizerConfig(kind="adagrad", lr=0.1, initial_accumulator_value=0.05)
    sparse_vs_dense(cfg, lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.05))


def test_sparse_adam_equals_torch_adam_with_per_row_steps():
    cfg = OptimizerConfig(kind="adam", lr=0.01, beta1=0.8, beta2=0.99)
    table = sparse_vs_dense(cfg, lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99)))
    row_12 = table.lookup([12])[0]
    assert table.state["step"][row_12] == 6
    table.admit([99])
    table.apply_gradients([99], np.ones((1, 4), np.float32), now_ms=7)  # a new row starts at step 1
    assert table.state["step"][table.lookup([99])[0]] == 1 and table.state["step"][row_12] == 6


def test_learned_default_trains_on_unadmitted_ids():
    table = EmbeddingTable(TableConfig(dim=2, default="learned", filter=FilterConfig(kind="counting", threshold=15),
                                       optimizer=OptimizerConfig(kind="adagrad", lr=0.5)))
    assert table.admit([1, 2, 3]).tolist() == [-1, -1, -1]
    table.apply_gradients([1, 2, 3], np.ones((3, 2), np.float32), now_ms=5)
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.full((2,), 3.0)
    torch.optim.Adagrad([p], lr=0.5).step()
    np.testing.assert_allclose(table.vectors([-1])[0], p.detach().numpy(), rtol=1e-6)
    zeros = EmbeddingTable(TableConfig(dim=2))
    zeros.apply_gradients([1], np.ones((1, 2), np.float32), now_ms=5)
    assert zeros.default.tolist() == [0.0, 0.0]


def test_apply_gradients_checks_shape():
    table = EmbeddingTable(TableConfig(dim=2))
    with pytest.raises(ValueError, match="ids.shape"):
        table.apply_gradients([[1, 2]], np.zeros((2, 2)), now_ms=0)


def test_export_error_bounds_order_and_since():
    table = EmbeddingTable(TableConfig(dim=8, init_scale=3.0))
    ids = np.random.default_rng(1).integers(-10**12, 10**12, 500)
    table.admit(ids, now_ms=0)
    table.apply_gradients(ids[:10], np.zeros((10, 8), np.float32), now_ms=50)
    table.weights[table.lookup(ids[-1])] = 0.0
    full = table.export("fp32")
    assert (np.diff(full.ids) > 0).all() and full.ids.size == 500
    w = full.values
    fp16 = table.export("fp16").dequantize()
    assert (np.abs(fp16 - w) <= 2.0**-11 * np.abs(w) + 2.0**-25).all()
    q = table.export("int8")
    assert q.values.dtype == np.int8 and (np.abs(q.dequantize() - w) <= q.scale[:, None] / 2 * (1 + 1e-6)).all()
    assert (q.dequantize()[full.ids == ids[-1]] == 0).all()
    assert sorted(table.export("int8", since_ms=50).ids.tolist()) == sorted(set(ids[:10].tolist()))
    with pytest.raises(ConfigError, match="export format"):
        table.export("bf16")


def busy_table() -> EmbeddingTable:
    """A table with every kind of state: filter counts, free rows, Adam moments, a learned default."""
    cfg = TableConfig(dim=3, ttl_ms=50, default="learned", initial_rows=4, index=CuckooConfig(initial_buckets=2),
                      filter=FilterConfig(kind="counting", threshold=2, width=64), optimizer=OptimizerConfig(kind="adam"))
    table = EmbeddingTable(cfg)
    rng = np.random.default_rng(2)
    for t in range(0, 200, 10):
        ids = rng.integers(0, 40, 30)
        table.admit(ids, now_ms=t)
        table.apply_gradients(ids[:20], rng.standard_normal((20, 3)).astype(np.float32), now_ms=t)
        table.expire(t)
    table.remove([int(table.index.items()[0][0])])
    return table


def assert_same(a: EmbeddingTable, b: EmbeddingTable) -> None:
    (ma, xa), (mb, xb) = a.state_dict(), b.state_dict()
    assert ma == mb and sorted(xa) == sorted(xb)
    for k in xa:
        assert xa[k].dtype == xb[k].dtype, k
        np.testing.assert_array_equal(xa[k], xb[k], err_msg=k)


def test_save_load_round_trip_is_exact_and_continues_identically(tmp_path):
    a = busy_table()
    assert a.index.n_free > 0 and a.filter.count(np.arange(40)).any()
    a.save(tmp_path / "t")
    b = EmbeddingTable.load(tmp_path / "t")
    assert b.cfg == a.cfg
    assert_same(a, b)
    for t in (300, 310):
        ids = np.arange(30, 90)
        assert (a.admit(ids, now_ms=t) == b.admit(ids, now_ms=t)).all()
        g = np.full((60, 3), 0.1, np.float32)
        a.apply_gradients(ids, g, now_ms=t), b.apply_gradients(ids, g, now_ms=t)
        assert (a.expire(t + 20) == b.expire(t + 20)).all()
    assert_same(a, b)


def test_load_refuses_missing_or_foreign_directories(tmp_path):
    with pytest.raises(DataError, match="not a saved embedding table"):
        EmbeddingTable.load(tmp_path)
    EmbeddingTable(TableConfig(dim=2)).save(tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "table.json").read_text())
    (tmp_path / "t" / "table.json").write_text(json.dumps({**meta, "format": "other/1"}))
    with pytest.raises(DataError, match="format"):
        EmbeddingTable.load(tmp_path / "t")
    (tmp_path / "t" / "table.json").write_text(json.dumps({**meta, "config": {**meta["config"], "dim": 5}}))
    with pytest.raises(DataError, match="shape"):
        EmbeddingTable.load(tmp_path / "t")


@pytest.mark.parametrize("kwargs, field", [({"ttl_ms": -1}, "ttl_ms"), ({"default": "random"}, "default"),
                                           ({"row_growth": 1.0}, "row_growth"),
                                           ({"optimizer": {"kind": "sgd"}}, "optimizer kind")])
def test_bad_table_config_is_a_config_error(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        TableConfig.from_dict({"dim": 2, **kwargs})
