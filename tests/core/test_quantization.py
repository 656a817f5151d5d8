"""int8 and packed 4-bit quantization: round-trip bounds, packing, numpy/torch agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from lifelong.core.quantization import (
    INT8_SCALE,
    Quantized4bit,
    compression_ratio,
    dequantize_4bit,
    dequantize_int8,
    pack_int4,
    quantize_4bit,
    quantize_int8,
    unpack_int4,
)

FLOAT32_MAX = float(np.finfo(np.float32).max)
# Half an int8 step, plus 2^-22 (4 float32 ulps of 0.65) for the float32 arithmetic.
INT8_BOUND = INT8_SCALE / 127 / 2 + 2.0**-22

float32s = st.floats(width=32, allow_nan=False, allow_infinity=False)
near_range = st.floats(-1.0, 1.0, width=32)


@settings(max_examples=100, deadline=None)
@given(arrays(np.float32, array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=8),
              elements=st.one_of(near_range, st.floats(width=32, allow_nan=False))))
def test_int8_round_trip_bound_saturation_and_torch_agreement(x):
    q = quantize_int8(x)
    assert q.dtype == np.int8 and q.shape == x.shape
    e = dequantize_int8(q)
    assert e.dtype == np.float32
    inside = np.abs(x) <= INT8_SCALE
    assert np.all(np.abs(x[inside].astype(np.float64) - e[inside]) <= INT8_BOUND)
    assert np.all(q[~inside] == np.sign(x[~inside]) * 127)
    assert np.all(np.abs(q.astype(np.int16)) <= 127)
    tq = quantize_int8(torch.from_numpy(x))
    assert tq.dtype == torch.int8 and np.array_equal(tq.numpy(), q)
    assert np.array_equal(dequantize_int8(tq).numpy(), e)
    wide = x.astype(np.float64)
    assert np.array_equal(quantize_int8(torch.from_numpy(wide)).numpy(), quantize_int8(wide))


def test_int8_known_values_and_dtypes():
    x = np.array([0.0, 0.65, -0.65, 1e30, -np.inf, 0.65 / 254 * 1.01], dtype=np.float32)
    assert quantize_int8(x).tolist() == [0, 127, -127, 127, -127, 1]
    q = np.array([127, -127, 0], dtype=np.int8)
    assert dequantize_int8(q, dtype="float16").dtype == np.float16
    assert dequantize_int8(torch.from_numpy(q), dtype=torch.float16).dtype == torch.float16
    assert dequantize_int8(torch.from_numpy(q), dtype=np.float64).dtype == torch.float64
    assert np.allclose(dequantize_int8(q, scale=1.0), [1.0, -1.0, 0.0])


def test_int8_rejects_nan_bad_scale_and_float_codes():
    for bad in (np.array([0.1, np.nan], dtype=np.float32), torch.tensor([np.nan])):
        with pytest.raises(ValueError, match="NaN"):
            quantize_int8(bad)
    with pytest.raises(ValueError):
        quantize_int8(np.zeros(2), scale=0.0)
    with pytest.raises(ValueError):
        dequantize_int8(np.zeros(2, dtype=np.float32))
    with pytest.raises(ValueError):
        dequantize_int8(torch.zeros(2))


@st.composite
def rows(draw):
    """Arrays (..., d) with odd and even d, extreme values, and some rows made constant."""
    x = draw(arrays(np.float32, array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9),
                    elements=st.one_of(near_range, float32s)))
    flat = x.reshape(-1, x.shape[-1])
    constant = np.array(draw(st.lists(st.booleans(), min_size=len(flat), max_size=len(flat))), dtype=bool)
    flat[constant] = flat[constant][:, :1]
    return x


def ulp32(v: np.ndarray) -> np.ndarray:
    """float32 ulp at |v| (np.spacing overflows at float32's largest value)."""
    _, exponent = np.frexp(np.abs(v).astype(np.float64))
    return np.where(v == 0, 2.0**-149, np.maximum(np.ldexp(1.0, exponent - 24), 2.0**-149))


@settings(max_examples=150, deadline=None)
@given(rows())
def test_4bit_round_trip_bound(x):
    q = quantize_4bit(x)
    d = x.shape[-1]
    assert q.dim == d and q.packed.dtype == np.uint8 and q.packed.shape == x.shape[:-1] + ((d + 1) // 2,)
    assert q.scale.dtype == q.offset.dtype == np.float32 and q.scale.shape == x.shape[:-1]
    back = dequantize_4bit(q)
    assert back.dtype == np.float32 and back.shape == x.shape and np.isfinite(back).all()
    # Tested bound: half the stored step, plus 2 float32 ulps of the row's largest magnitude.
    bound = q.scale.astype(np.float64) / 2 + 2 * ulp32(np.abs(x).max(axis=-1))
    err = np.abs(x.astype(np.float64) - back.astype(np.float64))
    assert np.all(err <= bound[..., None])
    constant = x.min(axis=-1) == x.max(axis=-1)
    assert np.all(q.scale[constant] == 0) and np.all(q.scale[~constant] > 0)
    assert np.array_equal(back[constant], x[constant])


def test_4bit_known_row_extremes_and_empty_batch():
    q = quantize_4bit(np.array([[-FLOAT32_MAX, 0.0, FLOAT32_MAX]], dtype=np.float32))
    assert unpack_int4(q.packed, 3).tolist() == [[0, 8, 15]]  # 7.5 rounds half-to-even
    assert np.isfinite(dequantize_4bit(q)).all()
    # Here offset + 15 * (rounded-up scale) lies past float32's largest value.
    top = np.array([[-2.1674681e38, FLOAT32_MAX]], dtype=np.float32)
    assert dequantize_4bit(quantize_4bit(top))[0, 1] == FLOAT32_MAX
    tiny = np.array([[0.0, 7e-45]], dtype=np.float32)  # a subnormal range must not become scale 0
    assert quantize_4bit(tiny).scale[0] > 0 and np.array_equal(dequantize_4bit(quantize_4bit(tiny)), tiny)
    empty = quantize_4bit(np.zeros((0, 5), dtype=np.float32))
    assert empty.packed.shape == (0, 3) and dequantize_4bit(empty).shape == (0, 5)


def test_4bit_rejects_non_finite_and_empty_rows():
    for bad in (np.array([[0.0, np.nan]]), np.array([[np.inf, 0.0]])):
        with pytest.raises(ValueError, match="NaN or infinite"):
            quantize_4bit(bad)
    for shape in ((), (3, 0)):
        with pytest.raises(ValueError):
            quantize_4bit(np.zeros(shape))


@settings(max_examples=100, deadline=None)
@given(arrays(np.int64, array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=9), elements=st.integers(0, 15)))
def test_pack_unpack_inverse(codes):
    d = codes.shape[-1]
    packed = pack_int4(codes)
    assert packed.dtype == np.uint8 and packed.shape == codes.shape[:-1] + ((d + 1) // 2,)
    assert np.array_equal(unpack_int4(packed, d), codes)
    assert np.array_equal(pack_int4(unpack_int4(packed, d)), packed)


def test_pack_layout_and_validation():
    assert pack_int4(np.array([1, 2, 3])).tolist() == [0x21, 0x03]  # even index in the low nibble
    for bad in (np.array([16]), np.array([-1]), np.array([0.5]), np.array(3)):
        with pytest.raises(ValueError):
            pack_int4(bad)
    with pytest.raises(ValueError):
        unpack_int4(np.zeros(2, dtype=np.uint8), 5)
    with pytest.raises(ValueError):
        unpack_int4(np.zeros(2, dtype=np.int64), 4)


def test_compression_ratio_matches_stored_bytes():
    x = np.random.default_rng(0).standard_normal((200, 256)).astype(np.float32)
    q = quantize_4bit(x)
    stored = q.packed.nbytes + q.scale.nbytes + q.offset.nbytes
    assert stored == 27_200 and compression_ratio((200, 256)) == pytest.approx(x.nbytes / stored)
    assert compression_ratio((200, 256)) == pytest.approx(7.529, abs=1e-3)
    assert compression_ratio((4, 7)) == pytest.approx(4 * 7 / (4 + 8))
    assert isinstance(q, Quantized4bit)
