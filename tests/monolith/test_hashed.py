"""The modulo-hashed embedding: colliding ids share one row (and its updates), everything else is the
collision-less module's (shapes, modes, sparse steps, extra state)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.core.errors import ConfigError
from lifelong.tables.cuckoo import mix64
from lifelong.tables.embedding import CollisionlessEmbedding, sparse_step
from lifelong.tables.hashed import ModuloEmbedding, bucket_of
from lifelong.tables.table import TableConfig

CFG = TableConfig(dim=3, init_scale=0.1, seed=7)
ids64 = st.integers(min_value=-2**63, max_value=2**63 - 1)


@given(st.lists(ids64, min_size=1, max_size=50), st.integers(1, 40))
@settings(max_examples=50, deadline=None)
def test_buckets_are_the_mixed_id_modulo_the_bucket_count(ids, buckets):
    got = bucket_of(np.array(ids), buckets)
    assert got.dtype == np.int64 and ((got >= 0) & (got < buckets)).all()
    want = [int(mix64(np.uint64(i % 2**64))) % buckets for i in ids]
    assert got.tolist() == want


def test_one_bucket_per_id_still_collides_like_a_hash():
    # Dense ids 0..n-1 would fit id % n exactly; mixed first, they collide as arbitrary ids do.
    n = 20_000
    _, counts = np.unique(bucket_of(np.arange(n), n), return_counts=True)
    shared = counts[counts > 1].sum() / n
    assert 0.60 < shared < 0.66  # 1 - 1/e = 0.632
    assert 0.34 < 1 - counts.size / n < 0.40  # empty buckets: 1/e = 0.368


@given(st.lists(ids64, min_size=1, max_size=60), st.integers(1, 8))
@settings(max_examples=40, deadline=None)
def test_equals_a_collisionless_table_of_the_buckets_through_training(ids, buckets):
    """Same init, same rows, same sparse updates as the collision-less module fed the bucket numbers."""
    ids = torch.tensor(ids)
    mod, ref = ModuloEmbedding(CFG, buckets), CollisionlessEmbedding(CFG)
    weight = torch.linspace(-1, 1, ids.numel() * CFG.dim).reshape(ids.numel(), CFG.dim)
    for step in range(2):
        out_mod, out_ref = mod(ids), ref(torch.from_numpy(bucket_of(ids.numpy(), buckets)))
        torch.testing.assert_close(out_mod, out_ref, rtol=0, atol=0)
        (out_mod * weight).sum().backward()
        (out_ref * weight).sum().backward()
        assert sparse_step(mod, now_ms=step) == sparse_step(ref, now_ms=step)
    assert len(mod.table) <= buckets
    # Ids of one bucket read one vector; ids of different buckets read different ones.
    b = bucket_of(ids.numpy(), buckets)
    out = mod.eval()(ids).numpy()
    for i in range(len(b)):
        for j in range(len(b)):
            assert np.array_equal(out[i], out[j]) == (b[i] == b[j])


def test_colliding_ids_share_their_gradient_updates():
    a, b = 0, next(i for i in range(1, 10_000) if bucket_of(np.array([i]), 5)[0] == bucket_of(np.array([0]), 5)[0])
    emb = ModuloEmbedding(CFG, buckets=5)
    before = emb(torch.tensor([b])).detach()
    emb(torch.tensor([a])).sum().backward()  # only a is trained...
    emb.step(now_ms=1)
    after = emb.eval()(torch.tensor([b]))
    assert not torch.equal(before, after)  # ...and b moved with it


@pytest.mark.parametrize("shape", [(5,), (2, 3), (0,), (2, 0, 4)])
def test_shapes_and_modes_match_the_collisionless_module(shape):
    ids = torch.arange(int(np.prod(shape)), dtype=torch.int64).reshape(shape) * 977
    mod, ref = ModuloEmbedding(CFG, buckets=4), CollisionlessEmbedding(CFG)
    assert mod(ids).shape == ref(ids).shape == (*shape, CFG.dim)
    assert mod.embedding_dim == ref.embedding_dim == CFG.dim
    mod.eval()
    rows = len(mod.table)
    mod(ids + 1)  # eval mode inserts nothing
    assert len(mod.table) == rows


def test_extra_state_keeps_the_rows_and_the_bucket_count():
    emb = ModuloEmbedding(CFG, buckets=6)
    ids = torch.arange(40)
    emb(ids).sum().backward()
    emb.step(now_ms=3)
    other = ModuloEmbedding(TableConfig(dim=3), buckets=99)
    other.load_state_dict(emb.state_dict())
    assert other.buckets == 6 and "buckets=6" in repr(other)
    torch.testing.assert_close(other.eval()(ids), emb.eval()(ids), rtol=0, atol=0)


def test_refuses_no_buckets():
    with pytest.raises(ConfigError, match="buckets must be >= 1"):
        ModuloEmbedding(CFG, buckets=0)
