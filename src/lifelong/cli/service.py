"""Assembling the ranking service from a run directory and a feature store URL, and running it:
as this one process, or as N replicas behind one port (``lifelong serve --workers N``).

The model, torch and the app are imported inside the functions that build a service, so that
the supervisor of ``--workers N`` (:func:`serve_replicas`) stays a small process that holds no
model, and a busy port is reported before torch loads.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lifelong.core.errors import ConfigError, LifelongError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from lifelong.serving.batcher import BatchingConfig

KEEP_ALIVE_S = 5
"""Idle keep-alive connections are closed after this many seconds (uvicorn ``timeout_keep_alive``)."""
MAX_HEADER_BYTES = 16 * 1024
"""Largest request line + headers h11 buffers before answering 431/closing (``h11_max_incomplete_event_size``)."""
MAX_CONNECTIONS = 1024
"""Concurrent connections and tasks before uvicorn itself answers 503 (``limit_concurrency``)."""
STOP_GRACE_S = 30.0
"""How long the replicas' supervisor waits for a stopped worker to finish its requests before killing it."""


def build_service(run: str | os.PathLike[str], store: str, path: str = "optimized", backend: str | None = None,
                  max_batch: int = 2048, max_wait_ms: float = 2.0, max_candidates: int = 1000,
                  max_latency_ms: float = 1000.0, max_queue_examples: int = 640,
                  body_timeout_s: float = 5.0, user_emb: str | None = None,
                  accept_sync: bool = False, worker: int | None = None,
                  precision: str = "fp32") -> tuple[FastAPI, str]:
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
        precision: ``fp32`` or ``bf16``: the model's forward under bfloat16 autocast
            (:class:`~lifelong.transact.serving.Ranker`).
        worker: this process's index among the replicas of ``lifelong serve --workers N``, named
            in its answers; a run that takes pushes is then refused (a push would reach one
            replica only).

    Raises:
        ConfigError: ``worker`` given for a run that takes parameter pushes.

    Example::

        app, version = build_service("runs/v2", "lmdb:///tmp/store")
    """
    from lifelong.serving.app import create_app
    from lifelong.serving.metrics import ServiceMetrics
    from lifelong.store.feature_store import open_store
    from lifelong.transact.online import SyncedTransActRanker, id_tables, run_config
    from lifelong.transact.serving import Ranker, model_version, user_emb_reader
    from lifelong.transact.trainer import load_model

    model, meta = load_model(run)
    synced = accept_sync or bool(id_tables(model))
    if synced and worker is not None:
        raise ConfigError(f"{run}: a run with collision-less id tables takes parameter pushes (POST /admin/sync), "
                          "which would reach one worker of --workers N only: serve it with --workers 1")
    feature_store = open_store(store)
    reader = user_emb_reader(run, model, meta, user_emb)
    version = model_version(Path(run))
    metrics = ServiceMetrics()  # the ranker times its stages into the metrics /metrics renders
    if synced:
        ranker = SyncedTransActRanker(model, feature_store, version, run_config(run), path=path, backend=backend,
                                      user_emb=reader, stages=metrics.stages, precision=precision)
    else:
        ranker = Ranker(model, feature_store, path=path, backend=backend, user_emb=reader, stages=metrics.stages,
                        precision=precision)
    app = create_app(ranker, version, _batching(max_batch, max_wait_ms, max_queue_examples), metrics=metrics,
                     max_candidates=max_candidates, max_latency_ms=max_latency_ms, body_timeout_s=body_timeout_s,
                     worker=worker)
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
    from lifelong.monolith.ranker import ItemCatalog
    from lifelong.monolith.serving import OnlineServingRanker
    from lifelong.serving.app import create_app

    ranker = OnlineServingRanker(ItemCatalog.from_dataset(data))
    return create_app(ranker, "online", _batching(max_batch, max_wait_ms, max_queue_examples),
                      max_candidates=max_candidates, max_latency_ms=max_latency_ms, body_timeout_s=body_timeout_s)


def _batching(max_batch: int, max_wait_ms: float, max_queue_examples: int) -> BatchingConfig:
    from lifelong.serving.batcher import BatchingConfig

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


def run_server(app: FastAPI, sock: socket.socket, keep_alive_s: int = KEEP_ALIVE_S,
               on_started: Callable[[], None] | None = None) -> None:
    """Run ``app`` under uvicorn on the bound ``sock`` with the server-side limits above.

    ``on_started`` is called once the app's startup has run and ``sock`` listens.
    """
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)  # exits the process when the app's startup fails
            if on_started is not None:
                on_started()

    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=keep_alive_s,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES, limit_concurrency=MAX_CONNECTIONS)
    Server(config).run(sockets=[sock])


# Replicas: lifelong serve --workers N.
#
# The parent binds N sockets to the port with SO_REUSEPORT, before any model loads, and worker i
# inherits socket i (pass_fds); the kernel hashes each new connection to one of the sockets that
# listen. Chosen over one listening socket inherited by every worker because, on Linux, a shared
# socket does not spread connections: asyncio accepts in a loop, so whichever worker's epoll
# wakes first drains the whole queue. Measured here, bursts of 40 new connections landed 39/1,
# 40/0 and 30/10 on two workers, and a keep-alive connection stays where it landed, so N
# workers served like one. SO_REUSEPORT's two weak points are closed:
# - a reuseport bind succeeds next to a listener of the same user that set it too (a stale
#   service), silently splitting the traffic; so the port is first bound exclusively
#   (bind_port: a busy port is one line and exit 2) and only then shared among the N sockets;
# - a socket that is closed resets the connections queued on it; but a worker that dies stops
#   the whole service anyway, and a worker still loading has not called listen() yet, so the
#   kernel sends it nothing.
# Workers are spawned, not forked: a fork copies the parent's threads' locks and torch's state.


def bind_replicas(host: str, port: int, workers: int) -> list[socket.socket]:
    """``workers`` sockets bound to ``host:port`` with SO_REUSEPORT, or :func:`bind_port`'s one
    clear error when the port is taken (checked with an exclusive bind first, see above)."""
    probe = bind_port(host, port)
    port = probe.getsockname()[1]  # with --port 0, the one port the kernel chose, for every worker
    probe.close()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(workers):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
    except OSError as exc:  # another process took the port since the exclusive bind
        for sock in socks:
            sock.close()
        raise ConfigError(f"cannot serve on {host}:{port}: {exc.strerror or exc} (choose another --port)") from None
    return socks


def serve_replicas(socks: list[socket.socket], service: dict[str, Any],
                   on_ready: Callable[[str, list[int]], None]) -> None:
    """Serve :func:`build_service` ``(**service)`` from one worker process per socket of
    :func:`bind_replicas`.

    Runs until SIGTERM or SIGINT, which is forwarded to the workers; once they have stopped, the
    signal is raised again here, as uvicorn does for one process, so the exit status names it.
    ``on_ready(version, pids)`` is called once every worker serves.

    Raises:
        LifelongError: a worker failed at start (its own error as is, e.g. a missing run; for
            a crash, its exit status and the last line of its traceback, printed above), or
            died while serving. The other workers are stopped first; nothing is restarted.
    """
    workers = len(socks)
    received: list[int] = []
    procs: list[subprocess.Popen] = []

    def forward(sig: int, _frame) -> None:
        received.append(sig)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(sig)

    handlers = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = []
        try:
            for index, sock in enumerate(socks):
                proc, read = _spawn(index, workers, sock, service)
                procs.append(proc)
                status.append(read)
        finally:
            for sock in socks:  # each worker holds its own now; the parent never accepts
                sock.close()
        version = _wait_started(procs, status, received)
        if not received:
            on_ready(version, [p.pid for p in procs])
        while not received:
            for index, proc in enumerate(procs):
                if proc.poll() is not None and not received:  # not one that a forwarded signal stopped
                    raise LifelongError(f"worker {index} of {workers} (pid {proc.pid}) {_how(proc.returncode)} while "
                                        "serving; the other workers were stopped (nothing is restarted)")
            time.sleep(0.2)
    finally:
        _stop(procs)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    signal.raise_signal(received[0])


def _spawn(index: int, workers: int, sock: socket.socket, service: dict[str, Any]) -> tuple[subprocess.Popen, int]:
    """Worker ``index``: a fresh interpreter running :func:`serve_worker`, and the read end of its status pipe."""
    read, write = os.pipe()
    spec = {"worker": index, "socket_fd": sock.fileno(), "status_fd": write, "parent": os.getpid(), "service": service}
    env = dict(os.environ)
    # N processes each running torch on every core only contend: they share the cores instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))
    try:
        # Its own process group: a terminal's Ctrl-C reaches the parent only, which forwards it,
        # so a worker still loading its model stops without a KeyboardInterrupt traceback.
        proc = subprocess.Popen([sys.executable, "-c", "from lifelong.cli.service import serve_worker; serve_worker()",
                                 json.dumps(spec)], stdin=subprocess.DEVNULL, pass_fds=(sock.fileno(), write),
                                env=env, process_group=0)
    except BaseException:
        os.close(read)
        raise
    finally:
        os.close(write)
    return proc, read


def _wait_started(procs: list[subprocess.Popen], status: list[int], received: list[int]) -> str:
    """The served model version once every worker reported it serves (or a signal came).

    Each worker writes one JSON report on its status pipe and closes it: ``{"ready": version}``,
    ``{"error": message}`` (a :class:`LifelongError`), or ``{"bug": traceback}``; a worker that
    dies without one closes it empty.
    """
    selector = selectors.DefaultSelector()
    reports: dict[int, bytes] = {}
    for index, fd in enumerate(status):
        selector.register(fd, selectors.EVENT_READ, index)
        reports[index] = b""
    version = ""
    try:
        while selector.get_map() and not received:
            for key, _ in selector.select(timeout=0.2):
                index = key.data
                if chunk := os.read(key.fd, 1 << 16):
                    reports[index] += chunk
                    continue
                selector.unregister(key.fd)
                report = json.loads(reports[index]) if reports[index] else {}
                if "ready" in report:
                    version = report["ready"]
                elif not received:  # not one that a forwarded signal stopped
                    raise _start_failure(index, len(procs), procs[index], report)
    finally:
        selector.close()
        for fd in status:
            os.close(fd)
    return version


def _start_failure(index: int, workers: int, proc: subprocess.Popen, report: dict[str, str]) -> LifelongError:
    if "error" in report:  # a user error: the same line one process prints
        return LifelongError(report["error"])
    try:
        how = _how(proc.wait(timeout=STOP_GRACE_S))
    except subprocess.TimeoutExpired:
        how = "closed its status pipe"
    reason = ""
    if "bug" in report:
        sys.stderr.write(report["bug"])
        reason = ": " + report["bug"].strip().splitlines()[-1]
    return LifelongError(f"worker {index} of {workers} (pid {proc.pid}) {how} at start{reason}; "
                         "the other workers were stopped")


def _how(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def _stop(procs: list[subprocess.Popen]) -> None:
    """Terminate every worker still running, and kill those not gone within :data:`STOP_GRACE_S`."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve_worker() -> None:
    """A replica started by :func:`serve_replicas`: build the service, report on the status pipe, serve."""
    spec = json.loads(sys.argv[1])
    _stop_with_parent(spec["parent"])
    status = os.fdopen(spec["status_fd"], "w")

    def report(**message: str) -> None:
        status.write(json.dumps(message))
        status.close()

    sock = socket.socket(fileno=spec["socket_fd"])
    try:
        app, version = build_service(**spec["service"], worker=spec["worker"])
    except LifelongError as exc:
        report(error=str(exc))
        sys.exit(2)
    except Exception:
        report(bug=traceback.format_exc())
        sys.exit(1)
    run_server(app, sock, on_started=lambda: report(ready=version))


def _stop_with_parent(parent: int) -> None:
    """Have the kernel send this worker SIGTERM when its supervisor dies, even by SIGKILL, so no
    orphaned worker keeps serving the port unsupervised."""
    if sys.platform != "linux":
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor died before the request above took effect
        os.kill(os.getpid(), signal.SIGTERM)
