"""TransAct's encoder over a de-duplicated token table, with a fused first layer.

A serving batch holds each distinct token once — its dequantized (not normalised) item
embedding ``tok_emb``, action mask ``tok_action`` and surface ``tok_surface`` — and each row
(candidate) points at its tokens with ``tok_index`` ``(N, S')`` (-1 = padding), for the blocks
the model reads (``S' = model.cfg.seq_len``). The result equals :meth:`TransAct.encode
<lifelong.models.transact.TransAct.encode>` on the gathered :class:`~lifelong.models.batch.RankBatch`
(padding tokens: embedding 0, action 0, surface 0, invalid — as ``RankData`` builds them).

Why the first layer fuses: its input is ``x = concat(e_j, e_c) + ctx_j + pos_s`` (``ctx_j`` =
action + surface embedding) and, the layers being post-norm, the first thing applied to ``x``
is the linear ``in_proj``. So ``W x + b = W·(concat(e_j, 0) + ctx_j) + W_cand·e_c + (W·pos_s + b)``:
a ``(T, 3d)`` table per distinct token, a ``(N, 3d)`` one per candidate and a ``(S', 3d)`` one
per model, gathered and added — the ``(N·S', d) × (d, 3d)`` projection and the ``(N, S', d)``
concatenation never happen. Without early fusion the candidate term drops out. The remaining
layers run as in the model.

The per-model constants (the first layer's q/k/v weights, arranged for the parts, and the
position projections) live in a :class:`FusedTransActEncoder` built once per model version
(e.g. at server start, and again after a parameter sync).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lifelong.data.schema import EMBED_DIM
from lifelong.models.layers import EncoderLayer, causal_attention_mask
from lifelong.models.transact import TransAct
from lifelong.ops.dispatch import implementation, register


def _append_padding(tok_emb: torch.Tensor, tok_action: torch.Tensor, tok_surface: torch.Tensor,
                    tok_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The table with a padding token (embedding 0, action 0, surface 0) at row T, and indices onto it."""
    t = tok_emb.shape[0]
    return (torch.cat([tok_emb, tok_emb.new_zeros(1, tok_emb.shape[1])]),
            torch.cat([tok_action, tok_action.new_zeros(1)]),
            torch.cat([tok_surface, tok_surface.new_zeros(1)]),
            torch.where(tok_index >= 0, tok_index, t))


def gather_tokens(tok_emb: torch.Tensor, tok_action: torch.Tensor, tok_surface: torch.Tensor,
                  tok_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The RankBatch-style token tensors of rows that index a token table.

    Args:
        tok_emb: ``(T, 32)`` float32 dequantized token embeddings.
        tok_action: ``(T,)`` int64 action masks.
        tok_surface: ``(T,)`` int64 surface codes.
        tok_index: ``(N, S)`` int64 token of each row position, -1 for padding.

    Returns:
        ``seq_emb`` ``(N, S, 32)``, ``seq_action`` ``(N, S)``, ``seq_surface`` ``(N, S)`` and
        ``seq_valid`` ``(N, S)``; padding positions hold 0, 0, 0 and False.

    Example::

        >>> emb, act, surf, valid = gather_tokens(torch.ones(1, 32), torch.tensor([2]), torch.tensor([3]),
        ...                                       torch.tensor([[0, -1]]))
        >>> emb[0, :, 0].tolist(), act.tolist(), surf.tolist(), valid.tolist()
        ([1.0, 0.0], [[2, 0]], [[3, 0]], [[True, False]])
    """
    emb, action, surface, index = _append_padding(tok_emb, tok_action, tok_surface, tok_index)
    return emb[index], action[index], surface[index], tok_index >= 0


class FusedTransActEncoder:
    """A TransAct model's encoder over token tables, on a chosen backend.

    Built once per model version: it keeps a snapshot of the first layer's q/k/v weights and
    position projections ``W·E_pos + b``, so after the weights change, build a new one.
    Inference only: dropout is not applied (use ``model.eval()``), and calls belong under
    ``torch.inference_mode()``.

    Args:
        model: the TransAct (V2 or v1) whose encoder to run.

    Raises:
        TypeError: the encoder's first layer is not the post-norm
            :class:`~lifelong.models.layers.EncoderLayer` the fusion relies on.

    Example::

        >>> from lifelong.models.batch import SequenceLayout
        >>> from lifelong.models.config import TransActConfig
        >>> model = TransAct(TransActConfig(layout=SequenceLayout(2, 2, 1, 1))).eval()
        >>> enc = FusedTransActEncoder(model)
        >>> with torch.inference_mode():
        ...     h, valid = enc(torch.randn(3, 32), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 0]),
        ...                    torch.tensor([[0, 1, 2, -1, 2, -1]]), torch.randn(1, 32))
        >>> h.shape, valid.tolist()
        (torch.Size([1, 6, 64]), [[True, True, True, False, True, False]])
    """

    def __init__(self, model: TransAct):
        if type(model.encoder.layers[0]) is not EncoderLayer:
            raise TypeError(f"the fused first layer needs a post-norm EncoderLayer, got {type(model.encoder.layers[0])}")
        self.model = model
        d = model.cfg.d_model
        with torch.no_grad():
            attn = model.encoder.layers[0].self_attn
            w = attn.in_proj.weight.detach().view(3, d, d)
            self.w_tok = w.transpose(1, 2).contiguous()
            """``(3, d, d)``: the first layer's q, k, v weights, transposed to multiply rows."""
            self.w_cand = w[:, :, EMBED_DIM:].transpose(1, 2).contiguous()
            """``(3, 32, d)``: their columns that see the candidate (early fusion)."""
            pos_qkv = F.linear(model.token_context.position, attn.in_proj.weight, attn.in_proj.bias)
            self.pos_qkv = pos_qkv.view(-1, 3, d).transpose(0, 1).contiguous()
            """``(3, S', d)``: q, k, v of each position embedding, bias included."""

    def __call__(self, tok_emb: torch.Tensor, tok_action: torch.Tensor, tok_surface: torch.Tensor,
                 tok_index: torch.Tensor, cand_emb: torch.Tensor,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output ``(N, S', d)`` and validity ``(N, S')`` of rows over a token table.

        Args:
            tok_emb: ``(T, 32)`` float32 dequantized (not normalised) token embeddings.
            tok_action: ``(T,)`` int64 action masks.
            tok_surface: ``(T,)`` int64 surface codes.
            tok_index: ``(N, S')`` int64 token of each position read by the model, -1 = padding.
            cand_emb: ``(N, 32)`` float32 candidate embeddings (dequantized).
            backend: ``reference`` | ``cpu`` | ``triton``; None: ``$LIFELONG_OPS_BACKEND``, else ``triton``
                where CUDA is present and triton imports, else ``cpu``.

        Raises:
            ValueError: inconsistent shapes.
            ConfigError: the backend is unknown, unavailable, or lacks this op.
        """
        s = self.model.cfg.seq_len
        t = tok_emb.shape[0]
        if tok_emb.shape != (t, EMBED_DIM) or tok_action.shape != (t,) or tok_surface.shape != (t,):
            raise ValueError(f"token table must be (T, {EMBED_DIM}), (T,), (T,); got {tuple(tok_emb.shape)}, "
                             f"{tuple(tok_action.shape)}, {tuple(tok_surface.shape)}")
        n = cand_emb.shape[0]
        if tok_index.shape != (n, s) or cand_emb.shape != (n, EMBED_DIM):
            raise ValueError(f"tok_index must be (N, {s}) and cand_emb (N, {EMBED_DIM}); "
                             f"got {tuple(tok_index.shape)} and {tuple(cand_emb.shape)}")
        if tok_index.numel() and int(tok_index.max()) >= t:
            raise ValueError(f"tok_index points past the {t} tokens")
        op = implementation("transact_encode", backend)
        if n == 0:  # the model's attention cannot reshape an empty batch
            return tok_emb.new_zeros(0, s, self.model.cfg.d_model), tok_index >= 0
        return op(self, tok_emb, tok_action, tok_surface, tok_index, cand_emb)


def pack_rows(tok_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's real tokens moved to its front, in their order.

    Causal attention over the packed positions is exactly the model's causal + padding mask
    for every real token (the keys before it are the real tokens before it).

    Args:
        tok_index: ``(N, S)`` token of each row position, -1 for padding.

    Returns:
        ``valid`` ``(N, S)``, ``lengths`` ``(N,)`` real tokens per row, and ``slot``
        ``(N, W)``: the original position of each packed one, ``W`` the longest length (at
        least 1); past a row's length, slots point at its padding positions.

    Example::

        >>> valid, lengths, slot = pack_rows(torch.tensor([[-1, 4, 7], [2, -1, -1]]))
        >>> lengths.tolist(), slot.tolist()
        ([2, 1], [[1, 2], [0, 1]])
    """
    valid = tok_index >= 0
    lengths = valid.sum(1)
    width = max(int(lengths.max()) if tok_index.shape[0] else 0, 1)
    return valid, lengths, torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :width]


def unpack_rows(x: torch.Tensor, slot: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Packed rows ``(N, W, d)`` back at their original positions of ``(N, seq_len, d)``; zeros elsewhere.

    Packed positions past a row's length must already be zeros (they land on padding slots).
    """
    out = x.new_zeros(x.shape[0], seq_len, x.shape[2])
    return out.scatter_(1, slot.unsqueeze(-1).expand(-1, -1, x.shape[2]), x)


@register("transact_encode", "reference")
def _encode_reference(enc: FusedTransActEncoder, tok_emb: torch.Tensor, tok_action: torch.Tensor,
                      tok_surface: torch.Tensor, tok_index: torch.Tensor,
                      cand_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather RankBatch-style tensors, then exactly ``TransAct.encode``'s math on the blocks read."""
    model = enc.model
    emb, action, surface, valid = gather_tokens(tok_emb, tok_action, tok_surface, tok_index)
    return model.encoder(model.embed_tokens(emb, action, surface, cand_emb), causal_attention_mask(valid)), valid


@register("transact_encode", "cpu")
def _encode_cpu(enc: FusedTransActEncoder, tok_emb: torch.Tensor, tok_action: torch.Tensor,
                tok_surface: torch.Tensor, tok_index: torch.Tensor,
                cand_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First layer from per-token, per-candidate and per-position parts; attention over packed rows.

    Each row's real tokens are packed to its front, in their order. Causal attention over the
    packed positions is then exactly the model's causal + padding mask for every real token
    (the keys before it are the real tokens before it), so the attention kernel runs with
    ``is_causal`` and no (N, S, S) mask is built; rows are cut to the longest real length.
    Outputs at padding positions are zeros (the reference's are meaningless too).
    """
    model, ctx = enc.model, enc.model.token_context
    first = model.encoder.layers[0]
    n, s = tok_index.shape
    d = model.cfg.d_model
    emb, action, surface, index = _append_padding(tok_emb, tok_action, tok_surface, tok_index)
    valid, lengths, slot = pack_rows(tok_index)
    width = slot.shape[1]
    flat = index.gather(1, slot).reshape(-1)

    def gather(table: torch.Tensor) -> torch.Tensor:
        return table.index_select(0, flat).view(n, width, d)

    # Each distinct token's part of the layer input (zero over the candidate's half) and its
    # q, k, v projections, computed once however many rows read it.
    tok_x = F.pad(emb, (0, d - EMBED_DIM)) + ctx.action(action) + ctx.surface(surface)
    tok_qkv = torch.matmul(tok_x, enc.w_tok)  # (3, T + 1, d)
    x = gather(tok_x).add_(ctx.position[slot])
    qkv = [gather(tok_qkv[i]).add_(enc.pos_qkv[i][slot]) for i in range(3)]
    if model.cfg.early_fusion:
        cand_qkv = torch.matmul(cand_emb, enc.w_cand).unsqueeze(2)  # (3, N, 1, d)
        x.add_(F.pad(cand_emb, (EMBED_DIM, 0)).unsqueeze(1))
        for part, c in zip(qkv, cand_qkv):
            part.add_(c)

    heads = first.self_attn.n_heads
    q, k, v = (t.view(n, width, heads, d // heads).transpose(1, 2) for t in qkv)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, width, d)
    x = first.norm1(x + first.self_attn.out_proj(attn))
    x = first.norm2(x + first.linear2(F.relu(first.linear1(x))))
    for layer in model.encoder.layers[1:]:
        x = layer(x, None, is_causal=True)
    packed_valid = torch.arange(width) < lengths.unsqueeze(1)
    return unpack_rows(x * packed_valid.unsqueeze(-1), slot, s), valid
