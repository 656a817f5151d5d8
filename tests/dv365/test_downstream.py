"""DV365 downstream integration: GateNet, the DLRM ranker, the two-tower model and HitRate@K."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.core.errors import ConfigError
from lifelong.dv365.downstream_ranker import DLRMRanker, DLRMRankerConfig
from lifelong.dv365.projection import EmbeddingProjection, GateNet
from lifelong.dv365.retrieval import (
    TwoTower,
    TwoTowerConfig,
    hit_rate_at_k,
    in_batch_softmax_loss,
)
from lifelong.modules.heads import ranking_loss

R, C = 3, 4


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_gatenet_scales_each_feature_by_a_gate_in_0_2(seed):
    torch.manual_seed(seed)
    gate = GateNet(6, hidden=(5,))
    torch.nn.init.normal_(gate.gate.weight, std=3.0)
    x = torch.randn(8, 6) + 0.1
    ratio = gate(x) / x
    # Open interval in exact arithmetic; float32 sigmoid saturates to 0 or 1 for large logits.
    assert ((ratio >= 0) & (ratio <= 2)).all()
    assert ratio.std() > 0.05, "trained gates differ per feature"


def test_projection_does_not_train_the_embedding_and_checks_its_shape():
    proj = EmbeddingProjection(R, C, 5, gate=True)
    emb = torch.randn(2, R, C, requires_grad=True)
    proj(emb).sum().backward()
    assert emb.grad is None and proj.linear.weight.grad is not None
    with pytest.raises(ValueError, match="not"):
        proj(torch.randn(2, C, R))
    with pytest.raises(ConfigError):
        EmbeddingProjection(0, C, 5)


def _ranker(with_embedding: bool, interaction: str = "dot") -> DLRMRanker:
    torch.manual_seed(0)
    return DLRMRanker(DLRMRankerConfig(n_dense=3, sparse_buckets=(50, 7), n_tasks=2, embed_dim=8, top_dims=(16,),
                                       interaction=interaction, user_embedding=(R, C) if with_embedding else None))


def test_dot_interaction_is_the_pairwise_dot_products_of_all_vectors():
    model = _ranker(True)
    dense, sparse, emb = torch.randn(4, 3), torch.randint(0, 50, (4, 2)), torch.randn(4, R, C)
    x = model.bottom(dense)
    vectors = [x, model.sparse[0](sparse[:, 0]), model.sparse[1](sparse[:, 1]), model.user(emb)]
    dots = [(vectors[i] * vectors[j]).sum(-1) for i in range(4) for j in range(i + 1, 4)]
    expected = model.top(torch.cat([x, torch.stack(dots, 1)], 1))
    torch.testing.assert_close(model(dense, sparse, emb), expected)


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_ranker_reads_the_embedding_only_when_configured(interaction):
    dense, sparse, emb = torch.randn(4, 3), torch.randint(0, 50, (4, 2)), torch.randn(4, R, C)
    with_emb, without = _ranker(True, interaction), _ranker(False, interaction)
    assert not torch.allclose(with_emb(dense, sparse, emb), with_emb(dense, sparse, emb + 1))
    assert without(dense, sparse).shape == (4, 2)
    with pytest.raises(ValueError, match="user_emb"):
        without(dense, sparse, emb)
    with pytest.raises(ValueError, match="user_emb"):
        with_emb(dense, sparse)
    with pytest.raises(ConfigError, match="interaction"):
        DLRMRankerConfig(n_dense=3, sparse_buckets=(5,), interaction="sum")


def test_ranker_learns_what_only_the_embedding_knows():
    """Task 0's label is the sign of one embedding entry; nothing else carries it."""
    gen = torch.Generator().manual_seed(1)

    def batch(n):
        emb = torch.randn(n, R, C, generator=gen)
        labels = torch.stack([(emb[:, 1, 2] > 0).float(), (torch.rand(n, generator=gen) < 0.3).float()], 1)
        return torch.randn(n, 3, generator=gen), torch.randint(0, 50, (n, 2), generator=gen), emb, labels

    losses = {}
    for with_embedding in (True, False):
        model = _ranker(with_embedding)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(150):
            dense, sparse, emb, labels = batch(128)
            loss = ranking_loss(model(dense, sparse, emb if with_embedding else None)[:, :1], labels[:, :1])
            opt.zero_grad()
            loss.backward()
            opt.step()
        dense, sparse, emb, labels = batch(1024)
        with torch.no_grad():
            logits = model(dense, sparse, emb if with_embedding else None)[:, :1]
        losses[with_embedding] = float(ranking_loss(logits, labels[:, :1]))
    assert losses[True] < 0.35, losses
    assert losses[False] > 0.65, losses


def test_in_batch_softmax_masks_accidental_hits_and_log_q_shifts_by_item():
    torch.manual_seed(0)
    u, v = torch.randn(4, 8), torch.randn(4, 8)
    ids = torch.tensor([1, 2, 1, 3])  # rows 0 and 2 engaged the same item
    loss = in_batch_softmax_loss(u, v, ids, temperature=0.5)
    logits = u @ v.T / 0.5
    logits[0, 2] = logits[2, 0] = float("-inf")
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, torch.arange(4)))
    # A constant log Q changes no softmax; a per-item one lowers that item's logit.
    torch.testing.assert_close(in_batch_softmax_loss(u, v, ids, 0.5, torch.full((4,), -3.0)), loss)
    log_q = torch.tensor([0.0, 0.0, 0.0, 5.0])
    expected = torch.nn.functional.cross_entropy(logits - log_q, torch.arange(4))
    torch.testing.assert_close(in_batch_softmax_loss(u, v, ids, 0.5, log_q), expected)


@pytest.mark.parametrize("projection", ["linear", "gatenet"])
def test_two_tower_outputs_unit_vectors_and_reads_the_embedding(projection):
    torch.manual_seed(0)
    cfg = TwoTowerConfig(n_user_dense=2, user_buckets=(10,), item_buckets=(30, 5), id_dim=4, hidden=(16,), out_dim=8,
                         user_embedding=(R, C), projection=projection, embedding_dim=6)
    model = TwoTower(cfg)
    dense, ids, emb = torch.randn(3, 2), torch.randint(0, 10, (3, 1)), torch.randn(3, R, C)
    u = model.user_vectors(dense, ids, emb)
    v = model.item_vectors(torch.randn(5, 32), torch.randint(0, 30, (5, 2)))
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(5))
    assert not torch.allclose(model.user_vectors(dense, ids, emb * 2), u)
    assert (model.embedding.gate is not None) == (projection == "gatenet")
    with pytest.raises(ConfigError, match="projection"):
        TwoTowerConfig(n_user_dense=2, user_buckets=(), item_buckets=(3,), projection="mlp")


def _reference_hit_rate(users, items, qu, qi, ks):
    scores = (users @ items.T).numpy()
    n_higher = []
    for u, i in zip(qu, qi):
        excused = np.isin(np.arange(items.shape[0]), qi[(qu == u) & (qi != i)])
        n_higher.append(int(((scores[u] > scores[u, i]) & ~excused).sum()))
    return {k: float((np.array(n_higher) < k).mean()) for k in ks}


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n_users=st.integers(1, 12), n_items=st.integers(2, 60),
       n_queries=st.integers(1, 80), chunk=st.integers(1, 5))
def test_hit_rate_matches_a_brute_force_reference(seed, n_users, n_items, n_queries, chunk):
    rng = np.random.default_rng(seed)
    users, items = torch.randn(n_users, 3, generator=torch.Generator().manual_seed(seed)), torch.randn(n_items, 3)
    pairs = np.unique(np.stack([rng.integers(0, n_users, n_queries), rng.integers(0, n_items, n_queries)]), axis=1)
    ks = (1, 3, 10)
    got = hit_rate_at_k(users, items, pairs[0], pairs[1], ks=ks, chunk=chunk)
    assert got == pytest.approx(_reference_hit_rate(users, items, pairs[0], pairs[1], ks))
