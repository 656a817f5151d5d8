"""The fused Triton NN search (in the interpreter without CUDA) == the reference backend."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET unset when the kernels were imported", allow_module_level=True)

from lifelong.ops import (  # noqa: E402
    implementation,
    nn_search,
    triton_nn_search,  # noqa: E402
)
from tests.ops.test_nn_search import D, _assert_same, _batch, _brute_force  # noqa: E402


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """16-token tiles in 32-token chunks: several of each per segment at test sizes, and the
    interpreter stays quick."""
    monkeypatch.setattr(triton_nn_search, "BLOCK_L", 16)
    monkeypatch.setattr(triton_nn_search, "CHUNK_L", 32)


def test_the_dispatcher_finds_the_kernel():
    assert implementation("nn_search", "triton") is triton_nn_search.nn_search_triton


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=4), st.integers(0, 40), st.integers(0, 20),
       st.booleans(), st.integers(0, 2**31))
def test_triton_matches_the_reference(lengths, n_cand, k, ties, seed):
    # Up to 40 candidates: several blocks of 16 for one user; up to 40 tokens: several tiles;
    # k up to 20: top-k lists narrower than, as wide as and wider than (then tiles grow) 16.
    args = _batch(lengths, n_cand, seed, ties=ties)
    ref = nn_search(*args, k, backend="reference")
    out = nn_search(*args, k, backend="triton")
    assert out[0].dtype == torch.int64 and out[1].dtype == torch.float32
    # Scores: the same float64 dot, over tokens normalised by another float32 reduction (an ulp).
    _assert_same(out, ref, atol=1e-6)


def test_ties_padding_and_empty_users():
    e = [127] + [0] * (D - 1)
    values = torch.tensor([e, [0, 127] + [0] * (D - 2), e, e], dtype=torch.int8)
    cand = torch.zeros(3, D)
    cand[:, 0] = 1.0
    pos, score = nn_search(values, torch.tensor([0, 4, 3]), torch.tensor([3, 0, 1]), torch.tensor([2, 0, 1]),
                           cand, 4, backend="triton")
    assert pos.tolist() == [[0, -1, -1, -1], [2, 0, 1, -1], [-1, -1, -1, -1]]
    assert score.tolist() == [[1.0, *[-np.inf] * 3], [1.0, 1.0, 0.0, -np.inf], [-np.inf] * 4]


def test_a_tie_across_many_tiles_picks_the_newest():
    values = torch.ones(100, D, dtype=torch.int8)
    values[7, 0] = 100  # one clear winner, then a 99-way tie over seven tiles
    cand = torch.zeros(17, D)  # two candidate blocks
    cand[:, 0] = 1.0
    args = (values, torch.tensor([0]), torch.tensor([100]), torch.zeros(17, dtype=torch.int64), cand, 5)
    assert nn_search(*args, backend="triton")[0].tolist() == [[7, 99, 98, 97, 96]] * 17


def test_distinct_tokens_match_brute_force():
    args = _batch([33, 0, 18], 20, seed=3, ties=False)
    _assert_same(nn_search(*args, 7, backend="triton"), _brute_force(*args, 7), atol=1e-6)
