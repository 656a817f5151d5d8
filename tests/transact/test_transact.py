"""TransAct V2 / v1: causality, padding invisibility, NaN-free empty sequences, shapes, learning."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.modules.heads import ranking_loss
from lifelong.modules.layers import masked_max_pool
from lifelong.transact.batch import RankBatch
from lifelong.transact.model import TransAct
from lifelong.transact.registry import build_model
from tests.transact.fixtures import SMALL, SMALL_LAYOUT, fit, random_batch, topic_match_batch

H = 3
RT = SMALL_LAYOUT.block_slice("rt")


@functools.cache
def v2_model() -> TransAct:
    torch.manual_seed(0)
    return build_model("transact_v2", n_heads=H, **SMALL).eval()


def _replace(batch: RankBatch, **changes) -> RankBatch:
    return dataclasses.replace(batch, **changes)


def _scramble(batch: RankBatch, where: torch.Tensor, seed: int, flip_valid: bool) -> RankBatch:
    """New content for the tokens at ``where`` (B, S); also new validity there if ``flip_valid``."""
    other = random_batch(len(batch), SMALL_LAYOUT, H, seed + 1000, pattern="random")
    pick = lambda a, b: torch.where(where.unsqueeze(-1) if a.dim() == 3 else where, b, a)  # noqa: E731
    return _replace(batch, seq_emb=pick(batch.seq_emb, other.seq_emb), seq_item=pick(batch.seq_item, other.seq_item),
                    seq_action=pick(batch.seq_action, other.seq_action),
                    seq_surface=pick(batch.seq_surface, other.seq_surface),
                    seq_valid=pick(batch.seq_valid, other.seq_valid) if flip_valid else batch.seq_valid)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.integers(0, SMALL_LAYOUT.total - 1), flip_valid=st.booleans())
def test_causal_mask_hides_later_tokens(seed, t, flip_valid):
    model = v2_model()
    batch = random_batch(4, SMALL_LAYOUT, H, seed, pattern="random")
    later = torch.zeros_like(batch.seq_valid)
    later[:, t + 1:] = True
    changed = _scramble(batch, later, seed, flip_valid)
    with torch.no_grad():
        h, _ = model.encode(batch)
        h2, _ = model.encode(changed)
        out, out2 = model(batch), model(changed)
    torch.testing.assert_close(h[:, : t + 1], h2[:, : t + 1], rtol=0, atol=1e-6)
    if t >= RT.start:  # RT positions up to t see nothing newer
        k = min(t, RT.stop - 1) - RT.start + 1
        torch.testing.assert_close(out.rt_states[:, :k], out2.rt_states[:, :k], rtol=0, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), pattern=st.sampled_from(["prefix", "random"]))
def test_padding_content_changes_nothing(seed, pattern):
    model = v2_model()
    batch = random_batch(4, SMALL_LAYOUT, H, seed, pattern=pattern)
    changed = _scramble(batch, ~batch.seq_valid, seed, flip_valid=False)
    with torch.no_grad():
        h, valid = model.encode(batch)
        h2, _ = model.encode(changed)
        out, out2 = model(batch), model(changed)
    torch.testing.assert_close(h[valid], h2[valid], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.logits, out2.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.rt_states, out2.rt_states, rtol=0, atol=1e-6)
    assert (out.rt_states[~batch.seq_valid[:, RT]] == 0).all()


@pytest.mark.parametrize("name", ["transact", "transact_v2"])
@pytest.mark.parametrize("empty", ["everything", "rt", "all_but_rt"])
def test_empty_blocks_are_nan_free(name, empty):
    torch.manual_seed(0)
    model = build_model(name, n_heads=H, **SMALL)
    batch = random_batch(6, SMALL_LAYOUT, H, 0)
    valid = batch.seq_valid.clone()
    if empty == "everything":
        valid[:] = False
    elif empty == "rt":
        valid[:, RT] = False
    else:
        valid[:, : RT.start] = False
        valid[:, RT.stop:] = False
    batch = random_batch(6, SMALL_LAYOUT, H, 0, seq_valid=valid)
    out = model(batch)
    (ranking_loss(out.logits, batch.labels) + out.rt_states.square().sum()).backward()
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.rt_states).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_empty_rows_pool_to_zero():
    model = v2_model()
    batch = random_batch(3, SMALL_LAYOUT, H, 1, seq_valid=torch.zeros(3, SMALL_LAYOUT.total, dtype=torch.bool))
    with torch.no_grad():
        h, valid = model.encode(batch)
        assert (model(batch).rt_states == 0).all()
    # With no real token the summary must not depend on whatever the padding positions computed.
    assert (masked_max_pool(model.pool_proj(h), valid) == 0).all()


@pytest.mark.parametrize(("name", "n_tokens"), [("transact", SMALL_LAYOUT.rt), ("transact_v2", SMALL_LAYOUT.total)])
def test_shapes_and_blocks_read(name, n_tokens):
    model = build_model(name, n_heads=H, **SMALL).eval()
    batch = random_batch(5, SMALL_LAYOUT, H, 2)
    out = model(batch)
    assert out.logits.shape == (5, H) and out.rt_states.shape == (5, SMALL_LAYOUT.rt, 32)
    assert model.token_context.position.shape == (n_tokens, 64)
    outside_rt = torch.ones_like(batch.seq_valid)
    outside_rt[:, RT] = False
    changed = _scramble(batch, outside_rt, 2, flip_valid=True)
    with torch.no_grad():
        same = torch.allclose(model(changed).logits, out.logits, rtol=0, atol=1e-6)
    assert same == (name == "transact"), "v1 reads only S_RT[:r]; V2 reads every block"


def test_without_early_fusion_tokens_are_item_embeddings():
    model = build_model("transact_v2", n_heads=H, early_fusion=False, **SMALL).eval()
    assert model.cfg.d_model == 32
    assert model(random_batch(2, SMALL_LAYOUT, H, 3)).logits.shape == (2, H)


@functools.cache
def wide_deep_topic_loss() -> float:
    torch.manual_seed(0)
    return fit(build_model("wide_deep", n_heads=1, **SMALL), _topic_batch, steps=60)[1]


@pytest.mark.parametrize(("name", "steps"), [("transact", 150), ("transact_v2", 120)])
def test_transact_learns_candidate_sequence_match_that_wide_deep_cannot(name, steps):
    torch.manual_seed(0)
    before, after = fit(build_model(name, n_heads=1, **SMALL), _topic_batch, steps=steps)
    assert after < 0.45 < 0.6 < wide_deep_topic_loss(), (before, after)


def _topic_batch(b: int, seed: int) -> RankBatch:
    return topic_match_batch(b, SMALL_LAYOUT, seed)
