"""The ``triton`` backend of :func:`~lifelong.ops.nn_search.nn_search`: one fused kernel, one small top-k.

Each program takes one block of up to ``BLOCK_C`` candidates of one user and one chunk of
``CHUNK_L`` tokens of that user's int8 segment, and walks the chunk in tiles of ``BLOCK_L``
tokens, read straight from the de-duplicated ``values`` (the sequence is never copied per
candidate). Per tile it dequantizes, L2-normalises
(float32, as :func:`~lifelong.ops.nn_select.l2_normalize`), scores the tile against the
block in float64 (``D`` outer products) rounded to float32, and merges the tile into a running
top-``k`` per candidate held in registers: a bitonic top-k over int64 keys ordered like
``(score, position)``, the keys the CPU paths break ties with
(:func:`~lifelong.ops.nn_select.tie_break_keys`). Each program writes its candidates'
top-k keys, ``(N, chunks, k)`` in all; one ``topk`` over them gives the ``(N, k)`` positions
and scores. Chunks let a long segment with few candidates fill the GPU.

The float64 dot keeps the op's tie contract (:mod:`lifelong.ops.nn_search`): products of
float32s are exact in float64, so equal tokens score equally whatever the summation order, and
the keys rank equal scores by position, newer first. A tile whose best key cannot beat any
candidate's current k-th is skipped.

The kernel imports :mod:`triton`; :func:`lifelong.ops.dispatch.implementation` imports this
module the first time the ``triton`` backend is asked for. With ``TRITON_INTERPRET=1`` (set
before this module is imported) it runs on the CPU, on CPU tensors; otherwise inputs go to the
current CUDA device and results come back to the inputs' device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.standard import _indicator, _log2

from lifelong.core.quantization import INT8_LEVELS
from lifelong.ops.dispatch import kernel_device, register
from lifelong.ops.nn_select import _POS_BITS

BLOCK_C = 16
"""Candidates per program: a tile's scores are ``(BLOCK_C, BLOCK_L)``."""
BLOCK_L = 64
"""Tokens per tile, read when the op runs (tests set a smaller one for the interpreter)."""
CHUNK_L = 1024
"""Tokens of a segment per program (rounded up to whole tiles): long segments are split over
programs, whose top-k lists a final ``topk`` over the keys merges. Read when the op runs."""
NUM_WARPS = 8
"""Chosen without a GPU: the sm_90 build (``triton.compile`` ahead of time) of 64-token tiles
then keeps at most 24 bytes of stack for k <= 128 (72 with 4 warps at k = 64)."""

POS_BITS = tl.constexpr(_POS_BITS)
"""Bits of a position in a key, as the CPU paths' keys: segments up to 16M tokens."""
_EMPTY_KEY = -(1 << 62)
"""The key of no token: below every (score, position) key."""
_EMPTY = tl.constexpr(_EMPTY_KEY)
_KEY_MAX = tl.constexpr(1 << 62)
"""Above every key."""


@triton.jit
def _tie_break_keys(s, pos):
    """int64 keys ordered like ``(score, position)``, as :func:`~lifelong.ops.nn_select.tie_break_keys`."""
    bits = (s + 0.0).to(tl.int32, bitcast=True).to(tl.int64)  # + 0.0 turns -0.0 into 0.0
    return (tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF) << POS_BITS) | pos


@triton.jit
def _compare_and_swap(h, flip, i: tl.constexpr):
    """One bitonic step on the ``i``-th innermost axis of a hypercube ``[2] * n`` of int64 keys.

    Triton's ``tl.sort`` step, but the pair's XOR comes from its max and min: Triton's
    interpreter runs the ``xor_sum`` it uses element by element in Python (seconds per tile),
    while max and min are numpy calls. Compiled, both are one exchange between lanes. It uses
    ``tl.sort``'s own helpers (``_indicator``, ``_log2``), private to the pinned triton 3.7.1.
    """
    n_dims: tl.constexpr = _log2(h.numel)
    axis: tl.constexpr = n_dims - 1 - i
    partner = h ^ tl.max(h, axis, keep_dims=True) ^ tl.min(h, axis, keep_dims=True)
    return tl.where((h > partner) != (flip ^ _indicator(n_dims, i)), partner, h)


@triton.jit
def _bitonic_merge(h, stage: tl.constexpr, order: tl.constexpr):
    """``stage`` compare-and-swap rounds: ascending (0), descending (1) or alternating (2) runs."""
    if order == 2:
        flip = _indicator(_log2(h.numel), stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        h = _compare_and_swap(h, flip, stage - 1 - i)
    return h


@triton.jit
def _top_keys(x, K: tl.constexpr):
    """The ``K`` largest keys of each row of ``x`` (R, W), descending (bitonic top-k, as ``tl.topk``)."""
    log_n: tl.constexpr = _log2(x.shape[1])
    log_k: tl.constexpr = _log2(K)
    h = tl.reshape(x, [2] * _log2(x.numel))
    for i in tl.static_range(1, log_k + 1):
        h = _bitonic_merge(h, i, 2 if i < log_n else 1)
    for i in tl.static_range(log_k + 1, log_n + 1):
        h = tl.max(h, axis=(_log2(h.numel) - 1 - log_k))
        h = _bitonic_merge(h, log_k, 2 if i < log_n else 1)
    return tl.reshape(h, [x.shape[0], K])


@triton.jit
def _nn_search_kernel(values_ptr, starts_ptr, lengths_ptr, order_ptr, work_user_ptr, work_first_ptr,
                      work_count_ptr, cand_ptr, keys_ptr, step, k, chunk_len, n_chunks,
                      D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, K_PAD: tl.constexpr):
    work = tl.program_id(0)
    chunk = tl.program_id(1)
    user = tl.load(work_user_ptr + work)
    count = tl.load(work_count_ptr + work)
    start = tl.load(starts_ptr + user)
    length = tl.load(lengths_ptr + user)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < count
    rows = tl.load(order_ptr + tl.load(work_first_ptr + work) + c, mask=c_ok, other=0)
    col = tl.arange(0, D)
    slot = tl.arange(0, K_PAD)[None, :]
    # The running top-k as (score, position) keys, descending; only the first k count.
    best = tl.full((BLOCK_C, K_PAD), _EMPTY, tl.int64)
    kth = tl.full((BLOCK_C,), _EMPTY, tl.int64)
    for t0 in range(chunk * chunk_len, tl.minimum((chunk + 1) * chunk_len, length), BLOCK_L):
        pos = t0 + tl.arange(0, BLOCK_L)
        ok = pos < length
        token = values_ptr + (start + pos) * D
        x = tl.load(token[:, None] + col[None, :], mask=ok[:, None], other=0).to(tl.float32) * step
        norm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)
        # The float64 dot as D outer products, summed in the same order for every token (a
        # float64 tl.dot of this K does not lower to the GPU's MMA); the columns are L1 hits.
        acc = tl.zeros((BLOCK_C, BLOCK_L), tl.float64)
        for d in range(D):
            tok_d = (tl.load(token + d, mask=ok, other=0).to(tl.float32) * step) / norm
            cand_d = tl.load(cand_ptr + rows * D + d, mask=c_ok, other=0.0)
            acc += cand_d.to(tl.float64)[:, None] * tok_d.to(tl.float64)[None, :]
        keys = tl.where(ok[None, :], _tie_break_keys(acc.to(tl.float32), pos[None, :].to(tl.int64)), _EMPTY)
        # Keys are unique, and every token of this tile is newer than those kept: a tile score
        # equal to the k-th has the larger key and enters.
        if tl.max((tl.max(keys, axis=1) > kth).to(tl.int32), axis=0) > 0:
            if BLOCK_L > K_PAD:
                tile = _top_keys(keys, K_PAD)
            else:
                tile = keys
            best = _top_keys(tl.reshape(tl.join(best, tile), (BLOCK_C, 2 * K_PAD)), K_PAD)
            kth = tl.min(tl.where(slot < k, best, _KEY_MAX), axis=1)
    tl.store(keys_ptr + (rows[:, None] * n_chunks + chunk) * K_PAD + slot, best, mask=c_ok[:, None])


def _decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (-1 = none) and float32 scores (-inf = none) of :func:`_tie_break_keys` keys."""
    ordered = keys >> _POS_BITS
    scores = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).to(torch.int32).view(torch.float32)
    empty = keys == _EMPTY_KEY
    return (keys & ((1 << _POS_BITS) - 1)).masked_fill(empty, -1), scores.masked_fill(empty, float("-inf"))


def _work_items(cand_user: torch.Tensor, block_c: int) -> tuple[torch.Tensor, ...]:
    """Candidates grouped by user in blocks of ``block_c``: order, and each block's user, first row, size."""
    order = torch.argsort(cand_user, stable=True)
    users, counts = torch.unique_consecutive(cand_user[order], return_counts=True)
    blocks = (counts + block_c - 1) // block_c
    block_start = torch.cumsum(blocks, 0) - blocks
    in_user = torch.arange(int(blocks.sum()), device=cand_user.device) - block_start.repeat_interleave(blocks)
    first = (torch.cumsum(counts, 0) - counts).repeat_interleave(blocks) + in_user * block_c
    count = torch.clamp(counts.repeat_interleave(blocks) - in_user * block_c, max=block_c)
    return order, users.repeat_interleave(blocks), first, count


@register("nn_search", "triton")
def nn_search_triton(values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, cand_user: torch.Tensor,
                     cand: torch.Tensor, k: int, scale: float,
                     block_l: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~lifelong.ops.nn_search.nn_search` as one Triton kernel and one ``topk`` (inputs checked by it).

    Args:
        values, starts, lengths, cand_user, cand, k, scale: as :func:`~lifelong.ops.nn_search.nn_search`
            (``k >= 1``, at least one candidate).
        block_l: tokens per tile (a power of two, at least 16; raised to k's next power of two);
            None: :data:`BLOCK_L`.

    Returns:
        ``positions`` int64 ``(N, k)`` and ``scores`` float32 ``(N, k)``, on the inputs' device.

    Example::

        from lifelong.ops import nn_search
        pos, scores = nn_search(values, starts, lengths, cand_user, cand, k=8, backend="triton")
    """
    if int(lengths.max()) >= 1 << _POS_BITS:
        raise ValueError(f"the triton NN search takes segments of fewer than {1 << _POS_BITS} tokens")
    home = cand.device
    device = kernel_device()
    values, starts, lengths, cand_user, cand = (t.to(device).contiguous()
                                                for t in (values, starts, lengths, cand_user, cand))
    order, work_user, first, count = _work_items(cand_user, BLOCK_C)
    k_pad = triton.next_power_of_2(k)
    block_l = max(block_l or BLOCK_L, k_pad)
    chunk_len = triton.cdiv(CHUNK_L, block_l) * block_l
    n_chunks = max(triton.cdiv(int(lengths[work_user].max()), chunk_len), 1)
    keys = torch.empty(cand.shape[0], n_chunks, k_pad, dtype=torch.int64, device=device)
    _nn_search_kernel[(work_user.numel(), n_chunks)](
        values, starts, lengths, order, work_user, first, count, cand, keys,
        scale / INT8_LEVELS, k, chunk_len, n_chunks, D=values.shape[1], BLOCK_C=BLOCK_C, BLOCK_L=block_l,
        K_PAD=k_pad, num_warps=NUM_WARPS)
    # Each chunk's list holds its exact top k first; the rest are real tokens' keys, below them.
    positions, scores = _decode_keys(keys.view(cand.shape[0], -1).topk(k, dim=1).values)
    return positions.to(home), scores.to(home)
