"""The HTTP ranking service: ``POST /rank``, ``GET /healthz``, ``GET /metrics`` (FastAPI).

Bad input is the client's error, never a 500: malformed JSON and wrong types are answered 422
with the offending field named (FastAPI's validation errors), unknown item ids 422 listing
them, too many candidates 413, a saturated queue 503. A user without stored sequences is
served cold-start (empty sequences) and counted in ``/metrics``.

A ranker that takes parameter pushes (a
:class:`~lifelong.serving.ranking.SyncedRanker`, such as Monolith's online ranker) also gets ``POST /admin/sync``: 200 with
what was applied, 409 when the delta does not follow the held version, 422 for a malformed
body; ``/rank`` answers 503 until the first full snapshot has arrived, and every response
names the version that scored it.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import Annotated

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from lifelong.core.errors import DataError
from lifelong.data.schema import SURFACE_CODES, SURFACES
from lifelong.serving.batcher import BatchingConfig, DynamicBatcher, QueueFull
from lifelong.serving.metrics import ServiceMetrics
from lifelong.serving.ranking import SYNC_PATH, MalformedDelta, RankRequest, RankResult, ServedRanker, SyncedRanker

INT64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
SurfaceName = Annotated[str, Field(json_schema_extra={"enum": list(SURFACES)})]


class RankBody(BaseModel):
    """A ranking request."""

    model_config = ConfigDict(strict=True, extra="forbid")

    user_id: INT64
    candidates: list[INT64] = Field(min_length=1, description="item ids to rank")
    surface: SurfaceName = Field(default=SURFACES[0], description=f"one of {', '.join(SURFACES)}")
    request_time: Annotated[int, Field(ge=0, le=2**62)] | None = Field(
        default=None, description="epoch ms; only events strictly before it are used (default: all stored)")


class ScoredItem(BaseModel):
    item_id: int
    score: float
    probs: dict[str, float]


class RankResponse(BaseModel):
    user_id: int
    model_version: str
    cold_start: bool
    items: list[ScoredItem] = Field(description="candidates sorted by final score, best first")


def _error(status: int, field: str, message: str, **extra) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": [{"loc": ["body", field], "msg": message, **extra}]})


def create_app(ranker: ServedRanker, version: str, batching: BatchingConfig = BatchingConfig(),
               max_candidates: int = 1000, metrics: ServiceMetrics | None = None) -> FastAPI:
    """The FastAPI application serving ``ranker``.

    Args:
        ranker: the request path (optimized, naive, or online).
        version: model version reported in every response (the online path reports the synced
            version that scored each response instead).
        batching: dynamic batching limits (the naive path ignores them: one request per batch).
        max_candidates: candidates per request; more is answered 413.
        metrics: counters to update (a new set by default).

    Example::

        app = create_app(Ranker(model, open_store(url)), version="v2@abc")
        uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    metrics = metrics or ServiceMetrics()
    if ranker.path == "naive":
        batching = BatchingConfig(max_examples=1, max_wait_ms=0.0, max_queue=batching.max_queue)

    def run_batch(requests: list[RankRequest]) -> list[RankResult]:
        return ranker.rank(requests)

    batcher: DynamicBatcher[RankRequest, RankResult] = DynamicBatcher(
        run_batch, size=lambda r: int(r.items.size), cfg=batching, metrics=metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="lifelong ranking service", version=version, lifespan=lifespan)
    online = isinstance(ranker, SyncedRanker)
    app.state.metrics, app.state.ranker = metrics, ranker

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        if request.url.path == "/rank":
            metrics.request(response.status_code, time.perf_counter() - start)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422, minus the echoed input (it may be huge); loc names the field.
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.post("/rank", response_model=RankResponse,
              responses={413: {"description": "too many candidates"}, 422: {"description": "invalid request"},
                         503: {"description": "overloaded; retry"}})
    async def rank(body: RankBody):
        if len(body.candidates) > max_candidates:
            return _error(413, "candidates", f"{len(body.candidates)} candidates; at most {max_candidates} per request")
        if body.surface not in SURFACE_CODES:
            return _error(422, "surface", f"unknown surface {body.surface!r}; one of {', '.join(SURFACES)}")
        ids = np.array(body.candidates, dtype=np.int64)
        rows, unknown = ranker.item_rows(ids)
        if unknown.size:
            return _error(422, "candidates", f"{unknown.size} unknown item ids", unknown=unknown[:100].tolist())
        if online and ranker.version is None:
            return JSONResponse(status_code=503, content={"detail": "no model yet: waiting for the trainer's first sync"},
                                headers={"Retry-After": "1"})
        req = RankRequest(body.user_id, rows, SURFACE_CODES[body.surface], body.request_time)
        try:
            result = await batcher.submit(req)
        except QueueFull as exc:
            return JSONResponse(status_code=503, content={"detail": f"overloaded: {exc}"}, headers={"Retry-After": "1"})
        if result.cold_start:
            metrics.cold()
        order = np.argsort(-result.scores, kind="stable")
        heads = ranker.heads
        items = [ScoredItem(item_id=int(ids[i]), score=float(result.scores[i]),
                            probs={h: float(p) for h, p in zip(heads, result.probs[i])}) for i in order]
        return RankResponse(user_id=body.user_id, model_version=result.model_version or version,
                            cold_start=result.cold_start, items=items)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "model_version": (ranker.version if online else version), "path": ranker.path}

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
        return metrics.render()

    return app
