"""A token table shared by the rows of a serving batch: gathering, padding and packing.

A serving batch holds each distinct token once (``tok_emb`` ``(T, 32)``, ``tok_action`` and
``tok_surface`` ``(T,)``) and each row points at its tokens with ``tok_index`` ``(N, S)``, -1
for padding. These helpers turn that layout into what kernels consume.
"""

from __future__ import annotations

import torch


def append_padding(tok_emb: torch.Tensor, tok_action: torch.Tensor, tok_surface: torch.Tensor,
                    tok_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The table with a padding token (embedding 0, action 0, surface 0) at row T, and indices onto it."""
    t = tok_emb.shape[0]
    return (torch.cat([tok_emb, tok_emb.new_zeros(1, tok_emb.shape[1])]),
            torch.cat([tok_action, tok_action.new_zeros(1)]),
            torch.cat([tok_surface, tok_surface.new_zeros(1)]),
            torch.where(tok_index >= 0, tok_index, t))


def gather_tokens(tok_emb: torch.Tensor, tok_action: torch.Tensor, tok_surface: torch.Tensor,
                  tok_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The RankBatch-style token tensors of rows that index a token table.

    Args:
        tok_emb: ``(T, 32)`` float32 dequantized token embeddings.
        tok_action: ``(T,)`` int64 action masks.
        tok_surface: ``(T,)`` int64 surface codes.
        tok_index: ``(N, S)`` int64 token of each row position, -1 for padding.

    Returns:
        ``seq_emb`` ``(N, S, 32)``, ``seq_action`` ``(N, S)``, ``seq_surface`` ``(N, S)`` and
        ``seq_valid`` ``(N, S)``; padding positions hold 0, 0, 0 and False.

    Example::

        >>> emb, act, surf, valid = gather_tokens(torch.ones(1, 32), torch.tensor([2]), torch.tensor([3]),
        ...                                       torch.tensor([[0, -1]]))
        >>> emb[0, :, 0].tolist(), act.tolist(), surf.tolist(), valid.tolist()
        ([1.0, 0.0], [[2, 0]], [[3, 0]], [[True, False]])
    """
    emb, action, surface, index = append_padding(tok_emb, tok_action, tok_surface, tok_index)
    return emb[index], action[index], surface[index], tok_index >= 0


def pack_rows(tok_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's real tokens moved to its front, in their order.

    Causal attention over the packed positions is exactly the model's causal + padding mask
    for every real token (the keys before it are the real tokens before it).

    Args:
        tok_index: ``(N, S)`` token of each row position, -1 for padding.

    Returns:
        ``valid`` ``(N, S)``, ``lengths`` ``(N,)`` real tokens per row, and ``slot``
        ``(N, W)``: the original position of each packed one, ``W`` the longest length (at
        least 1); past a row's length, slots point at its padding positions.

    Example::

        >>> valid, lengths, slot = pack_rows(torch.tensor([[-1, 4, 7], [2, -1, -1]]))
        >>> lengths.tolist(), slot.tolist()
        ([2, 1], [[1, 2], [0, 1]])
    """
    valid = tok_index >= 0
    lengths = valid.sum(1)
    width = max(int(lengths.max()) if tok_index.shape[0] else 0, 1)
    return valid, lengths, torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :width]


def unpack_rows(x: torch.Tensor, slot: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Packed rows ``(N, W, d)`` back at their original positions of ``(N, seq_len, d)``; zeros elsewhere.

    Packed positions past a row's length must already be zeros (they land on padding slots).
    """
    out = x.new_zeros(x.shape[0], seq_len, x.shape[2])
    return out.scatter_(1, slot.unsqueeze(-1).expand(-1, -1, x.shape[2]), x)
