"""TransAct V2 and TransAct v1: one causal early-fusion encoder, parameterised by its blocks.

TransAct V2 reads all of ``S_all`` (NN(S_LL, c) ⊕ S_RT[:r] ⊕ NN(S_RT[:r], c) ⊕ NN(S_imp, c));
TransAct v1 reads only ``S_RT[:r]`` (``TransActConfig.v1()``). Whether the Next Action Loss is
added is the trainer's choice: the model always exposes ``rt_states`` when it reads ``rt``.

Causality runs over token positions of what the encoder reads. Since ``S_RT[:r]`` is oldest
first and the NN(S_RT) / NN(S_imp) blocks come after it, a real-time position never sees a
newer real-time token nor those blocks; it does see the whole NN(S_LL, c) block, which is why
that block must hold only actions older than ``S_RT[:r]`` for the NAL to be leak-free (as
:mod:`lifelong.data.timelines` builds S_LL).

With ``TransActConfig.user_tokens = (R, C)`` the R rows of a frozen DV365 user embedding
(``RankBatch.user_emb``), each linearly projected to d_model plus a learned position, are
prepended before the blocks read. They are always real tokens, and being first, every position
attends to them under the causal mask; among themselves they attend both ways (the rows are
summaries, not a time order), and they never see a sequence token. The NAL stays leak-free
as long as the embedding is computed from events before the row's request time, as an export
refreshed earlier is. The embedding is an input: no gradient flows back into it.
"""

from __future__ import annotations

import torch
from torch import nn

from lifelong.data.schema import EMBED_DIM
from lifelong.modules.heads import ModelOutput
from lifelong.modules.layers import CrossHead, TokenContext, TransformerEncoder, causal_attention_mask, masked_max_pool
from lifelong.modules.row_features import RowFeatures, RowInputs
from lifelong.ops.dispatch import implementation
from lifelong.transact import fused_encoder  # noqa: F401 - registers the transact_encode op's implementations
from lifelong.transact.abilities import Abilities
from lifelong.transact.batch import RankBatch
from lifelong.transact.config import TransActConfig


class TransAct(nn.Module):
    """TransAct V2 / v1 ranker.

    Tokens ``F = concat(seq_emb, cand_emb) + E_act + E_surf + E_pos`` (d = 64 with early
    fusion; with ``token_similarity`` also ``+ <seq_emb, cand_emb> · w_sim``) go through a causal transformer encoder with padding mask; a linear layer and a
    max-pool over real tokens summarise them; the summary joins the row features in a DCN-v2
    cross network + MLP with one logit per head.

    Args:
        cfg: the configuration; ``TransActConfig()`` is TransAct V2, ``TransActConfig.v1()``
            TransAct v1.

    Example::

        model = TransAct(TransActConfig(layout=SequenceLayout(ll_nn=64, rt=64, rt_nn=32, imp_nn=32), n_heads=4))
        out = model(batch)  # a RankBatch with that layout
        out.logits.shape, out.rt_states.shape  # (B, 4), (B, 64, 32)
    """

    @classmethod
    def abilities_for(cls, cfg: TransActConfig) -> Abilities:
        """Reads ``cfg.blocks``; causal (NAL) when it reads ``rt``; user tokens when configured; the
        token-table serving path (:meth:`score_token_table`), with or without them."""
        return Abilities(blocks=cfg.blocks, causal="rt" in cfg.blocks, user_tokens=cfg.user_tokens is not None,
                         accepts_user_tokens=True, token_table=True, counters=cfg.row.counters)

    @property
    def abilities(self) -> Abilities:
        return self.abilities_for(self.cfg)

    @property
    def logit_layers(self) -> tuple[nn.Module, ...]:
        """The layers whose outputs sum to the logits (``fold_logit_calibration`` scales them)."""
        return (self.head.out,)

    def __init__(self, cfg: TransActConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        token_index = cfg.layout.positions(cfg.blocks)
        self.register_buffer("token_index", token_index, persistent=False)
        self.reads_all = token_index.numel() == cfg.layout.total
        self.n_user_tokens = 0
        if cfg.user_tokens is not None:
            self.n_user_tokens = cfg.user_tokens[0]
            self.user_token_proj = nn.Linear(cfg.user_tokens[1], d)
            self.user_token_position = nn.Parameter(torch.randn(cfg.user_tokens[0], d) * 0.02)
        self.rt_positions: slice | None = None
        if "rt" in cfg.blocks:
            start = self.n_user_tokens + sum(getattr(cfg.layout, b) for b in cfg.blocks[:cfg.blocks.index("rt")])
            self.rt_positions = slice(start, start + cfg.layout.rt)
            self.rt_proj = nn.Linear(d, EMBED_DIM)

        self.token_context = TokenContext(d, cfg.seq_len)
        if cfg.token_similarity:
            self.similarity = nn.Parameter(torch.randn(d) * 0.02)
        self.encoder = TransformerEncoder(d, cfg.n_layers, cfg.attn_heads, cfg.ffn_dim, cfg.dropout)
        self.pool_proj = nn.Linear(d, cfg.pool_dim)
        self.row = RowFeatures(cfg.row)
        self.head = CrossHead(cfg.pool_dim + self.row.out_dim, cfg.cross_layers, cfg.mlp_dims, cfg.n_heads)

    def _read(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.reads_all else x.index_select(1, self.token_index)

    def encode(self, batch: RankBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output (B, S', d) over the user tokens and blocks read, and their validity (B, S').

        Outputs at padding positions are meaningless (a padding query attends to itself so
        that no softmax row is empty); everything downstream masks them out.
        """
        valid = self._read(batch.seq_valid)
        x = self.embed_tokens(self._read(batch.seq_emb), self._read(batch.seq_action),
                              self._read(batch.seq_surface), batch.cand_emb)
        if self.n_user_tokens == 0:
            return self.encoder(x, causal_attention_mask(valid)), valid
        if batch.user_emb is None or tuple(batch.user_emb.shape[1:]) != self.cfg.user_tokens:
            got = None if batch.user_emb is None else tuple(batch.user_emb.shape)
            raise ValueError(f"the model prepends user tokens {self.cfg.user_tokens}; batch.user_emb is {got}")
        x, allowed, valid = self.prepend_user_tokens(x, valid, batch.user_emb)
        return self.encoder(x, allowed), valid

    def user_token_input(self, user_emb: torch.Tensor) -> torch.Tensor:
        """Encoder input ``(U, R, d)`` of the user tokens of ``(U, R, C)`` embeddings (frozen: detached)."""
        return self.user_token_proj(user_emb.detach()) + self.user_token_position

    def prepend_user_tokens(self, x: torch.Tensor, valid: torch.Tensor,
                            user_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` (B, S', d) with the user tokens of ``user_emb`` (B, R, C) first, the attention mask
        ``allowed`` (B, R + S', R + S') and the validity (B, R + S'): the user tokens are real and see
        each other both ways, every position sees them, the rest is causal."""
        r = self.n_user_tokens
        x = torch.cat([self.user_token_input(user_emb), x], dim=1)
        valid = torch.cat([valid.new_ones(valid.shape[0], r), valid], dim=1)
        allowed = causal_attention_mask(valid)
        allowed[:, :r, :r] = True
        return x, allowed, valid

    def embed_tokens(self, emb: torch.Tensor, action: torch.Tensor, surface: torch.Tensor,
                     cand_emb: torch.Tensor) -> torch.Tensor:
        """Encoder input ``F`` (B, S', d) of tokens already read: (B, S', 32) embeddings,
        (B, S') action masks and surfaces, (B, 32) candidate embeddings."""
        x = emb
        if self.cfg.early_fusion:
            x = torch.cat([emb, cand_emb.unsqueeze(1).expand(-1, emb.shape[1], -1)], dim=-1)
        x = x + self.token_context(action, surface)
        if self.cfg.token_similarity:
            x = x + self.token_similarity(emb, cand_emb).unsqueeze(-1) * self.similarity
        return x

    @staticmethod
    def token_similarity(emb: torch.Tensor, cand_emb: torch.Tensor) -> torch.Tensor:
        """(B, S') dot product of each token's (B, S', 32) embedding with its row's (B, 32) candidate."""
        return torch.bmm(emb, cand_emb.unsqueeze(-1)).squeeze(-1)

    def score(self, h: torch.Tensor, valid: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """Head logits (B, H) from encoder output ``h``, its validity and the row features.

        Split from :meth:`forward` so that :meth:`score_token_table` shares it.
        """
        pooled = masked_max_pool(self.pool_proj(h), valid)
        return self.head(torch.cat([pooled, row], dim=-1))

    def encode_token_table(self, tok_emb: torch.Tensor, tok_action: torch.Tensor, tok_surface: torch.Tensor,
                           tok_index: torch.Tensor, cand_emb: torch.Tensor, backend: str | None = None,
                           user_emb: torch.Tensor | None = None,
                           user_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode` of rows that index a de-duplicated token table: output ``(N, R + S', d)`` and
        validity ``(N, R + S')`` (R = 0 without user tokens).

        The ``transact_encode`` op (:mod:`lifelong.transact.fused_encoder`) on the chosen
        backend: ``reference`` gathers the rows and runs :meth:`encode`'s math; ``cpu`` fuses the
        first layer into per-token, per-candidate and per-position parts; ``triton`` runs SKUT.
        All read this model's modules and parameters as they are now. Inference only: dropout
        is not applied (``model.eval()``); outputs at padding positions are zeros or meaningless.

        Args:
            tok_emb: ``(T, 32)`` float32 dequantized (not normalised) token embeddings.
            tok_action: ``(T,)`` int64 action masks.
            tok_surface: ``(T,)`` int64 surface codes.
            tok_index: ``(N, S')`` int64 token of each position read (``cfg.layout.positions(cfg.blocks)``),
                -1 = padding.
            cand_emb: ``(N, 32)`` float32 candidate embeddings (dequantized).
            backend: ``reference`` | ``cpu`` | ``triton``; None: ``$LIFELONG_OPS_BACKEND``, else ``triton``
                where CUDA is present and triton imports, else ``cpu``. SKUT has no user-token mask:
                with user tokens, ``triton`` runs the ``cpu`` implementation.
            user_emb: with ``cfg.user_tokens = (R, C)``: ``(U, R, C)`` float32 embeddings, one per
                distinct user of the batch (the user tokens are prepended as :meth:`encode` does;
                each user's are projected once).
            user_index: ``(N,)`` int64 row of ``user_emb`` of each row; None: ``U == N``, one per row.

        Raises:
            ValueError: inconsistent shapes, or user tokens missing, misshapen or not read.
            ConfigError: the backend is unknown, unavailable, or lacks this op.

        Example::

            >>> from lifelong.transact.sequence_layout import SequenceLayout
            >>> model = TransAct(TransActConfig(layout=SequenceLayout(2, 2, 1, 1))).eval()
            >>> with torch.inference_mode():
            ...     h, valid = model.encode_token_table(torch.randn(3, 32), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 0]),
            ...                                         torch.tensor([[0, 1, 2, -1, 2, -1]]), torch.randn(1, 32))
            >>> h.shape, valid.tolist()
            (torch.Size([1, 6, 64]), [[True, True, True, False, True, False]])
        """
        s = self.cfg.seq_len
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
        user = self._user_rows(user_emb, user_index, n)
        op = implementation("transact_encode", backend)
        if n == 0:  # the attention cannot reshape an empty batch
            r = self.n_user_tokens
            return tok_emb.new_zeros(0, r + s, self.cfg.d_model), torch.zeros(0, r + s, dtype=torch.bool)
        return op(self, tok_emb, tok_action, tok_surface, tok_index, cand_emb, *user)

    def _user_rows(self, user_emb: torch.Tensor | None, user_index: torch.Tensor | None,
                   n: int) -> tuple[torch.Tensor, torch.Tensor] | tuple[()]:
        """``(user_emb, user_index)`` checked against ``cfg.user_tokens``; ``()`` without user tokens."""
        if self.n_user_tokens == 0:
            if user_emb is not None:
                raise ValueError("the model reads no user tokens; user_emb given")
            return ()
        if user_emb is None or user_emb.dim() != 3 or tuple(user_emb.shape[1:]) != self.cfg.user_tokens:
            got = None if user_emb is None else tuple(user_emb.shape)
            raise ValueError(f"the model prepends user tokens {self.cfg.user_tokens}; user_emb is {got}")
        if user_index is None:
            user_index = torch.arange(user_emb.shape[0])
        if user_index.shape != (n,) or (n and not 0 <= int(user_index.min()) <= int(user_index.max()) < user_emb.shape[0]):
            raise ValueError(f"user_index must be ({n},) rows of the {user_emb.shape[0]} embeddings")
        return user_emb, user_index

    def score_token_table(self, tok_emb: torch.Tensor, tok_action: torch.Tensor, tok_surface: torch.Tensor,
                          tok_index: torch.Tensor, cand_emb: torch.Tensor, rows: RowInputs,
                          backend: str | None = None, user_emb: torch.Tensor | None = None,
                          user_index: torch.Tensor | None = None) -> torch.Tensor:
        """Head logits ``(N, H)`` over a token table (the optimized serving path): :meth:`encode_token_table`
        (user tokens included), then :meth:`score` with the rows' features. Equals
        ``forward(batch).logits`` on the gathered rows (``batch.user_emb = user_emb[user_index]``)."""
        h, valid = self.encode_token_table(tok_emb, tok_action, tok_surface, tok_index, cand_emb, backend,
                                           user_emb, user_index)
        return self.score(h, valid, self.row(rows))

    def forward(self, batch: RankBatch) -> ModelOutput:
        h, valid = self.encode(batch)
        logits = self.score(h, valid, self.row(batch))
        rt_states = None
        if self.rt_positions is not None:
            rt_valid = valid[:, self.rt_positions].unsqueeze(-1)
            rt_states = self.rt_proj(h[:, self.rt_positions]) * rt_valid
        return ModelOutput(logits=logits, rt_states=rt_states)
