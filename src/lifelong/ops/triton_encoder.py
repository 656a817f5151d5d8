"""SKUT: a whole post-norm transformer encoder layer in one Triton kernel (TransAct V2 §3.4.2).

One program computes ``BLOCK_M`` query positions of one row (tile sizes: :data:`TILES`):

1. ``q = x W_q^T + b_q`` for its queries;
2. causal + padding masked attention, tile by tile over ``BLOCK_N`` keys with an online
   softmax: each key tile's ``k`` and ``v`` are projected from ``x`` in registers, so no Q/K/V
   (or score) tensor of the sequence is ever written to memory;
3. the output projection, residual and ``norm1``; the ReLU feed-forward, residual and ``norm2``;
4. one store of the layer's output.

Rows are packed: the real tokens of row ``n`` are its first ``lengths[n]`` positions (as the
``cpu`` encoder packs them, :mod:`lifelong.transact.fused_encoder`), so "key ``j`` may be seen by query
``i``" is ``j <= i and j < length``, the model's causal + padding mask for every real token.
Outputs at padding positions are zeros. Heads are unrolled inside the kernel (TransAct V2 uses
one: d_model 64, FFN 32); the 2-layer encoder is two launches.

fp32 inputs are multiplied as three TF32 products (``tf32x3``, about fp32's accuracy, not
single-pass TF32); fp16 inputs feed fp16 ``tl.dot`` with fp32 accumulation on a GPU, and are
upcast to fp32 in the interpreter. Softmax, layer norms and residuals accumulate in fp32
either way; the output has the input's dtype.

The ``triton`` implementation of the ``transact_encode`` op builds the first layer's packed
input from the token table, runs :func:`skut_encode`, and scatters back to the rows' slots.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from lifelong.core.errors import ConfigError
from lifelong.modules.layers import EncoderLayer
from lifelong.ops.dispatch import interpreting

TILES: dict[torch.dtype, tuple[int, int, int]] = {torch.float16: (64, 32, 8), torch.float32: (32, 32, 8)}
"""(query positions per program, key positions per attention tile, warps) per dtype, read when a
layer runs. Chosen without a GPU, as the largest tiles whose sm_90 build (``triton.compile``
ahead of time) spills no or few registers; tests set smaller tiles for the interpreter."""


@triton.jit
def _mm(a, b, FP16: tl.constexpr):
    """``a @ b`` accumulated in fp32: fp16 operands on fp16 tensor cores, else fp32 ones as three
    TF32 products (``tf32x3``: about fp32's accuracy; plain IEEE fp32 spills registers here)."""
    if FP16:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")


@triton.jit
def _layer_norm(x, w_ptr, b_ptr, eps, D: tl.constexpr):
    col = tl.arange(0, D)
    mean = tl.sum(x, axis=1) / D
    xc = x - mean[:, None]
    var = tl.sum(xc * xc, axis=1) / D
    w = tl.load(w_ptr + col).to(tl.float32)
    b = tl.load(b_ptr + col).to(tl.float32)
    return xc * tl.rsqrt(var + eps)[:, None] * w[None, :] + b[None, :]


@triton.jit
def _skut_layer_kernel(x_ptr, out_ptr, lengths_ptr, w_in_ptr, b_in_ptr, w_out_ptr, b_out_ptr,
                       w1_ptr, b1_ptr, w2_ptr, b2_ptr, n1_w_ptr, n1_b_ptr, n2_w_ptr, n2_b_ptr,
                       S, eps1, eps2, sm_scale,
                       D: tl.constexpr, H: tl.constexpr, FFN: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP16: tl.constexpr):
    DH: tl.constexpr = D // H
    row = tl.program_id(1)
    m0 = tl.program_id(0) * BLOCK_M
    length = tl.load(lengths_ptr + row)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    col = tl.arange(0, D)
    head_col = tl.arange(0, DH)
    base = row * S * D
    out_at = out_ptr + base + offs_m[:, None] * D + col[None, :]
    in_seq = (offs_m < S)[:, None]
    if m0 < length:
        x_q = tl.load(x_ptr + base + offs_m[:, None] * D + col[None, :], mask=in_seq, other=0.0)
        attn = tl.zeros((BLOCK_M, D), tl.float32)
        hi = tl.minimum(m0 + BLOCK_M, length)  # causal: no key after the block's last query
        for h in tl.static_range(H):
            # W^T tiles (D, DH) of this head's rows of in_proj, and (DH, D) of out_proj's columns.
            w_q = tl.load(w_in_ptr + (h * DH + head_col)[None, :] * D + col[:, None])
            w_k = tl.load(w_in_ptr + (D + h * DH + head_col)[None, :] * D + col[:, None])
            w_v = tl.load(w_in_ptr + (2 * D + h * DH + head_col)[None, :] * D + col[:, None])
            b_q = tl.load(b_in_ptr + h * DH + head_col).to(tl.float32)
            b_k = tl.load(b_in_ptr + D + h * DH + head_col).to(tl.float32)
            b_v = tl.load(b_in_ptr + 2 * D + h * DH + head_col).to(tl.float32)
            q = (_mm(x_q, w_q, FP16) + b_q[None, :]) * sm_scale
            m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK_M,), tl.float32)
            acc = tl.zeros((BLOCK_M, DH), tl.float32)
            for n0 in range(0, hi, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                x_k = tl.load(x_ptr + base + offs_n[:, None] * D + col[None, :],
                              mask=(offs_n < length)[:, None], other=0.0)
                k = _mm(x_k, w_k, FP16) + b_k[None, :]
                v = _mm(x_k, w_v, FP16) + b_v[None, :]
                s = _mm(q, tl.trans(k), FP16)
                # Key 0 is real and precedes every query, so each row has a finite max from tile one.
                allowed = (offs_n[None, :] <= offs_m[:, None]) & (offs_n < length)[None, :]
                s = tl.where(allowed, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + _mm(p, v, FP16)
                m_i = m_new
            w_o = tl.load(w_out_ptr + col[None, :] * D + (h * DH + head_col)[:, None])
            attn += _mm(acc / l_i[:, None], w_o, FP16)
        b_o = tl.load(b_out_ptr + col).to(tl.float32)
        y = _layer_norm(x_q.to(tl.float32) + attn + b_o[None, :], n1_w_ptr, n1_b_ptr, eps1, D)
        ffn_col = tl.arange(0, FFN)
        w_1 = tl.load(w1_ptr + ffn_col[None, :] * D + col[:, None])  # (D, FFN) = linear1.weight^T
        b_1 = tl.load(b1_ptr + ffn_col).to(tl.float32)
        w_2 = tl.load(w2_ptr + col[None, :] * FFN + ffn_col[:, None])  # (FFN, D) = linear2.weight^T
        b_2 = tl.load(b2_ptr + col).to(tl.float32)
        hidden = tl.maximum(_mm(y, w_1, FP16) + b_1[None, :], 0.0)
        z = _layer_norm(y + _mm(hidden, w_2, FP16) + b_2[None, :], n2_w_ptr, n2_b_ptr, eps2, D)
        z = tl.where((offs_m < length)[:, None], z, 0.0)
        tl.store(out_at, z.to(out_ptr.dtype.element_ty), mask=in_seq)
    else:
        tl.store(out_at, tl.zeros((BLOCK_M, D), out_ptr.dtype.element_ty), mask=in_seq)


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def check_supported(layer: EncoderLayer) -> None:
    """Raise :class:`~lifelong.core.errors.ConfigError` unless SKUT can run ``layer``.

    The kernel is the post-norm, ReLU :class:`~lifelong.modules.layers.EncoderLayer`, and it
    tiles d_model, the head width and the FFN width whole: each must be a power of two of at
    least 16 (``tl.dot``'s smallest tile).
    """
    if type(layer) is not EncoderLayer:
        raise ConfigError(f"the triton encoder runs post-norm EncoderLayers, got {type(layer).__name__}")
    d, heads = layer.norm1.normalized_shape[0], layer.self_attn.n_heads
    ffn = layer.linear1.out_features
    widths = {"d_model": d, "head width": d // heads, "ffn_dim": ffn}
    bad = [f"{name} {w}" for name, w in widths.items() if w < 16 or not _is_pow2(w)]
    if bad or d % heads:
        raise ConfigError(f"the triton encoder needs d_model, head width and ffn_dim powers of two >= 16; "
                          f"got {', '.join(bad) or f'{heads} heads for d_model {d}'}")


_WEIGHTS: weakref.WeakKeyDictionary[EncoderLayer, tuple[tuple, list[torch.Tensor]]] = weakref.WeakKeyDictionary()


def kernel_weights(layer: EncoderLayer, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """The layer's 12 parameters in the kernel's order, on ``device`` in ``dtype``, contiguous.

    A model served from the CPU (or in fp32 under fp16 inputs) would otherwise copy its
    weights to the GPU on every call. The copies are kept per layer, and made again only when
    a parameter is replaced or changed in place (its storage or version counter moves), so a
    model that is trained or loaded anew is never scored with stale weights.
    """
    attn = layer.self_attn
    params = (attn.in_proj.weight, attn.in_proj.bias, attn.out_proj.weight, attn.out_proj.bias,
              layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias,
              layer.norm1.weight, layer.norm1.bias, layer.norm2.weight, layer.norm2.bias)
    key = (torch.device(device), dtype, tuple((p.data_ptr(), p._version) for p in params))
    cached = _WEIGHTS.get(layer)
    if cached is None or cached[0] != key:
        cached = (key, [p.detach().to(device, dtype).contiguous() for p in params])
        _WEIGHTS[layer] = cached
    return cached[1]


def skut_layer(x: torch.Tensor, lengths: torch.Tensor, layer: EncoderLayer) -> torch.Tensor:
    """One encoder layer over packed rows, in one kernel launch.

    Args:
        x: ``(N, S, d)`` fp32 or fp16 layer input, each row's real tokens first.
        lengths: ``(N,)`` real tokens per row (0 allowed).
        layer: the post-norm :class:`~lifelong.modules.layers.EncoderLayer` (eval: no dropout);
            its parameters are used in ``x``'s dtype, on ``x``'s device (copied if need be).

    Returns:
        ``(N, S, d)`` in ``x``'s dtype: ``layer(x)`` under the causal + padding mask at real
        positions, zeros at padding ones.

    Example::

        out = skut_layer(x.half().cuda(), lengths.cuda(), layer)
    """
    check_supported(layer)
    x = x.contiguous()
    n, s, d = x.shape
    out = torch.empty_like(x)
    if n == 0 or s == 0:
        return out
    attn = layer.self_attn
    weights = kernel_weights(layer, x.device, x.dtype)
    block_m, block_n, warps = TILES[x.dtype]
    _skut_layer_kernel[(triton.cdiv(s, block_m), n)](
        x, out, lengths.to(x.device).contiguous(), *weights,
        s, layer.norm1.eps, layer.norm2.eps, (d // attn.n_heads) ** -0.5,
        D=d, H=attn.n_heads, FFN=layer.linear1.out_features, BLOCK_M=block_m, BLOCK_N=block_n,
        FP16=x.dtype == torch.float16 and not interpreting(), num_warps=warps)
    return out


def skut_encode(x: torch.Tensor, lengths: torch.Tensor,
                layers: torch.nn.ModuleList | list[EncoderLayer]) -> torch.Tensor:
    """An encoder stack over packed rows: one :func:`skut_layer` launch per layer.

    Example::

        h = skut_encode(x, lengths, model.encoder.layers)  # TransAct V2: two launches
    """
    for layer in layers:
        x = skut_layer(x, lengths, layer)
    return x
