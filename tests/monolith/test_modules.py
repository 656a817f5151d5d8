"""CollisionlessEmbedding: gradients reach the rows, toy training converges, eval inserts nothing, checkpoints."""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn

from lifelong.tables.embedding import CollisionlessEmbedding, collisionless_modules, sparse_step
from lifelong.tables.filters import FilterConfig
from lifelong.tables.table import OptimizerConfig, TableConfig


def test_matches_nn_embedding_with_dense_adagrad():
    emb = CollisionlessEmbedding(TableConfig(dim=3, init_scale=0.5, optimizer=OptimizerConfig(lr=0.3)))
    ids = torch.tensor([[5, 9], [5, 2**50]])
    emb(ids)  # admit all three ids
    emb.step(now_ms=0)  # nothing to apply: that forward's output got no gradient
    uniq = torch.tensor([5, 9, 2**50])
    dense = nn.Embedding(3, 3)
    dense.weight.data = emb(uniq).detach().clone()
    opt = torch.optim.Adagrad(dense.parameters(), lr=0.3)
    local = torch.tensor([[0, 1], [0, 2]])
    target = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(0))
    for t in range(4):
        ((emb(ids) - target) ** 2).sum().backward()
        assert emb.step(now_ms=t) == 3
        opt.zero_grad()
        ((dense(local) - target) ** 2).sum().backward()
        opt.step()
        torch.testing.assert_close(emb(uniq).detach(), dense.weight.detach())


def test_toy_regression_trains_with_admission_filter():
    torch.manual_seed(0)
    truth = torch.randn(200)  # one target per id; only a collision-free table can fit them all
    model = nn.ModuleDict({"emb": CollisionlessEmbedding(TableConfig(
        dim=4, init_scale=0.1, filter=FilterConfig(kind="counting", threshold=2),
        optimizer=OptimizerConfig(kind="adam", lr=0.05))), "out": nn.Linear(4, 1)})
    dense = torch.optim.Adam(model["out"].parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for t in range(300):
        ids = torch.randint(0, 200, (64,), generator=gen)
        loss = ((model["out"](model["emb"](ids)).squeeze(-1) - truth[ids]) ** 2).mean()
        dense.zero_grad()
        loss.backward()
        dense.step()
        sparse_step(model, now_ms=t)
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.1 * np.mean(losses[:20])
    assert len(model["emb"].table) == 200 and list(collisionless_modules(model)) == [model["emb"]]


def test_eval_mode_and_no_grad_insert_and_record_nothing():
    emb = CollisionlessEmbedding(TableConfig(dim=2, filter=FilterConfig(kind="counting", threshold=1)))
    emb.eval()
    out = emb(torch.tensor([[1, 2, 3]]))
    assert out.shape == (1, 3, 2) and not out.requires_grad and (out == 0).all()
    assert len(emb.table) == 0 and not emb.table.filter.count([1, 2, 3]).any()
    emb.train()
    with torch.no_grad():
        emb(torch.tensor([1, 2]))
    assert len(emb.table) == 2 and emb.step(now_ms=0) == 0  # admitted, but no gradient recorded


def test_state_dict_carries_the_table_through_weights_only_load():
    model = nn.Sequential(CollisionlessEmbedding(TableConfig(dim=2, optimizer=OptimizerConfig(kind="adam"))))
    model(torch.arange(10)).sum().backward()
    sparse_step(model, now_ms=7)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = nn.Sequential(CollisionlessEmbedding(TableConfig(dim=2)))
    other.load_state_dict(torch.load(buf, weights_only=True))
    a, b = model[0].table.state_dict(), other[0].table.state_dict()
    assert a[0] == b[0]
    for k, v in a[1].items():
        np.testing.assert_array_equal(v, b[1][k], err_msg=k)
