"""The HTTP ranking service: ``POST /rank``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics`` (FastAPI).

Bad input is the client's error, never a 500: a body that is not JSON, wrong types and values
outside the bounds ``/openapi.json`` states are answered 422 with the offending field named
(FastAPI's validation errors), unknown item ids 422 listing them, too many candidates (or a
body too large) 413. A user without stored sequences is served cold-start (empty sequences)
and counted in ``/metrics``. Duplicate candidates are merged: each distinct id is scored once
and returned once.

**Fail loudly, recover by itself.** A batch whose ranker raises
:class:`~lifelong.core.errors.StoreUnavailable` answers every request in it 503 with
``Retry-After`` and the reason; the next batch tries the store again, so the service recovers
without a restart when the store is back. ``/healthz`` is liveness (200 while the process runs);
``/readyz`` is readiness (200 only when ``ranker.readiness()`` says so, else 503 with the reason).
Both name the model version and the feature store version.

**Bounded work.** Every ``/rank`` request has a deadline: the server's ``max_latency_ms``, or
the client's shorter ``timeout_ms``. A request whose deadline passes, or whose client
disconnects, before it is scored is dropped unscored (504, or 499 for a client that is gone and
never reads it); the queue in front of the model is bounded in candidates (503 beyond it); the
body of a request must arrive whole within ``body_timeout_s`` (408) and within
``max_body_bytes`` (413). Every non-200 is counted in ``/metrics`` by cause.

A ranker that takes parameter pushes (a
:class:`~lifelong.serving.ranking.SyncedRanker`, such as Monolith's online ranker) also gets ``POST /admin/sync``: 200 with
what was applied, 409 when the delta does not follow the held version, 422 for a malformed
body; ``/rank`` answers 503 until the first full snapshot has arrived, and every response
names the version that scored it.

**Replicas.** Under ``lifelong serve --workers N`` each of the N processes builds its own app
with its ``worker`` index: every answer then carries ``x-lifelong-worker: <index>; pid=<pid>``,
and ``/metrics`` a ``lifelong_worker_info`` line, so a client or a scrape through the shared
port can tell which process answered. ``/healthz`` and ``/readyz`` always name ``worker``
(null for a single process) and ``pid``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lifelong.core.errors import DataError, StoreUnavailable
from lifelong.data.schema import SURFACE_CODES, SURFACES
from lifelong.serving.batcher import BatchingConfig, ClientGone, DeadlineExceeded, DynamicBatcher, QueueFull
from lifelong.serving.metrics import ServiceMetrics
from lifelong.serving.ranking import SYNC_PATH, MalformedDelta, RankRequest, RankResult, ServedRanker, SyncedRanker

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
REQUEST_TIME_MAX = 2**62
TIMEOUT_MS_MAX = 600_000
SurfaceName = Annotated[str, Field(json_schema_extra={"enum": list(SURFACES)})]
RETRY_AFTER_S = 1
CLIENT_GONE = 499  # nginx's "client closed request": recorded in /metrics, never read by anyone
_ARRIVAL, _CAUSE = "lifelong.arrival", "lifelong.cause"  # keys this app adds to the ASGI scope
WORKER_HEADER = "x-lifelong-worker"
"""The header naming the replica that answered (``<index>; pid=<pid>``), under ``lifelong serve --workers N``."""


class RankBody(BaseModel):
    """A ranking request."""

    model_config = ConfigDict(strict=True, extra="forbid")

    user_id: INT64
    candidates: list[INT64] = Field(min_length=1, description=(
        "item ids to rank (at most the server's max_candidates, stated as maxItems); duplicates are merged: "
        "each distinct id is scored once and returned once"))
    surface: SurfaceName = Field(default=SURFACES[0], description=f"one of {', '.join(SURFACES)}")
    request_time: Annotated[int, Field(ge=0, le=REQUEST_TIME_MAX)] | None = Field(
        default=None, description="epoch ms; only events strictly before it are used (default: all stored)")
    timeout_ms: Annotated[int, Field(ge=1, le=TIMEOUT_MS_MAX)] | None = Field(
        default=None, description="the client's deadline in ms from arrival; the server's max_latency_ms caps it. "
                                  "A request not scored by then is dropped unscored and answered 504")


class ScoredItem(BaseModel):
    item_id: int
    score: float
    probs: dict[str, float]


class RankResponse(BaseModel):
    user_id: int
    model_version: str
    store_version: str | None = Field(description="the feature store version the request read (null: no store)")
    user_emb_version: int | None = Field(default=None, description=(
        "the DV365 user-embedding export version the request read (null: the model reads none)"))
    cold_start: bool
    items: list[ScoredItem] = Field(description="distinct candidates sorted by final score, best first")


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str
    unknown: list[int] | None = Field(default=None, description="with type unknown_items: the ids (first 100)")


class FieldErrors(BaseModel):
    """A 413 or 422: what is wrong, and where (``loc``)."""

    detail: list[FieldError]


class Refusal(BaseModel):
    """A 408, 503 or 504: the request was not scored, and why."""

    detail: str
    cause: str = Field(description="the `cause` label this answer is counted under in /metrics")


class Health(BaseModel):
    status: str = Field(description="`ok` (liveness) or `ready` / `not ready` (readiness)")
    ready: bool | None = Field(default=None, description="readiness (/readyz only)")
    reason: str | None = Field(default=None, description="why not ready (/readyz only)")
    model_version: str | None
    store_version: str | None
    user_emb_version: int | None = Field(default=None, description=(
        "the DV365 export version the last batch read (null: the model reads none)"))
    path: str
    worker: int | None = Field(default=None, description=(
        "the serving process that answered, 0..N-1 under `lifelong serve --workers N` (null: a single process)"))
    pid: int | None = Field(default=None, description="the answering process's id")


_RETRY = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def _error(status: int, field: str, message: str, type_: str, **extra) -> JSONResponse:
    loc = ["body", field] if field else ["body"]
    return JSONResponse(status_code=status, content={"detail": [{"loc": loc, "msg": message, "type": type_, **extra}]})


def _refuse(status: int, cause: str, detail: str, retry: bool = False, **extra) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
    return JSONResponse(status_code=status, content={"detail": detail, "cause": cause, **extra}, headers=headers)


class _WorkerHeader:
    """ASGI middleware naming the replica in every answer's headers (see :data:`WORKER_HEADER`)."""

    def __init__(self, app, value: str):
        self.app, self.header = app, (WORKER_HEADER.encode(), value.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


class _RankGuard:
    """ASGI middleware for ``POST /rank``: stamps the arrival time, reads the whole body within
    ``body_timeout_s`` and ``max_body_bytes`` (408 / 413 otherwise, connection closed), then
    replays it to the app; counts every answer in the metrics with its status and cause."""

    def __init__(self, app, metrics: ServiceMetrics, body_timeout_s: float, max_body_bytes: int):
        self.app, self.metrics = app, metrics
        self.body_timeout_s, self.max_body_bytes = body_timeout_s, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/rank":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        scope[_ARRIVAL] = start
        status = [CLIENT_GONE]

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            body = await self._read_body(scope, receive, start)
            if isinstance(body, JSONResponse):
                await body(scope, receive, send_counted)
                return
            if body is None:  # the client left while sending
                scope[_CAUSE] = "client_gone"
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_counted)
        except Exception:
            status[0], scope[_CAUSE] = 500, "internal"
            raise
        finally:
            if status[0] == CLIENT_GONE:
                scope.setdefault(_CAUSE, "client_gone")
            self.metrics.request(status[0], time.monotonic() - start, scope.get(_CAUSE))

    async def _read_body(self, scope, receive, start: float) -> bytes | JSONResponse | None:
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return self._too_large(scope)
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, start + self.body_timeout_s - time.monotonic()))
            except TimeoutError:
                scope[_CAUSE] = "body_timeout"
                return JSONResponse(status_code=408, headers={"Connection": "close"}, content={
                    "detail": f"the request body did not arrive whole within {self.body_timeout_s:g} s",
                    "cause": "body_timeout"})
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return self._too_large(scope)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, scope) -> JSONResponse:
        scope[_CAUSE] = "body_too_large"
        response = _error(413, "", f"the body is larger than {self.max_body_bytes} bytes", "body_too_large")
        response.headers["Connection"] = "close"
        return response


def create_app(ranker: ServedRanker, version: str, batching: BatchingConfig = BatchingConfig(),
               max_candidates: int = 1000, metrics: ServiceMetrics | None = None, max_latency_ms: float = 1000.0,
               body_timeout_s: float = 5.0, max_body_bytes: int | None = None,
               readiness_timeout_s: float = 2.0, worker: int | None = None) -> FastAPI:
    """The FastAPI application serving ``ranker``.

    Args:
        ranker: the request path (optimized, naive, or online).
        version: model version reported in every response (the online path reports the synced
            version that scored each response instead).
        batching: dynamic batching limits and the queue bound in candidates (the naive path
            takes one request per batch).
        max_candidates: candidates per request; more is answered 413.
        metrics: counters to update (a new set by default).
        max_latency_ms: the server's deadline for every request, from its arrival; a client's
            ``timeout_ms`` can only shorten it.
        body_timeout_s: longest the whole body of a ``/rank`` request may take to arrive (408).
        max_body_bytes: largest ``/rank`` body (413); default: enough for ``max_candidates`` ids.
        readiness_timeout_s: a ``readiness()`` that takes longer counts as not ready.
        worker: this process's index among the replicas of ``lifelong serve --workers N``: named
            in every answer's :data:`WORKER_HEADER`, in ``/healthz`` and ``/readyz``, and in
            ``/metrics``; None for a service that is one process.

    Example::

        app = create_app(Ranker(model, open_store(url)), version="v2@abc")
        uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    metrics = metrics or ServiceMetrics()
    if ranker.path == "naive":
        batching = BatchingConfig(max_examples=1, max_wait_ms=0.0, max_queue_examples=batching.max_queue_examples)
    if max_body_bytes is None:
        max_body_bytes = 4096 + 24 * max_candidates  # 20 digits, a sign, ", " per id, and the rest of the body
    seen: dict[str, Any] = {"store_version": None, "user_emb_version": None}

    def run_batch(requests: list[RankRequest]) -> list[RankResult]:
        try:
            results = ranker.rank(requests)
        except StoreUnavailable:
            metrics.store_error()
            raise
        for res in results:
            if res.store_version is not None:
                seen["store_version"] = res.store_version
            if res.user_emb_version is not None:
                seen["user_emb_version"] = res.user_emb_version
        return results

    batcher: DynamicBatcher[RankRequest, RankResult] = DynamicBatcher(
        run_batch, size=lambda r: int(r.items.size), cfg=batching, metrics=metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="lifelong ranking service", version=version, lifespan=lifespan)
    online = isinstance(ranker, SyncedRanker)
    app.state.metrics, app.state.ranker, app.state.batcher = metrics, ranker, batcher
    app.add_middleware(_RankGuard, metrics=metrics, body_timeout_s=body_timeout_s, max_body_bytes=max_body_bytes)
    pid = os.getpid()
    worker_info = ""
    if worker is not None:
        # Added last, so outermost: even the guard's own 408/413 answers name the replica.
        app.add_middleware(_WorkerHeader, value=f"{worker}; pid={pid}")
        worker_info = ("# HELP lifelong_worker_info The replica of `lifelong serve --workers N` these figures are of.\n"
                       f'# TYPE lifelong_worker_info gauge\nlifelong_worker_info{{worker="{worker}",pid="{pid}"}} 1\n')

    def model_version() -> str | None:
        return ranker.version if online else version

    def store_version() -> str | None:
        current = getattr(ranker, "store_version", None)
        return current if isinstance(current, str) else seen["store_version"]

    def user_emb_version() -> int | None:
        current = getattr(ranker, "user_emb_version", None)
        return current if isinstance(current, int) else seen["user_emb_version"]

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422, minus the echoed input (it may be huge); loc names the field.
        request.scope[_CAUSE] = "invalid"
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.exception_handler(StarletteHTTPException)
    async def unparsable(request: Request, exc: StarletteHTTPException):
        # FastAPI answers 400 for a JSON body it cannot even decode (e.g. invalid UTF-8), where
        # any other undecodable JSON is 422: one status for one kind of error.
        if exc.status_code == 400 and request.url.path == "/rank":
            request.scope[_CAUSE] = "invalid"
            return _error(422, "", "the body is not a JSON document (UTF-8)", "json_invalid")
        return await http_exception_handler(request, exc)

    rank_responses: dict[int | str, dict[str, Any]] = {
        408: {"model": Refusal, "description": "the body did not arrive whole in time (the connection is closed)"},
        413: {"model": FieldErrors, "description": "more candidates than maxItems, or a body too large"},
        422: {"model": FieldErrors, "description": "invalid request: not JSON, a wrong type, a value out of bounds, "
                                                   "or unknown item ids (type unknown_items, listed in `unknown`)"},
        503: {"model": Refusal, "headers": _RETRY,
              "description": "not scored, retry after Retry-After: the feature store is unavailable "
                             "(cause store_unavailable), the queue is full (overloaded), or no model yet (no_model)"},
        504: {"model": Refusal, "description": "the deadline (timeout_ms or the server's max_latency_ms) passed "
                                               "before the request was scored; it was dropped unscored"},
    }

    @app.post("/rank", response_model=RankResponse, responses=rank_responses)
    async def rank(body: RankBody, request: Request):
        scope = request.scope
        arrival = scope.get(_ARRIVAL, time.monotonic())
        budget_ms = max_latency_ms if body.timeout_ms is None else min(max_latency_ms, body.timeout_ms)
        deadline = arrival + budget_ms / 1000

        def refuse(status: int, cause: str, detail: str, retry: bool = False) -> JSONResponse:
            scope[_CAUSE] = cause
            return _refuse(status, cause, detail, retry)

        if len(body.candidates) > max_candidates:
            scope[_CAUSE] = "too_many_candidates"
            return _error(413, "candidates", f"{len(body.candidates)} candidates; at most {max_candidates} per request",
                          "too_many_candidates")
        if body.surface not in SURFACE_CODES:
            scope[_CAUSE] = "invalid"
            return _error(422, "surface", f"unknown surface {body.surface!r}; one of {', '.join(SURFACES)}", "enum")
        ids = np.array(list(dict.fromkeys(body.candidates)), dtype=np.int64)  # merged duplicates, first-seen order
        rows, unknown = ranker.item_rows(ids)
        if unknown.size:
            scope[_CAUSE] = "unknown_items"
            return _error(422, "candidates", f"{unknown.size} unknown item ids", "unknown_items",
                          unknown=unknown[:100].tolist())
        if online and ranker.version is None:
            return refuse(503, "no_model", "no model yet: waiting for the trainer's first sync", retry=True)
        if await request.is_disconnected():
            metrics.dropped("client_gone", int(ids.size))
            return refuse(CLIENT_GONE, "client_gone", "the client disconnected")
        if time.monotonic() >= deadline:
            metrics.dropped("deadline", int(ids.size))
            return refuse(504, "deadline", f"the deadline ({budget_ms:g} ms) passed before the request was queued")
        req = RankRequest(body.user_id, rows, SURFACE_CODES[body.surface], body.request_time)
        try:
            result = await batcher.submit(req, deadline=deadline, gone=request.is_disconnected)
        except QueueFull as exc:
            return refuse(503, "overloaded", f"overloaded: {exc}", retry=True)
        except DeadlineExceeded:
            return refuse(504, "deadline", f"the deadline ({budget_ms:g} ms) passed before the request was scored")
        except ClientGone:
            return refuse(CLIENT_GONE, "client_gone", "the client disconnected")
        except StoreUnavailable as exc:
            return refuse(503, "store_unavailable", f"feature store unavailable: {exc.reason}", retry=True)
        except Exception as exc:  # a bug: answered, counted, never a dropped connection
            return refuse(500, "internal", f"internal error: {type(exc).__name__}: {exc}")
        if result.cold_start:
            metrics.cold()
        order = np.argsort(-result.scores, kind="stable")
        heads = ranker.heads
        items = [ScoredItem(item_id=int(ids[i]), score=float(result.scores[i]),
                            probs={h: float(p) for h, p in zip(heads, result.probs[i])}) for i in order]
        return RankResponse(user_id=body.user_id, model_version=result.model_version or version,
                            store_version=result.store_version, user_emb_version=result.user_emb_version,
                            cold_start=result.cold_start, items=items)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """Liveness: 200 while the process runs and its event loop answers (readiness: /readyz)."""
        return Health(status="ok", model_version=model_version(), store_version=store_version(),
                      user_emb_version=user_emb_version(), path=ranker.path, worker=worker, pid=pid)

    async def ready_now() -> tuple[bool, str]:
        probe = getattr(ranker, "readiness", None)
        if probe is None:
            return True, "ok"
        try:
            # Off the event loop: a store probe may block (a Redis PING against a dead host).
            return await asyncio.wait_for(asyncio.to_thread(probe), timeout=readiness_timeout_s)
        except TimeoutError:
            return False, f"the readiness probe took more than {readiness_timeout_s:g} s"
        except Exception as exc:
            return False, f"the readiness probe failed: {type(exc).__name__}: {exc}"

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health, "headers": _RETRY,
                                                                "description": "not ready; `reason` says why"}})
    async def readyz():
        """Readiness: 200 when the ranker can answer now (its store reachable and loaded), else 503."""
        ok, reason = await ready_now()
        if not batcher.alive:  # a bug killed the batching loop: say so instead of timing every request out
            ok, reason = False, "the batching loop is not running"
        metrics.ready = ok
        health = Health(status="ready" if ok else "not ready", ready=ok, reason=reason, model_version=model_version(),
                        store_version=store_version(), user_emb_version=user_emb_version(), path=ranker.path,
                        worker=worker, pid=pid)
        if ok:
            return health
        return JSONResponse(status_code=503, content=health.model_dump(), headers={"Retry-After": str(RETRY_AFTER_S)})

    if online:
        @app.post(SYNC_PATH, responses={409: {"description": "the delta does not follow the held version"},
                                        422: {"description": "not a delta"}})
        async def sync(request: Request):
            """Apply a parameter delta pushed by ``lifelong monolith online`` (body: lifelong.monolith.sync wire format)."""
            payload = await request.body()
            try:
                # Off the event loop: decoding a full snapshot takes a while, requests keep flowing.
                applied = await asyncio.to_thread(ranker.apply_sync, payload)
            except DataError as exc:  # a malformed body, or a delta that does not follow the held version
                status = 422 if isinstance(exc, MalformedDelta) else 409
                metrics.sync(ok=False)
                return JSONResponse(status_code=status, content={"detail": str(exc), "model_version": ranker.version})
            metrics.sync(ok=True)
            return applied

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> str:
        return metrics.render() + worker_info

    def openapi() -> dict[str, Any]:
        """FastAPI's schema with the request's bounds exact: FastAPI writes them as floats
        (2^63 - 1 becomes 9.223372036854776e18, i.e. 2^63), and maxItems is this server's."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            body = RankBody.model_json_schema(ref_template="#/components/schemas/{model}")
            body["properties"]["candidates"]["maxItems"] = max_candidates
            schema["components"]["schemas"]["RankBody"] = json.loads(json.dumps(body))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
