"""int8 NN search: reference == cpu == naive == ``nn_topk`` on ragged, tied, unsorted batches."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.core.quantization import INT8_SCALE, dequantize_int8
from lifelong.data.timelines import Jagged
from lifelong.ops import bytes_moved, nn_search, nn_search_naive
from lifelong.ops.nn_select import l2_normalize, nn_topk

nn_search_module = importlib.import_module("lifelong.ops.nn_search")  # the package's nn_search is the function

D = 32


def _batch(lengths: list[int], n_cand: int, seed: int, ties: bool = True):
    """A jagged batch: users' segments in shuffled order with gaps, candidates in random user order.

    With ``ties`` the tokens come from a palette of 4 vectors, the last one twice the first
    (other codes, the same normalised vector): many equal scores. Without, every token and
    candidate is its own random vector.
    """
    rng = np.random.default_rng(seed)
    gaps = rng.integers(0, 3, len(lengths))
    starts = np.zeros(len(lengths), dtype=np.int64)
    t = 0
    for u in rng.permutation(len(lengths)):
        t += gaps[u]
        starts[u] = t
        t += lengths[u]
    if ties:
        palette = rng.integers(-63, 64, (4, D)).astype(np.int8)
        palette[3] = palette[0] * 2
        values = palette[rng.integers(0, 4, t)]
        codes = palette[rng.integers(0, 4, n_cand)]
    else:
        values, codes = (rng.integers(-127, 128, (n, D)).astype(np.int8) for n in (t, n_cand))
    cand = dequantize_int8(torch.from_numpy(codes)) + torch.from_numpy(rng.normal(0, 0.05, (n_cand, D)).astype(
        np.float32)) * bool(rng.integers(0, 2))  # exact copies of tokens, or near them
    cand_user = torch.from_numpy(rng.integers(0, len(lengths), n_cand))
    return (torch.from_numpy(values), torch.from_numpy(starts), torch.tensor(lengths, dtype=torch.int64),
            cand_user, l2_normalize(cand))


def _brute_force(values, starts, lengths, cand_user, cand, k):
    """Per candidate: float64 dot products rounded to float32, sorted by (score, position) descending."""
    tokens = l2_normalize(dequantize_int8(values, INT8_SCALE)).double().numpy()
    positions, scores = np.full((len(cand), k), -1), np.full((len(cand), k), -np.inf, dtype=np.float32)
    for i, u in enumerate(cand_user.tolist()):
        seg = tokens[int(starts[u]):int(starts[u] + lengths[u])]
        s = (seg @ cand[i].double().numpy()).astype(np.float32)
        order = sorted(range(len(seg)), key=lambda p: (-s[p], -p))[:k]
        positions[i, :len(order)], scores[i, :len(order)] = order, s[order]
    return torch.from_numpy(positions), torch.from_numpy(scores)


def _nn_topk(values, starts, lengths, cand_user, cand, k):
    """``nn_topk`` on the dequantized, normalised tokens (it wants candidates sorted by user)."""
    tokens = l2_normalize(dequantize_int8(values, INT8_SCALE)).numpy()
    order = torch.argsort(cand_user, stable=True)
    pos, score = nn_topk(Jagged.from_ranges(tokens, starts.numpy(), lengths.numpy()), cand[order],
                         cand_user[order].numpy(), k)
    out_pos, out_score = torch.empty(pos.shape, dtype=torch.int64), torch.empty(score.shape)
    out_pos[order], out_score[order] = torch.from_numpy(pos), torch.from_numpy(score)
    return out_pos, out_score


def _assert_same(a, b, atol=0.0):
    assert torch.equal(a[0], b[0]), (a[0], b[0])
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=atol)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=5), st.integers(0, 9), st.integers(0, 15),
       st.integers(0, 2**31))
def test_backends_and_naive_rank_duplicates_newest_first(lengths, n_cand, k, seed):
    args = _batch(lengths, n_cand, seed)
    ref = nn_search(*args, k, backend="reference")
    assert ref[0].shape == ref[1].shape == (n_cand, k)
    assert ref[0].dtype == torch.int64 and ref[1].dtype == torch.float32
    _assert_same(ref, _brute_force(*args, k))
    _assert_same(nn_search(*args, k, backend="cpu"), ref)
    _assert_same(nn_search_naive(*args, k), ref)
    # Padding exactly where the user has fewer than k tokens.
    n_real = torch.minimum(args[2][args[3]], torch.tensor(k))
    assert torch.equal((ref[0] >= 0).sum(1), n_real) and torch.equal(torch.isfinite(ref[1]).sum(1), n_real)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=4), st.integers(0, 9), st.integers(1, 15),
       st.integers(0, 2**31))
def test_nn_topk_agrees_on_distinct_tokens(lengths, n_cand, k, seed):
    # nn_topk ranks float32 GEMM scores, which can split equal tokens by an ulp and so break
    # their tie the wrong way; on distinct tokens it must agree.
    args = _batch(lengths, n_cand, seed, ties=False)
    ref = nn_search(*args, k, backend="cpu")
    _assert_same(_nn_topk(*args, k), ref, atol=1e-6)


def test_ties_go_to_the_newer_token_and_short_segments_are_padded():
    e = [127] + [0] * (D - 1)
    values = torch.tensor([e, [0, 127] + [0] * (D - 2), e, e], dtype=torch.int8)
    starts, lengths = torch.tensor([0, 4, 3]), torch.tensor([3, 0, 1])
    cand = torch.zeros(3, D)
    cand[:, 0] = 1.0
    cand_user = torch.tensor([2, 0, 1])  # not sorted by user
    for out in (*(nn_search(values, starts, lengths, cand_user, cand, 4, backend=b) for b in ("reference", "cpu")),
                nn_search_naive(values, starts, lengths, cand_user, cand, 4)):
        assert out[0].tolist() == [[0, -1, -1, -1], [2, 0, 1, -1], [-1, -1, -1, -1]]
        assert out[1].tolist() == [[1.0, *[-np.inf] * 3], [1.0, 1.0, 0.0, -np.inf], [-np.inf] * 4]


def test_a_tie_larger_than_the_slack_picks_the_newest(monkeypatch):
    values = torch.ones(300, D, dtype=torch.int8)
    values[7, 0] = 100  # one clear winner, then a 299-way tie
    cand = torch.zeros(3, D)
    cand[:, 0] = 1.0
    args = (values, torch.tensor([0]), torch.tensor([300]), torch.zeros(3, dtype=torch.int64), cand, 5)
    monkeypatch.setattr(nn_search_module, "_SCORE_BUDGET", 600)  # chunks of 2 candidates on the cpu path
    for out in (nn_search(*args, backend="reference"), nn_search(*args, backend="cpu"), nn_search_naive(*args)):
        assert out[0].tolist() == [[7, 299, 298, 297, 296]] * 3


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31))
def test_cpu_chunks_agree_with_one_gemm(seed):
    args = _batch([40, 0, 25], 12, seed)
    whole = nn_search(*args, 6, backend="cpu")
    saved = nn_search_module._SCORE_BUDGET
    nn_search_module._SCORE_BUDGET = 50  # one candidate per GEMM
    try:
        chunked = nn_search(*args, 6, backend="cpu")
    finally:
        nn_search_module._SCORE_BUDGET = saved
    assert torch.equal(whole[0], chunked[0])
    torch.testing.assert_close(whole[1], chunked[1], rtol=0, atol=1e-6)


def test_empty_inputs():
    values = torch.zeros(0, D, dtype=torch.int8)
    none = torch.zeros(0, dtype=torch.int64)
    for b in ("reference", "cpu"):
        pos, score = nn_search(values, torch.tensor([0]), torch.tensor([0]), none, torch.zeros(0, D), 3, backend=b)
        assert pos.shape == score.shape == (0, 3)
        pos, score = nn_search(values, torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.ones(1, D), 3,
                               backend=b)
        assert pos.tolist() == [[-1] * 3] and score.tolist() == [[-np.inf] * 3]


@pytest.mark.parametrize("change, message", [
    ({"values": torch.zeros(4, D)}, "int8"),
    ({"starts": torch.tensor([0, 1])}, "starts and lengths"),
    ({"lengths": torch.tensor([5])}, "within the 4 tokens"),
    ({"cand_user": torch.tensor([1])}, "index the 1 users"),
    ({"cand": torch.ones(1, 8)}, "cand must be"),
    ({"cand": torch.ones(1, D, dtype=torch.float64)}, "cand must be float32"),
    ({"k": -1}, "k must be"),
])
def test_bad_inputs_are_value_errors(change, message):
    args = {"values": torch.zeros(4, D, dtype=torch.int8), "starts": torch.tensor([0]), "lengths": torch.tensor([4]),
            "cand_user": torch.tensor([0]), "cand": torch.ones(1, D), "k": 2} | change
    with pytest.raises(ValueError, match=message):
        nn_search(**args)
    with pytest.raises(ValueError, match=message):
        nn_search_naive(**args)


def test_bytes_moved_counts_one_copy_per_candidate_against_one_per_user():
    lengths = torch.tensor([100, 7, 50])
    cand_user = torch.tensor([0, 2, 0, 0])
    assert bytes_moved(lengths, cand_user, dim=D) == {
        "naive": (3 * 100 + 50) * D * 5 + 4 * D * 4,
        "optimized": (100 + 50) * D * 5 + 4 * D * 4,
    }


def test_equal_tokens_tie_where_a_float32_gemm_splits_them():
    # A few vectors repeated over 13 positions, 3 candidates: at this shape MKL's float32 GEMM
    # scores some equal copies an ulp apart, which would rank an older copy first.
    for seed in range(5):
        args = _batch([13], 3, seed)
        expected = _brute_force(*args, 6)
        for out in (nn_search(*args, 6, backend="cpu"), nn_search(*args, 6, backend="reference"),
                    nn_search_naive(*args, 6)):
            _assert_same(out, expected)
