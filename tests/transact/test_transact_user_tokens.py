"""TransAct with a frozen DV365 user embedding prepended as tokens: visibility, frozenness, use."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.core.errors import ConfigError
from lifelong.transact.model import TransAct
from lifelong.transact.registry import build_model
from tests.transact.fixtures import (
    _TOPICS,
    SMALL,
    SMALL_LAYOUT,
    fit,
    random_batch,
    topic_match_batch,
)

H, R, C = 3, 4, 8
RT = SMALL_LAYOUT.block_slice("rt")


@functools.cache
def model_with_user_tokens() -> TransAct:
    torch.manual_seed(0)
    return build_model("transact_v2", n_heads=H, user_tokens=(R, C), **SMALL).eval()


def _batch(seed: int, pattern: str = "random"):
    batch = random_batch(4, SMALL_LAYOUT, H, seed, pattern=pattern)
    batch.user_emb = torch.randn(4, R, C, generator=torch.Generator().manual_seed(seed))
    return batch


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.integers(0, SMALL_LAYOUT.total - 1))
def test_every_position_sees_the_user_tokens_and_causality_holds_after_them(seed, t):
    model = model_with_user_tokens()
    batch = _batch(seed)
    other_user = dataclasses.replace(batch, user_emb=batch.user_emb + 1.0)
    later = torch.zeros_like(batch.seq_valid)
    later[:, t + 1:] = True
    other = random_batch(4, SMALL_LAYOUT, H, seed + 1000, pattern="random")

    def pick(a, b):
        return torch.where(later.unsqueeze(-1) if a.dim() == 3 else later, b, a)

    later_changed = dataclasses.replace(batch, seq_emb=pick(batch.seq_emb, other.seq_emb),
                                        seq_action=pick(batch.seq_action, other.seq_action),
                                        seq_valid=pick(batch.seq_valid, other.seq_valid))
    with torch.no_grad():
        h, valid = model.encode(batch)
        h_user, _ = model.encode(other_user)
        h_later, _ = model.encode(later_changed)
    assert valid.shape == (4, R + SMALL_LAYOUT.total) and valid[:, :R].all()
    # A different user embedding reaches every real position.
    assert ((h - h_user).abs().amax(-1)[valid] > 1e-4).all()
    # The user tokens come first: sequence position t sits at R + t and sees nothing later.
    torch.testing.assert_close(h[:, : R + t + 1], h_later[:, : R + t + 1], rtol=0, atol=1e-6)


def test_user_tokens_see_each_other_but_no_sequence_token():
    model = model_with_user_tokens()
    batch = _batch(1)
    seq_changed = dataclasses.replace(batch, seq_emb=torch.randn_like(batch.seq_emb))
    last_row_changed = batch.user_emb.clone()
    last_row_changed[:, -1] += 1.0
    with torch.no_grad():
        h, _ = model.encode(batch)
        h_seq, _ = model.encode(seq_changed)
        h_row, _ = model.encode(dataclasses.replace(batch, user_emb=last_row_changed))
    torch.testing.assert_close(h[:, :R], h_seq[:, :R], rtol=0, atol=1e-6)
    assert (h[:, 0] - h_row[:, 0]).abs().max() > 1e-4, "the first user token must see the last one"


def test_rt_states_stay_on_the_real_time_block_and_the_embedding_gets_no_gradient():
    torch.manual_seed(0)
    model = build_model("transact_v2", n_heads=H, user_tokens=(R, C), **SMALL)
    batch = _batch(2, pattern="prefix")
    batch.user_emb.requires_grad_(True)
    out = model(batch)
    assert model.rt_positions == slice(R + RT.start, R + RT.stop)
    assert out.rt_states.shape == (4, SMALL_LAYOUT.rt, 32)
    assert (out.rt_states[~batch.seq_valid[:, RT]] == 0).all()
    (out.logits.sum() + out.rt_states.sum()).backward()
    assert batch.user_emb.grad is None
    assert model.user_token_proj.weight.grad.abs().sum() > 0


def test_missing_or_misshapen_embedding_and_bad_config_are_refused():
    model = model_with_user_tokens()
    with pytest.raises(ValueError, match="user tokens"):
        model(random_batch(2, SMALL_LAYOUT, H, 0))
    batch = random_batch(2, SMALL_LAYOUT, H, 0)
    batch.user_emb = torch.zeros(2, R, C + 1)
    with pytest.raises(ValueError, match="user tokens"):
        model(batch)
    with pytest.raises(ConfigError, match="user_tokens"):
        build_model("transact_v2", n_heads=H, user_tokens=(0, C), **SMALL)


def _user_topic_batch(b: int, seed: int):
    """The label says whether the candidate shares the topic carried only by the user embedding."""
    batch = topic_match_batch(b, SMALL_LAYOUT, seed)
    g = torch.Generator().manual_seed(seed + 7)
    topic = torch.randint(0, 4, (b,), generator=g)
    same = batch.labels[:, 0] > 0
    cand = torch.where(same, topic, (topic + torch.randint(1, 4, (b,), generator=g)) % 4)
    batch.cand_emb = _TOPICS[cand] + 0.1 * torch.randn(b, 32, generator=g)
    batch.seq_emb = torch.randn(batch.seq_emb.shape, generator=g) * batch.seq_valid.unsqueeze(-1) / 32**0.5
    user = torch.zeros(b, R, C)
    user[torch.arange(b), 0, topic] = 1.0
    batch.user_emb = user + 0.05 * torch.randn(b, R, C, generator=g)
    return batch


def test_the_model_learns_from_the_prepended_embedding():
    torch.manual_seed(0)
    before, after = fit(build_model("transact_v2", n_heads=1, user_tokens=(R, C), **SMALL), _user_topic_batch,
                        steps=30, batch_size=64)
    assert after < 0.45 < before, (before, after)
