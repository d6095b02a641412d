"""A per-process cache of item vectors keyed by (space, item id), never stale past a rewrite.

Most of a ranking request's store read is the same popular items again and again: 1,000 history
items and 200 candidates, 256 bytes each, fetched and decoded per request. This cache keeps the
decoded float32 rows in one preallocated array per space (a FIFO ring: when full, the oldest
entry gives up its slot) and reads from Redis only what it does not hold.

Staleness is ruled out by the store's version log (mmrank/store.py, `_PUT_VERSIONED`): every
put takes the space's next sequence number and records it per item, in the same Lua script that
writes the vectors. Each request first reads, in one MULTI together with the user's history,
the space's (epoch, seq, floor) and the items written since the last sequence this process has
applied; those items leave the cache before anything is looked up. So a request that starts
after a put has returned never sees the vector the put replaced. A read that raced with a
rewrite is not cached (`generation` changed while it was in flight). The cache starts afresh
when the log began anew (space deleted and re-created: another epoch), when this process fell
behind the kept part of the log (seq <= floor), or when more items changed than one sync reads.
Spaces without a log (written by a store that keeps none) are read through, never cached.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from mmrank.store import Found, RedisStore, Vectors

Ids = npt.NDArray[np.int64]  # [n]

SYNC_LIMIT = 10_000  # changed items one request applies; beyond it the space's cache starts afresh
DENSE_IDS = 1 << 22  # item ids below this are indexed by an array (16 MB at most), larger ones by a dict


@dataclasses.dataclass(frozen=True)
class LogState:
    """The space's version log as one request read it."""

    epoch: bytes | None  # None: no versioned write ever (cannot cache)
    seq: int
    floor: int
    since: int | None  # the version the request asked changes after; None: it asked none
    changed: tuple[int, ...]  # items written after `since`


def sync_decision(epoch: bytes | None, log: LogState) -> str:
    """What a request does with the cache before its lookup: 'bypass' (no log: read through),
    'reset' (start afresh), or 'apply' (drop `log.changed`, then use the rest)."""
    if log.epoch is None:
        return "bypass"
    if log.since is None or log.epoch != epoch or log.floor > log.since or len(log.changed) >= SYNC_LIMIT:
        return "reset"
    return "apply"


class SpaceCache:
    """Rows of one space: item -> slot in `rows` (an array indexed by item id below `DENSE_IDS`,
    a dict above), `owner` the other way; `seen` is the last version applied."""

    def __init__(self, dim: int, capacity: int) -> None:
        self.rows = np.zeros((capacity, dim), dtype=np.float32)
        self.owner = np.full(capacity, -1, dtype=np.int64)
        self.dense = np.full(0, -1, dtype=np.int32)
        self.sparse: dict[int, int] = {}
        self.next_slot = 0
        self.epoch: bytes | None = None
        self.seen = 0
        self.generation = 0  # bumped whenever items are dropped: reads in flight must not refill them

    def reset(self, epoch: bytes | None, seq: int) -> None:
        self.dense[:] = -1
        self.sparse.clear()
        self.owner[:] = -1
        self.next_slot = 0
        self.epoch, self.seen = epoch, seq
        self.generation += 1

    def slot_of(self, item: int) -> int:
        if 0 <= item < len(self.dense):
            return int(self.dense[item])
        return self.sparse.get(item, -1) if item >= DENSE_IDS else -1

    def _assign(self, item: int, slot: int) -> None:
        if 0 <= item < DENSE_IDS:
            if item >= len(self.dense):
                grown = np.full(min(DENSE_IDS, max(item + 1, 2 * len(self.dense), 1024)), -1, dtype=np.int32)
                grown[: len(self.dense)] = self.dense
                self.dense = grown
            self.dense[item] = slot
        elif slot < 0:
            self.sparse.pop(item, None)
        else:
            self.sparse[item] = slot

    def drop(self, items: tuple[int, ...], seq: int) -> int:
        """Forget `items` (rewritten at version `seq`); how many were held."""
        held = 0
        for item in items:
            slot = self.slot_of(item)
            if slot >= 0:
                self._assign(item, -1)
                self.owner[slot] = -1
                held += 1
        self.seen = max(self.seen, seq)
        if items:
            self.generation += 1
        return held

    def lookup(self, ids: Ids) -> tuple[Vectors, Found]:
        """(float32 [n, dim] copies, held bool [n]); rows not held are zero."""
        slot = np.full(len(ids), -1, dtype=np.int64)
        small = (ids >= 0) & (ids < len(self.dense))
        slot[small] = self.dense[ids[small]]
        if self.sparse:
            big = np.flatnonzero(ids >= DENSE_IDS)
            slot[big] = [self.sparse.get(i, -1) for i in ids[big].tolist()]
        held = slot >= 0
        out = np.take(self.rows, np.where(held, slot, 0), axis=0)
        out[~held] = 0.0
        return out, held

    def insert(self, ids: Ids, vectors: Vectors) -> None:
        capacity = len(self.rows)
        for item, row in zip(ids.tolist(), vectors, strict=True):
            if self.slot_of(item) >= 0:
                continue
            slot = self.next_slot
            self.next_slot = (slot + 1) % capacity
            old = int(self.owner[slot])
            if old >= 0:
                self._assign(old, -1)
            self.owner[slot] = item
            self.rows[slot] = row
            self._assign(item, slot)


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0  # rows read from the store (found or not)
    resets: int = 0
    dropped: int = 0  # cached items dropped because they were rewritten


class ItemVectorCache:
    """The process-wide cache; thread-safe (requests run in worker threads)."""

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self.spaces: dict[str, SpaceCache] = {}
        self.stats = CacheStats()
        self._lock = threading.Lock()

    def sync(self, store: RedisStore, space: str, history_user: int | None, window: int) -> tuple[Ids | None, LogState]:
        """One round trip: the version log since this process's last applied version, and the
        newest `window` history ids of `history_user` when given."""
        return read_log(store, space, history_user, window, self._seen(space))

    def vectors(self, store: RedisStore, space: str, dim: int, log: LogState, ids: Ids) -> tuple[Vectors, Found, int]:
        """(float32 [n, dim], found bool [n], rows served from the cache) for `ids`, after
        applying `log`; the store is read only for what the cache does not hold."""
        return self._read(store, space, dim, log, ids)

    def _seen(self, space: str) -> int | None:
        with self._lock:
            cached = self.spaces.get(space)
            return None if cached is None or cached.epoch is None else cached.seen

    def _read(self, store: RedisStore, space: str, dim: int, log: LogState, ids: Ids) -> tuple[Vectors, Found, int]:
        with self._lock:
            cached = self.spaces.get(space)
            if cached is None or cached.rows.shape[1] != dim:
                cached = self.spaces[space] = SpaceCache(dim, self.capacity)
            decision = sync_decision(cached.epoch, log)
            if decision == "bypass":
                if cached.epoch is not None:
                    cached.reset(None, 0)
            elif decision == "reset":
                cached.reset(log.epoch, log.seq)
                self.stats.resets += 1
            else:
                self.stats.dropped += cached.drop(log.changed, log.seq)
            if decision == "bypass":
                vectors, held = np.zeros((len(ids), dim), np.float32), np.zeros(len(ids), bool)
            else:
                vectors, held = cached.lookup(ids)
            generation = cached.generation
        missing = ids[~held]
        found = held.copy()
        if len(missing):
            read, read_found = store.get(space, missing)
            vectors[~held] = read
            found[~held] = read_found
            with self._lock:
                self.stats.misses += len(missing)
                if decision != "bypass" and cached.generation == generation:
                    unique, first = np.unique(missing[read_found], return_index=True)
                    cached.insert(unique, read[read_found][first])
        hits = int(held.sum())
        with self._lock:
            self.stats.hits += hits
        return vectors, found, hits


def history_ids(raw: list[bytes]) -> Ids:
    """LRANGE's decimal ids as int64, parsed by numpy in one call (a quarter of a per-item int())."""
    if not raw:
        return np.zeros(0, dtype=np.int64)
    return np.fromstring(b" ".join(raw), dtype=np.int64, sep=" ")


def read_log(
    store: RedisStore, space: str, history_user: int | None, window: int, seen: int | None
) -> tuple[Ids | None, LogState]:
    """One MULTI: LRANGE of the user's history (when asked), HMGET of the space's versions, and
    the items written after `seen` (none asked when the cache holds nothing of the space yet)."""
    client = store.client
    pipe = client.pipeline(transaction=True)
    if history_user is not None and window > 0:
        pipe.lrange(store.history_key(history_user), -window, -1)
    pipe.hmget(store.versions_key(space), ["epoch", "seq", "floor"])
    if seen is not None:
        pipe.zrangebyscore(store.changes_key(space), f"({seen}", "+inf", start=0, num=SYNC_LIMIT)
    answers = pipe.execute()
    history = None
    if history_user is not None:
        history = history_ids(answers.pop(0)) if window > 0 else np.zeros(0, dtype=np.int64)
    epoch, seq, floor = answers[0]
    changed = tuple(int(x) for x in answers[1]) if seen is not None else ()
    log = LogState(epoch, int(seq or 0), int(floor or 0), seen, changed)
    return history, log
