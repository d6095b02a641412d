"""What the embedder reports about itself: Prometheus metrics, and the stall trace (`--trace`).

Metrics (one registry per embedder, served at `/metrics`): `mmrank_embedding_freshness_seconds
{space}` (event time to vector stored), `mmrank_embedder_items_total{space}`,
`mmrank_embedder_errors_total{reason}`, `mmrank_embedder_stream_lag`,
`mmrank_embedder_stream_entries`, `mmrank_embedder_claimed_total`,
`mmrank_embedder_stale_events_total{space}`, `mmrank_embedder_stage_seconds{stage}` (where the
time goes: queued in the stream / validate / embed / store / ack) and
`mmrank_embedder_gc_pause_seconds{generation}` (the garbage collector's pauses, which stop every
batch at once).

Stalls: `--trace FILE` (debug) writes one JSON line per batch with the wall time of each stage
and one per garbage collection or event-loop delay over 2 ms; `bench/freshness.py` reads it to say
what each slow item waited for. In its own process (`mmrank embedder run`) the objects alive after
setup are frozen out of the collector (`freeze_startup_objects`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import time
from typing import Any

import numpy as np

FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 30, 60, 120, 300)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
TRACE_MIN_PAUSE = 0.002  # GC pauses and event-loop delays shorter than this are not traced
LOOP_PROBE = 0.005  # seconds between the trace's event-loop probes


# --- metrics --------------------------------------------------------------------------------


class Metrics:
    """The embedder's Prometheus metrics, in a registry of its own (one per embedder)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.freshness = Histogram(
            "mmrank_embedding_freshness_seconds",
            "Seconds from an item event's event_time to its vector stored, per space",
            ["space"],
            buckets=FRESHNESS_BUCKETS,
            registry=self.registry,
        )
        self.items = Counter(
            "mmrank_embedder_items", "Item vectors stored, per space", ["space"], registry=self.registry
        )
        self.errors = Counter(
            "mmrank_embedder_errors",
            "Failures by reason (bad events, Triton, Redis, store)",
            ["reason"],
            registry=self.registry,
        )
        self.lag = Gauge(
            "mmrank_embedder_stream_lag",
            "Stream entries not yet acknowledged by the group (undelivered + pending)",
            registry=self.registry,
        )
        self.batch = Histogram(
            "mmrank_embedder_batch_size",
            "Events per batch read from the stream",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.stale = Counter(
            "mmrank_embedder_stale_events",
            "Events not written: the item's stored vector comes from a later event",
            ["space"],
            registry=self.registry,
        )
        self.stream_length = Gauge(
            "mmrank_embedder_stream_entries", "Entries in the item stream (after trimming)", registry=self.registry
        )
        self.claimed = Counter(
            "mmrank_embedder_claimed", "Entries taken over from idle or restarted consumers", registry=self.registry
        )
        self.stage = Histogram(
            "mmrank_embedder_stage_seconds",
            "Where freshness goes: queued (event time to read, per event), validate (a batch "
            "decoded), embed (Triton, per space), store (write, per space), ack",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.gc_pause = Histogram(
            "mmrank_embedder_gc_pause_seconds",
            "Garbage collections of the embedder process, per generation: every batch waits while one runs",
            ["generation"],
            buckets=GC_BUCKETS,
            registry=self.registry,
        )

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
