"""Assembling the ranking service from a run directory and a feature store URL, and running it."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from fastapi import FastAPI

from lifelong.core.errors import ConfigError
from lifelong.monolith.ranker import ItemCatalog
from lifelong.monolith.serving import OnlineServingRanker
from lifelong.serving.app import create_app
from lifelong.serving.batcher import BatchingConfig
from lifelong.store.feature_store import open_store
from lifelong.transact.online import SyncedTransActRanker, id_tables, run_config
from lifelong.transact.serving import Ranker, model_version, user_emb_reader
from lifelong.transact.trainer import load_model

KEEP_ALIVE_S = 5
"""Idle keep-alive connections are closed after this many seconds (uvicorn ``timeout_keep_alive``)."""
MAX_HEADER_BYTES = 16 * 1024
"""Largest request line + headers h11 buffers before answering 431/closing (``h11_max_incomplete_event_size``)."""
MAX_CONNECTIONS = 1024
"""Concurrent connections and tasks before uvicorn itself answers 503 (``limit_concurrency``)."""


def build_service(run: str | os.PathLike[str], store: str, path: str = "optimized", backend: str | None = None,
                  max_batch: int = 2048, max_wait_ms: float = 2.0, max_candidates: int = 1000,
                  max_latency_ms: float = 1000.0, max_queue_examples: int = 640,
                  body_timeout_s: float = 5.0, user_emb: str | None = None,
                  accept_sync: bool = False) -> tuple[FastAPI, str]:
    """The FastAPI app serving ``run`` over ``store`` and the model version it reports.

    Args:
        run: run directory of a trained ranker (``lifelong transact train``).
        store: feature store URL (``lifelong store load``).
        path: ``optimized`` or ``naive``.
        backend: op backend of the optimized path (None: the dispatcher's default).
        max_batch, max_wait_ms: dynamic batching limits.
        max_candidates: most candidates per request.
        max_latency_ms: every request's deadline from its arrival (a client's ``timeout_ms`` may shorten it).
        max_queue_examples: candidates waiting at most before the service sheds load (503).
        body_timeout_s: longest a request body may take to arrive whole (408).
        user_emb: for a run trained with ``--user-emb``: the DV365 export store to read users'
            embeddings from, per batch [default: the store recorded in its ``run.json``]; refused
            for a run without user tokens.
        accept_sync: take parameter pushes of ``lifelong monolith online --model-run RUN``
            (``POST /admin/sync``, applied in place between batches; every response names the
            version that scored it). Always on for a run with collision-less id tables.

    Example::

        app, version = build_service("runs/v2", "lmdb:///tmp/store")
    """
    model, meta = load_model(run)
    feature_store = open_store(store)
    reader = user_emb_reader(run, model, meta, user_emb)
    version = model_version(Path(run))
    if accept_sync or id_tables(model):
        ranker = SyncedTransActRanker(model, feature_store, version, run_config(run), path=path, backend=backend,
                                      user_emb=reader)
    else:
        ranker = Ranker(model, feature_store, path=path, backend=backend, user_emb=reader)
    app = create_app(ranker, version, _batching(max_batch, max_wait_ms, max_queue_examples),
                     max_candidates=max_candidates, max_latency_ms=max_latency_ms, body_timeout_s=body_timeout_s)
    return app, version


def build_online_service(data: str | os.PathLike[str], max_batch: int = 2048, max_wait_ms: float = 2.0,
                         max_candidates: int = 1000, max_latency_ms: float = 1000.0, max_queue_examples: int = 640,
                         body_timeout_s: float = 5.0) -> FastAPI:
    """The FastAPI app serving the Monolith online ranker over ``data``'s item catalog.

    It starts without parameters (``/rank`` and ``/readyz`` answer 503) and serves whatever
    ``lifelong monolith online`` pushes to ``POST /admin/sync``; see :mod:`lifelong.monolith.serving`.

    Example::

        app = build_online_service("worlds/small")
    """
    ranker = OnlineServingRanker(ItemCatalog.from_dataset(data))
    return create_app(ranker, "online", _batching(max_batch, max_wait_ms, max_queue_examples),
                      max_candidates=max_candidates, max_latency_ms=max_latency_ms, body_timeout_s=body_timeout_s)


def _batching(max_batch: int, max_wait_ms: float, max_queue_examples: int) -> BatchingConfig:
    return BatchingConfig(max_examples=max_batch, max_wait_ms=max_wait_ms, max_queue_examples=max_queue_examples)


def bind_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for the server, or one clear error when the port is taken.

    Binding before anything else (the model load, the "serving … on" line) makes a busy port a
    one-line error with exit status 2, not a traceback after the banner.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        why = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ConfigError(f"cannot serve on {host}:{port}: {why} (choose another --port)") from None
    return sock


def run_server(app: FastAPI, sock: socket.socket, keep_alive_s: int = KEEP_ALIVE_S) -> None:
    """Run ``app`` under uvicorn on the bound ``sock`` with the server-side limits above."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=keep_alive_s,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES, limit_concurrency=MAX_CONNECTIONS)
    uvicorn.Server(config).run(sockets=[sock])
