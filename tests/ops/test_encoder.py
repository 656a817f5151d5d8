"""The token-table encoder (TransAct.encode_token_table): reference == TransAct.encode exactly,
cpu (fused) == reference, and every backend follows the live parameters."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.data.schema import EMBED_DIM, KNOWN_ACTION_BITS, SURFACES
from lifelong.modules.layers import masked_max_pool
from lifelong.ops import gather_tokens
from lifelong.transact.model import TransAct
from lifelong.transact.registry import build_model
from tests.transact.fixtures import SMALL, SMALL_LAYOUT, random_batch

VARIANTS = {
    "v2": ("transact_v2", {}),
    "v1": ("transact", {}),
    "v2_two_heads": ("transact_v2", {"attn_heads": 4, "n_layers": 3}),
    "v2_late_fusion": ("transact_v2", {"early_fusion": False}),
    "v2_similarity": ("transact_v2", {"token_similarity": True}),
}


def fresh_model(variant: str) -> TransAct:
    """A small model with random weights (layer norms too, which start at 1 and 0), in eval mode."""
    name, overrides = VARIANTS[variant]
    torch.manual_seed(0)
    model = build_model(name, n_heads=3, **SMALL, **overrides).eval()
    with torch.no_grad():
        for p_name, p in model.named_parameters():
            if ".norm" in p_name:
                p.add_(0.1 * torch.randn_like(p))
            if p_name == "similarity":  # large enough that a wrong similarity term shows
                p.mul_(50.0)
    return model


@functools.cache
def encoder(variant: str) -> TransAct:
    """:func:`fresh_model`, shared by the tests that do not change it."""
    return fresh_model(variant)


def _table(n: int, seq_len: int, n_tokens: int, seed: int):
    """A random token table and rows over it: per row all padding, a prefix, or any subset."""
    g = torch.Generator().manual_seed(seed)
    tok_emb = torch.randn(n_tokens, EMBED_DIM, generator=g) / EMBED_DIM**0.5
    tok_action = torch.randint(0, KNOWN_ACTION_BITS + 1, (n_tokens,), generator=g)
    tok_surface = torch.randint(0, len(SURFACES), (n_tokens,), generator=g)
    kind = torch.randint(0, 3, (n, 1), generator=g)
    prefix = torch.arange(seq_len) < torch.randint(0, seq_len + 1, (n, 1), generator=g)
    subset = torch.rand(n, seq_len, generator=g) < 0.6
    valid = torch.where(kind == 0, False, torch.where(kind == 1, prefix, subset)) & (n_tokens > 0)
    tok_index = torch.where(valid, torch.randint(0, max(n_tokens, 1), (n, seq_len), generator=g), -1)
    cand_emb = torch.randn(n, EMBED_DIM, generator=g) / EMBED_DIM**0.5
    return tok_emb, tok_action, tok_surface, tok_index, cand_emb


@pytest.mark.parametrize("variant", list(VARIANTS))
@settings(max_examples=8, deadline=None)
@given(n=st.integers(0, 6), n_tokens=st.integers(0, 30), seed=st.integers(0, 2**31))
def test_fused_cpu_matches_reference(variant, n, n_tokens, seed):
    assert_backend_matches_reference("cpu", variant, n, n_tokens, seed)


def assert_backend_matches_reference(backend: str, variant: str, n: int, n_tokens: int, seed: int) -> None:
    """``backend``'s encoder output equals the reference's at real tokens; zeros at padding."""
    model = encoder(variant)
    args = _table(n, model.cfg.seq_len, n_tokens, seed)
    with torch.inference_mode():
        h_ref, valid_ref = model.encode_token_table(*args, backend="reference")
        h, valid = model.encode_token_table(*args, backend=backend)
    assert h.shape == (n, model.cfg.seq_len, model.cfg.d_model)
    assert torch.equal(valid, valid_ref) and torch.equal(valid_ref, args[3] >= 0)
    # Outputs at padding positions are meaningless (nothing downstream reads them): real tokens only.
    torch.testing.assert_close(h[valid_ref], h_ref[valid_ref], rtol=0, atol=1e-5)
    assert torch.equal(h[~valid], torch.zeros_like(h[~valid]))  # all-padding rows too


def _as_table(model: TransAct, batch):
    """The token table of a RankBatch's read positions: its real tokens, shuffled, each once per row."""
    read = model.token_index
    valid = batch.seq_valid[:, read]
    flat = valid.flatten().nonzero().squeeze(1)
    perm = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(1))
    tok_index = torch.full(valid.shape, -1, dtype=torch.int64)
    tok_index.view(-1)[flat[perm]] = torch.arange(flat.numel())

    def take(x: torch.Tensor) -> torch.Tensor:
        return x[:, read].flatten(0, 1)[flat[perm]]

    return (take(batch.seq_emb), take(batch.seq_action), take(batch.seq_surface), tok_index, batch.cand_emb)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pattern", ["prefix", "random"])
def test_reference_is_transact_encode_exactly(variant, pattern):
    model = encoder(variant)
    valid = random_batch(9, SMALL_LAYOUT, 3, seed=5, pattern=pattern).seq_valid.clone()
    valid[0] = False  # a row without any token
    batch = random_batch(9, SMALL_LAYOUT, 3, seed=5, seq_valid=valid)
    with torch.no_grad():
        h, valid = model.encode(batch)
        h_ref, valid_ref = model.encode_token_table(*_as_table(model, batch), backend="reference")
    assert torch.equal(valid_ref, valid)
    assert torch.equal(h_ref, h)


@pytest.mark.parametrize("variant", ["v2", "v1"])
def test_pool_and_head_on_the_fused_output_give_the_model_logits(variant):
    model = encoder(variant)
    batch = random_batch(7, SMALL_LAYOUT, 3, seed=3, pattern="random")
    with torch.no_grad():
        h, valid = model.encode_token_table(*_as_table(model, batch), backend="cpu")
        pooled = masked_max_pool(model.pool_proj(h), valid)
        logits = model.head(torch.cat([pooled, model.row(batch)], dim=-1))
        via_protocol = model.score_token_table(*_as_table(model, batch), rows=batch, backend="cpu")
        expected = model(batch).logits
    # The random head amplifies the encoder's 1e-6 differences into logits of magnitude ~10.
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(via_protocol, logits, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("variant", ["v2", "v1", "v2_late_fusion"])
def test_the_token_table_path_follows_in_place_parameter_updates(variant, backend):
    """No weight snapshot: after an optimizer-style in-place update, the fast path scores with the new weights."""
    model = fresh_model(variant)
    batch = random_batch(6, SMALL_LAYOUT, 3, seed=7, pattern="random")
    table = _as_table(model, batch)
    with torch.no_grad():
        before = model.score_token_table(*table, rows=batch, backend=backend)
        attn = model.encoder.layers[0].self_attn
        for p in (attn.in_proj.weight, attn.in_proj.bias, model.token_context.position,
                  model.token_context.action.proj.weight, model.encoder.layers[-1].linear1.weight):
            p.add_(0.2 * torch.randn_like(p))
        after = model.score_token_table(*table, rows=batch, backend=backend)
        expected = model(batch).logits
    assert (after - before).abs().max() > 1e-3  # the update moved the scores ...
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)  # ... to the model's own


def test_padding_tokens_are_zero_embedding_action_and_surface():
    emb, action, surface, valid = gather_tokens(torch.ones(2, EMBED_DIM), torch.tensor([3, 5]), torch.tensor([1, 2]),
                                                torch.tensor([[1, -1], [-1, -1]]))
    assert emb.sum(-1).tolist() == [[EMBED_DIM, 0.0], [0.0, 0.0]]
    assert action.tolist() == [[5, 0], [0, 0]] and surface.tolist() == [[2, 0], [0, 0]]
    assert valid.tolist() == [[True, False], [False, False]]


@pytest.mark.parametrize("change, message", [
    ({"tok_action": torch.zeros(3, dtype=torch.int64)}, "token table"),
    ({"tok_index": torch.zeros(2, 5, dtype=torch.int64)}, "tok_index must be"),
    ({"cand_emb": torch.zeros(2, 8)}, "cand_emb"),
    ({"tok_index": torch.full((2, 10), 4)}, "past the 4 tokens"),
])
def test_bad_shapes_are_value_errors(change, message):
    model = encoder("v1")  # reads S' = rt = 10 positions
    args = {"tok_emb": torch.zeros(4, EMBED_DIM), "tok_action": torch.zeros(4, dtype=torch.int64),
            "tok_surface": torch.zeros(4, dtype=torch.int64), "tok_index": torch.zeros(2, 10, dtype=torch.int64),
            "cand_emb": torch.zeros(2, EMBED_DIM)} | change
    with pytest.raises(ValueError, match=message):
        model.encode_token_table(**args)


@pytest.mark.parametrize("variant", ["v2", "v1", "v2_two_heads"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_user_tokens_on_the_token_table_equal_transact_encode(variant, backend):
    """With DV365 user tokens (one embedding per distinct user, rows indexing it), the token-table
    path prepends them as ``encode`` does: the same output at real positions and the same logits."""
    import dataclasses

    torch.manual_seed(3)
    model = TransAct(dataclasses.replace(encoder(variant).cfg, user_tokens=(3, 8))).eval()
    valid = random_batch(9, SMALL_LAYOUT, 3, seed=5, pattern="random").seq_valid.clone()
    valid[0] = False  # a row without any token: only the user tokens are real
    batch = random_batch(9, SMALL_LAYOUT, 3, seed=5, seq_valid=valid)
    user_emb = torch.randn(4, 3, 8)
    user_index = torch.tensor([0, 1, 1, 3, 2, 0, 3, 3, 1])
    batch.user_emb = user_emb[user_index]
    with torch.inference_mode():
        h, valid = model.encode(batch)
        h_t, valid_t = model.encode_token_table(*_as_table(model, batch), backend=backend, user_emb=user_emb,
                                                user_index=user_index)
        logits = model.score_token_table(*_as_table(model, batch), rows=batch, backend=backend, user_emb=user_emb,
                                         user_index=user_index)
        expected = model(batch).logits
    assert torch.equal(valid_t, valid) and bool(valid[:, :3].all())
    torch.testing.assert_close(h_t[valid], h[valid], rtol=0, atol=0 if backend == "reference" else 1e-5)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="user tokens"):
        model.encode_token_table(*_as_table(model, batch), backend=backend)
    with pytest.raises(ValueError, match="user_index"):
        model.encode_token_table(*_as_table(model, batch), backend=backend, user_emb=user_emb,
                                 user_index=user_index[:3])
    with pytest.raises(ValueError, match="reads no user tokens"):
        encoder(variant).encode_token_table(*_as_table(encoder(variant), batch), backend=backend, user_emb=user_emb)
