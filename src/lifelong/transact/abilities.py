"""What a ranker can do, declared by the ranker: the trainer, evaluation and serving ask, never its name.

Every ranker of :mod:`lifelong.transact.registry` is an ``nn.Module`` whose ``forward(batch:
RankBatch) -> ModelOutput`` scores rows, and which declares its :class:`Abilities`: from its
configuration alone (``abilities_for(cfg)``, a classmethod, so that a training configuration
is validated before any model exists: :func:`lifelong.transact.registry.model_abilities`) and
on the instance (``model.abilities``).

A ranker that declares ``token_table`` also implements the optimized serving path,
:meth:`TokenTableRanker.score_token_table`: logits of rows that index a de-duplicated token
table (each distinct token once, rows pointing at theirs), computed with the model's own
modules, each choosing its kernel through :mod:`lifelong.ops.dispatch`. Its result must equal
``forward`` on the gathered :class:`~lifelong.transact.batch.RankBatch` (within 1e-5), which is
also what the naive serving path and every ranker without the ability run.

Adding a ranker: a config dataclass with ``layout`` and ``n_heads``, a module with ``cfg``,
``abilities_for`` / ``abilities`` and ``forward``, and one line in the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from lifelong.modules.heads import ModelOutput
from lifelong.modules.row_features import RowInputs
from lifelong.transact.batch import RankBatch
from lifelong.transact.sequence_layout import SequenceLayout


@dataclass(frozen=True)
class Abilities:
    """A ranker's declared abilities.

    Args:
        blocks: the blocks of ``S_all`` it reads, in layout order (``()``: no sequence). Serving
            assembles only what is read; the row builder always logs all of ``S_all``.
        causal: it exposes ``ModelOutput.rt_states`` from a causal encoder in which no real-time
            position sees a newer action, so the Next Action Loss may be added (``--nal``).
        user_tokens: this configuration reads a frozen DV365 user embedding as tokens
            (``RankBatch.user_emb``).
        accepts_user_tokens: the model can be configured to read one (``--user-emb``).
        token_table: it implements :meth:`TokenTableRanker.score_token_table`, the optimized
            serving path over a de-duplicated token table.
        counters: this configuration reads the rows' engagement counters
            (``RankBatch.counters``, ``RowFeatureConfig.counters``): trained and evaluated on built
            rows; the feature store does not keep counters, so serving refuses such a model.

    Example::

        >>> Abilities(blocks=("rt",), causal=True).reads_sequence
        True
    """

    blocks: tuple[str, ...] = ()
    causal: bool = False
    user_tokens: bool = False
    accepts_user_tokens: bool = False
    token_table: bool = False
    counters: bool = False

    def __post_init__(self) -> None:
        unknown = [b for b in self.blocks if b not in SequenceLayout.BLOCKS]
        if unknown:
            raise ValueError(f"unknown blocks {unknown}; blocks are {SequenceLayout.BLOCKS}")
        if self.user_tokens and not self.accepts_user_tokens:
            raise ValueError("a ranker reading user tokens must accept them")

    @property
    def reads_sequence(self) -> bool:
        return bool(self.blocks)


@runtime_checkable
class RankingModel(Protocol):
    """A ranker: configuration, declared abilities and ``forward`` over a RankBatch."""

    cfg: Any

    @property
    def abilities(self) -> Abilities: ...

    def __call__(self, batch: RankBatch) -> ModelOutput: ...


@runtime_checkable
class TokenTableRanker(RankingModel, Protocol):
    """A ranker with the optimized serving path (``abilities.token_table``)."""

    def score_token_table(self, tok_emb: torch.Tensor, tok_action: torch.Tensor, tok_surface: torch.Tensor,
                          tok_index: torch.Tensor, cand_emb: torch.Tensor, rows: RowInputs,
                          backend: str | None = None, user_emb: torch.Tensor | None = None,
                          user_index: torch.Tensor | None = None) -> torch.Tensor:
        """Head logits ``(N, H)`` of rows over a token table.

        Args:
            tok_emb: ``(T, 32)`` float32 dequantized (not normalised) token embeddings.
            tok_action, tok_surface: ``(T,)`` int64 action masks and surface codes.
            tok_index: ``(N, S')`` int64 token of each position the model reads
                (``layout.positions(abilities.blocks)``), -1 = padding.
            cand_emb: ``(N, 32)`` float32 candidate embeddings.
            rows: the rows' ids (:class:`~lifelong.modules.row_features.RowInputs`).
            backend: the ops backend (:func:`lifelong.ops.dispatch.resolve_backend`).
            user_emb: with ``abilities.user_tokens``: ``(U, R, C)`` float32 DV365 embeddings, one
                per distinct user of the rows (None otherwise).
            user_index: ``(N,)`` int64 row of ``user_emb`` of each row (None: one per row).
        """
        ...


def abilities_of(model: Any) -> Abilities:
    """``model.abilities``; a module that declares none has none (no sequence, no NAL, no fast path)."""
    found = getattr(model, "abilities", None)
    return found if isinstance(found, Abilities) else Abilities()
