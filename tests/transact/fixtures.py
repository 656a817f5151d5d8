"""A factory of valid random ``RankBatch``es: ragged padding per block, multi-hot actions, NAL fields."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from lifelong.data.schema import EMBED_DIM, HEADS, KNOWN_ACTION_BITS, SURFACES, Action
from lifelong.modules.heads import ranking_loss
from lifelong.transact.batch import RankBatch
from lifelong.transact.sequence_layout import SequenceLayout


def _block_valid(b: int, size: int, pattern: str, gen: torch.Generator) -> torch.Tensor:
    if pattern == "random":
        return torch.rand(b, size, generator=gen) < torch.rand(b, 1, generator=gen)
    lengths = torch.randint(0, size + 1, (b, 1), generator=gen)
    return torch.arange(size) < lengths


def _next_valid(valid: torch.Tensor) -> torch.Tensor:
    """For each position, the index of the next valid position after it (``size`` when none)."""
    size = valid.shape[1]
    idx = torch.where(valid, torch.arange(size), torch.tensor(size))
    after = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], size)], dim=1)
    return after.flip(1).cummin(1).values.flip(1)


def random_batch(B: int, layout: SequenceLayout = SequenceLayout(), n_heads: int = len(HEADS), seed: int = 0,
                 *, n_neg: int = 8, n_users: int | None = None, n_items: int = 1000,
                 pattern: Literal["prefix", "random"] = "prefix",
                 seq_valid: torch.Tensor | None = None) -> RankBatch:
    """A valid random batch.

    Args:
        B: rows.
        layout: block sizes of the token sequence.
        n_heads: label columns.
        seed: everything is drawn from a generator seeded with it.
        n_neg: impression negatives per row (a random prefix of them is valid).
        n_users: distinct users (default B // 2, so users repeat across rows).
        n_items: item vocabulary; embeddings come from one random table, so equal ids have
            equal embeddings everywhere (tokens, candidate, NAL targets and negatives).
        pattern: "prefix": each block holds a random number of tokens followed by padding;
            "random": any subset of each block's positions is real.
        seq_valid: (B, S) validity to use instead of drawing one.
    """
    gen = torch.Generator().manual_seed(seed)
    S, r = layout.total, layout.rt
    table = torch.randn(n_items, EMBED_DIM, generator=gen) / EMBED_DIM**0.5

    if seq_valid is None:
        seq_valid = torch.cat([_block_valid(B, getattr(layout, blk), pattern, gen) for blk in layout.BLOCKS], 1)
    seq_item = torch.where(seq_valid, torch.randint(0, n_items, (B, S), generator=gen), -1)
    seq_emb = table[seq_item.clamp_min(0)] * seq_valid.unsqueeze(-1)
    bits = torch.randint(0, KNOWN_ACTION_BITS + 1, (B, S), generator=gen) & KNOWN_ACTION_BITS
    seq_action = torch.where(seq_valid, bits | int(Action.CLICK), 0)
    seq_surface = torch.where(seq_valid, torch.randint(0, len(SURFACES), (B, S), generator=gen), 0)

    # The NAL target of an S_RT[:r] token is the next real token of the block.
    rt = layout.block_slice("rt")
    rt_valid, rt_item, rt_emb = seq_valid[:, rt], seq_item[:, rt], seq_emb[:, rt]
    nxt = _next_valid(rt_valid)
    nal_pos_valid = rt_valid & (nxt < r)
    gather = nxt.clamp_max(r - 1) if r > 0 else nxt
    nal_pos_item = torch.where(nal_pos_valid, rt_item.gather(1, gather), -1)
    nal_pos_emb = rt_emb.gather(1, gather.unsqueeze(-1).expand(-1, -1, EMBED_DIM)) * nal_pos_valid.unsqueeze(-1)

    nal_neg_valid = _block_valid(B, n_neg, "prefix", gen)
    nal_neg_item = torch.where(nal_neg_valid, torch.randint(0, n_items, (B, n_neg), generator=gen), -1)
    nal_neg_emb = table[nal_neg_item.clamp_min(0)] * nal_neg_valid.unsqueeze(-1)

    user_id = torch.randint(0, n_users or max(1, B // 2), (B,), generator=gen)
    item_id = torch.randint(0, n_items, (B,), generator=gen)
    return RankBatch(
        user_id=user_id, item_id=item_id, author_id=item_id % 97, topic_id=item_id % 13,
        surface=torch.randint(0, len(SURFACES), (B,), generator=gen), cand_emb=table[item_id],
        seq_emb=seq_emb, seq_item=seq_item, seq_action=seq_action, seq_surface=seq_surface, seq_valid=seq_valid,
        nal_pos_emb=nal_pos_emb, nal_pos_item=nal_pos_item, nal_pos_valid=nal_pos_valid,
        nal_neg_emb=nal_neg_emb, nal_neg_item=nal_neg_item, nal_neg_valid=nal_neg_valid,
        labels=torch.randint(0, 2, (B, n_heads), generator=gen).float(),
        request_id=user_id * 1000 + torch.randint(0, 3, (B,), generator=gen),
    )


SMALL_LAYOUT = SequenceLayout(ll_nn=6, rt=10, rt_nn=4, imp_nn=4)
SMALL = {"layout": SMALL_LAYOUT, "row": {"hash_buckets": 1024, "id_dim": 8, "surface_dim": 4}, "mlp_dims": (32,)}
"""Overrides for ``build_model`` that keep test models tiny."""

_TOPICS = torch.linalg.qr(torch.randn(EMBED_DIM, 4, generator=torch.Generator().manual_seed(0)))[0].T


def topic_match_batch(B: int, layout: SequenceLayout, seed: int) -> RankBatch:
    """A batch whose single label says whether the candidate shares the topic of the RT tokens.

    Each row's tokens (every block: the user has one topic) are noisy copies of one of 4
    orthogonal topic vectors and the candidate is one of them too (the same topic with
    probability 1/2). Topics are drawn independently of every id, so only a model comparing
    the candidate with the sequence can beat the constant 0.693 nats; every row has at least
    one real RT token.
    """
    g = torch.Generator().manual_seed(seed + 1)
    rt = layout.block_slice("rt")
    valid = torch.rand(B, layout.total, generator=g) < 0.5
    valid[:, rt.start] = True
    batch = random_batch(B, layout, 1, seed, seq_valid=valid)
    user_topic = torch.randint(0, 4, (B,), generator=g)
    same = torch.rand(B, generator=g) < 0.5
    cand_topic = torch.where(same, user_topic, (user_topic + torch.randint(1, 4, (B,), generator=g)) % 4)
    noise = 0.1 * torch.randn(B, layout.total, EMBED_DIM, generator=g)
    batch.seq_emb = (_TOPICS[user_topic].unsqueeze(1) + noise) * valid.unsqueeze(-1)
    batch.cand_emb = _TOPICS[cand_topic] + 0.1 * torch.randn(B, EMBED_DIM, generator=g)
    batch.labels = same.float().unsqueeze(1)
    return batch


def fit(model: torch.nn.Module, make_batch: Callable[[int, int], RankBatch], steps: int, lr: float = 3e-3,
        batch_size: int = 128) -> tuple[float, float]:
    """Train with Adam on fresh batches ``make_batch(batch_size, step)``; held-out loss before and after."""
    held_out = make_batch(512, 10_000)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            loss = float(ranking_loss(model(held_out).logits, held_out.labels))
        model.train()
        return loss

    before = evaluate()
    opt = torch.optim.Adam(model.parameters(), lr)
    for step in range(steps):
        batch = make_batch(batch_size, step)
        loss = ranking_loss(model(batch).logits, batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, evaluate()
