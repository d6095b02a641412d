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

This module is the batch loop (`Embedder`). The rest of the embedder, one concern each:

| module | what |
|---|---|
| `embedder_config` | `EmbedderConfig`, from flags or the environment the operator sets |
| `item_stream` | the consumer group on Redis: reads, claims, acks, dead letters, trims |
| `triton_client` | the encoder client (`TritonEncoder`), shared with the backfill |
| `embedder_metrics` | Prometheus metrics and the stall trace (`--trace`) |
| `embedder_app` | the HTTP endpoint (`POST /items`, health, metrics) and `serve` |

At least once, idempotent: an entry is acknowledged only after every space's write succeeded; a
batch that fails (Triton down, Redis down) is retried with exponential back-off and never
dropped (what a crashed embedder left pending: `item_stream`). Every write carries the event's
`event_time`: the store keeps the newest per item atomically, so a replayed old event, or a late
batch of a slower replica, never overwrites a newer vector
(`mmrank_embedder_stale_events_total`). An item the encoder itself keeps refusing (Triton answers
INTERNAL / INVALID_ARGUMENT, or a vector that is not finite) is found by embedding the batch one
item at a time, while a probe item still goes through, and dead-lettered with the reason
`encoder_rejected`, so one poisoned item never stalls the stream. Up to `in_flight` batches are
embedded at once; an item's events are embedded in stream order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from mmrank.encoders.embedder_config import ENV_ENCODERS, EmbedderConfig
from mmrank.encoders.embedder_metrics import GcWatch, Metrics, Trace, freeze_startup_objects, probe_loop
from mmrank.encoders.item_events import ItemEvent
from mmrank.encoders.item_stream import ItemStream, over_delivered, parse_entries
from mmrank.encoders.triton_client import TritonEncoder, is_rejection
from mmrank.store import EmbeddingStore, open_store, redis_client

log = logging.getLogger("mmrank.embedder")
T = TypeVar("T")
REJECT_AFTER = 3  # a batch the encoder refuses this often is embedded one item at a time


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


def model_inputs(events: Sequence[ItemEvent]) -> tuple[np.ndarray, list[str]]:
    return np.stack([e.image for e in events]), [e.title for e in events]


class Embedder:
    """Reads item events, embeds them in every live space, acknowledges when all are stored."""

    def __init__(self, config: EmbedderConfig, store: EmbeddingStore | None = None) -> None:
        if not config.encoders:
            raise ValueError(f"no encoders: pass --encoder SPACE=HOST:PORT or set {ENV_ENCODERS}")
        self.config = config
        self.store = store or open_store(config.store_url, config.scope)
        self.encoders = [TritonEncoder(t, config.triton_timeout) for t in config.encoders]
        self.metrics = Metrics()
        self.stop_event = asyncio.Event()
        self.triton_ok = {t.space: False for t in config.encoders}
        self.store_ok = True  # False while a store write is being retried
        self.heartbeat = time.monotonic()
        self.processed = 0
        self.in_flight: dict[bytes, asyncio.Task[None]] = {}
        self.item_tasks: dict[int, asyncio.Task[None]] = {}
        self.running: set[asyncio.Task[None]] = set()
        self.stream = ItemStream(
            config,
            redis_client(config.redis_url, asyncio=True, socket_timeout=config.idle_block + 10),
            self.metrics,
            self.in_flight,
        )
        self.trace = Trace(config.trace) if config.trace else None
        self.trace_record: dict[str, float] = {}
        self.gc_watch = GcWatch(self.metrics.gc_pause, self.trace)

    # readiness -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Not ready while the stream's Redis, the store or an encoder fails: a batch retrying its
        store write keeps the main loop waiting for a slot, so no stream read would notice."""
        return self.stream.redis_ok and self.store_ok and all(self.triton_ok.values())

    def state(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "redis": self.stream.redis_ok,
            "store": self.store_ok,
            "encoders": dict(self.triton_ok),
            "processed": self.processed,
            "heartbeat_age_s": round(time.monotonic() - self.heartbeat, 3),
        }

    # retrying ------------------------------------------------------------------------------

    async def retry(
        self,
        what: str,
        action: Callable[[], Awaitable[T]],
        on_error: Callable[[], None] = lambda: None,
        give_up: Callable[[BaseException, int], bool] = lambda exc, attempt: False,
    ) -> T:
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

    def _store_failed(self) -> None:
        self.store_ok = False

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), timeout=seconds)

    # setup ---------------------------------------------------------------------------------

    async def ensure_space(self, encoder: TritonEncoder) -> None:
        _, dim = await encoder.describe()
        await asyncio.to_thread(self.store.create_space, encoder.target.space, dim, self.config.dtype)
        self.triton_ok[encoder.target.space] = await encoder.ready()

    async def setup(self) -> None:
        await self.retry("redis_unavailable", self.stream.ensure_group, self.stream.lost)
        for encoder in self.encoders:
            # A space that exists with another dim or dtype is a configuration error: crash.
            await self.retry(
                "triton_unavailable",
                lambda e=encoder: self.ensure_space(e),
                lambda e=encoder: self.triton_ok.__setitem__(e.target.space, False),
                give_up=lambda exc, attempt: isinstance(exc, ValueError),
            )
        if self.config.freeze_gc:
            freeze_startup_objects()

    # one batch -----------------------------------------------------------------------------

    async def embed_space(
        self, encoder: TritonEncoder, events: Sequence[ItemEvent], marks: dict[str, float] | None = None
    ) -> list[tuple[ItemEvent, str]]:
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
                vectors = await self.retry(
                    "triton_unavailable", lambda: encoder.embed(*model_inputs(events)), triton_down, refused
                )
            rejected: list[tuple[ItemEvent, str]] = []
        except Exception as exc:  # noqa: BLE001 - only rejections get here (retry gives up on nothing else)
            log.warning("encoder for %s refused a batch of %d (%s); isolating the items", space, len(events), exc)
            events, vectors, rejected = await self.retry(
                "triton_unavailable", lambda: self.isolate(encoder, events), triton_down
            )
        self.triton_ok[space] = True
        marks["embed_end"] = time.time()
        written = np.zeros(0, dtype=bool)
        if events:
            ids = np.array([e.item_id for e in events], dtype=np.int64)
            times = np.array([e.event_time for e in events], dtype=np.float64)
            with self.metrics.stage.labels(stage="store").time():
                written = await self.retry(
                    "store_write",
                    lambda: asyncio.to_thread(self.store.put, space, ids, vectors, times),
                    self._store_failed,
                )
            self.store_ok = True
        stored = marks["stored"] = time.time()
        for event, fresh in zip(events, written, strict=True):
            if fresh:
                self.metrics.freshness.labels(space=space).observe(max(0.0, stored - event.event_time))
        self.metrics.items.labels(space=space).inc(int(written.sum()))
        if not written.all():
            self.metrics.stale.labels(space=space).inc(int((~written).sum()))
        return rejected

    async def isolate(
        self, encoder: TritonEncoder, events: Sequence[ItemEvent]
    ) -> tuple[list[ItemEvent], np.ndarray, list[tuple[ItemEvent, str]]]:
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

    async def take_batch(self) -> tuple[list[ItemEvent], bool]:
        """Read a batch, dead-letter what fails validation or was delivered too often; the events
        left to embed, and whether they must be embedded alone (a suspect: see `item_stream.redelivery`).

        Entries already being embedded by a batch in flight are skipped: re-reading pending
        entries after an outage (or claiming idle ones) must not start the same work twice."""
        self.heartbeat = time.monotonic()
        self.gc_watch.drain()
        read_start = time.time()
        delivered = await self.retry("redis_unavailable", self.stream.read_batch, self.stream.lost)
        read = time.time()
        await self.retry("redis_unavailable", self.stream.update_lag, self.stream.lost)
        delivered = [entry for entry in delivered if entry[0] not in self.in_flight]
        if not delivered:
            return [], False
        self.metrics.batch.observe(len(delivered))
        entries, too_often = over_delivered(delivered, self.config.max_deliveries)
        alone = any(deliveries > 2 for _, _, deliveries in delivered)
        if alone and entries and self.running:  # validating it may be what crashes: nothing else in flight
            await asyncio.wait(self.running)
        with self.metrics.stage.labels(stage="validate").time():
            good, bad = await asyncio.to_thread(parse_entries, entries)
        bad = too_often + bad
        for _, _, exc in bad:
            self.metrics.errors.labels(reason=exc.reason).inc()
            log.info("dead letter %s: %s", exc.reason, exc.detail)
        if bad:
            await self.retry("redis_unavailable", lambda: self.stream.dead_letter(bad), self.stream.lost)
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
        refused = await asyncio.gather(
            *(
                self.embed_space(encoder, events, spaces.setdefault(encoder.target.space, {}))
                for encoder in self.encoders
            )
        )
        by_item = {event.item_id: (event, detail) for per_space in refused for event, detail in per_space}
        rejected = list(by_item.values())
        if rejected:
            self.metrics.errors.labels(reason="encoder_rejected").inc(len(rejected))
            await self.retry("redis_unavailable", lambda: self.stream.dead_letter_rejected(rejected), self.stream.lost)
        ids = [e.message_id for e in good]
        with self.metrics.stage.labels(stage="ack").time():
            await self.retry("redis_unavailable", lambda: self.stream.ack(ids), self.stream.lost)
        self.processed += len(ids)
        if record is not None and self.trace is not None:
            self.trace.write({**record, "spaces": spaces, "acked": time.time()})

    def launch(self, good: Sequence[ItemEvent]) -> asyncio.Task[None]:
        record = None
        if self.trace is not None:
            self.trace.batches += 1
            record = {
                "batch": self.trace.batches,
                "items": [e.item_id for e in good],
                **self.trace_record,
                "launched": time.time(),
            }
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
        maintenance = asyncio.create_task(self.stream.maintain(self.stop_event))
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
        await self.stream.close()
