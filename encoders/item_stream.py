"""The embedder's side of the item stream: one consumer of the ranker's consumer group on Redis.

    <prefix>items ─ XREADGROUP (group <prefix>embedder) ─► the embedder ─► XACK once stored
        ├─ own pending entries first (after a restart or an outage): XCLAIM, a delivery counted
        ├─ other consumers' idle entries: XAUTOCLAIM sweep, then redelivered as own
        └─ refused entries ─► <prefix>items:dead (+ reason), XACK

At least once: an entry is acknowledged only after every space's write succeeded (the embedder
calls `ack`); what a crashed embedder left pending is claimed again on restart (its own pending
entries) or by another replica once idle for `claim_idle` seconds (XAUTOCLAIM, following its
cursor through the whole pending list, then again every `claim_idle / 2`). Entries being embedded
are re-claimed by their owner (XCLAIM JUSTID) every `claim_idle / 3`, so a live replica's slow
batch is never taken over. Every claim counts a delivery; an entry delivered more than
`max_deliveries` times (it crashed or hung every embedder that took it) is dead-lettered with the
reason `too_many_deliveries`. Consumers with nothing pending and idle for `forget_consumer_after`
seconds (pods gone) are removed from the group after a sweep.

Bounded streams: every `trim_interval` seconds the item stream is trimmed (XTRIM MINID) to the
oldest entry some consumer group still needs (`trim_floor`), so acknowledged events leave Redis
within seconds; `append` (POST /items) refuses with `StreamFull` once the stream holds
`stream_max_len` entries. The dead-letter stream keeps its newest `dead_letter_max_len` entries
(XADD MAXLEN). docs/streams.md tells the whole story; the decisions are the pure functions below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from mmrank.encoders.embedder_config import EmbedderConfig
from mmrank.encoders.embedder_metrics import Metrics
from mmrank.encoders.item_events import BadEvent, ItemEvent, StreamFull, dead_letter_fields, parse_event

log = logging.getLogger("mmrank.embedder")
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


# --- decisions (pure) -------------------------------------------------------------------------


def over_delivered(entries: Sequence[Delivered], limit: int) -> tuple[list[Entry], list[Refused]]:
    """Entries delivered more than `limit` times go to the dead letters: each delivery ended
    without an acknowledgement, so the entry crashed or hung every embedder that took it."""
    keep: list[Entry] = []
    refused: list[Refused] = []
    for entry_id, fields, deliveries in entries:
        if deliveries > limit:
            refused.append(
                (
                    entry_id,
                    fields or {},
                    BadEvent(
                        "too_many_deliveries",
                        f"delivered {deliveries} times without an acknowledgement (limit {limit}): "
                        "every embedder that took it crashed or hung",
                    ),
                )
            )
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


def parse_entries(entries: Sequence[Entry]) -> tuple[list[ItemEvent], list[Refused]]:
    """Stream entries -> the events to embed, and the entries to dead-letter (with the reason)."""
    good, bad = [], []
    for entry_id, fields in entries:
        try:
            if fields is None:  # trimmed from the stream while pending: nothing left to embed
                raise BadEvent("deleted_entry", "the entry was deleted from the stream")
            good.append(parse_event(fields, entry_id.decode()))
        except BadEvent as exc:
            bad.append((entry_id, fields or {}, exc))
    return good, bad


# --- the consumer -----------------------------------------------------------------------------


class ItemStream:
    """This embedder's reads, claims, acknowledgements, dead letters and trims on the item stream.

    `in_flight`: the entries being embedded here right now (id -> its batch's task), kept by the
    embedder and only read here: they are never redelivered, and their claims are kept fresh.
    Redis errors propagate: the embedder retries (and calls `lost` on each failure)."""

    def __init__(
        self, config: EmbedderConfig, redis: Any, metrics: Metrics, in_flight: Mapping[bytes, asyncio.Task[None]]
    ) -> None:
        self.config = config
        self.redis = redis
        self.metrics = metrics
        self.in_flight = in_flight
        self.redis_ok = False
        self.recover = True
        self.claim_cursor = NO_CURSOR
        self.last_claim = 0.0
        self.last_lag = 0.0

    def lost(self) -> None:
        """Redis failed: not ready, and after a reconnect read our own pending entries again first."""
        self.redis_ok = False
        self.recover = True

    def busy(self) -> bool:
        """Is a batch being embedded here?"""
        return any(not task.done() for task in self.in_flight.values())

    async def ensure_group(self) -> None:
        import redis

        try:
            await self.redis.xgroup_create(self.config.stream, self.config.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self.redis_ok = True

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
        fresh = await self._xread(">", cfg.batch_size, int(cfg.idle_block * 1000))
        deadline = time.monotonic() + (cfg.max_wait if self.busy() else 0.0)
        while fresh and len(fresh) < cfg.batch_size and time.monotonic() < deadline:
            more = await self._xread(
                ">", cfg.batch_size - len(fresh), max(1, int((deadline - time.monotonic()) * 1000))
            )
            if not more:
                break
            fresh.extend(more)
        return [(entry_id, fields, 1) for entry_id, fields in fresh]

    async def recover_own(self) -> list[Delivered]:
        """This consumer's pending entries that no batch here is embedding (after a restart, a
        sweep's take-over, or an XREADGROUP answer lost in an outage), claimed again with their
        fields: a claim counts a delivery. Which ones: `redelivery(...)` decides."""
        cfg = self.config
        start = "-"
        while True:
            rows = await self.redis.xpending_range(
                cfg.stream, cfg.group, min=start, max="+", count=cfg.batch_size, consumername=cfg.consumer
            )
            self.redis_ok = True
            if not rows:
                self.recover = False
                return []
            waiting = [
                (row["message_id"], int(row["times_delivered"]))
                for row in rows
                if row["message_id"] not in self.in_flight
            ]
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
        cursor, claimed, deleted = (
            list(
                await self.redis.eval(
                    AUTOCLAIM_IDS,
                    1,
                    cfg.stream,
                    cfg.group,
                    cfg.consumer,
                    int(cfg.claim_idle * 1000),
                    self.claim_cursor,
                    CLAIM_STEP_BATCHES * cfg.batch_size,
                )
            )
            + [[]]
        )[:3]
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

    async def _xread(self, start: str, count: int, block_ms: int | None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        cfg = self.config
        response = await self.redis.xreadgroup(
            cfg.group, cfg.consumer, {cfg.stream: start}, count=count, block=block_ms
        )
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

    # acknowledging -------------------------------------------------------------------------

    async def ack(self, ids: Sequence[str]) -> None:
        """The entries are stored in every space: they leave the group's pending list."""
        await self.redis.xack(self.config.stream, self.config.group, *ids)

    async def dead_letter(self, bad: Sequence[Refused]) -> None:
        """Refused entries go to the dead letters (fields + reason) and are acknowledged, at once."""
        cfg = self.config
        pipe = self.redis.pipeline(transaction=True)
        for entry_id, fields, exc in bad:
            pipe.xadd(
                cfg.dead_stream,
                dead_letter_fields(fields, exc.reason, exc.detail, entry_id.decode()),
                maxlen=cfg.dead_letter_max_len,
                approximate=False,
            )
        pipe.xack(cfg.stream, cfg.group, *[entry_id for entry_id, _, _ in bad])
        await pipe.execute()

    async def dead_letter_rejected(self, rejected: Sequence[tuple[ItemEvent, str]]) -> None:
        """Events the encoder refused go to the dead letters; `ack` acknowledges them with their batch."""
        cfg = self.config
        pipe = self.redis.pipeline(transaction=True)
        for event, detail in rejected:
            fields = {"item_id": str(event.item_id), "title": event.title, "event_time": repr(event.event_time)}
            pipe.xadd(
                cfg.dead_stream,
                dead_letter_fields(fields, "encoder_rejected", detail, event.message_id),
                maxlen=cfg.dead_letter_max_len,
                approximate=False,
            )
        await pipe.execute()

    # maintenance ---------------------------------------------------------------------------

    async def forget_dead_consumers(self) -> None:
        """Remove consumers with nothing pending, idle for `forget_consumer_after` (pods gone).
        Checked and removed in one script: a consumer that reads meanwhile is never removed
        with entries pending (which would orphan them)."""
        cfg = self.config
        removed = await self.redis.eval(
            FORGET_CONSUMERS, 1, cfg.stream, cfg.group, int(cfg.forget_consumer_after * 1000), cfg.consumer
        )
        if removed:
            log.info(
                "removed %d consumers gone from the group: %s",
                len(removed),
                ", ".join(r.decode() if isinstance(r, bytes) else str(r) for r in removed),
            )

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
        floor = trim_floor(
            [
                (int(summary["pending"]), summary["min"], group["last-delivered-id"])
                for group, summary in zip(groups, summaries, strict=True)
            ]
        )
        if floor is not None:
            await self.redis.xtrim(cfg.stream, minid=floor, approximate=False)

    async def maintain(self, stop: asyncio.Event) -> None:
        """Until `stop` is set: keep the claims of batches in flight, trim the stream. Failures
        are counted and retried at the next tick; they never stop the embedder."""
        cfg = self.config
        tick = min(cfg.claim_idle / 3, cfg.trim_interval)
        last_trim = 0.0
        while not stop.is_set():
            try:
                await self.keep_claims()
                if time.monotonic() - last_trim >= cfg.trim_interval:
                    last_trim = time.monotonic()
                    await self.trim()
            except Exception as exc:  # noqa: BLE001 - Redis down: the main loop reports it too
                self.metrics.errors.labels(reason="redis_unavailable").inc()
                log.warning("stream maintenance: %s", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=tick)

    # publishing ----------------------------------------------------------------------------

    async def append(self, fields: Mapping[str, Any]) -> str:
        """Append a validated event (POST /items); a full stream refuses it (the producer retries)."""
        cfg = self.config
        if await self.redis.xlen(cfg.stream) >= cfg.stream_max_len:
            raise StreamFull(cfg.stream, cfg.stream_max_len)
        entry = await self.redis.xadd(cfg.stream, fields)
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.redis.aclose()
