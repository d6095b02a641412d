"""REST: an ASGI layer in front of KServe's FastAPI app, and the routes this service adds to it.

`Guard` answers the ranking routes (`POST /v1/models/<m>:predict`, `POST /v2/models/<m>/infer`)
itself: it reads the body under a size limit and a deadline *before* taking one of the
`max_concurrency` slots (503 at once when none is free; predictors/admission.py), decodes it
(predictors/protocol.py: every malformed body a 4xx naming the field), calls the model's hooks
and writes the answer, counted and timed (predictors/ranking_metrics.py) whatever its status.
Every other route goes on to KServe's app; `POST /v1/feedback` after the same body limit and
deadline. `add_routes` registers, on KServe's app, the feedback route and the model-ready routes
that say why a model is not ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse
from kserve.errors import ModelNotFound, ModelNotReady

from mmrank.predictors.admission import Admission, classify
from mmrank.predictors.protocol import HEADER_LENGTH, decode_v1, decode_v2
from mmrank.predictors.ranker_model import RankerModel
from mmrank.predictors.ranking_metrics import record
from mmrank.predictors.requests import BadRequest, Limits

log = logging.getLogger("mmrank.predictor")


def ranking_route(path: str, method: str) -> tuple[str, str] | None:
    """(protocol, model name) of a ranking call, or None for every other route."""
    if method != "POST":
        return None
    if path.startswith("/v1/models/") and path.endswith(":predict"):
        return "v1", path[len("/v1/models/") : -len(":predict")]
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        name = path[len("/v2/models/") : -len("/infer")]
        return "v2", name.split("/versions/")[0]
    return None


def route_of(path: str, method: str) -> str | None:
    """Which guarded route a request is for: 'v1', 'v2', 'feedback' or None (not guarded)."""
    if path == "/v1/feedback" and method == "POST":
        return "feedback"
    route = ranking_route(path, method)
    return route[0] if route else None


Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Guard:
    """Answers the ranking routes itself (body limit and deadline, slots, decoding, the model's
    hooks, metrics for every answer); every other route goes on to KServe's app, the feedback
    route after the same body limit and deadline."""

    def __init__(self, app: Any, model: RankerModel, admission: Admission) -> None:
        self.app = app
        self.model = model
        self.admission = admission

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        path, method = scope.get("path", ""), scope.get("method", "")
        route = ranking_route(path, method) if scope["type"] == "http" else None
        if route is None:
            if scope["type"] == "http" and route_of(path, method) == "feedback":
                await self._feedback(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        answered: list[int] = []

        async def tracked(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answered.append(int(message["status"]))
            await send(message)

        status: int | None
        reason: str | None = None
        try:
            status, reason = await self._ranking(scope, receive, tracked, *route)
        except Exception as exc:  # noqa: BLE001 - a bug of ours: answered 500, counted, logged once
            status, reason, message = classify(exc)
            log.error("%s %s: %s", method, path, message, exc_info=exc)
            if not answered:
                await _json(tracked, status, {"error": message})
        if status is not None:
            record(self.model.version, route[0], status, reason, time.perf_counter() - started)

    async def _ranking(
        self, scope: MutableMapping[str, Any], receive: Receive, send: Send, protocol: str, name: str
    ) -> tuple[int | None, str | None]:
        """(status, reason) of the answer sent; (None, None) when the client left first."""
        model, limits = self.model, self.model.limits
        body, refused = await read_body(scope, receive, limits)
        if refused:
            await _json(send, refused[0], {"error": refused[1]}, close=True)
            return refused[0], None
        if body is None:
            return None, None
        if not self.admission.enter():
            await _json(send, 503, {"error": self.admission.refusal()}, {"retry-after": "1"})
            return 503, "overloaded"
        try:
            if name != model.name:
                raise ModelNotFound(name)
            if not model.serving:
                raise ModelNotReady(name, model.state.reason)
            call = (
                decode_v1(body, limits) if protocol == "v1" else decode_v2(body, header(scope, HEADER_LENGTH), limits)
            )
            answer, _ = await model(call)
        except Exception as exc:  # noqa: BLE001 - each kind has its status (classify)
            status, reason, message = classify(exc)
            if status >= 500 and reason == "internal":
                log.error("%s: %s", scope.get("path"), message, exc_info=exc)
            await _json(send, status, {"error": message}, {"retry-after": "1"} if status == 503 else None)
            return status, reason
        finally:
            self.admission.leave()
        headers = [*answer.headers, (b"content-length", str(len(answer.body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})
        return 200, None

    async def _feedback(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        body, refused = await read_body(scope, receive, self.model.limits)
        if refused:
            await _json(send, refused[0], {"error": refused[1]}, close=True)
        elif body is not None:
            await self.app(scope, _replay(body, receive), send)


def header(scope: MutableMapping[str, Any], name: str) -> str | None:
    wanted = name.encode()
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])  # ASGI: raw (name, value) pairs
    for key, value in headers:
        if key == wanted:
            return value.decode("latin-1")
    return None


async def read_body(
    scope: MutableMapping[str, Any], receive: Receive, limits: Limits
) -> tuple[bytes | None, tuple[int, str] | None]:
    """(body, None), or (None, (status, message)) when refused: 413 beyond `max_body_bytes`
    (before reading when Content-Length says so), 408 when it is not all in within
    `body_timeout_seconds`; (None, None) when the client disconnected."""
    too_large = (413, f"body: larger than {limits.max_body_bytes} bytes")
    length = header(scope, "content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
        return None, too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(limits.body_timeout_seconds):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None, None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limits.max_body_bytes:
                    return None, too_large
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        return None, (408, f"body: {size} bytes received, the rest not within {limits.body_timeout_seconds:g} s")
    return b"".join(chunks), None


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


async def _json(
    send: Send, status: int, content: dict[str, Any], headers: dict[str, str] | None = None, close: bool = False
) -> None:
    """A JSON answer; `close` ends the connection (the rest of an unread body must not be taken
    for the next request)."""
    body = orjson.dumps(content)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
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
            return JSONResponse(
                {"error": f"feedback stream unavailable: {type(exc).__name__}: {exc}"},
                status_code=503,
                headers={"retry-after": "1"},
            )
        return JSONResponse(answer, status_code=200 if answer["counted"] else 202)

    async def server_ready() -> JSONResponse:
        """One model per server: the server is ready when the ranker is (Kubernetes probes this)."""
        if model.serving:
            return JSONResponse({"ready": True})
        return JSONResponse({"error": f"Server is not ready. {model.state.reason}", "ready": False}, status_code=503)

    app.add_api_route("/v2/health/ready", server_ready, methods=["GET"])
    app.add_api_route("/v1/models/{model_name}", v1_model_ready, methods=["GET"])
    app.add_api_route("/v1/models/{model_name}/status", model_status, methods=["GET"])
    app.add_api_route("/v2/models/{model_name}/ready", v2_model_ready, methods=["GET"])
    app.add_api_route("/v1/feedback", feedback, methods=["POST"])


def _ready_answer(model: RankerModel, name: str, ok: dict[str, Any]) -> JSONResponse:
    if name != model.name:
        return JSONResponse({"error": f"Model with name {name} does not exist."}, status_code=404)
    if model.serving:
        return JSONResponse(ok)
    return JSONResponse({"error": str(ModelNotReady(name, model.state.reason)), **model.status()}, status_code=503)
