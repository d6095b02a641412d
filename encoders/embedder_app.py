"""The embedder's HTTP endpoint (aiohttp, in the embedder's process) and `serve`, which runs both.

`POST /items` takes the event as JSON (`item_id`, `title`, `image` base64 PNG/JPEG or
`image_path`, optional `event_time`), validates it as the stream does (400 with the reason; 413
`oversized`) and appends it to the item stream (202 with the entry id; 503 `stream_full`, with
Retry-After, while the stream holds `stream_max_len` entries; 503 `redis_unavailable`).
`/healthz` (the batch loop is alive), `/readyz` (Redis and every encoder answer) and `/metrics`
(`mmrank.encoders.embedder_metrics`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Callable
from typing import Any

from mmrank.encoders.embedder import Embedder
from mmrank.encoders.item_events import MAX_EVENT_BYTES, BadEvent, StreamFull, parse_event


def http_event_fields(body: Any) -> dict[str, Any]:
    """JSON body -> stream fields; the image travels base64-encoded in JSON and raw in Redis."""
    if not isinstance(body, dict):
        raise BadEvent("bad_body", "the body must be a JSON object")
    fields: dict[str, Any] = {}
    for name in ("item_id", "title", "image_path", "event_time"):
        if body.get(name) is not None:
            fields[name] = str(body[name]) if name != "event_time" else repr(float(body[name]))
    if body.get("image") is not None:
        try:
            fields["image"] = base64.b64decode(str(body["image"]), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadEvent("undecodable_image", f"image is not valid base64: {exc}") from exc
    return fields


async def accept(embedder: Embedder, body: Any) -> str:
    """Validate an HTTP event exactly as the stream would, then append it to the stream."""
    fields = http_event_fields(body)
    await asyncio.to_thread(parse_event, fields)
    return await embedder.stream.append(fields)


def http_app(embedder: Embedder) -> Any:
    from aiohttp import web

    async def post_item(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return web.json_response({"error": "bad_body", "detail": str(exc)}, status=400)
        try:
            entry = await accept(embedder, body)
        except BadEvent as exc:
            embedder.metrics.errors.labels(reason=exc.reason).inc()
            status = 413 if exc.reason == "oversized" else 400
            return web.json_response({"error": exc.reason, "detail": exc.detail}, status=status)
        except StreamFull as exc:
            embedder.metrics.errors.labels(reason="stream_full").inc()
            return web.json_response(
                {"error": "stream_full", "detail": str(exc)}, status=503, headers={"Retry-After": "1"}
            )
        except (ConnectionError, OSError, TimeoutError) as exc:
            return web.json_response({"error": "redis_unavailable", "detail": str(exc)}, status=503)
        except Exception as exc:  # noqa: BLE001 - redis errors are not all ConnectionError subclasses
            return web.json_response({"error": "redis_unavailable", "detail": str(exc)}, status=503)
        return web.json_response({"id": entry}, status=202)

    async def healthz(_: web.Request) -> web.Response:
        alive = time.monotonic() - embedder.heartbeat < max(60.0, 3 * embedder.config.backoff_cap)
        return web.json_response(embedder.state(), status=200 if alive else 503)

    async def readyz(_: web.Request) -> web.Response:
        return web.json_response(embedder.state(), status=200 if embedder.ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        embedder.gc_watch.drain()
        return web.Response(body=embedder.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(client_max_size=2 * MAX_EVENT_BYTES)
    app.add_routes(
        [
            web.post("/items", post_item),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
        ]
    )
    return app


async def serve(embedder: Embedder, started: Callable[[int | None], None] = lambda port: None) -> None:
    """Run the HTTP endpoint (when a port is configured) and the embedding loop until stopped."""
    from aiohttp import web

    runner = None
    port = None
    if embedder.config.http_port is not None:
        runner = web.AppRunner(http_app(embedder), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, embedder.config.http_host, embedder.config.http_port)
        await site.start()
        port = runner.addresses[0][1]
    started(port)
    try:
        await embedder.run()
    finally:
        if runner is not None:
            await runner.cleanup()
        await embedder.close()
