"""The layout of ``S_all`` and how a row's tokens are chosen: one module for builder, serving and bench.

A row is one (request, candidate) pair. Its token sequence is ``S_all``, the concatenation of
fixed-size blocks (padding where a block has fewer tokens), in this order::

    NN(S_LL, c)  ⊕  S_RT[:r]  ⊕  NN(S_RT[:r], c)  ⊕  NN(S_imp, c)

Each block is cut from one **source segment** of the user's history as of the request
(:data:`BLOCK_SOURCES`): the lifelong sequence ``ll``, the newest real-time actions ``rt``
(already capped at r) and the bare impressions ``imp``. ``S_RT[:r]`` is the ``rt`` segment
itself, chronological (oldest first) and left-aligned, so causal attention over positions never
lets a real-time token see a newer one; the NN blocks hold the K tokens of their segment most
similar to the candidate, by descending similarity, ties to the newer token.

The functions below take segments as ``(starts, lengths)`` ranges of one token table and a
``search`` function (the NN search of the caller: ``nn_topk`` in the row builder,
``nn_search`` / ``nn_search_naive`` in the service), and return indices into that table
(-1 = padding). :func:`assemble_s_all` is a row's whole ``S_all``; the row builder, which
stores ``S_RT[:r]`` once per request, calls its two halves :func:`nn_block_index` and
:func:`rt_block_index` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

SEGMENTS: tuple[str, ...] = ("ll", "rt", "imp")
"""Source segments of a user's history: lifelong actions, the newest r real-time actions, impressions."""

BLOCK_SOURCES: dict[str, str] = {"ll_nn": "ll", "rt": "rt", "rt_nn": "rt", "imp_nn": "imp"}
"""The source segment each block of ``S_all`` is cut from."""

NN_BLOCKS: tuple[str, ...] = ("ll_nn", "rt_nn", "imp_nn")
"""The blocks chosen per candidate by NN search (``rt`` is the segment in order)."""

Search = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``search(starts (U,), lengths (U,), cand_key (N,), cand (N, d), k) -> (N, k)`` positions within
each candidate's segment, by descending score, ties to the newer position, -1 where none."""


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
        >>> SequenceLayout(2, 2, 1, 1).positions(("rt", "imp_nn")).tolist()
        [2, 3, 5]
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

    def positions(self, blocks: tuple[str, ...]) -> torch.Tensor:
        """int64 positions of ``S_all`` covered by ``blocks``, in the order given."""
        parts = [torch.arange(s.start, s.stop) for s in map(self.block_slice, blocks)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def nn_block_index(layout: SequenceLayout, block: str, starts: torch.Tensor, lengths: torch.Tensor,
                   cand_key: torch.Tensor, cand: torch.Tensor, search: Search) -> torch.Tensor:
    """``(N, K)`` token-table index of NN block ``block`` for each candidate (-1 = padding).

    Args:
        layout: block sizes (K = ``getattr(layout, block)``).
        block: one of :data:`NN_BLOCKS`.
        starts, lengths: ``(U,)`` int64 range of each history key's source segment
            (``BLOCK_SOURCES[block]``) in the token table.
        cand_key: ``(N,)`` int64 history key of each candidate.
        cand: ``(N, d)`` normalised candidate embeddings.
        search: the NN search (see :data:`Search`).
    """
    if block not in NN_BLOCKS:
        raise KeyError(f"{block!r} is not an NN block; NN blocks are {NN_BLOCKS}")
    pos = search(starts, lengths, cand_key, cand, getattr(layout, block))
    return torch.where(pos >= 0, pos + starts[cand_key].unsqueeze(1), -1)


def rt_block_index(layout: SequenceLayout, starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``(U, r)`` token-table index of ``S_RT[:r]`` per history key: the newest r of the ``rt``
    segment, chronological, left-aligned (-1 = padding)."""
    keep = lengths.clamp_max(layout.rt)
    slot = torch.arange(layout.rt)
    first = starts + lengths - keep
    return torch.where(slot < keep.unsqueeze(1), first.unsqueeze(1) + slot, -1)


def assemble_s_all(layout: SequenceLayout, segments: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                   cand_key: torch.Tensor, cand: torch.Tensor, search: Search,
                   out: torch.Tensor | None = None, blocks: tuple[str, ...] = SequenceLayout.BLOCKS) -> torch.Tensor:
    """``(N, |S_all|)`` token-table index of every candidate's ``S_all`` (-1 = padding).

    Args:
        layout: block sizes.
        segments: ``{"ll" | "rt" | "imp": (starts (U,), lengths (U,))}``, each history key's
            source segments in the token table.
        cand_key: ``(N,)`` int64 history key of each candidate.
        cand: ``(N, d)`` normalised candidate embeddings.
        search: the NN search (see :data:`Search`).
        out: an ``(N, |S_all|)`` int64 buffer to fill (e.g. a serving arena's); None allocates.
        blocks: the blocks to assemble (a model's ``abilities.blocks``); the others are left
            padding and their NN search is skipped.

    Example::

        >>> table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # one user: ll = [0, 1], rt = [2]
        >>> def search(starts, lengths, key, cand, k):
        ...     s = int(starts[0]); seg = table[s:s + int(lengths[0])]
        ...     pos = torch.argsort(seg @ cand[0], descending=True, stable=True)[:k]
        ...     return torch.cat([pos, torch.full((k - pos.numel(),), -1)]).unsqueeze(0)
        >>> seg = {"ll": (torch.tensor([0]), torch.tensor([2])), "rt": (torch.tensor([2]), torch.tensor([1])),
        ...        "imp": (torch.tensor([3]), torch.tensor([0]))}
        >>> assemble_s_all(SequenceLayout(1, 2, 1, 1), seg, torch.tensor([0]), torch.tensor([[0.0, 1.0]]), search).tolist()
        [[1, 2, -1, 2, -1]]
    """
    n = cand_key.numel()
    if out is None:
        out = torch.empty(n, layout.total, dtype=torch.int64)
    out.fill_(-1)
    for block in NN_BLOCKS:
        if block in blocks:
            starts, lengths = segments[BLOCK_SOURCES[block]]
            out[:, layout.block_slice(block)] = nn_block_index(layout, block, starts, lengths, cand_key, cand, search)
    if "rt" in blocks:
        starts, lengths = segments["rt"]
        out[:, layout.block_slice("rt")] = rt_block_index(layout, starts, lengths)[cand_key]
    return out
