"""Building blocks: multi-hot actions, hashing, cross network, masks, pooling."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.data.schema import Action
from lifelong.modules.layers import (
    ActionEmbedding,
    CrossNetwork,
    HashedEmbedding,
    causal_attention_mask,
    masked_max_pool,
    masked_mean_pool,
    padding_attention_mask,
)


def test_action_embedding_sums_bits_and_padding_is_zero():
    emb = ActionEmbedding(8)
    click, repin = int(Action.CLICK), int(Action.REPIN)
    torch.testing.assert_close(emb(torch.tensor(click | repin)), emb(torch.tensor(click)) + emb(torch.tensor(repin)))
    assert (emb(torch.zeros(2, 3, dtype=torch.long)) == 0).all()


def test_hashed_embedding_accepts_any_int64():
    table = HashedEmbedding(16, 2)
    ids = torch.tensor([0, 16, -16, 2**62 + 5, -(2**62)])
    out = table(ids)
    assert out.shape == (5, 2)
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[0], out[2])


def test_cross_network_is_dcn_v2():
    net = CrossNetwork(4, 1)
    x = torch.randn(3, 4)
    layer = net.layers[0]
    torch.testing.assert_close(net(x), x * layer(x) + x)
    assert torch.equal(CrossNetwork(4, 0)(x), x)


@settings(max_examples=50, deadline=None)
@given(valid=st.lists(st.lists(st.booleans(), min_size=5, max_size=5), min_size=1, max_size=4))
def test_masks_never_leave_a_query_without_keys(valid):
    v = torch.tensor(valid)
    causal, bidirectional = causal_attention_mask(v), padding_attention_mask(v)
    assert causal.any(-1).all() and bidirectional.any(-1).all()
    i, j = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    # A real query sees exactly the real keys not after it (causal) / all real keys (bidirectional).
    real_query = v.unsqueeze(-1)
    assert torch.equal(causal & real_query, (v.unsqueeze(1) & (j <= i)) & real_query)
    assert torch.equal(bidirectional & real_query, v.unsqueeze(1).expand(-1, 5, -1) & real_query)


def test_pooling_ignores_padding_and_empty_rows_give_zero():
    x = torch.tensor([[[-3.0], [5.0], [-1.0]], [[7.0], [8.0], [9.0]]], requires_grad=True)
    valid = torch.tensor([[True, False, True], [False, False, False]])
    assert masked_max_pool(x, valid).flatten().tolist() == [-1.0, 0.0]
    assert masked_mean_pool(x, valid).flatten().tolist() == [-2.0, 0.0]
    (masked_max_pool(x, valid).sum() + masked_mean_pool(x, valid).sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[~valid] == 0).all()
