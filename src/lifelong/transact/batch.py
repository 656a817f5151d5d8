"""The mini-batch every ranker consumes, shared by training (logged NN features) and serving.

A row is one (request, candidate) pair; its token sequence is ``S_all``, laid out as
:class:`~lifelong.transact.sequence_layout.SequenceLayout` says (that module owns the block
layout and the per-candidate token selection).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class RankBatch:
    """A mini-batch of B rows with |S| = layout.total tokens each.

    Args:
        user_id, item_id, author_id, topic_id, surface: (B,) int64 ids of the row.
        cand_emb: (B, 32) float32 candidate content embedding (dequantized).
        seq_emb: (B, S, 32) float32 token item embeddings (dequantized int8).
        seq_item: (B, S) int64 token item ids (-1 for padding).
        seq_action: (B, S) int64 action bitmask of each token (0 for padding).
        seq_surface: (B, S) int64 surface code of each token.
        seq_valid: (B, S) bool, False on padding.
        nal_pos_emb: (B, r, 32) embedding of the next positive action after each position of
            the ``S_RT[:r]`` block (the NAL target p(t+1)); nal_pos_item (B, r) its item id.
        nal_pos_valid: (B, r) bool, True where a next positive exists.
        nal_neg_emb: (B, M, 32) impression negatives of the row's user (items shown without
            engagement before the request); nal_neg_item (B, M); nal_neg_valid (B, M).
        labels: (B, H) float32 0/1 labels, one column per head (see ``heads``).
        request_id: (B,) int64, to group rows for HIT@K.
        user_emb: (B, R, C) float32 de-quantized DV365 embedding of each row's user, for models
            configured to read it (``TransActConfig.user_tokens``); None otherwise.
        counters: (B, F) float32 engagement counters of each row as of its request
            (:mod:`lifelong.data.counters`), for models configured to read them
            (``RowFeatureConfig.counters``); None where the rows carry none.
    """

    user_id: torch.Tensor
    item_id: torch.Tensor
    author_id: torch.Tensor
    topic_id: torch.Tensor
    surface: torch.Tensor
    cand_emb: torch.Tensor
    seq_emb: torch.Tensor
    seq_item: torch.Tensor
    seq_action: torch.Tensor
    seq_surface: torch.Tensor
    seq_valid: torch.Tensor
    nal_pos_emb: torch.Tensor
    nal_pos_item: torch.Tensor
    nal_pos_valid: torch.Tensor
    nal_neg_emb: torch.Tensor
    nal_neg_item: torch.Tensor
    nal_neg_valid: torch.Tensor
    labels: torch.Tensor
    request_id: torch.Tensor
    user_emb: torch.Tensor | None = None
    counters: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> RankBatch:
        return RankBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                            for f in fields(self)})

    def __len__(self) -> int:
        return int(self.user_id.shape[0])
