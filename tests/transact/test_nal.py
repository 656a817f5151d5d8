"""Next Action Loss: against a loop-by-loop reference, accidental hits, fallback, gradients."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.core.errors import ConfigError
from lifelong.modules.heads import ranking_loss
from lifelong.transact.batch import RankBatch
from lifelong.transact.nal import next_action_loss
from lifelong.transact.registry import build_model
from lifelong.transact.sequence_layout import SequenceLayout
from tests.transact.fixtures import SMALL, SMALL_LAYOUT, random_batch

LAYOUT = SequenceLayout(ll_nn=2, rt=6, rt_nn=2, imp_nn=2)
TAU = 0.1


def reference_nal(states: torch.Tensor, b: RankBatch, negatives: str, loss: str, tau: float = TAU) -> float:
    """The loss spelled out position by position, straight from the specification."""
    if negatives == "impression" and not b.nal_neg_valid.any():
        negatives = "in_batch"
    pool = {}  # (user, item) -> embedding of a valid positive; the first row seen wins
    for i, j in b.nal_pos_valid.nonzero().tolist():
        pool.setdefault((int(b.user_id[i]), int(b.nal_pos_item[i, j])), b.nal_pos_emb[i, j])
    terms = []
    for i, t in b.nal_pos_valid.nonzero().tolist():
        target = int(b.nal_pos_item[i, t])
        if negatives == "impression":
            negs = [b.nal_neg_emb[i, m] for m in range(b.nal_neg_emb.shape[1])
                    if b.nal_neg_valid[i, m] and int(b.nal_neg_item[i, m]) != target]
        else:
            negs = [e for (user, item), e in pool.items() if user != int(b.user_id[i]) and item != target]
        if not negs:
            continue
        q = F.normalize(states[i, t], dim=0)
        pos = float(q @ F.normalize(b.nal_pos_emb[i, t], dim=0)) / tau
        neg = [float(q @ F.normalize(e, dim=0)) / tau for e in negs]
        if loss == "softmax":
            terms.append(math.log(sum(math.exp(x) for x in [pos, *neg])) - pos)
        else:
            softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
            terms.append(softplus(-pos) + sum(softplus(x) for x in neg) / len(neg))
    return sum(terms) / len(terms) if terms else 0.0


def _batch(seed: int, B: int = 6, **kw) -> RankBatch:
    # Few items, so that accidental hits (negatives equal to the target) occur by chance.
    return random_batch(B, LAYOUT, 2, seed, n_items=12, n_neg=5, n_users=3, **kw)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), negatives=st.sampled_from(["impression", "in_batch"]),
       loss=st.sampled_from(["softmax", "bce"]), pattern=st.sampled_from(["prefix", "random"]))
def test_matches_reference(seed, negatives, loss, pattern):
    b = _batch(seed, pattern=pattern)
    states = torch.randn(len(b), LAYOUT.rt, 32, generator=torch.Generator().manual_seed(seed))
    got = next_action_loss(states, b, negatives=negatives, loss=loss, temperature=TAU)
    assert float(got) == pytest.approx(reference_nal(states, b, negatives, loss), rel=1e-4, abs=1e-5)


def _one_target_per_row(seed: int) -> tuple[torch.Tensor, RankBatch]:
    """Each row keeps a single NAL position, so a negative can equal every target of its row."""
    b = _batch(seed, pattern="prefix")
    first = b.nal_pos_valid & (b.nal_pos_valid.cumsum(1) == 1)
    b = dataclasses.replace(b, nal_pos_valid=first, nal_neg_valid=torch.ones_like(b.nal_neg_valid))
    return torch.randn(len(b), LAYOUT.rt, 32, generator=torch.Generator().manual_seed(seed)), b


@pytest.mark.parametrize("loss", ["softmax", "bce"])
def test_impression_negative_equal_to_target_is_masked(loss):
    states, b = _one_target_per_row(0)
    assert b.nal_pos_valid.any()
    t = b.nal_pos_valid.float().argmax(1)
    rows = torch.arange(len(b))
    hit_item, hit_emb = b.nal_neg_item.clone(), b.nal_neg_emb.clone()
    hit_item[:, 0], hit_emb[:, 0] = b.nal_pos_item[rows, t], b.nal_pos_emb[rows, t]
    with_hit = dataclasses.replace(b, nal_neg_item=hit_item, nal_neg_emb=hit_emb)
    removed_valid = b.nal_neg_valid.clone()
    removed_valid[:, 0] = False
    removed = dataclasses.replace(b, nal_neg_valid=removed_valid)
    a = next_action_loss(states, with_hit, loss=loss)
    assert torch.isfinite(a)
    torch.testing.assert_close(a, next_action_loss(states, removed, loss=loss))


@pytest.mark.parametrize("loss", ["softmax", "bce"])
def test_in_batch_same_item_from_another_user_is_masked(loss):
    states, b = _one_target_per_row(1)
    rows = b.nal_pos_valid.any(1).nonzero().flatten()[:2].tolist()
    r0, r1 = rows
    t0, t1 = (int(b.nal_pos_valid[r].float().argmax()) for r in rows)
    user_id = b.user_id.clone()
    user_id[r1] = user_id[r0] + 100  # surely a different user
    pos_item, pos_emb = b.nal_pos_item.clone(), b.nal_pos_emb.clone()
    pos_item[r1, t1], pos_emb[r1, t1] = pos_item[r0, t0], pos_emb[r0, t0]
    b = dataclasses.replace(b, user_id=user_id, nal_pos_item=pos_item, nal_pos_emb=pos_emb)
    # Row r0's only in-batch candidate equal to its own target is row r1's positive: masking it
    # must give the loss of a batch where row r1's positive is a fresh item.
    fresh_item = pos_item.clone()
    fresh_item[r1, t1] = 10_000
    baseline_pool_entry_removed = dataclasses.replace(b, nal_pos_item=fresh_item)
    got = float(next_action_loss(states, b, negatives="in_batch", loss=loss, temperature=TAU))
    assert got == pytest.approx(reference_nal(states, b, "in_batch", loss), rel=1e-4)
    unmasked = next_action_loss(states, baseline_pool_entry_removed, negatives="in_batch", loss=loss, temperature=TAU)
    assert got != pytest.approx(float(unmasked), rel=1e-6)


@pytest.mark.parametrize("negatives", ["impression", "in_batch"])
@pytest.mark.parametrize("loss", ["softmax", "bce"])
def test_moving_query_towards_target_lowers_loss_and_gradients_flow(negatives, loss):
    b = _batch(3)
    states = torch.randn(len(b), LAYOUT.rt, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    value = next_action_loss(states, b, negatives=negatives, loss=loss)
    value.backward()
    assert states.grad[b.nal_pos_valid].abs().sum() > 0
    assert (states.grad[~b.nal_pos_valid] == 0).all()
    closer = states.detach() + 0.5 * (F.normalize(b.nal_pos_emb, dim=-1) * states.detach().norm(dim=-1, keepdim=True)
                                      - states.detach())
    assert next_action_loss(closer, b, negatives=negatives, loss=loss) < value


def test_impression_falls_back_to_in_batch_without_impressions():
    b = _batch(4)
    b = dataclasses.replace(b, nal_neg_valid=torch.zeros_like(b.nal_neg_valid))  # e.g. MovieLens
    states = torch.randn(len(b), LAYOUT.rt, 32)
    fallback = next_action_loss(states, b, negatives="impression")
    assert float(fallback) > 0
    torch.testing.assert_close(fallback, next_action_loss(states, b, negatives="in_batch"))


def test_no_valid_position_gives_zero_with_grad():
    b = _batch(5)
    b = dataclasses.replace(b, nal_pos_valid=torch.zeros_like(b.nal_pos_valid))
    states = torch.randn(len(b), LAYOUT.rt, 32, requires_grad=True)
    for negatives in ("impression", "in_batch"):
        value = next_action_loss(states, b, negatives=negatives)
        assert float(value.detach()) == 0.0 and value.requires_grad
        value.backward()


def test_single_user_batch_has_no_in_batch_negatives():
    b = random_batch(4, LAYOUT, 2, 6, n_users=1)
    states = torch.randn(4, LAYOUT.rt, 32, requires_grad=True)
    assert float(next_action_loss(states, b, negatives="in_batch").detach()) == 0.0


def test_in_batch_subset_is_capped_and_seeded():
    b = random_batch(64, LAYOUT, 2, 7, n_items=10_000)
    states = torch.randn(64, LAYOUT.rt, 32)
    draw = lambda seed: float(next_action_loss(states, b, negatives="in_batch", max_in_batch=8,  # noqa: E731
                                               generator=torch.Generator().manual_seed(seed)))
    assert draw(0) == draw(0)
    assert len({draw(s) for s in range(4)}) > 1
    assert float(next_action_loss(states, b, negatives="in_batch")) == pytest.approx(
        reference_nal(states, b, "in_batch", "softmax", tau=0.05), rel=1e-4)


def test_nal_trains_transact_encoder():
    torch.manual_seed(0)
    model = build_model("transact_v2", n_heads=2, **SMALL)
    b = random_batch(8, SMALL_LAYOUT, 2, 8)
    out = model(b)
    (ranking_loss(out.logits, b.labels) + 0.01 * next_action_loss(out.rt_states, b)).backward()
    assert model.rt_proj.weight.grad.abs().sum() > 0
    assert model.encoder.layers[0].self_attn.in_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("kwargs", "message"), [({"negatives": "random"}, "negatives"),
                                                 ({"loss": "hinge"}, "loss"),
                                                 ({"temperature": 0.0}, "temperature")])
def test_bad_arguments(kwargs, message):
    b = _batch(9)
    with pytest.raises(ConfigError, match=message):
        next_action_loss(torch.zeros(len(b), LAYOUT.rt, 32), b, **kwargs)


def test_states_must_match_the_rt_block():
    b = _batch(9)
    with pytest.raises(ValueError, match="rt_states"):
        next_action_loss(torch.zeros(len(b), LAYOUT.rt + 1, 32), b)
