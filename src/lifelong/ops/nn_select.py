"""Nearest-neighbour token selection NN(S, c): the top-K tokens of a sequence for a candidate.

Score = dot product of the L2-normalised (dequantized) token and candidate embeddings. Ties
are broken towards the **newer** token (higher position in the chronological sequence), so the
offline feature logger and the serving path pick identical tokens. Results are ordered by
descending score.

Candidates are grouped by the request they belong to and each request's sequence is held once:
a chunk of requests is padded to ``(R, L_max, d)``, its candidates to ``(R, N_max, d)``, and one
batched matmul scores them — the sequence is never copied per candidate.

This is the reference implementation; fused CPU/GPU kernels (``lifelong.ops``) must match it.
"""

from __future__ import annotations

import numpy as np
import torch

from lifelong.data.timelines import Jagged


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


_POS_BITS = 24  # sequences up to 16M tokens; the float's 32 bits sit above: 56 bits in all


def tie_break_keys(scores: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """int64 keys ordered like ``(score, position)``: unique, so top-k is deterministic.

    A float32's bits, with the negative half flipped, order like the floats themselves; shifted
    left and joined with the position, equal scores rank the later (newer) token first.

    Args:
        scores: float scores along the last axis.
        positions: the tokens' positions (same shape); default ``arange`` over the last axis.
    """
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into 0.0
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    if positions is None:
        positions = torch.arange(scores.shape[-1], dtype=torch.int64)
    return (ordered << _POS_BITS) | positions


TIE_SLACK = 32  # extra candidates fetched so that a tie at the k-th score is usually seen whole


def topk_newest_first(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last axis, ties to the newer position, exactly but at top-k cost.

    A float top-k of ``k + slack`` holds every token scoring at least the k-th score unless
    the tie there is larger than the slack; the exact (score, position) order is then decided
    among those few. Rows with a bigger tie fall back to keys over the whole row.
    """
    length = s.shape[-1]
    m = min(k + TIE_SLACK, length)
    top, idx = torch.topk(s, m, dim=-1)
    pick = torch.topk(tie_break_keys(top, idx), k, dim=-1).indices
    out_idx = torch.gather(idx, -1, pick)
    complete = (top[..., m - 1] < top[..., k - 1]) if m < length else torch.ones(top.shape[:-1], dtype=torch.bool)
    if not bool(complete.all()):
        rows = ~complete
        out_idx[rows] = torch.topk(tie_break_keys(s[rows]), k, dim=-1).indices
    return torch.gather(s, -1, out_idx), out_idx


def _pad_rows(values: torch.Tensor, offsets: np.ndarray, width: int) -> torch.Tensor:
    """(n_rows, width, *trailing) zero-padded copy of a jagged tensor."""
    lengths = np.diff(offsets)
    out = values.new_zeros((lengths.size, width, *values.shape[1:]))
    row = np.repeat(np.arange(lengths.size), lengths)
    col = np.arange(offsets[-1] - offsets[0]) - np.repeat(offsets[:-1] - offsets[0], lengths)
    out[torch.from_numpy(row), torch.from_numpy(col)] = values
    return out


def nn_topk(tokens: Jagged, cand: torch.Tensor, cand_request: np.ndarray, k: int,
            budget: int = 1 << 25) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` tokens of each candidate's request sequence.

    Args:
        tokens: per request, its sequence's token embeddings (values ``(T, d)`` float, already
            normalised) — one row per request.
        cand: ``(N, d)`` normalised candidate embeddings.
        cand_request: ``(N,)`` request (row of ``tokens``) of each candidate, non-decreasing.
        k: tokens to select; rows with fewer tokens are padded with position -1.
        budget: score-matrix elements per chunk (bounds memory).

    Returns:
        ``positions`` ``(N, k)`` int64 indices into the request's sequence (-1 = none) and
        ``scores`` ``(N, k)`` float32 (``-inf`` where none).

    Example::

        >>> seq = Jagged(np.array([[1., 0.], [0., 1.], [1., 0.]], dtype=np.float32), np.array([0, 3]))
        >>> pos, _ = nn_topk(seq, torch.tensor([[1., 0.]]), np.array([0]), k=2)
        >>> pos.tolist()  # a tie between positions 0 and 2: the newer one first
        [[2, 0]]
    """
    cand_request = np.asarray(cand_request, dtype=np.int64)
    n = cand_request.size
    positions = np.full((n, k), -1, dtype=np.int64)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    if n == 0 or k == 0:
        return positions, scores
    if np.any(np.diff(cand_request) < 0):
        raise ValueError("cand_request must be sorted (candidates grouped by request)")
    values = torch.as_tensor(tokens.values, dtype=torch.float32)
    seq_len = np.diff(tokens.offsets)
    # Requests that own candidates, with their candidate ranges.
    req, cand_start, cand_count = np.unique(cand_request, return_index=True, return_counts=True)
    order = np.argsort(seq_len[req], kind="stable")  # similar lengths share a chunk: less padding
    i = 0
    while i < order.size:
        # Grow the chunk while its padded score matrix fits the budget.
        j = i + 1
        l_max, c_max = max(int(seq_len[req[order[i]]]), 1), int(cand_count[order[i]])
        while j < order.size:
            l2 = max(l_max, int(seq_len[req[order[j]]]))
            c2 = max(c_max, int(cand_count[order[j]]))
            if (j + 1 - i) * l2 * c2 > budget:
                break
            l_max, c_max, j = l2, c2, j + 1
        chunk = order[i:j]
        _score_chunk(values, tokens.offsets, seq_len, req[chunk], cand_start[chunk], cand_count[chunk],
                     cand, k, l_max, c_max, positions, scores)
        i = j
    return positions, scores


def _score_chunk(values, offsets, seq_len, reqs, c_start, c_count, cand, k, l_max, c_max, positions, scores):
    sub_off = np.r_[0, np.cumsum(seq_len[reqs])]
    flat = Jagged.from_ranges(np.arange(offsets[-1]), offsets[reqs], seq_len[reqs]).values
    seq = _pad_rows(values[torch.from_numpy(flat)], sub_off, l_max)  # (R, L, d)
    cand_off = np.r_[0, np.cumsum(c_count)]
    cand_rows = Jagged.from_ranges(np.arange(cand.shape[0]), c_start, c_count).values
    cands = _pad_rows(cand[torch.from_numpy(cand_rows)], cand_off, c_max)  # (R, C, d)
    # Float64 products are exact and the float32 rounding of their sum is the same for equal
    # tokens wherever they sit in the GEMM's blocking (a float32 GEMM can score two equal tokens
    # an ulp apart and break the newest-first rule); serving's NN search scores the same way.
    s = torch.bmm(cands.double(), seq.double().transpose(1, 2)).float()  # (R, C, L)
    valid = torch.arange(l_max)[None, :] < torch.from_numpy(seq_len[reqs])[:, None]
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    kk = min(k, l_max)
    top, idx = topk_newest_first(s, kk)
    idx = idx.masked_fill(torch.isinf(top), -1)
    # Scatter back to the candidates' rows.
    cand_pos = np.repeat(np.arange(len(reqs)), c_count)
    slot = np.arange(cand_rows.size) - np.repeat(cand_off[:-1], c_count)
    positions[cand_rows, :kk] = idx[cand_pos, slot].numpy()
    scores[cand_rows, :kk] = top[cand_pos, slot].numpy()


def nn_topk_segments(values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, cand_key: torch.Tensor,
                     cand: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`nn_topk` over segments of one token table: the row builder's NN search.

    The search :func:`lifelong.transact.sequence_layout.assemble_s_all` and its halves take
    (``Search``). Segments laid end to end (as the builder lays them) are searched in place.

    Args:
        values: ``(T, d)`` float normalised token embeddings.
        starts, lengths: ``(U,)`` int64 range of each segment in ``values``.
        cand_key: ``(N,)`` int64 segment of each candidate, non-decreasing.
        cand: ``(N, d)`` normalised candidate embeddings.
        k: tokens to select.

    Returns:
        ``(N, k)`` int64 positions within each candidate's segment (-1 = none), descending score,
        ties to the newer token.

    Example::

        >>> values = torch.tensor([[0., 1.], [1., 0.], [0., 1.], [1., 0.]])
        >>> nn_topk_segments(values, torch.tensor([0, 2]), torch.tensor([2, 2]), torch.tensor([1]),
        ...                  torch.tensor([[0., 1.]]), k=1).tolist()
        [[0]]
    """
    starts_np, lengths_np = starts.numpy().astype(np.int64), lengths.numpy().astype(np.int64)
    data = values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    first = int(starts_np[0]) if starts_np.size else 0
    if starts_np.size and np.array_equal(starts_np[1:], starts_np[:-1] + lengths_np[:-1]):
        end = first + int(lengths_np.sum())
        tokens = Jagged(data[first:end], np.r_[starts_np - first, end - first])
    else:
        tokens = Jagged.from_ranges(data, starts_np, lengths_np)
    positions, _ = nn_topk(tokens, cand, cand_key.numpy(), k)
    return torch.from_numpy(positions)
