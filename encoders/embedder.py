"""The real-time embedder: new items get a vector in every live space within seconds.

    <prefix>items (Redis Stream, group <prefix>embedder) ─► batch (size, max wait) ─► validate
        ├─ bad event ─► <prefix>items:dead (+ reason), ack
        └─ good ─► every live encoder version on Triton (async gRPC, concurrently)
                   ─► store.put(space, ...) for each space ─► ack

`<prefix>` is the ranker's scope, `mmrank:{<namespace>/<name>}:` (`mmrank.store.Scope`, from
`--scope` or `MMRANK_SCOPE`): every ranker has its own item stream, dead letters and consumer
group, so two rankers' embedders each receive every item of their own stream. A stream named
explicitly (`--stream`, the spec's `itemEvents.stream`) may be shared by several rankers; the
group and the dead letters stay the ranker's own.

At least once, idempotent: an entry is acknowledged only after every space's write succeeded; a
batch that fails (Triton down, Redis down) is retried with exponential back-off and never
dropped, and what a crashed embedder left pending is claimed again on restart (its own pending
entries) or by another replica once idle for `claim_idle` seconds (XAUTOCLAIM, following its
cursor through the whole pending list, then again every `claim_idle / 2`). Entries being embedded
are re-claimed by their owner (XCLAIM JUSTID) every `claim_idle / 3`, so a live replica's slow
batch is never taken over. Every claim counts a delivery; an entry delivered more than
`max_deliveries` times (it crashed or hung every embedder that took it) is dead-lettered with the
reason `too_many_deliveries`. Consumers with nothing pending and idle for `forget_consumer_after`
seconds (pods gone) are removed from the group after a sweep.

Every write carries the event's `event_time`: the store keeps the newest per item atomically, so
a replayed old event, or a late batch of a slower replica, never overwrites a newer vector
(`mmrank_embedder_stale_events_total`). An item the encoder itself keeps refusing
(Triton answers INTERNAL / INVALID_ARGUMENT, or a vector that is not finite) is found by embedding
the batch one item at a time, while a probe item still goes through, and dead-lettered with the
reason `encoder_rejected`, so one poisoned item never stalls the stream.

Bounded streams: every `trim_interval` seconds the item stream is trimmed (XTRIM MINID) to the
oldest entry some consumer group still needs (its oldest pending entry, or the one after its
last delivered), so acknowledged events leave Redis within seconds; `POST /items` answers 503
`stream_full` once the stream holds `stream_max_len` entries (a backlog the embedders cannot
drain: nothing is dropped, the producer retries). The dead-letter stream keeps its newest
`dead_letter_max_len` entries (XADD MAXLEN), each without payload fields over 64 KiB.

Encoders ("every live encoder version") come from `--encoder SPACE=HOST:PORT[/MODEL]` or the
environment variable `MMRANK_ENCODERS` ("e1=triton-e1:8001,e2=triton-e2:8001/item_encoder"),
which the operator sets on the embedder Deployment. `MMRANK_STORE_URL` (with
`MMRANK_STORE_PASSWORD`), `MMRANK_REDIS_URL` (the stream's Redis; defaults to the store when that
is Redis), `MMRANK_SCOPE`, `MMRANK_ITEM_STREAM` and `MMRANK_CONSUMER_GROUP` likewise.

HTTP (aiohttp, same process): `POST /items` takes the event as JSON (`item_id`, `title`,
`image` base64 PNG/JPEG or `image_path`, optional `event_time`), validates it like the stream
does (400 with the reason) and appends it to the stream (202; 503 `stream_full` while the
stream holds `stream_max_len` entries); `/healthz`, `/readyz`, `/metrics`
(`mmrank_embedding_freshness_seconds`, `mmrank_embedder_items_total`,
`mmrank_embedder_errors_total{reason}`, `mmrank_embedder_stream_lag`,
`mmrank_embedder_stream_entries`, `mmrank_embedder_claimed_total`,
`mmrank_embedder_stale_events_total{space}`, `mmrank_embedder_stage_seconds{stage}`: where the
time goes, queued in the stream / validate / embed / store / ack; `mmrank_embedder_gc_pause_seconds
{generation}`: the garbage collector's pauses, which stop every batch at once).

Stalls: `--trace FILE` (debug) writes one JSON line per batch with the wall time of each stage
(read, validated, launched, per space embed start/end and stored, acknowledged) and one per
garbage collection or event-loop delay over 2 ms; `bench/freshness.py` reads it to say what
each slow item waited for. In its own process (`mmrank embedder run`) the objects alive after
setup (imported modules, clients) are frozen out of the collector (`gc.freeze`): a full
collection then scans only what batches allocate, instead of every module's objects (about
35 ms of CPU with the event loop stopped).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import gc
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from mmrank.encoders.item_events import (
    MAX_EVENT_BYTES,
    BadEvent,
    ItemEvent,
    StreamFull,
    dead_letter_fields,
    parse_event,
)
from mmrank.store import DEFAULT_SCOPE, SCOPE_ENV, EmbeddingStore, Scope, open_store, redis_client, scope_from_env

log = logging.getLogger("mmrank.embedder")
ENV_ENCODERS = "MMRANK_ENCODERS"
ENV_STORE = "MMRANK_STORE_URL"
ENV_REDIS = "MMRANK_REDIS_URL"
ENV_STREAM = "MMRANK_ITEM_STREAM"
ENV_GROUP = "MMRANK_CONSUMER_GROUP"
ENV_SCOPE = SCOPE_ENV
DEFAULT_MODEL = "item_encoder"
FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 30, 60, 120, 300)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
TRACE_MIN_PAUSE = 0.002  # GC pauses and event-loop delays shorter than this are not traced
LOOP_PROBE = 0.005  # seconds between the trace's event-loop probes
T = TypeVar("T")
CLAIM_STEP_BATCHES = 8  # a sweep step takes over this many batches (ids only; `recover_own` reads them)
AUTOCLAIM_IDS = """
return redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5], 'JUSTID')
"""
# Removes the group's consumers that have nothing pending and were idle at least ARGV[2] ms,
# except ARGV[3] (the caller). KEYS[1]: stream; ARGV[1]: group. Returns the names removed.
FORGET_CONSUMERS = """
local removed = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['pending'] == 0 and info['idle'] >= tonumber(ARGV[2]) and info['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed[#removed + 1] = info['name']
  end
end
return removed
"""
Entry = tuple[bytes, "dict[bytes, bytes] | None"]  # a stream entry: id, fields (None once deleted)
Delivered = tuple[bytes, "dict[bytes, bytes] | None", int]  # an entry and how often it was delivered
Refused = tuple[bytes, "dict[bytes, bytes]", BadEvent]  # entry id, fields, why it is dead-lettered
NO_CURSOR = b"0-0"


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
    scope: Scope = DEFAULT_SCOPE
    stream: str = ""       # default: the scope's item stream; a named one may be shared by rankers
    dead_stream: str = ""  # default: the scope's dead letters (always the ranker's own)
    group: str = "embedder"  # scoped to the ranker: <prefix>embedder
    max_deliveries: int = 5
    forget_consumer_after: float = 600.0
    trim_interval: float = 5.0
    stream_max_len: int = 100_000
    dead_letter_max_len: int = 10_000
    trace: str = ""  # debug: JSON lines of per-batch stage times, GC pauses and loop delays
    freeze_gc: bool = False  # gc.freeze() after setup: for the embedder's own process (the CLI), not a library user

    def __post_init__(self) -> None:
        if self.max_deliveries < 3:
            raise ValueError(f"max_deliveries must be at least 3 (a batch-mate of a crashing entry is delivered "
                             f"up to 3 times), got {self.max_deliveries}")
        self.stream = self.stream or self.scope.item_stream
        self.dead_stream = self.dead_stream or self.scope.dead_letter_stream
        if not self.scope.owns(self.group):
            self.group = self.scope.consumer_group(self.group)


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential back-off with full jitter (redis-py's policy), `attempt` counting from 1."""
    from redis.backoff import ExponentialWithJitterBackoff

    return float(ExponentialWithJitterBackoff(cap=cap, base=base).compute(attempt))


def latest_per_item(events: Sequence[ItemEvent]) -> list[ItemEvent]:
    """Two events of one item in a batch: embed the one with the later event time only (on a
    tie, the later in the stream); the store would refuse the older one anyway."""
    latest: dict[int, ItemEvent] = {}
    for event in events:
        kept = latest.get(event.item_id)
        if kept is None or kept.event_time <= event.event_time:
            latest[event.item_id] = event
    return list(latest.values())


def over_delivered(entries: Sequence[Delivered], limit: int) -> tuple[list[Entry], list[Refused]]:
    """Entries delivered more than `limit` times go to the dead letters: each delivery ended
    without an acknowledgement, so the entry crashed or hung every embedder that took it."""
    keep: list[Entry] = []
    refused: list[Refused] = []
    for entry_id, fields, deliveries in entries:
        if deliveries > limit:
            refused.append((entry_id, fields or {}, BadEvent(
                "too_many_deliveries", f"delivered {deliveries} times without an acknowledgement (limit {limit}): "
                "every embedder that took it crashed or hung")))
        else:
            keep.append((entry_id, fields))
    return keep, refused


def redelivery(waiting: Sequence[tuple[bytes, int]]) -> list[tuple[bytes, int]]:
    """Which pending entries (id, deliveries so far; oldest first) to deliver again now.

    Entries delivered once go again as a batch: their consumer most likely died for a reason of
    its own. An entry delivered twice or more was in a batch that crashed again, so it goes
    alone (and is embedded with nothing else in flight): only the entry that kills the embedder
    keeps counting deliveries, and its batch-mates are stored after at most three."""
    if waiting[0][1] >= 2:
        return [waiting[0]]
    batch = []
    for entry in waiting:
        if entry[1] >= 2:
            break
        batch.append(entry)
    return batch


def next_stream_id(entry_id: bytes | str) -> str:
    """The smallest stream id after `entry_id` ("ms-seq")."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def trim_floor(groups: Sequence[tuple[int, bytes | None, bytes | str]]) -> str | None:
    """MINID for XTRIM: the oldest entry any consumer group still needs, from each group's
    (pending count, oldest pending id, last delivered id). None: keep everything (no group)."""
    needed = []
    for pending, oldest_pending, last_delivered in groups:
        needed.append(oldest_pending if pending and oldest_pending else next_stream_id(last_delivered))
    if not needed:
        return None
    as_text = [n.decode() if isinstance(n, bytes) else n for n in needed]
    return min(as_text, key=lambda n: tuple(int(part) for part in n.split("-")))


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
        self.stale = Counter("mmrank_embedder_stale_events", "Events not written: the item's stored vector "
                             "comes from a later event", ["space"], registry=self.registry)
        self.stream_length = Gauge("mmrank_embedder_stream_entries", "Entries in the item stream (after trimming)",
                                   registry=self.registry)
        self.claimed = Counter("mmrank_embedder_claimed", "Entries taken over from idle or restarted consumers",
                               registry=self.registry)
        self.stage = Histogram("mmrank_embedder_stage_seconds",
                               "Where freshness goes: queued (event time to read, per event), validate (a batch "
                               "decoded), embed (Triton, per space), store (write, per space), ack",
                               ["stage"], buckets=STAGE_BUCKETS, registry=self.registry)
        self.gc_pause = Histogram("mmrank_embedder_gc_pause_seconds",
                                  "Garbage collections of the embedder process, per generation: every batch "
                                  "waits while one runs", ["generation"], buckets=GC_BUCKETS, registry=self.registry)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# --- stalls -----------------------------------------------------------------------------------

class Trace:
    """The debug trace (`--trace FILE`): JSON lines, wall-clock times (time.time, comparable with
    event times). A batch: {"batch", "items", "read_start", "read", "validated", "launched",
    "spaces": {space: {"embed_start", "embed_end", "stored"}}, "acked"}; a pause: {"gc": generation,
    "start", "end"} or {"loop_late": start, "end", "cpu"} (the event loop ran nothing else meanwhile;
    "cpu": the seconds its thread ran in that time, the rest it waited for a CPU)."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - closed by close()
        self.batches = 0

    def write(self, record: dict[str, Any]) -> None:
        if not self.file.closed:
            self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


class GcWatch:
    """Times each garbage collection (gc.callbacks). The callback only appends to a deque (no
    lock: it runs inside whatever allocation triggered the collection, perhaps holding a metric's
    or a file's lock); `drain` moves the pauses into the histogram and the trace."""

    def __init__(self, histogram: Any, trace: Trace | None) -> None:
        self.histogram = histogram
        self.trace = trace
        self.started = 0.0
        self.pauses: collections.deque[tuple[int, float, float]] = collections.deque(maxlen=10_000)
        gc.callbacks.append(self.callback)

    def callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.time()
        else:
            self.pauses.append((info["generation"], self.started, time.time()))

    def drain(self) -> None:
        while self.pauses:
            generation, start, end = self.pauses.popleft()
            self.histogram.labels(generation=str(generation)).observe(end - start)
            if self.trace is not None and end - start >= TRACE_MIN_PAUSE:
                self.trace.write({"gc": generation, "start": start, "end": end})

    def close(self) -> None:
        self.drain()
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self.callback)


async def probe_loop(trace: Trace, stop: asyncio.Event) -> None:
    """Trace the event loop's delays: a sleep of LOOP_PROBE that wakes late by more than
    TRACE_MIN_PAUSE means something held the loop (a synchronous call, GC) or the CPU."""
    while not stop.is_set():
        start, cpu = time.time(), time.thread_time()
        await asyncio.sleep(LOOP_PROBE)
        end = time.time()
        if end - start - LOOP_PROBE >= TRACE_MIN_PAUSE:
            # cpu: what the loop's own thread ran meanwhile; far less than the delay: the CPU was elsewhere
            trace.write({"loop_late": start + LOOP_PROBE, "end": end, "cpu": time.thread_time() - cpu})


def freeze_startup_objects() -> None:
    """Move every object alive now (imported modules, clients, metrics) out of the collector's
    generations (gc.freeze): they live as long as the process, and a full collection otherwise
    scans them all with the event loop stopped (about 35 ms of CPU for the embedder's imports).
    Image decoding is imported first, since the first batch would import it."""
    from mmrank.encoders.item_events import decode_image, encode_image

    decode_image(encode_image(np.zeros((2, 2, 3), np.uint8)))
    gc.collect()
    gc.freeze()


# --- the embedder ---------------------------------------------------------------------------

class Embedder:
    """Reads item events, embeds them in every live space, acknowledges when all are stored."""

    def __init__(self, config: EmbedderConfig, store: EmbeddingStore | None = None) -> None:
        if not config.encoders:
            raise ValueError(f"no encoders: pass --encoder SPACE=HOST:PORT or set {ENV_ENCODERS}")
        self.config = config
        self.store = store or open_store(config.store_url, config.scope)
        self.redis = redis_client(config.redis_url, asyncio=True, socket_timeout=config.idle_block + 10)
        self.encoders = [TritonEncoder(t, config.triton_timeout) for t in config.encoders]
        self.metrics = Metrics()
        self.stop_event = asyncio.Event()
        self.redis_ok = False
        self.triton_ok = {t.space: False for t in config.encoders}
        self.heartbeat = time.monotonic()
        self.recover = True
        self.claim_cursor = NO_CURSOR
        self.last_claim = 0.0
        self.last_lag = 0.0
        self.processed = 0
        self.in_flight: dict[bytes, asyncio.Task[None]] = {}
        self.item_tasks: dict[int, asyncio.Task[None]] = {}
        self.running: set[asyncio.Task[None]] = set()
        self.trace = Trace(config.trace) if config.trace else None
        self.trace_record: dict[str, float] = {}
        self.gc_watch = GcWatch(self.metrics.gc_pause, self.trace)

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
        if self.config.freeze_gc:
            freeze_startup_objects()

    # reading -------------------------------------------------------------------------------

    async def read_batch(self) -> list[Delivered]:
        """Own pending entries first (after a start or an outage), idle ones of other consumers
        next (one step of a sweep), then new entries: up to batch_size, waiting at most max_wait
        after the first while another batch is being embedded (with none, waiting to fill a
        batch would only add to the freshness of what is there: Triton batches again anyway)."""
        cfg = self.config
        if self.recover:
            entries = await self.recover_own()
            if entries:
                return entries
        if self.claim_cursor != NO_CURSOR or time.monotonic() - self.last_claim > cfg.claim_idle / 2:
            entries = await self.claim_idle_entries()
            if entries:
                return entries
        entries = await self._xread(">", cfg.batch_size, int(cfg.idle_block * 1000))
        busy = any(not task.done() for task in self.running)
        deadline = time.monotonic() + (cfg.max_wait if busy else 0.0)
        while entries and len(entries) < cfg.batch_size and time.monotonic() < deadline:
            more = await self._xread(">", cfg.batch_size - len(entries),
                                     max(1, int((deadline - time.monotonic()) * 1000)))
            if not more:
                break
            entries.extend(more)
        return [(entry_id, fields, 1) for entry_id, fields in entries]

    async def recover_own(self) -> list[Delivered]:
        """This consumer's pending entries that no batch here is embedding (after a restart, a
        sweep's take-over, or an XREADGROUP answer lost in an outage), claimed again with their
        fields: a claim counts a delivery. Which ones: `redelivery(...)` decides."""
        cfg = self.config
        start = "-"
        while True:
            rows = await self.redis.xpending_range(cfg.stream, cfg.group, min=start, max="+", count=cfg.batch_size,
                                                   consumername=cfg.consumer)
            self.redis_ok = True
            if not rows:
                self.recover = False
                return []
            waiting = [(row["message_id"], int(row["times_delivered"])) for row in rows
                       if row["message_id"] not in self.in_flight]
            if waiting:
                return await self._claim(redelivery(waiting))
            start = "(" + rows[-1]["message_id"].decode()

    async def claim_idle_entries(self) -> list[Delivered]:
        """One step of a sweep over the group's pending entries: XAUTOCLAIM (JUSTID: counting no
        delivery yet) from the cursor the last step returned takes over what other consumers
        left idle; `recover_own` then redelivers it. At the sweep's end, the consumers that are
        gone are removed. Entries deleted from the stream meanwhile come back for dead letters."""
        cfg = self.config
        # Through EVAL: redis-py's xautoclaim(justid=True) drops the cursor from its answer.
        cursor, claimed, deleted = (list(await self.redis.eval(
            AUTOCLAIM_IDS, 1, cfg.stream, cfg.group, cfg.consumer, int(cfg.claim_idle * 1000), self.claim_cursor,
            CLAIM_STEP_BATCHES * cfg.batch_size)) + [[]])[:3]
        self.claim_cursor = cursor
        if cursor == NO_CURSOR:
            self.last_claim = time.monotonic()
            await self.forget_dead_consumers()
        if claimed or deleted:
            self.metrics.claimed.inc(len(claimed) + len(deleted))
            log.info("took over %d idle entries (%d deleted from the stream)", len(claimed), len(deleted))
        if claimed:
            self.recover = True
        return [(entry_id, None, 1) for entry_id in deleted]

    async def _claim(self, deliveries: Sequence[tuple[bytes, int]]) -> list[Delivered]:
        """XCLAIM (id, deliveries so far) for this consumer, with fields; an id that comes back
        without its entry was deleted from the stream (it is dead-lettered as such)."""
        cfg = self.config
        claimed = dict(await self.redis.xclaim(cfg.stream, cfg.group, cfg.consumer, 0, [i for i, _ in deliveries]))
        return [(entry_id, claimed.get(entry_id), count + 1) for entry_id, count in deliveries]

    async def forget_dead_consumers(self) -> None:
        """Remove consumers with nothing pending, idle for `forget_consumer_after` (pods gone).
        Checked and removed in one script: a consumer that reads meanwhile is never removed
        with entries pending (which would orphan them)."""
        cfg = self.config
        removed = await self.redis.eval(FORGET_CONSUMERS, 1, cfg.stream, cfg.group,
                                        int(cfg.forget_consumer_after * 1000), cfg.consumer)
        if removed:
            log.info("removed %d consumers gone from the group: %s", len(removed),
                     ", ".join(r.decode() if isinstance(r, bytes) else str(r) for r in removed))

    async def keep_claims(self) -> None:
        """Reset the idle time of the entries being embedded here (XCLAIM JUSTID counts no
        delivery), so another replica never takes over a live replica's slow batch."""
        ids = list(self.in_flight)
        if ids:
            cfg = self.config
            await self.redis.xclaim(cfg.stream, cfg.group, cfg.consumer, 0, ids, justid=True)

    async def trim(self) -> None:
        """Drop the entries every consumer group has acknowledged (XTRIM MINID)."""
        cfg = self.config
        groups = await self.redis.xinfo_groups(cfg.stream)
        pipe = self.redis.pipeline(transaction=False)
        for group in groups:
            pipe.xpending(cfg.stream, group["name"])
        summaries = await pipe.execute()
        floor = trim_floor([(int(summary["pending"]), summary["min"], group["last-delivered-id"])
                            for group, summary in zip(groups, summaries, strict=True)])
        if floor is not None:
            await self.redis.xtrim(cfg.stream, minid=floor, approximate=False)

    async def maintain(self) -> None:
        """Until stopped: keep the claims of batches in flight, trim the stream. Failures are
        counted and retried at the next tick; they never stop the embedder."""
        cfg = self.config
        tick = min(cfg.claim_idle / 3, cfg.trim_interval)
        last_trim = 0.0
        while not self.stop_event.is_set():
            try:
                await self.keep_claims()
                if time.monotonic() - last_trim >= cfg.trim_interval:
                    last_trim = time.monotonic()
                    await self.trim()
            except Exception as exc:  # noqa: BLE001 - Redis down: the main loop reports it too
                self.metrics.errors.labels(reason="redis_unavailable").inc()
                log.warning("stream maintenance: %s", exc)
            await self._sleep(tick)

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
        pipe = self.redis.pipeline(transaction=False)
        pipe.xinfo_groups(self.config.stream)
        pipe.xlen(self.config.stream)
        groups, length = await pipe.execute()
        self.metrics.stream_length.set(int(length))
        for group in groups:
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
            pipe.xadd(cfg.dead_stream, dead_letter_fields(fields, exc.reason, exc.detail, entry_id.decode()),
                      maxlen=cfg.dead_letter_max_len, approximate=False)
        pipe.xack(cfg.stream, cfg.group, *[entry_id for entry_id, _, _ in bad])
        await pipe.execute()

    async def embed_space(self, encoder: TritonEncoder, events: Sequence[ItemEvent],
                          marks: dict[str, float] | None = None) -> list[tuple[ItemEvent, str]]:
        """Embed and store `events` in one space; returns the events its encoder refused.
        `marks` gets the wall time of embed_start, embed_end and stored (for the trace)."""
        space = encoder.target.space
        marks = {} if marks is None else marks
        marks["embed_start"] = time.time()

        def triton_down() -> None:
            self.triton_ok[space] = False

        def refused(exc: BaseException, attempt: int) -> bool:
            return is_rejection(exc) and attempt >= REJECT_AFTER

        try:
            with self.metrics.stage.labels(stage="embed").time():
                vectors = await self.retry("triton_unavailable", lambda: encoder.embed(*model_inputs(events)),
                                           triton_down, refused)
            rejected: list[tuple[ItemEvent, str]] = []
        except Exception as exc:  # noqa: BLE001 - only rejections get here (retry gives up on nothing else)
            log.warning("encoder for %s refused a batch of %d (%s); isolating the items", space, len(events), exc)
            events, vectors, rejected = await self.retry("triton_unavailable", lambda: self.isolate(encoder, events),
                                                         triton_down)
        self.triton_ok[space] = True
        marks["embed_end"] = time.time()
        written = np.zeros(0, dtype=bool)
        if events:
            ids = np.array([e.item_id for e in events], dtype=np.int64)
            times = np.array([e.event_time for e in events], dtype=np.float64)
            with self.metrics.stage.labels(stage="store").time():
                written = await self.retry("store_write",
                                           lambda: asyncio.to_thread(self.store.put, space, ids, vectors, times))
        stored = marks["stored"] = time.time()
        for event, fresh in zip(events, written, strict=True):
            if fresh:
                self.metrics.freshness.labels(space=space).observe(max(0.0, stored - event.event_time))
        self.metrics.items.labels(space=space).inc(int(written.sum()))
        if not written.all():
            self.metrics.stale.labels(space=space).inc(int((~written).sum()))
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
            pipe.xadd(cfg.dead_stream, dead_letter_fields(fields, "encoder_rejected", detail, event.message_id),
                      maxlen=cfg.dead_letter_max_len, approximate=False)
        await pipe.execute()

    async def take_batch(self) -> tuple[list[ItemEvent], bool]:
        """Read a batch, dead-letter what fails validation or was delivered too often; the events
        left to embed, and whether they must be embedded alone (a suspect: see `redelivery`).

        Entries already being embedded by a batch in flight are skipped: re-reading pending
        entries after an outage (or claiming idle ones) must not start the same work twice."""
        self.heartbeat = time.monotonic()
        self.gc_watch.drain()
        read_start = time.time()
        delivered = await self.retry("redis_unavailable", self.read_batch, self._redis_down)
        read = time.time()
        await self.retry("redis_unavailable", self.update_lag, self._redis_down)
        delivered = [entry for entry in delivered if entry[0] not in self.in_flight]
        if not delivered:
            return [], False
        self.metrics.batch.observe(len(delivered))
        entries, too_often = over_delivered(delivered, self.config.max_deliveries)
        alone = any(deliveries > 2 for _, _, deliveries in delivered)
        if alone and entries and self.running:  # validating it may be what crashes: nothing else in flight
            await asyncio.wait(self.running)
        with self.metrics.stage.labels(stage="validate").time():
            good, bad = await asyncio.to_thread(self.validate, entries)
        bad = too_often + bad
        for _, _, exc in bad:
            self.metrics.errors.labels(reason=exc.reason).inc()
            log.info("dead letter %s: %s", exc.reason, exc.detail)
        if bad:
            await self.retry("redis_unavailable", lambda: self.dead_letter(bad), self._redis_down)
            self.processed += len(bad)
        queued = self.metrics.stage.labels(stage="queued")
        for event in good:
            queued.observe(max(0.0, read - event.event_time))
        if self.trace is not None and good:
            self.trace_record = {"read_start": read_start, "read": read, "validated": time.time()}
        return good, alone

    async def process(self, good: Sequence[ItemEvent], record: dict[str, Any] | None = None) -> None:
        """Embed in every space, store, then acknowledge (only then). `record`: the batch's
        trace line (with --trace), completed here and written."""
        events = latest_per_item(good)
        spaces: dict[str, dict[str, float]] = {}
        refused = await asyncio.gather(*(self.embed_space(encoder, events, spaces.setdefault(encoder.target.space, {}))
                                         for encoder in self.encoders))
        by_item = {event.item_id: (event, detail) for per_space in refused for event, detail in per_space}
        rejected = list(by_item.values())
        if rejected:
            self.metrics.errors.labels(reason="encoder_rejected").inc(len(rejected))
            await self.retry("redis_unavailable", lambda: self.dead_letter_rejected(rejected), self._redis_down)
        ids = [e.message_id for e in good]
        with self.metrics.stage.labels(stage="ack").time():
            await self.retry("redis_unavailable",
                             lambda: self.redis.xack(self.config.stream, self.config.group, *ids), self._redis_down)
        self.processed += len(ids)
        if record is not None and self.trace is not None:
            self.trace.write({**record, "spaces": spaces, "acked": time.time()})

    def launch(self, good: Sequence[ItemEvent]) -> asyncio.Task[None]:
        record = None
        if self.trace is not None:
            self.trace.batches += 1
            record = {"batch": self.trace.batches, "items": [e.item_id for e in good], **self.trace_record,
                      "launched": time.time()}
        task = asyncio.create_task(self.process(good, record))
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
        running = self.running
        maintenance = asyncio.create_task(self.maintain())
        probe = asyncio.create_task(probe_loop(self.trace, self.stop_event)) if self.trace is not None else None
        try:
            while not self.stop_event.is_set():
                await self.settle(self.config.in_flight - 1)
                good, alone = await self.take_batch()
                if not good:
                    continue
                earlier = {self.item_tasks[e.item_id] for e in good if e.item_id in self.item_tasks}
                if earlier:
                    await asyncio.wait(earlier)
                running.add(self.launch(good))
                if alone:
                    await self.settle(0)
        finally:
            results = await asyncio.gather(*running, return_exceptions=True)
            for helper in (maintenance, probe):
                if helper is not None:
                    helper.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await helper
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures and not self.stop_event.is_set():
                raise failures[0]

    async def settle(self, at_most: int) -> None:
        """Wait until at most `at_most` batches are in flight; a failed batch ends the run."""
        while len(self.running) > at_most:
            done, _ = await asyncio.wait(self.running, return_when=asyncio.FIRST_COMPLETED)
            self.running.difference_update(done)
            for task in done:
                task.result()

    async def close(self) -> None:
        self.gc_watch.close()
        if self.trace is not None:
            self.trace.close()
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
        if await self.redis.xlen(self.config.stream) >= self.config.stream_max_len:
            raise StreamFull(self.config.stream, self.config.stream_max_len)
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
        except StreamFull as exc:
            embedder.metrics.errors.labels(reason="stream_full").inc()
            return web.json_response({"error": "stream_full", "detail": str(exc)}, status=503,
                                     headers={"Retry-After": "1"})
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
                    scope: str | None = None, **overrides: Any) -> EmbedderConfig:
    """Flags first, then MMRANK_ENCODERS / MMRANK_STORE_URL / MMRANK_REDIS_URL / MMRANK_SCOPE /
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
                          scope=scope_from_env(scope), **{k: v for k, v in overrides.items() if v is not None})
