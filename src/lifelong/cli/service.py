"""Assembling the ranking service from a run directory and a feature store URL."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI

from lifelong.monolith.ranker import ItemCatalog
from lifelong.monolith.serving import OnlineServingRanker
from lifelong.serving.app import create_app
from lifelong.serving.batcher import BatchingConfig
from lifelong.store.feature_store import open_store
from lifelong.transact.serving import Ranker, model_version
from lifelong.transact.trainer import load_model


def build_service(run: str | os.PathLike[str], store: str, path: str = "optimized", backend: str | None = None,
                  max_batch: int = 2048, max_wait_ms: float = 2.0, max_candidates: int = 1000) -> tuple[FastAPI, str]:
    """The FastAPI app serving ``run`` over ``store`` and the model version it reports.

    Args:
        run: run directory of a trained ranker (``lifelong transact train``).
        store: feature store URL (``lifelong store load``).
        path: ``optimized`` or ``naive``.
        backend: op backend of the optimized path (None: the dispatcher's default).
        max_batch, max_wait_ms: dynamic batching limits.
        max_candidates: most candidates per request.

    Example::

        app, version = build_service("runs/v2", "lmdb:///tmp/store")
    """
    model, _ = load_model(run)
    ranker = Ranker(model, open_store(store), path=path, backend=backend)
    version = model_version(Path(run))
    app = create_app(ranker, version, BatchingConfig(max_examples=max_batch, max_wait_ms=max_wait_ms),
                     max_candidates=max_candidates)
    return app, version


def build_online_service(data: str | os.PathLike[str], max_batch: int = 2048, max_wait_ms: float = 2.0,
                         max_candidates: int = 1000) -> FastAPI:
    """The FastAPI app serving the Monolith online ranker over ``data``'s item catalog.

    It starts without parameters (``/rank`` answers 503) and serves whatever ``lifelong monolith online``
    pushes to ``POST /admin/sync``; see :mod:`lifelong.monolith.serving`.

    Example::

        app = build_online_service("worlds/small")
    """
    ranker = OnlineServingRanker(ItemCatalog.from_dataset(data))
    return create_app(ranker, "online", BatchingConfig(max_examples=max_batch, max_wait_ms=max_wait_ms),
                      max_candidates=max_candidates)
