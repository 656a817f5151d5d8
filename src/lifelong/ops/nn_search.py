"""De-duplicated int8 nearest-neighbour search: NN(S, c) over a jagged batch of sequences.

A serving batch holds each user's int8 sequence once (``values`` plus per-user ``starts`` and
``lengths``, docs/design.md "Serving") and candidates that point at their user. For each
candidate, the tokens are dequantized (:func:`~lifelong.core.quantization.dequantize_int8`),
L2-normalised (:func:`~lifelong.ops.nn_select.l2_normalize`) and dotted with the
(normalised) candidate; the top ``k`` come back by descending score, ties to the newer (larger)
position — the order of :func:`~lifelong.ops.nn_select.nn_topk`, whose top-k helper all
paths share.

A score is the float64 dot product of the float32 vectors, rounded to float32. A float32 GEMM
alone is not enough: its blocking sums some columns in another order, so two equal tokens can
score an ulp apart and the older one win the tie (``nn_topk``, which ranks float32 GEMM
scores, does break such ties wrongly). The optimized paths rank by float32 GEMM scores and
rescore exactly what the GEMM's rounding could have misordered (:func:`_topk_exact`).

- :func:`nn_search` dispatches to a backend (:mod:`lifelong.ops.dispatch`): ``reference``
  pads users and candidates and runs one float64 batched matmul; ``cpu`` dequantizes and
  normalises each user's segment once and scores its candidates with one GEMM per
  memory-bounded chunk.
- :func:`nn_search_naive` is the paper's baseline serving path: every candidate gets its own
  copy of its user's sequence, then separate dequantize, normalise, dot and top-k ops.

All three return the same positions and scores (``reference`` sums its float64 GEMM in another
order, which moves a float32 score by an ulp with a probability of about 1e-7).
:func:`bytes_moved` counts the sequence bytes each approach materialises.
"""

from __future__ import annotations

import torch

from lifelong.core.quantization import INT8_SCALE, dequantize_int8
from lifelong.ops.dispatch import implementation, register
from lifelong.ops.nn_select import TIE_SLACK, l2_normalize, topk_newest_first

_SCORE_BUDGET = 1 << 22
"""Score-matrix elements (16 MiB of float32) per GEMM of the cpu path, and per exact fallback."""

_UNIT_ROUNDOFF = {"highest": 2.0**-24, "high": 2.0**-11, "medium": 2.0**-8}
"""Relative error of one float32 matmul step at each ``torch.get_float32_matmul_precision()``."""


def _dot_exact(tokens: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Scores ``(R, m)`` of tokens ``(R, m, d)`` against candidates ``(R, d)``: the float64 dot, rounded.

    A float32 GEMM sums in an order that depends on where a column falls in its blocking, so
    two equal tokens can score an ulp apart and break the tie rule. Products of float32s are
    exact in float64, and one element-wise product plus a reduction over the last axis treats
    every token alike: equal vectors get equal scores, and every path the same scores.
    """
    return (tokens.double() * cand.double().unsqueeze(-2)).sum(-1).float()


def _take(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Tokens ``(R, m, d)`` at positions ``idx`` ``(R, m)`` of a shared ``(L, d)`` or per-row ``(R, L, d)`` set."""
    if tokens.dim() == 2:
        return tokens[idx]
    return tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def _topk_exact(s: torch.Tensor, tokens: torch.Tensor, cand: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` by :func:`_dot_exact` score, ties to the newer position, found from GEMM scores.

    Args:
        s: ``(R, L)`` float32 GEMM scores, ``-inf`` where there is no token; ``1 <= k <= L``.
        tokens: the normalised tokens (float32, or float64 to save converting each pick), shared
            ``(L, d)`` or per row ``(R, L, d)``.
        cand: ``(R, d)`` candidates.
        k: tokens to keep.

    Returns:
        ``(R, k)`` scores (``-inf`` where a row has fewer than ``k`` tokens) and positions.

    A GEMM score and the exact one are both within ``delta`` of the true dot product. Where
    the GEMM's top ``k + 1`` are more than ``4 delta`` apart, the GEMM order is the exact order
    and only the k picked tokens are rescored. Elsewhere (equal or nearly equal tokens) the
    ``k + slack`` best are rescored and ranked by ``topk_newest_first``; a token outside them
    cannot reach the k-th exact score unless the shortlist's last GEMM score is within
    ``4 delta`` of the k-th (a tie bigger than the slack), and such rows are rescored whole.
    """
    length, d = s.shape[-1], tokens.shape[-1]
    m = min(k + TIE_SLACK, length)
    noisy, idx = torch.topk(s, m)
    # |float32 dot - true| <= (d + 2) u |token| |cand| in any summation order; |token| <= 1 (+ rounding).
    delta = (d + 2) * _UNIT_ROUNDOFF[torch.get_float32_matmul_precision()] * 1.01 * cand.norm(dim=-1)
    pos = idx[:, :k]
    top = _dot_exact(_take(tokens, pos), cand).masked_fill(torch.isinf(noisy[:, :k]), float("-inf"))
    head = noisy[:, :k + 1]
    unsure = ((head[:, :-1] - head[:, 1:]) <= 4 * delta[:, None]).any(1).nonzero().squeeze(1)
    if unsure.numel():
        rows_tokens = tokens if tokens.dim() == 2 else tokens[unsure]
        short = idx[unsure].sort(-1).values  # position order: ties in the shortlist go to the newer token
        exact = _dot_exact(_take(rows_tokens, short), cand[unsure])
        exact = exact.masked_fill(torch.isinf(s[unsure].gather(1, short)), float("-inf"))
        t, pick = topk_newest_first(exact, k)
        top[unsure], pos[unsure] = t, short.gather(1, pick)
        last = noisy[unsure, m - 1]
        whole = unsure[torch.isfinite(last) & (last + 4 * delta[unsure] >= noisy[unsure, k - 1])] if m < length \
            else unsure[:0]
        for chunk in whole.split(max(1, _SCORE_BUDGET // (length * d))):
            full_tokens = tokens.expand(chunk.numel(), -1, -1) if tokens.dim() == 2 else tokens[chunk]
            full = _dot_exact(full_tokens, cand[chunk]).masked_fill(torch.isinf(s[chunk]), float("-inf"))
            top[chunk], pos[chunk] = topk_newest_first(full, k)
    return top, pos


def _check(values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, cand_user: torch.Tensor,
           cand: torch.Tensor, k: int) -> None:
    if values.dtype != torch.int8 or values.dim() != 2:
        raise ValueError(f"values must be int8 (T, d), got {values.dtype} {tuple(values.shape)}")
    if starts.dim() != 1 or starts.shape != lengths.shape:
        raise ValueError(f"starts and lengths must be (U,), got {tuple(starts.shape)} and {tuple(lengths.shape)}")
    if cand.dtype != torch.float32 or cand.dim() != 2 or cand.shape[1] != values.shape[1] \
            or cand_user.shape != cand.shape[:1]:
        raise ValueError(f"cand must be float32 (N, {values.shape[1]}) and cand_user (N,), "
                         f"got {cand.dtype} {tuple(cand.shape)} and {tuple(cand_user.shape)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if bool(((lengths < 0) | (starts < 0) | (starts + lengths > values.shape[0])).any()):
        raise ValueError(f"segments [starts, starts + lengths) must lie within the {values.shape[0]} tokens")
    if cand_user.numel() and not (0 <= int(cand_user.min()) and int(cand_user.max()) < starts.numel()):
        raise ValueError(f"cand_user must index the {starts.numel()} users")


def _empty(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((n, k), -1, dtype=torch.int64), torch.full((n, k), float("-inf"), dtype=torch.float32)


def _pad(top: torch.Tensor, pos: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of width <= k (``-inf`` where no token) as ``(N, k)`` positions and scores."""
    positions, scores = _empty(top.shape[0], k)
    positions[:, :top.shape[1]] = pos.masked_fill(torch.isinf(top), -1)
    scores[:, :top.shape[1]] = top
    return positions, scores


def _padded_index(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token index (R, L_max) of each segment, left-aligned, and its validity (padding reads token 0)."""
    valid = torch.arange(int(lengths.max())) < lengths[:, None]
    return (starts[:, None] + torch.arange(valid.shape[1])).masked_fill(~valid, 0), valid


def nn_search(values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, cand_user: torch.Tensor,
              cand: torch.Tensor, k: int, scale: float = INT8_SCALE,
              backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` tokens of each candidate's user sequence, on the chosen backend.

    Args:
        values: int8 ``(T, d)`` token embeddings of all users, each user's segment contiguous.
        starts: int64 ``(U,)`` first token of each user's segment.
        lengths: int64 ``(U,)`` tokens in each segment (0 allowed).
        cand_user: int64 ``(N,)`` user (segment) of each candidate, in any order.
        cand: float32 ``(N, d)`` L2-normalised candidate embeddings.
        k: tokens per candidate; segments shorter than ``k`` are padded.
        scale: the int8 code's scale (:data:`~lifelong.core.quantization.INT8_SCALE`).
        backend: ``reference`` | ``cpu`` | ``triton``; None: ``$LIFELONG_OPS_BACKEND``, else ``triton``
            where CUDA is present and triton imports, else ``cpu``.

    Returns:
        ``positions`` int64 ``(N, k)``, indices within the user's segment (-1 = none), and
        ``scores`` float32 ``(N, k)`` (``-inf`` = none), by descending score, ties to the
        newer (larger) position.

    Raises:
        ValueError: inconsistent shapes, segments outside ``values`` or users out of range.
        ConfigError: the backend is unknown or unavailable.

    Example::

        >>> values = torch.tensor([[127, 0], [0, 127], [127, 0]], dtype=torch.int8)
        >>> pos, score = nn_search(values, torch.tensor([0, 3]), torch.tensor([3, 0]),
        ...                        torch.tensor([1, 0]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]), k=2)
        >>> pos.tolist(), score.tolist()  # user 1 is empty; user 0 ties at positions 0 and 2
        ([[-1, -1], [2, 0]], [[-inf, -inf], [1.0, 1.0]])
    """
    _check(values, starts, lengths, cand_user, cand, k)
    if cand.shape[0] == 0 or k == 0:
        return _empty(cand.shape[0], k)
    return implementation("nn_search", backend)(values, starts, lengths, cand_user, cand, k, scale)


@register("nn_search", "reference")
def _nn_search_reference(values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                         cand_user: torch.Tensor, cand: torch.Tensor, k: int,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Users padded to ``(U, L, d)``, their candidates to ``(U, C, d)``, one bmm, then top-k."""
    if int(lengths.max()) == 0:
        return _empty(cand.shape[0], k)
    index, valid = _padded_index(starts, lengths)
    tokens = l2_normalize(dequantize_int8(values[index], scale))  # (U, L, d)
    counts = torch.bincount(cand_user, minlength=starts.numel())
    order = torch.argsort(cand_user, stable=True)
    slot = torch.empty_like(cand_user)
    slot[order] = torch.arange(cand_user.numel()) - (torch.cumsum(counts, 0) - counts)[cand_user[order]]
    cands = cand.new_zeros(starts.numel(), int(counts.max()), cand.shape[1])
    cands[cand_user, slot] = cand
    # In float64 the products are exact and the GEMM's summation order moves the float32 result
    # with a probability of about 1e-7, so equal tokens score equally (see _dot_exact).
    s = torch.bmm(cands.double(), tokens.double().transpose(1, 2)).float()[cand_user, slot]  # (N, L)
    s = s.masked_fill(~valid[cand_user], float("-inf"))
    return _pad(*topk_newest_first(s, min(k, s.shape[1])), k)


@register("nn_search", "cpu")
def _nn_search_cpu(values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, cand_user: torch.Tensor,
                   cand: torch.Tensor, k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per user with candidates: its segment dequantized and normalised once, one GEMM per chunk."""
    positions, scores = _empty(cand.shape[0], k)
    order = torch.argsort(cand_user, stable=True)
    users, counts = torch.unique_consecutive(cand_user[order], return_counts=True)
    for user, rows in zip(users.tolist(), order.split(counts.tolist())):
        start, length = int(starts[user]), int(lengths[user])
        if length == 0:
            continue
        tokens = l2_normalize(dequantize_int8(values[start:start + length], scale))
        tokens64 = tokens.double()  # converted once, not once per pick
        kk = min(k, length)
        for chunk in rows.split(max(1, _SCORE_BUDGET // length)):
            c = cand[chunk]
            # The segment has no padding: every position is a token, so no -1 fix-up is needed.
            scores[chunk, :kk], positions[chunk, :kk] = _topk_exact(c @ tokens.t(), tokens64, c, kk)
    return positions, scores


def nn_search_naive(values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, cand_user: torch.Tensor,
                    cand: torch.Tensor, k: int, scale: float = INT8_SCALE) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline serving path: a materialised copy of the sequence per candidate.

    Same arguments and results as :func:`nn_search` (no backend): each candidate's copy of its
    user's int8 sequence ``(N, L, d)`` goes through separate dequantize, normalise, batched dot
    and top-k ops, as a server without request-level de-duplication would run them.

    Example::

        >>> values = torch.tensor([[127, 0], [0, 127]], dtype=torch.int8)
        >>> nn_search_naive(values, torch.tensor([0]), torch.tensor([2]), torch.tensor([0]),
        ...                 torch.tensor([[0.0, 1.0]]), k=1)[0].tolist()
        [[1]]
    """
    _check(values, starts, lengths, cand_user, cand, k)
    n = cand.shape[0]
    if n == 0 or k == 0 or int(lengths[cand_user].max()) == 0:
        return _empty(n, k)
    index, valid = _padded_index(starts[cand_user], lengths[cand_user])
    copies = values[index]  # (N, L, d) int8: the per-candidate copies
    tokens = l2_normalize(dequantize_int8(copies, scale))
    s = torch.bmm(tokens, cand.unsqueeze(-1)).squeeze(-1).masked_fill(~valid, float("-inf"))
    return _pad(*_topk_exact(s, tokens, cand, min(k, s.shape[1])), k)


def bytes_moved(lengths: torch.Tensor, cand_user: torch.Tensor, dim: int = 32) -> dict[str, int]:
    """Bytes of sequence data the naive and the optimized path materialise for one batch.

    Naive: each candidate's int8 copy of its user's sequence plus its float32 dequantized copy,
    ``Σ_n L_u(n) · d · (1 + 4)``; optimized: the same once per user with candidates,
    ``Σ_u L_u · d · (1 + 4)``. Both read the float32 candidates, ``N · d · 4``, counted in
    both. Score matrices (the same in both) are left out.

    Args:
        lengths: ``(U,)`` segment lengths.
        cand_user: ``(N,)`` user of each candidate.
        dim: embedding width.

    Example::

        >>> bytes_moved(torch.tensor([10_000]), torch.zeros(500, dtype=torch.int64))
        {'naive': 800064000, 'optimized': 1664000}
    """
    per_token = dim * (1 + 4)
    cand_bytes = cand_user.numel() * dim * 4
    users = torch.unique(cand_user)
    return {"naive": int(lengths[cand_user].sum()) * per_token + cand_bytes,
            "optimized": int(lengths[users].sum()) * per_token + cand_bytes}
