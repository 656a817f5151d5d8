"""The ``triton`` backend of :func:`~lifelong.ops.nn_search.nn_search`: one fused kernel.

Each program takes one block of up to ``BLOCK_C`` candidates of one user and walks that
user's int8 segment in tiles of ``BLOCK_L`` tokens, read straight from the de-duplicated
``values`` (the sequence is never copied per candidate). Per tile it dequantizes, L2-normalises
(float32, as :func:`~lifelong.features.nn_select.l2_normalize`), scores the tile against the
block in float64 (``D`` outer products) rounded to float32, and merges the tile into a running
top-``k`` per candidate held in registers. Only the ``(N, k)`` positions and scores are written.

The float64 dot keeps the op's tie contract (:mod:`lifelong.ops.nn_search`): products of
float32s are exact in float64, so equal tokens score equally whatever the summation order, and
the merge ranks equal scores by position, newer first. A tile whose best score cannot reach
any candidate's current k-th is skipped.

The kernel imports :mod:`triton`; :func:`lifelong.ops.dispatch.implementation` imports this
module the first time the ``triton`` backend is asked for. With ``TRITON_INTERPRET=1`` (set
before this module is imported) it runs on the CPU, on CPU tensors; otherwise inputs go to the
current CUDA device and results come back to the inputs' device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lifelong.features.quantization import INT8_LEVELS
from lifelong.ops.dispatch import kernel_device, register

BLOCK_C = 16
"""Candidates per program (``tl.dot`` needs at least 16 rows on a GPU)."""
BLOCK_L = 64
"""Tokens per tile, read when the op runs (tests set a smaller one for the interpreter)."""
NUM_WARPS = 8
"""Chosen without a GPU: the sm_90 build (``triton.compile`` ahead of time) of 64-token tiles
then spills no registers up to k = 128 (4 warps spill from k = 128)."""


@triton.jit
def _nn_search_kernel(values_ptr, starts_ptr, lengths_ptr, order_ptr, work_user_ptr, work_first_ptr,
                      work_count_ptr, cand_ptr, out_pos_ptr, out_score_ptr, step, k,
                      D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, K_PAD: tl.constexpr):
    work = tl.program_id(0)
    user = tl.load(work_user_ptr + work)
    count = tl.load(work_count_ptr + work)
    start = tl.load(starts_ptr + user)
    length = tl.load(lengths_ptr + user)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < count
    rows = tl.load(order_ptr + tl.load(work_first_ptr + work) + c, mask=c_ok, other=0)
    col = tl.arange(0, D)
    slot = tl.arange(0, K_PAD)[None, :]
    best_s = tl.full((BLOCK_C, K_PAD), float("-inf"), tl.float32)
    best_p = tl.full((BLOCK_C, K_PAD), -1, tl.int64)
    kth = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    for t0 in range(0, length, BLOCK_L):
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
        s = tl.where(ok[None, :], acc.to(tl.float32), float("-inf"))
        # Ties go to the newer token, and every token of this tile is newer than those kept,
        # so a tile score equal to the k-th still enters.
        if tl.max((tl.max(s, axis=1) >= kth).to(tl.int32), axis=0) > 0:
            new_s = best_s
            new_p = best_p
            for j in range(k):
                m = tl.maximum(tl.max(best_s, axis=1), tl.max(s, axis=1))
                p = tl.maximum(tl.max(tl.where(best_s == m[:, None], best_p, -1), axis=1),
                               tl.max(tl.where(s == m[:, None], pos[None, :].to(tl.int64), -1), axis=1))
                p = tl.where(m == float("-inf"), -1, p)
                new_s = tl.where(slot == j, m[:, None], new_s)
                new_p = tl.where(slot == j, p[:, None], new_p)
                best_s = tl.where(best_p == p[:, None], float("-inf"), best_s)
                s = tl.where(pos[None, :].to(tl.int64) == p[:, None], float("-inf"), s)
            best_s = new_s
            best_p = new_p
            kth = tl.min(tl.where(slot < k, best_s, float("inf")), axis=1)
    out = rows[:, None] * k + slot
    keep = c_ok[:, None] & (slot < k)
    tl.store(out_pos_ptr + out, best_p, mask=keep)
    tl.store(out_score_ptr + out, best_s, mask=keep)


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
    """:func:`~lifelong.ops.nn_search.nn_search` in one Triton kernel (inputs already checked by it).

    Args:
        values, starts, lengths, cand_user, cand, k, scale: as :func:`~lifelong.ops.nn_search.nn_search`
            (``k >= 1``, at least one candidate).
        block_l: tokens per tile (a power of two, at least 16); None: :data:`BLOCK_L`.

    Returns:
        ``positions`` int64 ``(N, k)`` and ``scores`` float32 ``(N, k)``, on the inputs' device.

    Example::

        from lifelong.ops import nn_search
        pos, scores = nn_search(values, starts, lengths, cand_user, cand, k=8, backend="triton")
    """
    home = cand.device
    device = kernel_device()
    values, starts, lengths, cand_user, cand = (t.to(device).contiguous()
                                                for t in (values, starts, lengths, cand_user, cand))
    order, work_user, first, count = _work_items(cand_user, BLOCK_C)
    positions = torch.empty(cand.shape[0], k, dtype=torch.int64, device=device)
    scores = torch.empty(cand.shape[0], k, dtype=torch.float32, device=device)
    _nn_search_kernel[(work_user.numel(),)](
        values, starts, lengths, order, work_user, first, count, cand, positions, scores,
        scale / INT8_LEVELS, k, D=values.shape[1], BLOCK_C=BLOCK_C, BLOCK_L=block_l or BLOCK_L,
        K_PAD=triton.next_power_of_2(k), num_warps=NUM_WARPS)
    return positions.to(home), scores.to(home)
