"""Wide & deep and BST: shapes, what they read, NaN-free empty sequences, learning."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lifelong.modules.heads import ranking_loss
from lifelong.transact.batch import RankBatch
from lifelong.transact.registry import build_model
from tests.transact.fixtures import SMALL, SMALL_LAYOUT, fit, random_batch, topic_match_batch

H = 3
RT = SMALL_LAYOUT.block_slice("rt")
_ITEM_LABEL = torch.randperm(40, generator=torch.Generator().manual_seed(0)) < 20


def _item_label_batch(b: int, seed: int) -> RankBatch:
    """The label is a fixed function of the candidate's item id: memorisable from ids alone."""
    batch = random_batch(b, SMALL_LAYOUT, 1, seed, n_items=40)
    return dataclasses.replace(batch, labels=_ITEM_LABEL[batch.item_id].float().unsqueeze(1))


def _topic_batch(b: int, seed: int) -> RankBatch:
    return topic_match_batch(b, SMALL_LAYOUT, seed)


def _new_sequence(batch: RankBatch, seed: int, where: torch.Tensor) -> RankBatch:
    other = random_batch(len(batch), SMALL_LAYOUT, H, seed, pattern="random")
    w3 = where.unsqueeze(-1)
    return dataclasses.replace(batch, seq_emb=torch.where(w3, other.seq_emb, batch.seq_emb),
                               seq_action=torch.where(where, other.seq_action, batch.seq_action),
                               seq_surface=torch.where(where, other.seq_surface, batch.seq_surface),
                               seq_item=torch.where(where, other.seq_item, batch.seq_item))


@pytest.mark.parametrize("name", ["wide_deep", "bst"])
def test_shapes_and_no_nal_states(name):
    model = build_model(name, n_heads=H, **SMALL).eval()
    out = model(random_batch(5, SMALL_LAYOUT, H, 0))
    assert out.logits.shape == (5, H) and out.rt_states is None


def test_wide_deep_reads_no_sequence():
    model = build_model("wide_deep", n_heads=H, **SMALL).eval()
    batch = random_batch(5, SMALL_LAYOUT, H, 1)
    changed = _new_sequence(batch, 2, torch.ones_like(batch.seq_valid))
    torch.testing.assert_close(model(batch).logits, model(changed).logits, rtol=0, atol=0)


def test_bst_reads_only_real_rt_tokens():
    model = build_model("bst", n_heads=H, **SMALL).eval()
    batch = random_batch(6, SMALL_LAYOUT, H, 3, pattern="random")
    outside_rt = torch.ones_like(batch.seq_valid)
    outside_rt[:, RT] = False
    with torch.no_grad():
        logits = model(batch).logits
        for where in (outside_rt, ~batch.seq_valid):
            torch.testing.assert_close(model(_new_sequence(batch, 4, where)).logits, logits, rtol=0, atol=1e-6)
        rt_real = batch.seq_valid & ~outside_rt
        assert not torch.allclose(model(_new_sequence(batch, 4, rt_real)).logits, logits)


def test_bst_empty_rt_block_is_nan_free():
    torch.manual_seed(0)
    model = build_model("bst", n_heads=H, **SMALL)
    batch = random_batch(4, SMALL_LAYOUT, H, 5, seq_valid=torch.zeros(4, SMALL_LAYOUT.total, dtype=torch.bool))
    out = model(batch)
    ranking_loss(out.logits, batch.labels).backward()
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_wide_deep_learns_id_target():
    torch.manual_seed(0)
    before, after = fit(build_model("wide_deep", n_heads=1, **SMALL), _item_label_batch, steps=60, lr=1e-2)
    assert after < 0.3 < 0.6 < before


def test_bst_learns_candidate_sequence_match_that_wide_deep_cannot():
    torch.manual_seed(0)
    _, bst_loss = fit(build_model("bst", n_heads=1, **SMALL), _topic_batch, steps=250)
    torch.manual_seed(0)
    _, wide_deep_loss = fit(build_model("wide_deep", n_heads=1, **SMALL), _topic_batch, steps=60)
    assert bst_loss < 0.55 < 0.6 < wide_deep_loss
