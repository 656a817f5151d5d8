"""The DV365 export record: 4-bit codes as int64 words, 16 nibbles a word, then scale and offset."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from lifelong.core.quantization import (
    dequantize_4bit,
    from_words_4bit,
    quantize_4bit,
    to_words_4bit,
    unpack_int4,
    words_per_row_4bit,
)

values = st.floats(-1e6, 1e6, width=32, allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(arrays(np.float32, array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40), elements=values))
def test_words_round_trip_within_the_4bit_bound(x):
    q = quantize_4bit(x)
    words = to_words_4bit(q)
    d = x.shape[-1]
    assert words.dtype == np.dtype("<i8") and words.shape == x.shape[:-1] + (-(-d // 16) + 1,)
    back = from_words_4bit(words, d)
    assert np.array_equal(back.packed, q.packed) and np.array_equal(back.scale, q.scale)
    assert np.array_equal(back.offset, q.offset) and back.dim == d
    # The bound of lifelong.core.quantization: half a step plus two float32 ulps of the row's magnitude.
    bound = q.scale.astype(np.float64)[..., None] / 2 + 2 * np.spacing(np.abs(x).max(axis=-1, keepdims=True))
    assert np.all(np.abs(dequantize_4bit(back).astype(np.float64) - x) <= bound)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 70), st.integers(0, 2**32 - 1))
def test_word_layout_is_16_nibbles_a_word_then_scale_and_offset(d, seed):
    x = np.random.default_rng(seed).standard_normal((2, d)).astype(np.float32)
    q = quantize_4bit(x)
    words = to_words_4bit(q)
    codes = unpack_int4(q.packed, d)
    n_code_words = words_per_row_4bit(d) - 1
    for w in range(n_code_words):
        nibbles = (words[:, w, None].view(np.uint64) >> (4 * np.arange(16, dtype=np.uint64))) & np.uint64(15)
        want = np.zeros((2, 16), dtype=np.uint64)
        part = codes[:, 16 * w:16 * (w + 1)]
        want[:, :part.shape[1]] = part
        assert np.array_equal(nibbles, want)  # element 16w + k in nibble k; padding nibbles are 0
    last = words[:, -1:].view(np.uint8).reshape(2, 8)
    assert np.array_equal(last[:, :4].copy().view("<f4")[:, 0], q.scale)
    assert np.array_equal(last[:, 4:].copy().view("<f4")[:, 0], q.offset)


def test_words_per_row_and_paper_shape():
    assert [words_per_row_4bit(d) for d in (1, 16, 17, 32, 256)] == [2, 2, 3, 3, 17]
    x = np.random.default_rng(0).standard_normal((200, 256)).astype(np.float32)
    assert to_words_4bit(quantize_4bit(x)).shape == (200, 17)  # the paper's 17 words a row


def test_from_words_rejects_wrong_shapes_and_types():
    words = to_words_4bit(quantize_4bit(np.ones((2, 20), dtype=np.float32)))
    for bad, dim in ((words, 33), (words.astype(np.float64), 20), (words[0, 0], 20), (words.view(np.int32), 20)):
        with pytest.raises(ValueError, match="expected int64"):
            from_words_4bit(bad, dim)
    assert from_words_4bit(words.view(np.uint64).view(np.int64), 20).dim == 20
