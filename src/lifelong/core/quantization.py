"""Embedding quantization: int8 item embeddings (TransAct V2) and packed 4-bit DV365 exports.

**int8** (TransAct V2 §3.4, docs/design.md "Quantization"): a fixed affine code shared by all item
embeddings, ``q = clamp(round(e / 0.65 * 127), -127, 127)`` and ``e' = q * 0.65 / 127``.
Inside ``[-0.65, 0.65]`` the error is at most half a step, ``0.65 / 127 / 2``; values beyond
saturate to ``±0.65``. Works on numpy arrays and torch tensors alike (same results).

**4-bit** (DV365 export): each row (the last axis) gets its own affine code: ``offset`` is the
row minimum, ``scale = (max - min) / 15`` (stored float32, rounded up so that the maximum maps
to code 15 at most), ``code = round((x - offset) / scale)`` in ``0..15``, two codes per byte
(element ``2j`` in the low nibble of byte ``j``, ``2j + 1`` in the high one; an odd last element
gets a zero high nibble). Dequantization ``x' = offset + code * scale`` is within
``scale / 2`` of ``x`` in exact arithmetic; float rounding adds at most two float32 ulps of the
row's largest magnitude, and ``scale / 2 + 2 ulp(max |row|)`` is the bound the tests check.
A constant row has ``scale == 0`` and comes back exactly.

**int64 words** (the DV365 export record, :func:`to_words_4bit`): a row is ``ceil(d / 16)``
little-endian int64 words of codes, 16 nibbles per word (element ``16w + k`` in nibble ``k``
of word ``w``, the byte layout above padded to whole words), then one word holding the float32
scale (low half) and offset (high half): a 256-wide row is 17 words, as in the paper.

Size: ``ceil(d / 2)`` bytes plus 8 bytes (scale, offset) per row. A 200×256 fp32 user embedding
(204,800 bytes) becomes 200 × (128 + 8) = 27,200 bytes, **7.53× smaller**
(:func:`compression_ratio`). The DV365 paper reports 200×256 fp32 → 58×17 int64 words
(7,888 bytes, 26×; it says "~50×"): fewer than 4 bits per value, so the paper must also shrink
the embedding by means it does not describe; element-wise 4-bit codes cannot exceed 8×.

Example::

    >>> import numpy as np
    >>> e = np.array([0.0, 0.1, -0.65, 2.0], dtype=np.float32)
    >>> quantize_int8(e).tolist()
    [0, 20, -127, 127]
    >>> q = quantize_4bit(np.array([[0.0, 1.0, 3.0]], dtype=np.float32))
    >>> q.packed.tolist(), q.scale.tolist(), dequantize_4bit(q).tolist()
    ([[80, 15]], [0.20000000298023224], [[0.0, 1.0, 3.0]])
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import TypeVar

import numpy as np
import torch

INT8_SCALE = 0.65
"""TransAct V2's clipping range of item embedding values."""
INT8_LEVELS = 127
INT4_LEVELS = 15

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def _check_scale(scale: float) -> None:
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")


def quantize_int8(e: Array, scale: float = INT8_SCALE) -> Array:
    """Affine int8 code of embedding values: ``clamp(round(e / scale * 127), -127, 127)``.

    Computed in float32 (float64 inputs stay float64); rounding is half-to-even in numpy and
    torch alike, so both give the same codes. Infinite values saturate like any out-of-range one.

    Args:
        e: embedding values, a numpy array or a torch tensor of any shape.
        scale: the value mapped to code 127 (paper: 0.65).

    Returns:
        int8 codes of ``e``'s shape and kind (numpy in, numpy out; torch in, torch out).

    Raises:
        ValueError: on a NaN value or a non-positive scale.

    Example::

        >>> quantize_int8(torch.tensor([0.0026, -0.7])).tolist()
        [1, -127]
    """
    _check_scale(scale)
    if isinstance(e, torch.Tensor):
        x = e if e.dtype == torch.float64 else e.to(torch.float32)
        if torch.isnan(x).any():
            raise ValueError("cannot quantize NaN embedding values")
        return torch.clamp(torch.round(x / scale * INT8_LEVELS), -INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    x = np.asarray(e)
    x = x.astype(np.float64 if x.dtype == np.float64 else np.float32, copy=False)
    if np.isnan(x).any():
        raise ValueError("cannot quantize NaN embedding values")
    with np.errstate(over="ignore"):  # huge values overflow to inf and then saturate, as intended
        return np.clip(np.round(x / scale * INT8_LEVELS), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)


def _dtype_name(dtype: object) -> str:
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else np.dtype(dtype).name


def dequantize_int8(q: Array, scale: float = INT8_SCALE, dtype: object = "float32") -> Array:
    """Embedding values of int8 codes: ``q * scale / 127``.

    Args:
        q: integer codes (numpy or torch), as made by :func:`quantize_int8`.
        scale: the scale they were quantized with.
        dtype: output float type: a name (``"float32"``), a numpy dtype or a torch dtype.

    Returns:
        Values of ``q``'s shape and kind, in ``dtype``.

    Example::

        >>> dequantize_int8(np.array([127, -1], dtype=np.int8)).tolist()
        [0.6499999761581421, -0.005118110217154026]
    """
    _check_scale(scale)
    name = _dtype_name(dtype)
    if isinstance(q, torch.Tensor):
        if q.is_floating_point() or q.is_complex():
            raise ValueError(f"expected integer codes, got {q.dtype}")
        return q.to(getattr(torch, name)) * (scale / INT8_LEVELS)
    q = np.asarray(q)
    if not np.issubdtype(q.dtype, np.integer):
        raise ValueError(f"expected integer codes, got {q.dtype}")
    return q.astype(name) * (scale / INT8_LEVELS)


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit codes two per byte along the last axis.

    Args:
        codes: integers in ``0..15``, shape ``(..., d)``.

    Returns:
        uint8 of shape ``(..., ceil(d / 2))``: element ``2j`` in the low nibble of byte ``j``.

    Example::

        >>> pack_int4(np.array([1, 2, 15])).tolist()
        [33, 15]
    """
    codes = np.asarray(codes)
    if codes.ndim == 0 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"expected an integer array with a last axis, got {codes.dtype} {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() > INT4_LEVELS):
        raise ValueError("4-bit codes must lie in 0..15")
    codes = codes.astype(np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), dtype=np.uint8)], axis=-1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: np.ndarray, d: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: uint8 ``(..., ceil(d / 2))`` → uint8 codes ``(..., d)``.

    Example::

        >>> unpack_int4(np.array([33, 15], dtype=np.uint8), 3).tolist()
        [1, 2, 15]
    """
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim == 0 or packed.shape[-1] != (d + 1) // 2:
        raise ValueError(f"expected uint8 (..., {(d + 1) // 2}) for d={d}, got {packed.dtype} {packed.shape}")
    codes = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), dtype=np.uint8)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    return codes[..., :d]


@dataclass(frozen=True, eq=False)
class Quantized4bit:
    """Per-row affine 4-bit codes of an array ``(..., dim)``; see the module docstring.

    Args:
        packed: uint8 ``(..., ceil(dim / 2))``, two codes per byte.
        scale: float32 ``(...)``, each row's step between codes (0 for a constant row).
        offset: float32 ``(...)``, each row's minimum (the value of code 0).
        dim: length of the last axis before packing.

    Example::

        >>> q = quantize_4bit(np.ones((2, 3, 5), dtype=np.float32))
        >>> q.packed.shape, q.scale.shape, q.dim
        ((2, 3, 3), (2, 3), 5)
    """

    packed: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    dim: int


def quantize_4bit(x: np.ndarray) -> Quantized4bit:
    """Quantize each row (last axis) of ``x`` to 4 bits with its own offset and scale.

    Values are taken as float32, the export dtype; the codes are computed in float64 so that the
    rows' ranges cannot overflow and the error bound holds for the stored float32 scale.

    Args:
        x: float array ``(..., d)`` with ``d >= 1``, all values finite.

    Returns:
        :class:`Quantized4bit`; :func:`dequantize_4bit` is within ``scale / 2`` per element,
        plus float rounding (at most two float32 ulps of the row's largest magnitude).

    Raises:
        ValueError: on NaN or infinite values, or an empty last axis.

    Example::

        >>> q = quantize_4bit(np.array([[1.0, 2.0, 4.0]], dtype=np.float32))
        >>> unpack_int4(q.packed, q.dim).tolist(), q.offset.tolist()
        ([[0, 5, 15]], [1.0])
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"expected an array (..., d) with d >= 1, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("cannot quantize NaN or infinite values")
    offset = x.min(axis=-1)
    wide = x.astype(np.float64)
    step = (x.max(axis=-1).astype(np.float64) - offset) / INT4_LEVELS
    scale = step.astype(np.float32)
    # Rounding the stored step up keeps every code within 0..15, and a positive range from
    # underflowing to a zero scale.
    scale = np.where(scale < step, np.nextafter(scale, np.float32(np.inf)), scale)
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    codes = np.clip(np.rint((wide - offset[..., None]) / safe), 0, INT4_LEVELS).astype(np.uint8)
    return Quantized4bit(pack_int4(codes), scale, offset, x.shape[-1])


_DEQUANTIZE_CHUNK = 16_384


def dequantize_4bit(q: Quantized4bit) -> np.ndarray:
    """float32 values of :class:`Quantized4bit` codes: ``offset + code * scale`` per row.

    Example::

        >>> dequantize_4bit(quantize_4bit(np.array([[-2.0, -2.0]]))).tolist()
        [[-2.0, -2.0]]
    """
    codes = unpack_int4(q.packed, q.dim)
    rows = codes.reshape(-1, q.dim)
    offset, scale = q.offset.reshape(-1, 1).astype(np.float64), q.scale.reshape(-1, 1).astype(np.float64)
    out = np.empty(rows.shape, dtype=np.float32)
    # In chunks of ~16k values: the float64 temporaries stay in cache (3x faster on big batches).
    step = max(1, _DEQUANTIZE_CHUNK // q.dim)
    for lo in range(0, rows.shape[0], step):
        value = offset[lo:lo + step] + rows[lo:lo + step] * scale[lo:lo + step]
        # The rounded-up scale can put code 15 a hair above a row maximum of float32's largest value.
        out[lo:lo + step] = np.minimum(value, np.finfo(np.float32).max, out=value)
    return out.reshape(codes.shape)


WORD_NIBBLES = 16
"""4-bit codes per int64 word."""
_WORD = np.dtype("<i8")


def words_per_row_4bit(dim: int) -> int:
    """int64 words of one :func:`to_words_4bit` row of ``dim`` values: codes, then scale and offset.

    Example::

        >>> words_per_row_4bit(256), words_per_row_4bit(17)
        (17, 3)
    """
    return -(-dim // WORD_NIBBLES) + 1


def to_words_4bit(q: Quantized4bit) -> np.ndarray:
    """:class:`Quantized4bit` as int64 words ``(..., words_per_row_4bit(dim))``; see the module docstring.

    Example::

        >>> w = to_words_4bit(quantize_4bit(np.array([[0.0, 1.0, 3.0]], dtype=np.float32)))
        >>> w.shape, hex(w[0, 0]), from_words_4bit(w, 3).scale.tolist()
        ((1, 2), '0xf50', [0.20000000298023224])
    """
    rows = q.packed.shape[:-1]
    code_bytes = 8 * (words_per_row_4bit(q.dim) - 1)
    record = np.zeros(rows + (code_bytes + 8,), dtype=np.uint8)
    record[..., :q.packed.shape[-1]] = q.packed
    record[..., code_bytes:code_bytes + 4] = q.scale.astype("<f4")[..., None].view(np.uint8)
    record[..., code_bytes + 4:] = q.offset.astype("<f4")[..., None].view(np.uint8)
    return record.view(_WORD)


def from_words_4bit(words: np.ndarray, dim: int) -> Quantized4bit:
    """Inverse of :func:`to_words_4bit` (no copy of the codes: ``packed`` is a view of ``words``).

    Raises:
        ValueError: ``words`` is not an int64 array ``(..., words_per_row_4bit(dim))``.
    """
    words = np.asarray(words)
    if words.dtype.kind != "i" or words.dtype.itemsize != 8 or words.ndim == 0 \
            or words.shape[-1] != words_per_row_4bit(dim):
        raise ValueError(f"expected int64 (..., {words_per_row_4bit(dim)}) for dim={dim}, "
                         f"got {words.dtype} {words.shape}")
    record = np.ascontiguousarray(words, dtype=_WORD).view(np.uint8)
    code_bytes = record.shape[-1] - 8
    scale = record[..., code_bytes:code_bytes + 4].copy().view("<f4")[..., 0].astype(np.float32)
    offset = record[..., code_bytes + 4:].copy().view("<f4")[..., 0].astype(np.float32)
    return Quantized4bit(record[..., :(dim + 1) // 2], scale, offset, dim)


def compression_ratio(shape: tuple[int, ...]) -> float:
    """fp32 bytes of an array of ``shape`` over the bytes of its :class:`Quantized4bit`.

    Args:
        shape: the array's shape; the last axis is the quantized row.

    Example::

        >>> round(compression_ratio((200, 256)), 2)
        7.53
    """
    *rows, d = shape
    return 4 * prod(shape) / (prod(rows) * ((d + 1) // 2 + 8))
