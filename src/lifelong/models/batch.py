"""The tensor layout every ranker consumes, shared by training (logged NN features) and serving.

A row is one (request, candidate) pair. Its token sequence is ``S_all``, the concatenation of
fixed-size blocks (padding where a block has fewer tokens), in this order::

    NN(S_LL, c)  ⊕  S_RT[:r]  ⊕  NN(S_RT[:r], c)  ⊕  NN(S_imp, c)

``S_RT[:r]`` is chronological (oldest first), so causal attention over positions never lets a
real-time token see a newer one; the NN blocks are ordered by descending similarity.
Models that read only some blocks (BST and TransAct read only ``S_RT[:r]``) slice them out
with :meth:`SequenceLayout.block_slice`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class SequenceLayout:
    """Sizes of the blocks of ``S_all``; |S_all| = their sum (default 192).

    Args:
        ll_nn: K of NN(S_LL, c).
        rt: r, the newest real-time actions kept in order.
        rt_nn: K of NN(S_RT[:r], c).
        imp_nn: K of NN(S_imp, c).

    Example::

        >>> SequenceLayout().total, SequenceLayout().block_slice("rt")
        (192, slice(64, 128, None))
    """

    ll_nn: int = 64
    rt: int = 64
    rt_nn: int = 32
    imp_nn: int = 32

    BLOCKS = ("ll_nn", "rt", "rt_nn", "imp_nn")

    @property
    def total(self) -> int:
        return self.ll_nn + self.rt + self.rt_nn + self.imp_nn

    def block_slice(self, name: str) -> slice:
        start = 0
        for block in self.BLOCKS:
            size = getattr(self, block)
            if block == name:
                return slice(start, start + size)
            start += size
        raise KeyError(f"unknown block {name!r}; blocks are {self.BLOCKS}")


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

    def to(self, device: torch.device | str) -> "RankBatch":
        return RankBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                            for f in fields(self)})

    def __len__(self) -> int:
        return int(self.user_id.shape[0])
