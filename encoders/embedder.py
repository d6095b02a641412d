"""The real-time embedder: new items get a vector in every live space within seconds.

    mmrank:items (Redis Stream, group `embedder`) ─► batch (size, max wait) ─► validate
        ├─ bad event ─► mmrank:items:dead (+ reason), ack
        └─ good ─► every live encoder version on Triton (async gRPC, concurrently)
                   ─► store.put(space, ...) for each space ─► ack

At least once, idempotent: an entry is acknowledged only after every space's write succeeded; a
batch that fails (Triton down, Redis down) is retried with exponential back-off and never
dropped, and what a crashed embedder left pending is read again on restart (its own pending
entries) or claimed by another replica after `claim_idle` seconds (XAUTOCLAIM). Writing the same
item twice overwrites one vector with an identical one. An item the encoder itself keeps refusing
(Triton answers INTERNAL / INVALID_ARGUMENT, or a vector that is not finite) is found by embedding
the batch one item at a time, while a probe item still goes through, and dead-lettered with the
reason `encoder_rejected`, so one poisoned item never stalls the stream.

Encoders ("every live encoder version") come from `--encoder SPACE=HOST:PORT[/MODEL]` or the
environment variable `MMRANK_ENCODERS` ("e1=triton-e1:8001,e2=triton-e2:8001/item_encoder"),
which the operator sets on the embedder Deployment. `MMRANK_STORE_URL` (with
`MMRANK_STORE_PASSWORD`), `MMRANK_REDIS_URL` (the stream's Redis; defaults to the store when that
is Redis), `MMRANK_ITEM_STREAM` and `MMRANK_CONSUMER_GROUP` likewise.

HTTP (aiohttp, same process): `POST /items` takes the event as JSON (`item_id`, `title`,
`image` base64 PNG/JPEG or `image_path`, optional `event_time`), validates it like the stream
does (400 with the reason) and appends it to the stream (202); `/healthz`, `/readyz`, `/metrics`
(`mmrank_embedding_freshness_seconds`, `mmrank_embedder_items_total`,
`mmrank_embedder_errors_total{reason}`, `mmrank_embedder_stream_lag`).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from mmrank.encoders.item_events import (DEAD_LETTER_STREAM, EMBEDDER_GROUP, ITEM_STREAM, MAX_EVENT_BYTES, BadEvent,
                                         ItemEvent, dead_letter_fields, parse_event)
from mmrank.store import EmbeddingStore, open_store, redis_client

log = logging.getLogger("mmrank.embedder")
ENV_ENCODERS = "MMRANK_ENCODERS"
ENV_STORE = "MMRANK_STORE_URL"
ENV_REDIS = "MMRANK_REDIS_URL"
ENV_STREAM = "MMRANK_ITEM_STREAM"
ENV_GROUP = "MMRANK_CONSUMER_GROUP"
DEFAULT_MODEL = "item_encoder"
FRESHNESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 30, 60, 120, 300)
T = TypeVar("T")
Entry = tuple[bytes, "dict[bytes, bytes] | None"]  # a stream entry: id, fields (None once deleted)
Refused = tuple[bytes, "dict[bytes, bytes]", BadEvent]  # entry id, fields, why it is dead-lettered


@dataclasses.dataclass(frozen=True)
class EncoderTarget:
    """One live encoder version: the space it fills and the Triton model that computes it."""

    space: str
    url: str
    model: str = DEFAULT_MODEL


def parse_encoder(spec: str) -> EncoderTarget:
    """`SPACE=HOST:PORT[/MODEL]` -> EncoderTarget."""
    space, sep, rest = spec.strip().partition("=")
    if not sep or not space or not rest:
        raise ValueError(f"encoder {spec!r} must look like SPACE=HOST:PORT[/MODEL]")
    url, _, model = rest.partition("/")
    return EncoderTarget(space.strip(), url.strip(), model.strip() or DEFAULT_MODEL)


def parse_encoders(specs: Sequence[str]) -> list[EncoderTarget]:
    """Flags and comma-separated lists alike; one space may appear only once."""
    targets = [parse_encoder(s) for spec in specs for s in spec.split(",") if s.strip()]
    spaces = [t.space for t in targets]
    if len(set(spaces)) != len(spaces):
        raise ValueError(f"each space may have one encoder, got {spaces}")
    return targets


@dataclasses.dataclass
class EmbedderConfig:
    encoders: list[EncoderTarget]
    store_url: str
    redis_url: str
    batch_size: int = 32
    max_wait: float = 0.05
    in_flight: int = 2
    consumer: str = dataclasses.field(default_factory=socket.gethostname)
    claim_idle: float = 30.0
    idle_block: float = 1.0
    dtype: str = "float16"
    http_host: str = "0.0.0.0"
    http_port: int | None = 8080
    backoff_base: float = 0.1
    backoff_cap: float = 5.0
    triton_timeout: float = 30.0
    stream: str = ITEM_STREAM
    dead_stream: str = ""  # default: "<stream>:dead" (mmrank:items:dead)
    group: str = EMBEDDER_GROUP

    def __post_init__(self) -> None:
        if not self.dead_stream:
            self.dead_stream = DEAD_LETTER_STREAM if self.stream == ITEM_STREAM else f"{self.stream}:dead"


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential back-off with full jitter (redis-py's policy), `attempt` counting from 1."""
    from redis.backoff import ExponentialWithJitterBackoff

    return float(ExponentialWithJitterBackoff(cap=cap, base=base).compute(attempt))


def latest_per_item(events: Sequence[ItemEvent]) -> list[ItemEvent]:
    """Two events of one item in a batch: embed the later one only (stream order wins)."""
    latest: dict[int, ItemEvent] = {}
    for event in events:
        latest[event.item_id] = event
    return list(latest.values())


class EncoderOutputError(RuntimeError):
    """The encoder answered, but with something that is not one unit vector per item."""


def check_embeddings(vectors: np.ndarray, n: int, space: str) -> np.ndarray:
    if vectors is None or vectors.ndim != 2 or vectors.shape[0] != n:
        raise EncoderOutputError(f"encoder for {space} returned shape {getattr(vectors, 'shape', None)} for {n} items")
    if not np.isfinite(vectors).all():
        raise EncoderOutputError(f"encoder for {space} returned NaN or infinity")
    return vectors.astype(np.float32, copy=False)


# gRPC statuses with which Triton refuses the request itself; anything else (UNAVAILABLE,
# DEADLINE_EXCEEDED, NOT_FOUND while a restarted server loads its models...) is an outage.
REJECTING_STATUSES = ("StatusCode.INTERNAL", "StatusCode.INVALID_ARGUMENT")
REJECT_AFTER = 3


def is_rejection(exc: BaseException) -> bool:
    """Did the encoder refuse these inputs (as opposed to being unreachable)?"""
    status = exc.status() if callable(getattr(exc, "status", None)) else None
    return isinstance(exc, EncoderOutputError) or status in REJECTING_STATUSES


def model_inputs(events: Sequence[ItemEvent]) -> tuple[np.ndarray, list[str]]:
    return np.stack([e.image for e in events]), [e.title for e in events]


# --- Triton ---------------------------------------------------------------------------------

class TritonEncoder:
    """Async gRPC client of one encoder model; splits batches to the model's max_batch_size."""

    def __init__(self, target: EncoderTarget, timeout: float = 30.0) -> None:
        import tritonclient.grpc.aio as grpcclient

        self.target = target
        self.timeout = timeout
        self.client = grpcclient.InferenceServerClient(target.url)
        self.max_batch = 0
        self.dim = 0

    async def describe(self) -> tuple[int, int]:
        """(max_batch_size, embedding dim) from the model's config."""
        config = (await self.client.get_model_config(self.target.model, as_json=True))["config"]
        dims = [int(d) for o in config["output"] if o["name"] == "EMBEDDING" for d in o["dims"]]
        self.max_batch = int(config.get("max_batch_size", 0)) or 64
        self.dim = dims[-1]
        return self.max_batch, self.dim

    async def ready(self) -> bool:
        return bool(await self.client.is_model_ready(self.target.model))

    async def embed(self, images: np.ndarray, titles: Sequence[str]) -> np.ndarray:
        if not self.max_batch:
            await self.describe()
        parts = [await self._infer(images[i:i + self.max_batch], titles[i:i + self.max_batch])
                 for i in range(0, len(titles), self.max_batch)]
        return check_embeddings(np.concatenate(parts), len(titles), self.target.space)

    async def _infer(self, images: np.ndarray, titles: Sequence[str]) -> np.ndarray:
        import tritonclient.grpc.aio as grpcclient

        image = grpcclient.InferInput("IMAGE", list(images.shape), "UINT8")
        image.set_data_from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
        title = grpcclient.InferInput("TITLE", [len(titles), 1], "BYTES")
        title.set_data_from_numpy(np.array([[t.encode()] for t in titles], dtype=object))
        result = await self.client.infer(self.target.model, [image, title],
                                         outputs=[grpcclient.InferRequestedOutput("EMBEDDING")],
                                         client_timeout=self.timeout)
        return result.as_numpy("EMBEDDING")

    async def close(self) -> None:
        await self.client.close()


# --- metrics --------------------------------------------------------------------------------

class Metrics:
    """The embedder's Prometheus metrics, in a registry of its own (one per embedder)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.freshness = Histogram("mmrank_embedding_freshness_seconds",
                                   "Seconds from an item event's event_time to its vector stored, per space",
                                   ["space"], buckets=FRESHNESS_BUCKETS, registry=self.registry)
        self.items = Counter("mmrank_embedder_items", "Item vectors stored, per space", ["space"],
                             registry=self.registry)
        self.errors = Counter("mmrank_embedder_errors", "Failures by reason (bad events, Triton, Redis, store)",
                              ["reason"], registry=self.registry)
        self.lag = Gauge("mmrank_embedder_stream_lag",
                         "Stream entries not yet acknowledged by the group (undelivered + pending)",
                         registry=self.registry)
        self.batch = Histogram("mmrank_embedder_batch_size", "Events per batch read from the stream",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# --- the embedder ---------------------------------------------------------------------------

class Embedder:
    """Reads item events, embeds them in every live space, acknowledges when all are stored."""

    def __init__(self, config: EmbedderConfig, store: EmbeddingStore | None = None) -> None:
        if not config.encoders:
            raise ValueError(f"no encoders: pass --encoder SPACE=HOST:PORT or set {ENV_ENCODERS}")
        self.config = config
        self.store = store or open_store(config.store_url)
        self.redis = redis_client(config.redis_url, asyncio=True, socket_timeout=config.idle_block + 10)
        self.encoders = [TritonEncoder(t, config.triton_timeout) for t in config.encoders]
        self.metrics = Metrics()
        self.stop_event = asyncio.Event()
        self.redis_ok = False
        self.triton_ok = {t.space: False for t in config.encoders}
        self.heartbeat = time.monotonic()
        self.recover = True
        self.last_claim = 0.0
        self.last_lag = 0.0
        self.processed = 0
        self.in_flight: dict[bytes, asyncio.Task[None]] = {}
        self.item_tasks: dict[int, asyncio.Task[None]] = {}

    # readiness -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.redis_ok and all(self.triton_ok.values())

    def state(self) -> dict[str, Any]:
        return {"ready": self.ready, "redis": self.redis_ok, "encoders": dict(self.triton_ok),
                "processed": self.processed, "heartbeat_age_s": round(time.monotonic() - self.heartbeat, 3)}

    # retrying ------------------------------------------------------------------------------

    async def retry(self, what: str, action: Callable[[], Awaitable[T]], on_error: Callable[[], None] = lambda: None,
                    give_up: Callable[[BaseException, int], bool] = lambda exc, attempt: False) -> T:
        """Run `action` until it succeeds; count each failure as `what`; stop on shutdown, or
        when `give_up(exc, attempt)` says no retry will help."""
        attempt = 0
        while True:
            try:
                return await action()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is retried, and counted
                attempt += 1
                if give_up(exc, attempt):
                    raise
                on_error()
                self.metrics.errors.labels(reason=what).inc()
                self.heartbeat = time.monotonic()
                log.warning("%s (attempt %d): %s", what, attempt, exc)
                if self.stop_event.is_set():
                    raise
                await self._sleep(backoff_delay(attempt, self.config.backoff_base, self.config.backoff_cap))

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), timeout=seconds)

    def _redis_down(self) -> None:
        self.redis_ok = False
        self.recover = True  # after a reconnect, read our own pending entries again first

    # setup ---------------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        import redis

        try:
            await self.redis.xgroup_create(self.config.stream, self.config.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self.redis_ok = True

    async def ensure_space(self, encoder: TritonEncoder) -> None:
        _, dim = await encoder.describe()
        await asyncio.to_thread(self.store.create_space, encoder.target.space, dim, self.config.dtype)
        self.triton_ok[encoder.target.space] = await encoder.ready()

    async def setup(self) -> None:
        await self.retry("redis_unavailable", self.ensure_group, self._redis_down)
        for encoder in self.encoders:
            # A space that exists with another dim or dtype is a configuration error: crash.
            await self.retry("triton_unavailable", lambda e=encoder: self.ensure_space(e),
                             lambda e=encoder: self.triton_ok.__setitem__(e.target.space, False),
                             give_up=lambda exc, attempt: isinstance(exc, ValueError))

    # reading -------------------------------------------------------------------------------

    async def read_batch(self) -> list[Entry]:
        """Own pending entries first (after a start or an outage), stale ones of dead replicas
        next, then new entries: up to batch_size, waiting at most max_wait after the first."""
        cfg = self.config
        start = "0"
        while self.recover:
            pending = await self._xread(start, cfg.batch_size, None)
            if not pending:
                self.recover = False
                break
            fresh = [entry for entry in pending if entry[0] not in self.in_flight]
            if fresh:
                return fresh
            start = pending[-1][0].decode()
        if time.monotonic() - self.last_claim > cfg.claim_idle / 2:
            self.last_claim = time.monotonic()
            claimed = await self.redis.xautoclaim(cfg.stream, cfg.group, cfg.consumer, int(cfg.claim_idle * 1000),
                                                  start_id="0-0", count=cfg.batch_size)
            fresh = [entry for entry in claimed[1] if entry[0] not in self.in_flight]
            if fresh:
                return fresh
        entries = await self._xread(">", cfg.batch_size, int(cfg.idle_block * 1000))
        deadline = time.monotonic() + cfg.max_wait
        while entries and len(entries) < cfg.batch_size and time.monotonic() < deadline:
            more = await self._xread(">", cfg.batch_size - len(entries),
                                     max(1, int((deadline - time.monotonic()) * 1000)))
            if not more:
                break
            entries.extend(more)
        return entries

    async def _xread(self, start: str, count: int, block_ms: int | None) -> list[Any]:
        cfg = self.config
        response = await self.redis.xreadgroup(cfg.group, cfg.consumer, {cfg.stream: start}, count=count,
                                               block=block_ms)
        self.redis_ok = True
        return list(response[0][1]) if response else []

    async def update_lag(self) -> None:
        if time.monotonic() - self.last_lag < 1.0:
            return
        self.last_lag = time.monotonic()
        for group in await self.redis.xinfo_groups(self.config.stream):
            if group["name"] in (self.config.group, self.config.group.encode()):
                self.metrics.lag.set(int(group.get("lag") or 0) + int(group.get("pending") or 0))

    # one batch -----------------------------------------------------------------------------

    def validate(self, entries: Sequence[Entry]) -> tuple[list[ItemEvent], list[Refused]]:
        good, bad = [], []
        for entry_id, fields in entries:
            try:
                if fields is None:  # trimmed from the stream while pending: nothing left to embed
                    raise BadEvent("deleted_entry", "the entry was deleted from the stream")
                good.append(parse_event(fields, entry_id.decode()))
            except BadEvent as exc:
                bad.append((entry_id, fields or {}, exc))
        return good, bad

    async def dead_letter(self, bad: Sequence[Refused]) -> None:
        cfg = self.config
        pipe = self.redis.pipeline(transaction=True)
        for entry_id, fields, exc in bad:
            pipe.xadd(cfg.dead_stream, dead_letter_fields(fields, exc.reason, exc.detail, entry_id.decode()))
        pipe.xack(cfg.stream, cfg.group, *[entry_id for entry_id, _, _ in bad])
        await pipe.execute()

    async def embed_space(self, encoder: TritonEncoder, events: Sequence[ItemEvent]) -> list[tuple[ItemEvent, str]]:
        """Embed and store `events` in one space; returns the events its encoder refused."""
        space = encoder.target.space

        def triton_down() -> None:
            self.triton_ok[space] = False

        def refused(exc: BaseException, attempt: int) -> bool:
            return is_rejection(exc) and attempt >= REJECT_AFTER

        try:
            vectors = await self.retry("triton_unavailable", lambda: encoder.embed(*model_inputs(events)), triton_down,
                                       refused)
            rejected: list[tuple[ItemEvent, str]] = []
        except Exception as exc:  # noqa: BLE001 - only rejections get here (retry gives up on nothing else)
            log.warning("encoder for %s refused a batch of %d (%s); isolating the items", space, len(events), exc)
            events, vectors, rejected = await self.retry("triton_unavailable", lambda: self.isolate(encoder, events),
                                                         triton_down)
        self.triton_ok[space] = True
        if events:
            ids = np.array([e.item_id for e in events], dtype=np.int64)
            await self.retry("store_write", lambda: asyncio.to_thread(self.store.put, space, ids, vectors))
        stored = time.time()
        for event in events:
            self.metrics.freshness.labels(space=space).observe(max(0.0, stored - event.event_time))
        self.metrics.items.labels(space=space).inc(len(events))
        return rejected

    async def isolate(self, encoder: TritonEncoder,
                      events: Sequence[ItemEvent]) -> tuple[list[ItemEvent], np.ndarray, list[tuple[ItemEvent, str]]]:
        """Embed one item at a time to find the ones the encoder refuses. Only while a probe item
        goes through: a broken encoder refuses everything, and must not empty the stream into
        the dead letters."""
        probe = ItemEvent(-1, "probe", np.zeros((64, 64, 3), np.uint8), 0.0)
        await encoder.embed(*model_inputs([probe]))
        ok, vectors, rejected = [], [], []
        for event in events:
            try:
                vectors.append((await encoder.embed(*model_inputs([event])))[0])
                ok.append(event)
            except Exception as exc:
                if not is_rejection(exc):
                    raise
                rejected.append((event, str(exc)[:300]))
        return ok, np.array(vectors, dtype=np.float32).reshape(len(ok), -1), rejected

    async def dead_letter_rejected(self, rejected: Sequence[tuple[ItemEvent, str]]) -> None:
        cfg = self.config
        pipe = self.redis.pipeline(transaction=True)
        for event, detail in rejected:
            fields = {"item_id": str(event.item_id), "title": event.title, "event_time": repr(event.event_time)}
            pipe.xadd(cfg.dead_stream, dead_letter_fields(fields, "encoder_rejected", detail, event.message_id))
        await pipe.execute()

    async def take_batch(self) -> list[ItemEvent]:
        """Read a batch, dead-letter what fails validation; the events left to embed.

        Entries already being embedded by a batch in flight are skipped: re-reading pending
        entries after an outage (or claiming idle ones) must not start the same work twice."""
        self.heartbeat = time.monotonic()
        entries = await self.retry("redis_unavailable", self.read_batch, self._redis_down)
        await self.retry("redis_unavailable", self.update_lag, self._redis_down)
        entries = [(entry_id, fields) for entry_id, fields in entries if entry_id not in self.in_flight]
        if not entries:
            return []
        self.metrics.batch.observe(len(entries))
        good, bad = await asyncio.to_thread(self.validate, entries)
        for _, _, exc in bad:
            self.metrics.errors.labels(reason=exc.reason).inc()
            log.info("dead letter %s: %s", exc.reason, exc.detail)
        if bad:
            await self.retry("redis_unavailable", lambda: self.dead_letter(bad), self._redis_down)
            self.processed += len(bad)
        return good

    async def process(self, good: Sequence[ItemEvent]) -> None:
        """Embed in every space, store, then acknowledge (only then)."""
        events = latest_per_item(good)
        refused = await asyncio.gather(*(self.embed_space(encoder, events) for encoder in self.encoders))
        by_item = {event.item_id: (event, detail) for per_space in refused for event, detail in per_space}
        rejected = list(by_item.values())
        if rejected:
            self.metrics.errors.labels(reason="encoder_rejected").inc(len(rejected))
            await self.retry("redis_unavailable", lambda: self.dead_letter_rejected(rejected), self._redis_down)
        ids = [e.message_id for e in good]
        await self.retry("redis_unavailable",
                         lambda: self.redis.xack(self.config.stream, self.config.group, *ids), self._redis_down)
        self.processed += len(ids)

    def launch(self, good: Sequence[ItemEvent]) -> asyncio.Task[None]:
        task = asyncio.create_task(self.process(good))
        for event in good:
            self.in_flight[event.message_id.encode()] = task
            self.item_tasks[event.item_id] = task

        def forget(done: asyncio.Task[None]) -> None:
            for event in good:
                self.in_flight.pop(event.message_id.encode(), None)
                if self.item_tasks.get(event.item_id) is done:
                    del self.item_tasks[event.item_id]

        task.add_done_callback(forget)
        return task

    async def run(self) -> None:
        """Until `stop_event` is set, keep up to `in_flight` batches going (Triton batches them
        further); an item's events are embedded in stream order. On stop, drain and return."""
        await self.setup()
        running: set[asyncio.Task[None]] = set()
        try:
            while not self.stop_event.is_set():
                while len(running) >= self.config.in_flight:
                    done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()
                good = await self.take_batch()
                if not good:
                    continue
                earlier = {self.item_tasks[e.item_id] for e in good if e.item_id in self.item_tasks}
                if earlier:
                    await asyncio.wait(earlier)
                running.add(self.launch(good))
        finally:
            results = await asyncio.gather(*running, return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures and not self.stop_event.is_set():
                raise failures[0]

    async def close(self) -> None:
        for encoder in self.encoders:
            with contextlib.suppress(Exception):
                await encoder.close()
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    # publishing (the HTTP endpoint) ----------------------------------------------------------

    async def accept(self, body: dict[str, Any]) -> str:
        """Validate an HTTP event exactly as the stream would, then append it to the stream."""
        fields = http_event_fields(body)
        await asyncio.to_thread(parse_event, fields)
        entry = await self.redis.xadd(self.config.stream, fields)
        return entry.decode() if isinstance(entry, bytes) else str(entry)


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


# --- HTTP -----------------------------------------------------------------------------------

def http_app(embedder: Embedder) -> Any:
    from aiohttp import web

    async def post_item(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return web.json_response({"error": "bad_body", "detail": str(exc)}, status=400)
        try:
            entry = await embedder.accept(body)
        except BadEvent as exc:
            embedder.metrics.errors.labels(reason=exc.reason).inc()
            status = 413 if exc.reason == "oversized" else 400
            return web.json_response({"error": exc.reason, "detail": exc.detail}, status=status)
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

        return web.Response(body=embedder.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(client_max_size=2 * MAX_EVENT_BYTES)
    app.add_routes([web.post("/items", post_item), web.get("/healthz", healthz), web.get("/readyz", readyz),
                    web.get("/metrics", metrics)])
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


def config_from_env(encoders: Sequence[str] = (), store_url: str | None = None, redis_url: str | None = None,
                    **overrides: Any) -> EmbedderConfig:
    """Flags first, then MMRANK_ENCODERS / MMRANK_STORE_URL / MMRANK_REDIS_URL /
    MMRANK_ITEM_STREAM / MMRANK_CONSUMER_GROUP (what the operator sets on the Deployment)."""
    specs = list(encoders) or [os.environ.get(ENV_ENCODERS, "")]
    store_url = store_url or os.environ.get(ENV_STORE, "")
    if not store_url:
        raise ValueError(f"no store: pass --store URL or set {ENV_STORE}")
    redis_url = redis_url or os.environ.get(ENV_REDIS) or (store_url if store_url.startswith("redis") else "")
    if not redis_url:
        raise ValueError(f"the item stream needs Redis: pass --redis URL or set {ENV_REDIS}")
    overrides.setdefault("stream", os.environ.get(ENV_STREAM) or None)
    overrides.setdefault("group", os.environ.get(ENV_GROUP) or None)
    return EmbedderConfig(encoders=parse_encoders(specs), store_url=store_url, redis_url=redis_url,
                          **{k: v for k, v in overrides.items() if v is not None})
