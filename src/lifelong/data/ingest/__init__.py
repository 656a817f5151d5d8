"""Real-data ingest: public interaction logs -> lifelong dataset directories.

One adapter per source (KuaiRand, MovieLens, MIND, Taobao) maps the source's rows onto the
unified event model (see each module's docstring for its mapping); the shared machinery in
:mod:`lifelong.data.ingest.common` quarantines bad rows, learns item embeddings from the
training period and writes ``items/events/users.parquet``, ``dataset.json`` and, when any row
was rejected, ``quarantine.parquet`` atomically.

Example::

    from lifelong.data.ingest import ingest
    report = ingest("movielens", Path("../shared/data/movielens-latest-small"), Path("data/ml"))
    for label, value in report.summary():
        print(f"{label:>16}  {value}")
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lifelong.core.errors import ConfigError, DataError
from lifelong.core.progress import progress
from lifelong.data.ingest import kuairand, mind, movielens, taobao
from lifelong.data.ingest.common import REQUEST_UNITS, IngestReport, Parsed, regroup_requests, write_dataset

SOURCES: tuple[str, ...] = ("kuairand", "movielens", "mind", "taobao")
_PARSERS: dict[str, Callable[[Path], Parsed]] = {
    "kuairand": kuairand.parse,
    "movielens": movielens.parse,
    "mind": mind.parse,
    "taobao": taobao.parse,
}

__all__ = ["REQUEST_UNITS", "SOURCES", "IngestReport", "ingest"]


def ingest(source: str, src: Path, out: Path, requests: str = "native", embedding_lag_days: float = 3.0,
           protocol_days: tuple[float, float, float] | None = None) -> IngestReport:
    """Ingest one real dataset folder into a dataset directory.

    Args:
        source: one of :data:`SOURCES`.
        src: the source's folder (e.g. ``../shared/data/kuairand27k-likehate``); read only.
        out: the dataset directory to write; replaced atomically, left untouched on failure.
        requests: what one request is, one of :data:`REQUEST_UNITS`: the source's own unit, or
            ``day`` (a user's UTC day; for sources whose requests are too small for HIT@3).
        embedding_lag_days: learn item embeddings from events before the training cutoff
            minus this many days (:func:`~lifelong.data.ingest.common.write_dataset`).
        protocol_days: ``(train, gap, eval)`` days placed at the end of the data (default
            :meth:`Protocol.fit`'s 14, 7, 1); the item embeddings' cutoff follows it, so rows
            built with another protocol must not cut earlier.

    Returns:
        The counts written, the quarantine reasons and the protocol dates.

    Raises:
        ConfigError: ``source`` or ``requests`` is unknown.
        DataError: ``src`` or an input file is missing, a header column is missing, or no row
            survived validation.

    Example::

        report = ingest("taobao", Path("../shared/data/taobao-userbehavior-head"), Path("data/taobao"))
        assert report.users == 814
    """
    if source not in _PARSERS:
        raise ConfigError(f"unknown ingest source {source!r}; expected one of {', '.join(SOURCES)}")
    if embedding_lag_days < 0:
        raise ConfigError(f"--embedding-lag-days must be >= 0, got {embedding_lag_days}")
    if requests not in REQUEST_UNITS:
        raise ConfigError(f"unknown --requests {requests!r}; expected one of {', '.join(REQUEST_UNITS)}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError(src, f"{source} dataset folder not found")
    with progress(f"ingesting {source}", total=2) as advance:
        parsed = regroup_requests(_PARSERS[source](src), requests)
        advance(1)
        report = write_dataset(source, src, out, parsed, embedding_lag_days=embedding_lag_days,
                               protocol_days=protocol_days)
        advance(1)
    return report
