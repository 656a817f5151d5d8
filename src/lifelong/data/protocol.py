"""The evaluation protocol's dates (TransAct V2 §4.1.1).

Training rows are the impressions of ``train_days`` before a cutoff; evaluation rows are the
requests of ``eval_days`` starting ``gap_days`` after the cutoff. Sequences for any row use only
events strictly before that row's request time.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

DAY_MS = 86_400_000


def utc_minute(ms: int) -> str:
    """A protocol time as people read it.

    Example::

        >>> utc_minute(86_400_000)
        '1970-01-02 00:00 UTC'
    """
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class Protocol:
    """Protocol dates in epoch milliseconds.

    Args:
        train_start_ms: first training impression time (inclusive).
        cutoff_ms: end of the training period (exclusive).
        eval_start_ms: first evaluation request time (inclusive).
        eval_end_ms: end of the evaluation period (exclusive).

    Example::

        >>> p = Protocol.fit(0, 30 * DAY_MS)
        >>> (p.cutoff_ms - p.train_start_ms) // DAY_MS, (p.eval_start_ms - p.cutoff_ms) // DAY_MS
        (14, 7)
    """

    train_start_ms: int
    cutoff_ms: int
    eval_start_ms: int
    eval_end_ms: int

    @classmethod
    def fit(cls, first_ms: int, end_ms: int, train_days: float = 14, gap_days: float = 7,
            eval_days: float = 1) -> Protocol:
        """Place the protocol at the end of the data span ``[first_ms, end_ms)``.

        When the span is shorter than ``train_days + gap_days + eval_days`` (KuaiRand covers 14
        days), the gap shrinks first, down to a day, then the training window: the evaluation
        day always stays last so that no evaluation row predates a training row.
        """
        span = (end_ms - first_ms) / DAY_MS
        need = train_days + gap_days + eval_days
        if span < need:
            gap_days = max(min(1.0, gap_days), gap_days - (need - span))
            train_days = max(1.0, min(train_days, span - gap_days - eval_days))
        eval_end = int(end_ms)
        eval_start = eval_end - int(eval_days * DAY_MS)
        cutoff = eval_start - int(gap_days * DAY_MS)
        return cls(int(max(first_ms, cutoff - int(train_days * DAY_MS))), int(cutoff), int(eval_start), eval_end)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict) -> Protocol:
        return cls(**{k: int(meta["protocol"][k]) for k in ("train_start_ms", "cutoff_ms", "eval_start_ms", "eval_end_ms")})
