"""The ranking service: a KServe model that scores one user's candidates from the embedding store.

`RankerModel` is the only thing KServe sees (load, preprocess, predict, postprocess). Per request
it makes one batched vector read (history and candidates in one HMGET; the history ids come with
the request or from one LRANGE), runs SimTier and MAKE inside one forward pass of the ranker, and
answers one score per candidate. An item the store
has no vector for (new, not embedded yet) is scored with neutral features and counted in
`mmrank_embedding_miss_total`, never a 500.

Readiness is the embedding-sync invariant: the model reports ready only while the space its
ranker was trained on is reachable and covers at least `min_coverage` of the catalogue. A
background thread re-checks it, logs every change, and the model-ready routes say why.

Beside KServe's routes, `serve()` adds to KServe's own FastAPI app (one port, one process):
`POST /v1/feedback` (impressions and clicks by request id), the model-ready routes with the
reason, and an ASGI guard that answers 413 beyond the body limit and 503 at once when
`max_concurrency` requests are already in flight (a queue would only grow latency).
"""
from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import JSONResponse
from kserve import Model
from kserve.errors import InvalidInput, ModelNotReady
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from prometheus_client import Counter, Gauge, Histogram

from mmrank.predictors.requests import (
    UNKNOWN,
    BadRequest,
    Limits,
    Ranking,
    new_request_id,
    parse_feedback,
    parse_v1,
    parse_v2,
    v2_tensor,
)

log = logging.getLogger("mmrank.predictor")

FEEDBACK_STREAM = "mmrank:feedback"

# --- metrics (the default registry: KServe's /metrics serves it beside its own) ---------------

LATENCY = Histogram("mmrank_request_duration_seconds", "Ranking request latency, body read to answer",
                    ["variant", "protocol"],
                    buckets=(0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5))
REQUESTS = Counter("mmrank_requests", "Ranking requests answered", ["variant", "protocol", "code"])
ERRORS = Counter("mmrank_request_errors", "Ranking requests answered with an error", ["variant", "reason"])
STORE_READ = Histogram("mmrank_store_read_duration_seconds", "Embedding store read per request",
                       ["variant", "space"],
                       buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1))
CANDIDATES = Histogram("mmrank_candidates_per_request", "Candidates scored per request", ["variant"],
                       buckets=(1, 5, 10, 25, 50, 100, 200, 300, 500, 1000))
MISSES = Counter("mmrank_embedding_miss", "Items scored without an embedding (neutral features)",
                 ["variant", "space", "role"])
IMPRESSIONS = Counter("mmrank_impressions", "Impressions reported by request id", ["variant"])
CLICKS = Counter("mmrank_clicks", "Clicks reported by request id", ["variant"])
READY = Gauge("mmrank_ready", "1 while the ranker may serve: space reachable and covered", ["variant", "space"])
COVERAGE = Gauge("mmrank_space_coverage", "Coverage of the ranker's space as last read", ["variant", "space"])
INFLIGHT = Gauge("mmrank_inflight_requests", "Ranking requests in flight", ["variant"])

# Filled per request by the guard; the model writes the specific error reason into it. A mutable
# dict, so writes from KServe's handler (even in another task or thread) reach the guard.
_REQUEST_NOTE: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("mmrank_request_note")


def note(**values: str) -> None:
    slot = _REQUEST_NOTE.get(None)
    if slot is not None:
        slot.update(values)


# --- pure decisions -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str
    coverage: float | None = None


def readiness(space: str, dim: int, min_coverage: float, info: Any | None, error: str | None,
              expected_space: str | None = None) -> Readiness:
    """May the ranker trained on `space` serve? `info` is the store's SpaceInfo, `error` why it
    could not be read. Never ready when deployed for another space, on a space of another width,
    or below the minimum coverage."""
    if expected_space and expected_space != space:
        return Readiness(False, f"deployed for space {expected_space}, but the ranker was trained on space {space}")
    if error is not None:
        return Readiness(False, error)
    if info.dim != dim:
        return Readiness(False, f"space {space} has dim {info.dim}, the ranker was trained on {dim}", info.coverage)
    if info.coverage < min_coverage:
        return Readiness(False, f"space {space} coverage {info.coverage:.4f} is below the minimum "
                         f"{min_coverage:.4f} ({info.items} of {info.catalogue_size} items)", info.coverage)
    return Readiness(True, f"space {space} coverage {info.coverage:.4f} >= {min_coverage:.4f}", info.coverage)


def error_reason(status: int, noted: str | None) -> str:
    """The `reason` label of an error answer: what the model noted, else what the status says."""
    if noted:
        return noted
    if status == 413:
        return "body_too_large"
    if status == 422:
        return "invalid_v2_body"
    if status == 404:
        return "model_not_found"
    if status == 503:
        return "not_ready"
    if 400 <= status < 500:
        return "invalid_request"
    return "internal"


def fill_features(ids: np.ndarray, given: np.ndarray, table: np.ndarray, column: int) -> np.ndarray:
    """Category or brand per item: what the request gave, else the artifact's table, else -1."""
    known = (ids >= 0) & (ids < len(table))
    looked_up = np.full(len(ids), UNKNOWN, dtype=np.int64)
    if len(table):
        looked_up[known] = table[ids[known], column]
    return np.where(given >= 0, given, looked_up)


def newest(history: np.ndarray, length: int) -> np.ndarray:
    """The last `length` behaviours (the window the ranker was trained on); oldest first."""
    return history[-length:] if length > 0 else history[:0]


def with_password(url: str, password: str | None) -> str:
    """The store URL with the password from its Secret, unless the URL carries one already."""
    import urllib.parse

    parsed = urllib.parse.urlsplit(url)
    if not password or parsed.scheme not in ("redis", "rediss") or parsed.password:
        return url
    user = urllib.parse.quote(parsed.username or "", safe="")
    netloc = f"{user}:{urllib.parse.quote(password, safe='')}@{parsed.hostname}" + \
        (f":{parsed.port}" if parsed.port else "")
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc))


def redact(url: str) -> str:
    import urllib.parse

    parsed = urllib.parse.urlsplit(url)
    if not parsed.password:
        return url
    return urllib.parse.urlunsplit(parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@")))


def route_of(path: str, method: str) -> str | None:
    """Which guarded route a request is for: 'v1', 'v2', 'feedback' or None (not guarded)."""
    if method != "POST":
        return None
    if path.startswith("/v1/models/") and path.endswith(":predict"):
        return "v1"
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "v2"
    if path == "/v1/feedback":
        return "feedback"
    return None


# --- the model ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Scored:
    request_id: str
    scores: np.ndarray  # float32 [C], click probabilities
    cand_misses: int
    hist_misses: int
    history_length: int


class RankerModel(Model):
    """A ranker artifact served against the embedding store; knows nothing about HTTP."""

    def __init__(self, name: str, model_dir: str | Path, store_url: str, limits: Limits = Limits(),
                 min_coverage: float = 0.99, recheck_seconds: float = 5.0, feedback_stream: bool = True,
                 expected_space: str | None = None, version: str | None = None,
                 history_length: int | None = None) -> None:
        super().__init__(name)
        self.model_dir = Path(model_dir)
        self.store_url = store_url
        self.expected_space = expected_space or None
        self.version_override = version or None
        self.history_length = history_length
        self.limits = limits
        self.min_coverage = min_coverage
        self.recheck_seconds = recheck_seconds
        self.feedback_stream = feedback_stream
        self.state = Readiness(False, "not loaded")
        self._stop = threading.Event()
        self.ranker: Any = None
        self.meta: dict[str, Any] = {}
        self.store: Any = None
        self.features = np.zeros((0, 2), np.int64)

    # identity of what is served
    @property
    def version(self) -> str:
        """The variant label: the operator's name for this ranker when given, else ranker.json's."""
        return self.version_override or str(self.meta.get("version", ""))

    @property
    def window(self) -> int:
        """Newest behaviours read per user: `--history-length`, else what the ranker trained on."""
        return int(self.history_length or self.meta.get("history_length", self.limits.max_history))

    @property
    def space(self) -> str:
        return str(self.meta.get("encoder_version", ""))

    def load(self) -> bool:
        """Load the artifact (idempotent: KServe calls it again when a model is not ready)."""
        if self.ranker is not None:
            return self.ready
        from mmrank.predictors.artifact import load_ranker
        from mmrank.store import open_store

        self.ranker, self.meta = load_ranker(self.model_dir)
        self.features = self.ranker.item_features.numpy()
        self.store = open_store(self.store_url)
        log.info("loaded ranker %s (artifact %s, %s) from %s, trained on space %s; history window %d; store %s",
                 self.version, self.meta.get("version"), self.meta.get("variant"), self.model_dir, self.space,
                 self.window, redact(self.store_url))
        self.check()
        threading.Thread(target=self._recheck_loop, name="mmrank-readiness", daemon=True).start()
        if self.feedback_stream and hasattr(self.store, "client"):
            threading.Thread(target=self._feedback_loop, name="mmrank-feedback", daemon=True).start()
        self.ready = True
        return self.ready

    def stop(self) -> None:
        self._stop.set()
        super().stop()

    async def healthy(self) -> bool:
        return self.ready and self.state.ready

    # readiness ------------------------------------------------------------------------------
    def check(self) -> Readiness:
        from mmrank.store import SpaceNotFound

        info, error = None, None
        try:
            info = self.store.space_info(self.space)
        except SpaceNotFound:
            error = f"space {self.space} is not in the store"
        except Exception as exc:  # noqa: BLE001 - any failure to read means 'unreachable'
            error = f"store unreachable: {type(exc).__name__}: {exc}"
        self._set_state(readiness(self.space, int(self.meta["dim"]), self.min_coverage, info, error,
                                  self.expected_space))
        return self.state

    def _set_state(self, state: Readiness) -> None:
        previous, self.state = self.state, state
        READY.labels(self.version, self.space).set(1.0 if state.ready else 0.0)
        if state.coverage is not None:
            COVERAGE.labels(self.version, self.space).set(state.coverage)
        if previous.ready != state.ready or (not state.ready and previous.reason != state.reason):
            (log.info if state.ready else log.warning)(
                "ranker %s %s: %s", self.version, "ready" if state.ready else "NOT ready", state.reason)

    def _recheck_loop(self) -> None:
        while not self._stop.wait(self.recheck_seconds):
            self.check()

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "ready": self.ready and self.state.ready, "reason": self.state.reason,
                "ranker_version": self.version, "variant": self.meta.get("variant"), "space": self.space,
                "coverage": self.state.coverage, "min_coverage": self.min_coverage}

    # KServe hooks -----------------------------------------------------------------------------
    def validate(self, payload: Any) -> Any:
        return payload  # `preprocess` has validated it already, per protocol

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
        try:
            if isinstance(payload, InferRequest):
                ranking, protocol = parse_v2(self._v2_tensors(payload), self.limits), "v2"
            else:
                ranking, protocol = parse_v1(_json_body(payload), self.limits), "v1"
        except BadRequest as exc:
            note(reason=exc.reason, status=str(exc.status))
            raise InvalidInput(str(exc)) from None
        return {"ranking": ranking, "protocol": protocol}

    @staticmethod
    def _v2_tensors(request: InferRequest) -> dict[str, np.ndarray]:
        return {i.name: v2_tensor(i.name, i.datatype, i.shape, i.as_numpy) for i in request.inputs}

    async def predict(self, payload: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
        try:
            scored = await asyncio.to_thread(self.rank, payload["ranking"])
        except StoreUnavailable as exc:
            note(reason="store_unavailable")
            self._set_state(Readiness(False, str(exc)))
            raise ModelNotReady(self.name, str(exc)) from None
        return {**payload, "scored": scored}

    async def postprocess(self, result: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        scored: Scored = result["scored"]
        if result["protocol"] == "v2":
            output = InferOutput("scores", [len(scored.scores)], "FP32", scored.scores.tolist())
            return InferResponse(scored.request_id, self.name, [output], model_version=self.version,
                                 parameters={"ranker_version": self.version, "space": self.space,
                                             "request_id": scored.request_id,
                                             "embedding_misses": scored.cand_misses + scored.hist_misses})
        return {"predictions": scored.scores.tolist(), "ranker_version": self.version, "space": self.space,
                "request_id": scored.request_id,
                "embedding_misses": {"candidates": scored.cand_misses, "history": scored.hist_misses}}

    # the work of one request (runs in a worker thread) -----------------------------------------
    def rank(self, ranking: Ranking) -> Scored:
        import torch

        space, variant = self.space, self.version
        window = self.window
        started = time.perf_counter()
        try:
            history = ranking.history if ranking.history is not None \
                else self.store.get_history(ranking.user_id, window)
            history = newest(np.asarray(history, dtype=np.int64), window)
            vectors, found = self.store.get(space, np.concatenate([history, ranking.cand_ids]))
        except Exception as exc:  # noqa: BLE001 - the store's client raises its own errors
            raise StoreUnavailable(f"store read failed: {type(exc).__name__}: {exc}") from exc
        STORE_READ.labels(variant, space).observe(time.perf_counter() - started)
        n_hist = len(history)
        hist_found, cand_found = found[:n_hist], found[n_hist:]
        cand_misses, hist_misses = int((~cand_found).sum()), int((~hist_found).sum())
        if cand_misses:
            MISSES.labels(variant, space, "candidate").inc(cand_misses)
        if hist_misses:
            MISSES.labels(variant, space, "history").inc(hist_misses)
        CANDIDATES.labels(variant).observe(len(ranking.cand_ids))
        t = torch.from_numpy
        logits = self.ranker.score_candidates(
            ranking.user_id, t(history), torch.ones(n_hist, dtype=torch.bool), t(vectors[:n_hist]),
            t(hist_found), t(ranking.cand_ids), t(vectors[n_hist:]), t(cand_found),
            cand_category=t(fill_features(ranking.cand_ids, ranking.cand_category, self.features, 0)),
            cand_brand=t(fill_features(ranking.cand_ids, ranking.cand_brand, self.features, 1)),
            history_category=t(fill_features(history, np.full(n_hist, UNKNOWN), self.features, 0)),
            history_brand=t(fill_features(history, np.full(n_hist, UNKNOWN), self.features, 1)))
        scores = torch.sigmoid(logits).numpy().astype(np.float32)
        return Scored(new_request_id(variant), scores, cand_misses, hist_misses, n_hist)

    # click feedback ---------------------------------------------------------------------------
    def record_feedback(self, body: Any, lax: bool = False) -> dict[str, Any]:
        """Count it when this variant served the request, else pass it on through the stream,
        where the serving variant's consumer group counts it (canary and stable share a route)."""
        feedback, variant = parse_feedback(body, lax=lax)
        if variant == self.version:
            IMPRESSIONS.labels(variant).inc(feedback.impressions)
            CLICKS.labels(variant).inc(feedback.clicks)
            return {"counted": True, "variant": variant}
        client = getattr(self.store, "client", None)
        if lax:
            return {"counted": False, "variant": variant}  # the serving variant's consumers count it
        if client is None:
            raise BadRequest("request_id", f"served by variant {variant}, this is {self.version}, and the "
                             "embedded store has no feedback stream to pass it on", status=409, reason="other_variant")
        client.xadd(FEEDBACK_STREAM, {"request_id": feedback.request_id, "impressions": feedback.impressions,
                                      "clicks": feedback.clicks}, maxlen=1_000_000, approximate=True)
        return {"counted": False, "relayed": FEEDBACK_STREAM, "variant": variant}

    def _feedback_loop(self) -> None:
        """One consumer group per variant, so every variant sees every entry and counts its own."""
        client, group = self.store.client, f"feedback-{self.version}"
        consumer = f"{os.uname().nodename}-{os.getpid()}"
        last_error = ""
        while not self._stop.is_set():
            try:
                try:
                    client.xgroup_create(FEEDBACK_STREAM, group, id="$", mkstream=True)
                except Exception as exc:  # noqa: BLE001 - BUSYGROUP: it exists already
                    if "BUSYGROUP" not in str(exc):
                        raise
                while not self._stop.is_set():
                    batches = client.xreadgroup(group, consumer, {FEEDBACK_STREAM: ">"}, count=500, block=1000)
                    for _, entries in batches or []:
                        for entry_id, fields in entries:
                            self._count_stream_entry(fields)
                            client.xack(FEEDBACK_STREAM, group, entry_id)
            except Exception as exc:  # noqa: BLE001 - keep consuming once the store is back
                error = f"{type(exc).__name__}: {exc}"
                if error != last_error:
                    log.warning("feedback stream %s: %s (retrying every %.1f s)", FEEDBACK_STREAM, error,
                                self.recheck_seconds)
                last_error = error
                self._stop.wait(self.recheck_seconds)

    def _count_stream_entry(self, fields: dict[bytes, bytes]) -> None:
        body = {k.decode(): v.decode() for k, v in fields.items()}
        try:
            self.record_feedback(body, lax=True)
        except BadRequest as exc:
            log.warning("feedback stream entry dropped: %s", exc)


def _json_body(payload: Any) -> Any:
    """KServe hands the v1 body over undecoded when the content type is not JSON: decode it."""
    if isinstance(payload, bytes | bytearray | str):
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise BadRequest("body", f"not valid JSON: {exc}") from None
    return payload


class StoreUnavailable(RuntimeError):
    """The store did not answer a request's read: the answer is 503, and the model not ready."""


# --- HTTP wiring: added to KServe's own FastAPI app before it starts ---------------------------

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Guard:
    """Pure ASGI middleware on the ranking and feedback routes: body limit (413), concurrency
    bound (503 at once), latency and error metrics by variant."""

    def __init__(self, app: Any, model: RankerModel) -> None:
        self.app = app
        self.model = model
        self.inflight = 0

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        route = route_of(scope.get("path", ""), scope.get("method", "")) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        variant, limits = self.model.version, self.model.limits
        slot: dict[str, str] = {}
        _REQUEST_NOTE.set(slot)
        status = {"code": 500}

        async def send_noting_status(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        counted = route != "feedback"
        if counted and self.inflight >= limits.max_concurrency:
            slot["reason"] = "overloaded"
            await _json(send_noting_status, 503, {"error": f"overloaded: {self.inflight} requests in flight, "
                                                  f"at most {limits.max_concurrency}; retry later"},
                        {"retry-after": "1"})
        else:
            # The slot is taken before the body is read: a slow upload holds capacity too.
            self._enter(counted, variant, +1)
            try:
                body = await _read_body(scope, receive, limits.max_body_bytes)
                if body is None:
                    await _json(send_noting_status, 413, {"error": f"body: larger than {limits.max_body_bytes} bytes"})
                else:
                    await self.app(scope, _replay(body, receive), send_noting_status)
            finally:
                self._enter(counted, variant, -1)
        if not counted:
            return
        code = status["code"]
        REQUESTS.labels(variant, route, str(code)).inc()
        if code >= 400:
            ERRORS.labels(variant, error_reason(code, slot.get("reason"))).inc()
        else:
            LATENCY.labels(variant, route).observe(time.perf_counter() - started)

    def _enter(self, counted: bool, variant: str, step: int) -> None:
        if counted:
            self.inflight += step
            INFLIGHT.labels(variant).set(self.inflight)


async def _read_body(scope: MutableMapping[str, Any], receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None beyond `limit` (refused before reading when Content-Length says so)."""
    for key, value in scope.get("headers", []):
        if key == b"content-length" and value.isdigit() and int(value) > limit:
            return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read by the guard, then the client's own channel (for its disconnect)."""
    sent = False

    async def replay() -> MutableMapping[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _json(send: Send, status: int, content: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    body = orjson.dumps(content)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def add_routes(app: Any, model: RankerModel) -> None:
    """Registered before KServe's own routes, so the model-ready routes here (same paths, same
    answers, plus the reason when not ready) take precedence."""
    async def v1_model_ready(model_name: str) -> JSONResponse:
        return _ready_answer(model, model_name, {"name": model_name, "ready": True})

    async def v2_model_ready(model_name: str) -> JSONResponse:
        return _ready_answer(model, model_name, {"name": model_name, "ready": True})

    async def model_status(model_name: str) -> JSONResponse:
        if model_name != model.name:
            return JSONResponse({"error": f"Model with name {model_name} does not exist."}, status_code=404)
        return JSONResponse(model.status())

    async def feedback(request: Request) -> JSONResponse:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return JSONResponse({"error": f"body: not JSON: {exc}"}, status_code=400)
        try:
            answer = await asyncio.to_thread(model.record_feedback, body)
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        except Exception as exc:  # noqa: BLE001 - the stream is in the store; it may be down
            return JSONResponse({"error": f"feedback stream unavailable: {type(exc).__name__}: {exc}"},
                                status_code=503, headers={"retry-after": "1"})
        return JSONResponse(answer, status_code=200 if answer["counted"] else 202)

    async def server_ready() -> JSONResponse:
        """One model per server: the server is ready when the ranker is (Kubernetes probes this)."""
        if model.ready and model.state.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"error": f"Server is not ready. {model.state.reason}", "ready": False}, status_code=503)

    app.add_api_route("/v2/health/ready", server_ready, methods=["GET"])
    app.add_api_route("/v1/models/{model_name}", v1_model_ready, methods=["GET"])
    app.add_api_route("/v1/models/{model_name}/status", model_status, methods=["GET"])
    app.add_api_route("/v2/models/{model_name}/ready", v2_model_ready, methods=["GET"])
    app.add_api_route("/v1/feedback", feedback, methods=["POST"])
    app.add_middleware(Guard, model=model)


def _ready_answer(model: RankerModel, name: str, ok: dict[str, Any]) -> JSONResponse:
    if name != model.name:
        return JSONResponse({"error": f"Model with name {name} does not exist."}, status_code=404)
    if model.ready and model.state.ready:
        return JSONResponse(ok)
    return JSONResponse({"error": str(ModelNotReady(name, model.state.reason)), **model.status()},
                          status_code=503)


def serve(model: RankerModel, http_port: int, workers_threads: int | None = None, access_log: bool = False) -> None:
    """Load the model and run KServe's ModelServer (REST only) until SIGTERM. Per-request access
    and timing log lines are off unless `access_log`: metrics carry that, at a fraction of the cost."""
    import sys

    argv, sys.argv = sys.argv, sys.argv[:1]  # kserve.model_server parses sys.argv on import
    try:
        from kserve import ModelServer
        from kserve.model_server import app
    finally:
        sys.argv = argv
    server = ModelServer(http_port=http_port, enable_grpc=False, max_asyncio_workers=workers_threads,
                         enable_latency_logging=False)
    _log_to_stderr()
    if not access_log:
        for name in ("uvicorn.access", "kserve.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
    model.load()
    add_routes(app, model)
    server.start([model])


def _log_to_stderr() -> None:
    """After KServe's dictConfig (which disables loggers it does not name)."""
    log.disabled = False
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
