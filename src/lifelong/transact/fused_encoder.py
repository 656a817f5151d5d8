"""The ``transact_encode`` op: TransAct's encoder over a de-duplicated token table, per backend.

:meth:`TransAct.encode_token_table <lifelong.transact.model.TransAct.encode_token_table>` is
the entry point; it checks shapes and dispatches here through :mod:`lifelong.ops.dispatch`
(``reference``, ``cpu``, ``triton``). Each implementation runs the model's own modules and
reads their parameters as they are at the call: nothing is snapshotted, so after an in-place
update (an optimizer step, a parameter sync) the next call scores with the new weights.

A serving batch holds each distinct token once — its dequantized (not normalised) item
embedding ``tok_emb``, action mask ``tok_action`` and surface ``tok_surface`` — and each row
(candidate) points at its tokens with ``tok_index`` ``(N, S')`` (-1 = padding), for the blocks
the model reads (``S' = model.cfg.seq_len``). The result equals :meth:`TransAct.encode
<lifelong.transact.model.TransAct.encode>` on the gathered :class:`~lifelong.transact.batch.RankBatch`
(padding tokens: embedding 0, action 0, surface 0, invalid — as ``RankData`` builds them).

Why the first layer fuses (``cpu``): its input is ``x = concat(e_j, e_c) + ctx_j + pos_s``
(``ctx_j`` = action + surface embedding) and, the layers being post-norm, the first thing
applied to ``x`` is the linear ``in_proj``. So ``W x + b = W·(concat(e_j, 0) + ctx_j) +
W_cand·e_c + (W·pos_s + b)``: a ``(T, 3d)`` table per distinct token, a ``(N, 3d)`` one per
candidate and a ``(S', 3d)`` one per model, gathered and added — the ``(N·S', d) × (d, 3d)``
projection and the ``(N, S', d)`` concatenation never happen. Without early fusion the
candidate term drops out. The remaining layers run as in the model. The per-model parts
(:func:`first_layer_parts`) are views of the live weights plus one ``(S', d) × (d, 3d)``
product, recomputed every call.

With user tokens (``TransActConfig.user_tokens``) every implementation takes ``user_emb``
``(U, R, C)`` (one per distinct user) and ``user_index`` ``(N,)`` and prepends the R user tokens
as :meth:`TransAct.encode <lifelong.transact.model.TransAct.encode>` does; outputs and validity
are then ``(N, R + S', ...)``. The user tokens see only each other, so their input and their
first-layer q, k, v are computed once per user (``cpu``); over packed rows the mask is the same
for every row (causal, the R × R corner open), one ``(R + W, R + W)`` bias. SKUT knows only the
causal mask, so ``triton`` runs the ``cpu`` implementation for such a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lifelong.data.schema import EMBED_DIM
from lifelong.modules.layers import EncoderLayer, attention_bias, causal_attention_mask
from lifelong.ops.dispatch import kernel_device, register
from lifelong.ops.token_table import append_padding, gather_tokens, pack_rows, unpack_rows

if TYPE_CHECKING:
    from lifelong.transact.model import TransAct


def first_layer_parts(model: TransAct) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first layer's q, k, v weights arranged for the fused parts, from the live parameters.

    Returns:
        ``w_tok`` ``(3, d, d)`` (q, k, v weights transposed to multiply rows), ``w_cand``
        ``(3, 32, d)`` (their columns that see the candidate under early fusion) and
        ``pos_qkv`` ``(3, S', d)`` (q, k, v of each position embedding, bias included).

    Raises:
        TypeError: the encoder's first layer is not the post-norm
            :class:`~lifelong.modules.layers.EncoderLayer` the fusion relies on.
    """
    first = model.encoder.layers[0]
    if type(first) is not EncoderLayer:
        raise TypeError(f"the fused first layer needs a post-norm EncoderLayer, got {type(first)}")
    d = model.cfg.d_model
    attn = first.self_attn
    w = attn.in_proj.weight.view(3, d, d)
    pos_qkv = F.linear(model.token_context.position, attn.in_proj.weight, attn.in_proj.bias)
    return (w.transpose(1, 2).contiguous(), w[:, :, EMBED_DIM:].transpose(1, 2).contiguous(),
            pos_qkv.view(-1, 3, d).transpose(0, 1).contiguous())


@register("transact_encode", "reference")
def _encode_reference(model: TransAct, tok_emb: torch.Tensor, tok_action: torch.Tensor,
                      tok_surface: torch.Tensor, tok_index: torch.Tensor,
                      cand_emb: torch.Tensor, user_emb: torch.Tensor | None = None,
                      user_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather RankBatch-style tensors, then exactly ``TransAct.encode``'s math on the blocks read."""
    emb, action, surface, valid = gather_tokens(tok_emb, tok_action, tok_surface, tok_index)
    x = model.embed_tokens(emb, action, surface, cand_emb)
    if user_emb is None:
        return model.encoder(x, causal_attention_mask(valid)), valid
    x, allowed, valid = model.prepend_user_tokens(x, valid, user_emb.index_select(0, user_index))
    return model.encoder(x, allowed), valid


@register("transact_encode", "cpu")
def _encode_cpu(model: TransAct, tok_emb: torch.Tensor, tok_action: torch.Tensor,
                tok_surface: torch.Tensor, tok_index: torch.Tensor,
                cand_emb: torch.Tensor, user_emb: torch.Tensor | None = None,
                user_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """First layer from per-token, per-candidate and per-position parts; attention over packed rows.

    Each row's real tokens are packed to its front, in their order. Causal attention over the
    packed positions is then exactly the model's causal + padding mask for every real token
    (the keys before it are the real tokens before it), so the attention kernel runs with
    ``is_causal`` and no (N, S, S) mask is built; rows are cut to the longest real length.
    Outputs at padding positions are zeros (the reference's are meaningless too). User tokens
    go in front of the packed rows, under one shared mask (module docstring).
    """
    ctx = model.token_context
    first = model.encoder.layers[0]
    w_tok, w_cand, pos_qkv = first_layer_parts(model)
    n, s = tok_index.shape
    d = model.cfg.d_model
    emb, action, surface, index = append_padding(tok_emb, tok_action, tok_surface, tok_index)
    valid, lengths, slot = pack_rows(tok_index)
    width = slot.shape[1]
    flat = index.gather(1, slot).reshape(-1)

    def gather(table: torch.Tensor) -> torch.Tensor:
        return table.index_select(0, flat).view(n, width, table.shape[-1])

    # Each distinct token's part of the layer input (zero over the candidate's half) and its
    # q, k, v projections, computed once however many rows read it.
    tok_x = F.pad(emb, (0, d - EMBED_DIM)) + ctx.action(action) + ctx.surface(surface)
    tok_qkv = torch.matmul(tok_x, w_tok)  # (3, T + 1, d)
    # Where no row has padding before a real token (full blocks, as with long histories) every
    # row's packed positions are 0..W-1: the position parts broadcast instead of being gathered.
    in_order = bool((slot == torch.arange(width)).all())

    def at_slots(table: torch.Tensor) -> torch.Tensor:
        return table[:width] if in_order else table[slot]

    x = gather(tok_x).add_(at_slots(ctx.position))
    qkv = [gather(tok_qkv[i]).add_(at_slots(pos_qkv[i])) for i in range(3)]
    if model.cfg.early_fusion:
        cand_qkv = torch.matmul(cand_emb, w_cand).unsqueeze(2)  # (3, N, 1, d)
        x.add_(F.pad(cand_emb, (EMBED_DIM, 0)).unsqueeze(1))
        for part, c in zip(qkv, cand_qkv):
            part.add_(c)
    if model.cfg.token_similarity:
        # The similarity term is a scalar per (row, token) times one vector: its q, k, v are
        # that scalar times the vector's projections, computed once.
        sim = model.token_similarity(gather(emb), cand_emb).unsqueeze(-1)  # (N, W, 1)
        x.add_(sim * model.similarity)
        for part, w in zip(qkv, torch.matmul(model.similarity, w_tok)):
            part.add_(sim * w)

    r, bias = 0, None
    if user_emb is not None:
        # The user tokens' input and first-layer q, k, v: once per distinct user, then gathered.
        r = model.n_user_tokens
        user_x = model.user_token_input(user_emb)  # (U, R, d)
        user_qkv = F.linear(user_x, first.self_attn.in_proj.weight, first.self_attn.in_proj.bias).view(-1, r, 3, d)
        x = torch.cat([user_x.index_select(0, user_index), x], dim=1)
        qkv = [torch.cat([user_qkv[:, :, i].index_select(0, user_index), part], dim=1) for i, part in enumerate(qkv)]
        allowed = torch.ones(r + width, r + width, dtype=torch.bool).tril_()
        allowed[:r, :r] = True
        bias = attention_bias(allowed, x.dtype)
    heads = first.self_attn.n_heads
    q, k, v = (t.view(n, r + width, heads, d // heads).transpose(1, 2) for t in qkv)
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None)
    x = first.norm1(x + first.self_attn.out_proj(attn.transpose(1, 2).reshape(n, r + width, d)))
    x = first.norm2(x + first.linear2(F.relu(first.linear1(x))))
    for layer in model.encoder.layers[1:]:
        x = layer(x, bias, is_causal=bias is None)
    packed_valid = torch.arange(width) < lengths.unsqueeze(1)
    h = unpack_rows(x[:, r:] * packed_valid.unsqueeze(-1), slot, s)
    if user_emb is None:
        return h, valid
    return torch.cat([x[:, :r], h], dim=1), torch.cat([valid.new_ones(n, r), valid], dim=1)


@register("transact_encode", "triton")
def _encode_triton(model: TransAct, tok_emb: torch.Tensor, tok_action: torch.Tensor,
                   tok_surface: torch.Tensor, tok_index: torch.Tensor,
                   cand_emb: torch.Tensor, user_emb: torch.Tensor | None = None,
                   user_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed first-layer input from the token table, then :func:`skut_encode` (fp32).

    The kernels run where :func:`~lifelong.ops.dispatch.kernel_device` says; a model kept on
    the CPU has its (small, ~25k parameters for V2) encoder weights copied there per call, and
    the result comes back to ``tok_emb``'s device. With user tokens: the ``cpu`` implementation
    (SKUT has no user-token mask).
    """
    if user_emb is not None:
        return _encode_cpu(model, tok_emb, tok_action, tok_surface, tok_index, cand_emb, user_emb, user_index)
    from lifelong.ops.triton_encoder import check_supported, skut_encode  # imports triton: only when asked for

    ctx = model.token_context
    for layer in model.encoder.layers:
        check_supported(layer)
    device = kernel_device()
    s = tok_index.shape[1]
    d = model.cfg.d_model
    emb, action, surface, index = append_padding(tok_emb, tok_action, tok_surface, tok_index)
    valid, lengths, slot = pack_rows(tok_index)
    tok_x = F.pad(emb, (0, d - EMBED_DIM)) + ctx.action(action) + ctx.surface(surface)
    packed = index.gather(1, slot)
    x = tok_x[packed] + ctx.position[slot]
    if model.cfg.early_fusion:
        x += F.pad(cand_emb, (EMBED_DIM, 0)).unsqueeze(1)
    if model.cfg.token_similarity:
        x += model.token_similarity(emb[packed], cand_emb).unsqueeze(-1) * model.similarity
    h = skut_encode(x.to(device), lengths.to(device), model.encoder.layers)
    return unpack_rows(h.to(tok_emb.device), slot, s), valid
