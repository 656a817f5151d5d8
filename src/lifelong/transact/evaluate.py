"""Evaluation of a trained ranker on the evaluation rows (TransAct V2 §4.2; docs/design.md, "Evaluation protocol").

Per head: HIT@3 (requests ordered by ``S = Σ w_h f_h``), NE, AUC and GAUC. On simulated
worlds the same HIT@3 is computed for the oracle's true probabilities and for a random
order, and the model is reported as its fraction of the oracle's lift over random.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from lifelong.core.errors import ConfigError
from lifelong.core.metrics import (
    DEFAULT_HEAD_WEIGHTS,
    auc,
    final_score,
    gauc,
    head_ne,
    hit_at_k,
    hit_at_k_random,
    oracle_lift_fraction,
)
from lifelong.transact.abilities import abilities_of
from lifelong.transact.rank_data import RankData


@dataclass
class Evaluation:
    """Metrics of one model on one evaluation split.

    Args:
        per_head: ``{head: {"hit@3", "ne", "auc", "gauc"}}``.
        rows, requests, users: sizes of the split.
        oracle_hit, random_hit: HIT@3 per head of the oracle and of a random order (NaN when
            the data has no oracle).
        lift_fraction: per head, ``(HIT_model − HIT_random) / (HIT_oracle − HIT_random)``.
        oracle_ne: per head, the NE of the oracle's true probabilities: the floor a model's NE
            can reach on this split (only the labels' own randomness is left).
    """

    per_head: dict[str, dict[str, float]]
    rows: int
    requests: int
    users: int
    oracle_hit: dict[str, float] = field(default_factory=dict)
    random_hit: dict[str, float] = field(default_factory=dict)
    lift_fraction: dict[str, float] = field(default_factory=dict)
    oracle_ne: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"per_head": self.per_head, "rows": self.rows, "requests": self.requests, "users": self.users,
                "oracle_hit": self.oracle_hit, "random_hit": self.random_hit, "lift_fraction": self.lift_fraction,
                "oracle_ne": self.oracle_ne}


def evaluate_predictions(data: RankData, probs: np.ndarray, k: int = 3,
                         weights: dict[str, float] = DEFAULT_HEAD_WEIGHTS) -> Evaluation:
    """Score ``probs`` ((n, H) head probabilities in row order) against the split's labels."""
    a = data.arrays
    groups = np.asarray(a["req_id"])[np.asarray(a["request"])]
    users = np.asarray(a["user_id"])
    labels = np.asarray(a["labels"])
    heads = list(data.heads)
    score = final_score({h: probs[:, i] for i, h in enumerate(heads)}, weights)
    per_head: dict[str, dict[str, float]] = {}
    result = Evaluation(per_head, len(data), int(np.unique(groups).size), int(np.unique(users).size))
    oracle = data.oracle
    oracle_score = None
    if oracle is not None and not np.isnan(oracle).any():
        oracle_score = final_score({h: oracle[:, i] for i, h in enumerate(heads)}, weights)
    for i, h in enumerate(heads):
        y = labels[:, i]
        per_head[h] = {f"hit@{k}": hit_at_k(groups, users, score, y, k), "ne": head_ne(y, probs[:, i]),
                       "auc": auc(y, probs[:, i]), "gauc": gauc(users, y, probs[:, i])}
        if oracle_score is not None:
            result.oracle_hit[h] = hit_at_k(groups, users, oracle_score, y, k)
            result.random_hit[h] = hit_at_k_random(groups, users, y, k)
            result.lift_fraction[h] = oracle_lift_fraction(per_head[h][f"hit@{k}"], result.random_hit[h],
                                                           result.oracle_hit[h])
            result.oracle_ne[h] = head_ne(y, oracle[:, i])
    return result


def evaluate_run(run: str | os.PathLike[str], data_dir: str | os.PathLike[str], split: str = "eval",
                 user_emb: str | os.PathLike[str] | None = None) -> Evaluation:
    """Load a run's model, predict the split and evaluate it.

    Args:
        user_emb: for a model trained with ``--user-emb``, the DV365 store to read the split's
            user embeddings from [default: the store it was trained with, its served version now].
    """
    from lifelong.transact.trainer import load_model, predict

    model, meta = load_model(run)
    trained_with = meta.get("train", {}).get("user_emb")
    if user_emb is not None and not abilities_of(model).user_tokens:
        raise ConfigError(f"{run} was trained without a user embedding; drop --user-emb")
    data = RankData(data_dir, split, user_emb=user_emb or trained_with)
    return evaluate_predictions(data, predict(model, data))
