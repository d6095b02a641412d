"""The embedding store: vectors keyed by (ranker, space, item id), the online copy of every space.

Every key, stream and consumer group belongs to one ranker: its *scope* (`Scope`, namespace and
name of the MultimodalRanker), so two rankers on one Redis never read, retire or delete each
other's data, even when both use encoder version `e1`. In Redis every key of a ranker starts with
`mmrank:{<namespace>/<name>}:` — the braces are a Redis Cluster hash tag, so all of one ranker's
keys live in one slot, which the multi-key Lua script of `put` and the MULTI of `delete_space`
need there. The catalogue size is kept per space. `Scope.keys_pattern` matches everything a
ranker owns; `delete_scope` removes it (the operator's finalizer does, after the ranker's pods).

A *space* is everything one encoder version produced. Vectors are kept as float16 (half the
bytes of float32, error ~1e-3 on unit vectors) or int8 with a per-vector float32 scale (a quarter,
error ~4e-3); `get` always returns float32. Two back ends share the `EmbeddingStore` interface:

- `redis://host:port/db` — production (password: `store_password`, the one rule every part uses).
  One hash per space (`<prefix>emb:<space>`, field = item id), read with HMGET and written with HSET: measured against pipelined string keys in
  `bench/store_layout.py` (docs/benchmarks.md, "Store layout"); the hash also gives the exact
  item count in O(1) (HLEN), so re-putting an item never counts it twice. Every put also takes
  the space's next version number and logs it per item, atomically with the vectors (one Lua
  script): `<prefix>embver:<space>` (epoch, seq, floor) and the sorted set
  `<prefix>embchanges:<space>` (item -> seq of its last write, the newest `CHANGE_LOG_LIMIT` kept).
  The predictor's item vector cache (predictors/item_cache.py) reads that log to drop what was
  rewritten, so a re-embedded item is never served from a stale copy.
- `file:///path` — the embedded store of the local quick start, one LMDB environment (chosen
  over SQLite by the same benchmark); several processes may share it.

Every stored vector keeps the event time it was computed from (unix seconds; the hash
`<prefix>emb-time:<space>` in Redis, a database beside the vectors in LMDB). `put` writes a row
only when its event time is at least the stored one, checked and written atomically (in the same
Lua script in Redis, one write transaction in LMDB), so an old event replayed after a new one, or
a late batch of a slower replica, never overwrites a newer vector. `event_times(space, ids)` reads
them alone (one HMGET, under 20 bytes per item).

The item-event stream, dead-letter stream, consumer group and feedback stream names live here
too (`Scope.item_stream`, ...), so producers that only import the common package agree with the
embedder; `ITEM_STREAM`, `DEAD_LETTER_STREAM` and `EMBEDDER_GROUP` are those of `DEFAULT_SCOPE`,
the scope of local runs. This module must not import torch.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import re
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

SCOPE_ENV = "MMRANK_SCOPE"
DTYPES = ("float16", "int8")
CHANGE_LOG_LIMIT = 100_000  # newest item versions kept per space; a reader further behind starts afresh
PASSWORD_ENV = "MMRANK_STORE_PASSWORD"
_INT8_SCALE = struct.Struct("<f")

Vectors = npt.NDArray[np.float32]  # [n, dim]
Found = npt.NDArray[np.bool_]  # [n]: per row, stored (get) or written (put)
ItemIds = Iterable[int] | npt.NDArray[np.integer[Any]]
EventTimes = Iterable[float] | npt.NDArray[np.floating[Any]]


# A namespace is a DNS-1123 label, a MultimodalRanker's name a DNS-1123 subdomain: neither holds a
# glob character, a brace or a colon, so a scope's key prefix never matches another ranker's keys.
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclasses.dataclass(frozen=True)
class Scope:
    """The ranker that owns a set of store keys: a MultimodalRanker's namespace and name."""

    namespace: str
    name: str

    def __post_init__(self) -> None:
        if not _NAMESPACE.match(self.namespace):
            raise ValueError(
                f"scope namespace {self.namespace!r} is not a Kubernetes namespace name "
                "(lower-case letters, digits and '-', at most 63)"
            )
        if not _NAME.match(self.name):
            raise ValueError(
                f"scope name {self.name!r} is not a Kubernetes object name "
                "(lower-case letters, digits, '-' and '.', at most 253)"
            )

    @classmethod
    def parse(cls, text: str) -> Scope:
        """`NAMESPACE/NAME`, as `--scope` and `MMRANK_SCOPE` take it."""
        namespace, slash, name = text.strip().partition("/")
        if not slash:
            raise ValueError(f"scope {text!r} must be NAMESPACE/NAME (the MultimodalRanker's namespace and name)")
        return cls(namespace, name)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def prefix(self) -> str:
        """`mmrank:{ns/name}:` — the braces are a Redis Cluster hash tag: one slot per ranker."""
        return f"mmrank:{{{self.namespace}/{self.name}}}:"

    @property
    def keys_pattern(self) -> str:
        """A SCAN MATCH pattern for every key of this ranker (names hold no glob characters)."""
        return f"{self.prefix}*"

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @property
    def item_stream(self) -> str:
        return self.key("items")

    @property
    def dead_letter_stream(self) -> str:
        return self.key("items", "dead")

    @property
    def feedback_stream(self) -> str:
        return self.key("feedback")

    def consumer_group(self, name: str = "embedder") -> str:
        """The ranker's group on an item stream: scoped even on a stream several rankers share,
        so each ranker's embedders receive every item."""
        return self.key(name)

    def owns(self, key: str) -> bool:
        return key.startswith(self.prefix)


DEFAULT_SCOPE = Scope("default", "local")  # local runs: the CLI's default, and the operator never uses it
ITEM_STREAM = DEFAULT_SCOPE.item_stream
DEAD_LETTER_STREAM = DEFAULT_SCOPE.dead_letter_stream
EMBEDDER_GROUP = DEFAULT_SCOPE.consumer_group()


def scope_from_env(value: str | None = None, env: Mapping[str, str] | None = None) -> Scope:
    """`value` (a `--scope` flag), else `MMRANK_SCOPE` (the operator sets it on every child), else
    the local default."""
    text = value or (os.environ if env is None else env).get(SCOPE_ENV) or ""
    return Scope.parse(text) if text else DEFAULT_SCOPE


@dataclasses.dataclass(frozen=True)
class ScopeDeleted:
    """What `delete_scope` removed: how many keys (or LMDB databases and records), which spaces."""

    keys: int
    spaces: list[str]


class SpaceNotFound(KeyError):
    """The space was never created (or was deleted): callers must not treat it as 'no vectors'."""


@dataclasses.dataclass(frozen=True)
class BackfillShard:
    done: int
    total: int
    updated: float


@dataclasses.dataclass(frozen=True)
class SpaceInfo:
    """What the operator and the predictor read about a space.

    `coverage` is items / catalogue size, clamped to 1 (items added after the catalogue size was
    last set can push the raw ratio above 1), and 0 while the catalogue size is unknown: an
    unknown catalogue must never let a ranker go live. `backfill` maps shard "I/N" to progress.
    """

    version: str
    dim: int
    dtype: str
    items: int
    created: float
    catalogue_size: int
    coverage: float
    backfill: dict[str, BackfillShard]

    @property
    def backfill_done(self) -> int:
        return sum(s.done for s in self.backfill.values())

    @property
    def backfill_total(self) -> int:
        return sum(s.total for s in self.backfill.values())


# --- pure codecs --------------------------------------------------------------------------------


def coverage(items: int, catalogue_size: int) -> float:
    return min(1.0, items / catalogue_size) if catalogue_size > 0 else 0.0


def check_vectors(vectors: npt.ArrayLike, n: int, dim: int) -> npt.NDArray[np.float32]:
    checked = np.asarray(vectors, dtype=np.float32)
    if checked.shape != (n, dim):
        raise ValueError(f"expected vectors of shape ({n}, {dim}), got {checked.shape}")
    if not np.isfinite(checked).all():
        raise ValueError("vectors contain NaN or infinity")
    return checked


def encode_vectors(vectors: npt.NDArray[np.float32], dtype: str) -> list[bytes]:
    """float32 [n, dim] -> one blob per row; int8 rows carry their own scale (max |x| / 127)."""
    if dtype == "float16":
        half = vectors.astype("<f2")
        return [row.tobytes() for row in half]
    if dtype == "int8":
        scale = np.abs(vectors).max(axis=1) / 127.0
        safe = np.where(scale > 0, scale, 1.0)
        q = np.clip(np.rint(vectors / safe[:, None]), -127, 127).astype(np.int8)
        return [_INT8_SCALE.pack(float(s)) + row.tobytes() for s, row in zip(scale, q, strict=True)]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {DTYPES}")


def decode_vectors(blobs: Sequence[bytes | None], dim: int, dtype: str) -> tuple[Vectors, Found]:
    """Blobs (None where missing) -> (float32 [n, dim], found bool [n]); missing rows are zero."""
    out = np.zeros((len(blobs), dim), dtype=np.float32)
    found = np.fromiter((blob is not None for blob in blobs), dtype=bool, count=len(blobs))
    row = _row_dtype(dim, dtype)
    present = b"".join(blob for blob in blobs if blob is not None)
    if len(present) == int(found.sum()) * row.itemsize:
        # One join and one frombuffer for the whole batch: the predictor's hot path (1,200 rows a
        # request) spends 5x less CPU here than decoding row by row.
        rows = np.frombuffer(present, dtype=row)
        out[found] = rows["v"] if dtype == "float16" else rows["v"] * rows["scale"][:, None]
        return out, found
    found[:] = False
    for i, blob in enumerate(blobs):
        if blob is None:
            continue
        if dtype == "float16":
            out[i] = np.frombuffer(blob, dtype="<f2", count=dim)
        else:
            (scale,) = _INT8_SCALE.unpack_from(blob)
            out[i] = np.frombuffer(blob, dtype=np.int8, count=dim, offset=_INT8_SCALE.size) * np.float32(scale)
        found[i] = True
    return out, found


def _row_dtype(dim: int, dtype: str) -> np.dtype[np.void]:
    """One stored vector as a numpy record: float16 values, or a float32 scale and int8 values."""
    if dtype == "float16":
        return np.dtype([("v", "<f2", (dim,))])
    return np.dtype([("scale", "<f4"), ("v", "i1", (dim,))])


def item_id_list(item_ids: ItemIds) -> list[int]:
    return [int(i) for i in np.asarray(item_ids, dtype=np.int64).reshape(-1)]


def event_time_list(event_times: EventTimes | None, n: int) -> list[float]:
    """One finite event time per row; None stamps every row with the current time."""
    if event_times is None:
        return [time.time()] * n
    times = np.asarray(event_times, dtype=np.float64).reshape(-1)
    if times.shape != (n,):
        raise ValueError(f"expected {n} event times, got {times.shape[0]}")
    if not np.isfinite(times).all():
        raise ValueError("event times contain NaN or infinity")
    return [float(t) for t in times]


def newer_or_same(stored: float | None, event_time: float) -> bool:
    """The write rule: a row replaces the stored vector unless that one comes from a later event."""
    return stored is None or stored <= event_time


def _space_meta(space: str, dim: int, dtype: str) -> dict[str, Any]:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {DTYPES}")
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    if not space or any(c in space for c in " :/\n"):
        raise ValueError(f"space name {space!r} must be non-empty without spaces, ':' or '/'")
    return {"version": space, "dim": int(dim), "dtype": dtype, "created": time.time()}


def _same_layout(existing: dict[str, Any], dim: int, dtype: str) -> None:
    if int(existing["dim"]) != dim or existing["dtype"] != dtype:
        raise ValueError(
            f"space {existing['version']!r} exists with dim={existing['dim']} "
            f"dtype={existing['dtype']}, not dim={dim} dtype={dtype}"
        )


def _info(meta: dict[str, Any], items: int, catalogue_size: int, backfill: dict[str, BackfillShard]) -> SpaceInfo:
    return SpaceInfo(
        version=meta["version"],
        dim=int(meta["dim"]),
        dtype=meta["dtype"],
        items=items,
        created=float(meta["created"]),
        catalogue_size=catalogue_size,
        coverage=coverage(items, catalogue_size),
        backfill=backfill,
    )


def _shard(raw: bytes | str) -> BackfillShard:
    data = json.loads(raw)
    return BackfillShard(int(data["done"]), int(data["total"]), float(data["updated"]))


def _shard_json(done: int, total: int) -> str:
    return json.dumps({"done": int(done), "total": int(total), "updated": time.time()})


# --- the interface ------------------------------------------------------------------------------


class EmbeddingStore(abc.ABC):
    """Batch get and put of vectors per space, space metadata, backfill progress, user histories,
    all of one ranker (`scope`)."""

    scope: Scope = DEFAULT_SCOPE

    @abc.abstractmethod
    def create_space(self, space: str, dim: int, dtype: str = "float16") -> SpaceInfo:
        """Idempotent; a second call with another dim or dtype raises ValueError."""

    @abc.abstractmethod
    def put(
        self, space: str, item_ids: ItemIds, vectors: npt.ArrayLike, event_times: EventTimes | None = None
    ) -> Found:
        """Write vectors computed from events at `event_times` (None: now); returns bool [n],
        False where the stored vector comes from a later event and was kept. Atomic per row;
        putting an item again never counts it twice."""

    @abc.abstractmethod
    def get(self, space: str, item_ids: ItemIds) -> tuple[Vectors, Found]:
        """(float32 [n, dim], found bool [n]) in the order asked; missing rows are zero."""

    @abc.abstractmethod
    def event_times(self, space: str, item_ids: ItemIds) -> npt.NDArray[np.float64]:
        """float64 [n]: the event time each stored vector was computed from, NaN where none is."""

    @abc.abstractmethod
    def space_info(self, space: str) -> SpaceInfo: ...

    @abc.abstractmethod
    def spaces(self) -> list[str]: ...

    @abc.abstractmethod
    def delete_space(self, space: str) -> None: ...

    @abc.abstractmethod
    def set_catalogue_size(self, space: str, n: int) -> None:
        """The catalogue size the space's coverage counts against (its backfill sets it)."""

    @abc.abstractmethod
    def catalogue_size(self, space: str) -> int:
        """0 while unknown (never set, or the space was deleted)."""

    @abc.abstractmethod
    def for_scope(self, scope: Scope) -> EmbeddingStore:
        """The same store (one connection) seen as another ranker."""

    @abc.abstractmethod
    def delete_scope(self) -> ScopeDeleted:
        """Everything this ranker holds: spaces, catalogue sizes, backfill progress, histories,
        its streams and their groups. Other rankers' keys are untouched."""

    @abc.abstractmethod
    def report_backfill(self, space: str, shard: str, done: int, total: int) -> None:
        """Progress of one backfill shard ("I/N"); also its checkpoint (items done, in order)."""

    @abc.abstractmethod
    def put_history(self, user_id: int, item_ids: ItemIds, append: bool = False) -> None:
        """A user's behaviour sequence, oldest first; `append=True` adds to the end."""

    @abc.abstractmethod
    def get_history(self, user_id: int, max_len: int) -> npt.NDArray[np.int64]:
        """The newest `max_len` item ids, oldest first, int64 (empty for an unknown user)."""

    def ping(self) -> bool:
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


# --- Redis --------------------------------------------------------------------------------------


class RedisStore(EmbeddingStore):
    """Production back end; `client` is a `redis.Redis` (decode_responses must be False)."""

    def __init__(self, client: Any, scope: Scope = DEFAULT_SCOPE) -> None:
        self.client = client
        self.scope = scope
        self._meta: dict[str, dict[str, Any]] = {}
        self._put_versioned = client.register_script(_PUT_VERSIONED)

    @classmethod
    def from_url(cls, url: str, scope: Scope = DEFAULT_SCOPE, password: str | None = None) -> RedisStore:
        return cls(redis_client(url, password), scope)

    def for_scope(self, scope: Scope) -> RedisStore:
        return RedisStore(self.client, scope)

    @property
    def spaces_key(self) -> str:
        return self.scope.key("spaces")

    def vectors_key(self, space: str) -> str:
        return self.scope.key("emb", space)

    def event_times_key(self, space: str) -> str:
        return self.scope.key("emb-time", space)

    def meta_key(self, space: str) -> str:
        return self.scope.key("space", space)

    def catalogue_key(self, space: str) -> str:
        return self.scope.key("catalogue", space)

    def backfill_key(self, space: str) -> str:
        return self.scope.key("backfill", space)

    def versions_key(self, space: str) -> str:
        return self.scope.key("embver", space)

    def changes_key(self, space: str) -> str:
        return self.scope.key("embchanges", space)

    def history_key(self, user_id: int) -> str:
        return self.scope.key("history", str(int(user_id)))

    def space_keys(self, space: str) -> list[str]:
        """Every key of one space (what `delete_space` removes)."""
        return [
            self.meta_key(space),
            self.vectors_key(space),
            self.event_times_key(space),
            self.catalogue_key(space),
            self.backfill_key(space),
            self.versions_key(space),
            self.changes_key(space),
        ]

    def _load_meta(self, space: str, cached: bool = True) -> dict[str, Any]:
        if cached and space in self._meta:
            return self._meta[space]
        raw = self.client.hgetall(self.meta_key(space))
        if not raw:
            self._meta.pop(space, None)
            raise SpaceNotFound(space)
        meta = {k.decode(): v.decode() for k, v in raw.items()}
        self._meta[space] = meta
        return meta

    def create_space(self, space: str, dim: int, dtype: str = "float16") -> SpaceInfo:
        meta = _space_meta(space, dim, dtype)
        # HSETNX on each field keeps the first creator's values when two processes race.
        pipe = self.client.pipeline(transaction=True)
        for key, value in meta.items():
            pipe.hsetnx(self.meta_key(space), key, str(value))
        pipe.sadd(self.spaces_key, space)
        pipe.execute()
        _same_layout(self._load_meta(space, cached=False), dim, dtype)
        return self.space_info(space)

    def put(
        self, space: str, item_ids: ItemIds, vectors: npt.ArrayLike, event_times: EventTimes | None = None
    ) -> Found:
        ids = item_id_list(item_ids)
        times = event_time_list(event_times, len(ids))
        if not ids:
            return np.zeros(0, dtype=bool)
        meta = self._load_meta(space)
        vectors = check_vectors(vectors, len(ids), int(meta["dim"]))
        blobs = encode_vectors(vectors, meta["dtype"])
        args: list[Any] = [CHANGE_LOG_LIMIT]
        for item, blob, event_time in zip(ids, blobs, times, strict=True):
            args += (item, blob, repr(event_time))
        written = self._put_versioned(
            keys=[
                self.vectors_key(space),
                self.versions_key(space),
                self.changes_key(space),
                self.event_times_key(space),
            ],
            args=args,
        )
        return np.array(written, dtype=bool)

    def get(self, space: str, item_ids: ItemIds) -> tuple[Vectors, Found]:
        ids = item_id_list(item_ids)
        meta = self._load_meta(space)
        blobs = self.client.hmget(self.vectors_key(space), ids) if ids else []
        return decode_vectors(blobs, int(meta["dim"]), meta["dtype"])

    def event_times(self, space: str, item_ids: ItemIds) -> npt.NDArray[np.float64]:
        ids = item_id_list(item_ids)
        self._load_meta(space)
        raw = self.client.hmget(self.event_times_key(space), ids) if ids else []
        return np.array([float(t) if t is not None else np.nan for t in raw], dtype=np.float64)

    def space_info(self, space: str) -> SpaceInfo:
        meta = self._load_meta(space, cached=False)
        pipe = self.client.pipeline(transaction=False)
        pipe.hlen(self.vectors_key(space))
        pipe.get(self.catalogue_key(space))
        pipe.hgetall(self.backfill_key(space))
        items, catalogue, shards = pipe.execute()
        backfill = {k.decode(): _shard(v) for k, v in sorted(shards.items())}
        return _info(meta, int(items), int(catalogue or 0), backfill)

    def spaces(self) -> list[str]:
        return sorted(s.decode() for s in self.client.smembers(self.spaces_key))

    def delete_space(self, space: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.srem(self.spaces_key, space)
        pipe.unlink(*self.space_keys(space))
        pipe.execute()
        self._meta.pop(space, None)

    def set_catalogue_size(self, space: str, n: int) -> None:
        self._load_meta(space)
        self.client.set(self.catalogue_key(space), int(n))

    def catalogue_size(self, space: str) -> int:
        return int(self.client.get(self.catalogue_key(space)) or 0)

    def delete_scope(self) -> ScopeDeleted:
        """SCAN for the scope's prefix (other rankers' keys are passed over, never touched) and
        UNLINK what it finds, a batch at a time; then the spaces are gone from `spaces()` too."""
        spaces = self.spaces()
        removed = 0
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=self.scope.keys_pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                removed += int(self.client.unlink(*batch))
                batch = []
        if batch:
            removed += int(self.client.unlink(*batch))
        self._meta.clear()
        return ScopeDeleted(keys=removed, spaces=spaces)

    def leave_stream(self, stream: str, group: str) -> bool:
        """Destroy this ranker's consumer group on a stream it shares with others (named in its
        spec); the stream and the other groups stay. False when there was no such group."""
        import redis

        try:
            return bool(self.client.xgroup_destroy(stream, group))
        except redis.ResponseError as exc:  # no such stream
            if "no such key" in str(exc).lower() or "requires the key to exist" in str(exc).lower():
                return False
            raise

    def report_backfill(self, space: str, shard: str, done: int, total: int) -> None:
        self._load_meta(space)
        self.client.hset(self.backfill_key(space), shard, _shard_json(done, total))

    def put_history(self, user_id: int, item_ids: ItemIds, append: bool = False) -> None:
        ids = item_id_list(item_ids)
        key = self.history_key(user_id)
        pipe = self.client.pipeline(transaction=True)
        if not append:
            pipe.delete(key)
        if ids:
            pipe.rpush(key, *ids)
        pipe.execute()

    def get_history(self, user_id: int, max_len: int) -> npt.NDArray[np.int64]:
        if max_len <= 0:
            return np.zeros(0, dtype=np.int64)
        raw = self.client.lrange(self.history_key(user_id), -max_len, -1)
        return np.array([int(x) for x in raw], dtype=np.int64)

    def ping(self) -> bool:
        return bool(self.client.ping())

    def close(self) -> None:
        self.client.close()


# Writes the vectors whose event time is at least the stored one, and logs their version, in one
# step. KEYS: vectors hash, versions hash (epoch: when the log began, seq: last version, floor:
# newest version dropped from the log), changes zset, event times hash. ARGV: log limit, then
# item, blob, event time triples. Returns 1 per row written, 0 per row kept (a newer one stored);
# a put that writes nothing takes no version.
_PUT_VERSIONED = """
local seq = nil
local written = {}
for i = 2, #ARGV, 3 do
  local stored = redis.call('HGET', KEYS[4], ARGV[i])
  if (not stored) or tonumber(stored) <= tonumber(ARGV[i + 2]) then
    if not seq then
      seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
      if seq == 1 then
        local now = redis.call('TIME')
        redis.call('HSET', KEYS[2], 'epoch', now[1] .. '.' .. now[2], 'floor', 0)
      end
    end
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 2])
    redis.call('ZADD', KEYS[3], seq, ARGV[i])
    written[#written + 1] = 1
  else
    written[#written + 1] = 0
  end
end
if seq then
  local excess = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[1])
  if excess > 0 then
    local dropped = redis.call('ZPOPMIN', KEYS[3], excess)
    redis.call('HSET', KEYS[2], 'floor', dropped[#dropped])
  end
end
return written
"""


# --- LMDB (embedded) ----------------------------------------------------------------------------

_ENVS: dict[str, Any] = {}
_DBS: dict[str, dict[bytes, Any]] = {}
_ENVS_LOCK = threading.Lock()


def _lmdb_env(path: Path, map_size: int) -> Any:
    """One environment per file per process: LMDB forbids opening the same one twice."""
    import lmdb

    key = str(path.resolve())
    with _ENVS_LOCK:
        if key not in _ENVS:
            path.mkdir(parents=True, exist_ok=True)
            _ENVS[key] = lmdb.open(key, map_size=map_size, max_dbs=256, subdir=True, lock=True, max_readers=512)
        return _ENVS[key]


def _id_key(item_id: int) -> bytes:
    return struct.pack(">q", item_id)


_EVENT_TIME = struct.Struct("<d")


class FileStore(EmbeddingStore):
    """Embedded back end: one LMDB environment, one named database per space and ranker.

    Keys are big-endian int64 item ids; each space has a database of vectors and one of their
    event times (float64); the `meta` database holds space metadata, backfill progress and the
    catalogue sizes as JSON, the `history` database user sequences. Every database name and
    record key starts with the scope's prefix, as in Redis.

    A reader sees the snapshot the lock file names. A writer killed after writing its commit to
    the data file but before publishing it in the lock file leaves that name one commit behind
    until the next write, in every process that has the environment open. `space_info` (coverage,
    backfill checkpoints: read after a pod was killed) therefore reads inside a write transaction,
    which starts from the newest commit in the data file, and aborts it.
    """

    def __init__(self, path: str | Path, map_size: int = 1 << 36, scope: Scope = DEFAULT_SCOPE) -> None:
        self.path = Path(path)
        self.map_size = map_size
        self.scope = scope
        self.env = _lmdb_env(self.path, map_size)
        self._dbs = _DBS.setdefault(str(self.path.resolve()), {})
        self.meta_db = self.env.open_db(b"meta")
        self.history_db = self.env.open_db(b"history")

    def for_scope(self, scope: Scope) -> FileStore:
        return FileStore(self.path, self.map_size, scope)

    def _name(self, *parts: str) -> bytes:
        return self.scope.key(*parts).encode()

    def _vectors_db_name(self, space: str) -> bytes:
        return self._name("emb", space)

    def _event_times_db_name(self, space: str) -> bytes:
        return self._name("emb-time", space)

    def _space_key(self, space: str) -> bytes:
        return self._name("space", space)

    def _backfill_prefix(self, space: str) -> bytes:
        return self._name("backfill", space, "")

    def _history_key(self, user_id: int) -> bytes:
        return self.scope.prefix.encode() + _id_key(int(user_id))

    def _meta(self, txn: Any, space: str) -> dict[str, Any]:
        raw = txn.get(self._space_key(space), db=self.meta_db)
        if raw is None:
            raise SpaceNotFound(space)
        meta: dict[str, Any] = json.loads(raw)  # what _space_meta wrote
        return meta

    def _vectors_db(self, space: str) -> Any:
        return self._db(self._vectors_db_name(space))

    def _event_times_db(self, space: str) -> Any:
        return self._db(self._event_times_db_name(space))

    def _db(self, name: bytes) -> Any:
        """A database handle, opened once per process (opening takes a write lock)."""
        with _ENVS_LOCK:
            if name not in self._dbs:
                self._dbs[name] = self.env.open_db(name)
            return self._dbs[name]

    def create_space(self, space: str, dim: int, dtype: str = "float16") -> SpaceInfo:
        meta = _space_meta(space, dim, dtype)
        with self.env.begin(write=True) as txn:
            key = self._space_key(space)
            existing = txn.get(key, db=self.meta_db)
            if existing is None:
                txn.put(key, json.dumps(meta).encode(), db=self.meta_db)
            else:
                _same_layout(json.loads(existing), dim, dtype)
        self._vectors_db(space)
        self._event_times_db(space)
        return self.space_info(space)

    def put(
        self, space: str, item_ids: ItemIds, vectors: npt.ArrayLike, event_times: EventTimes | None = None
    ) -> Found:
        ids = item_id_list(item_ids)
        times = event_time_list(event_times, len(ids))
        if not ids:
            return np.zeros(0, dtype=bool)
        with self.env.begin() as txn:
            meta = self._meta(txn, space)
        vectors = check_vectors(vectors, len(ids), int(meta["dim"]))
        blobs = encode_vectors(vectors, meta["dtype"])
        db, times_db = self._vectors_db(space), self._event_times_db(space)
        written = np.zeros(len(ids), dtype=bool)
        with self.env.begin(write=True, db=db) as txn:
            self._meta(txn, space)
            for row, (item_id, blob, event_time) in enumerate(zip(ids, blobs, times, strict=True)):
                key = _id_key(item_id)
                stored = txn.get(key, db=times_db)
                if newer_or_same(None if stored is None else _EVENT_TIME.unpack(stored)[0], event_time):
                    txn.put(key, blob, db=db)
                    txn.put(key, _EVENT_TIME.pack(event_time), db=times_db)
                    written[row] = True
        return written

    def get(self, space: str, item_ids: ItemIds) -> tuple[Vectors, Found]:
        ids = item_id_list(item_ids)
        with self.env.begin() as txn:
            self._meta(txn, space)
        db = self._vectors_db(space)
        with self.env.begin(db=db, buffers=False) as txn:
            meta = self._meta(txn, space)
            blobs = [txn.get(_id_key(i), db=db) for i in ids]
        return decode_vectors(blobs, int(meta["dim"]), meta["dtype"])

    def event_times(self, space: str, item_ids: ItemIds) -> npt.NDArray[np.float64]:
        ids = item_id_list(item_ids)
        with self.env.begin() as txn:
            self._meta(txn, space)
        db = self._event_times_db(space)
        with self.env.begin(db=db, buffers=False) as txn:
            raw = [txn.get(_id_key(i), db=db) for i in ids]
        return np.array([_EVENT_TIME.unpack(t)[0] if t is not None else np.nan for t in raw], dtype=np.float64)

    def space_info(self, space: str) -> SpaceInfo:
        with self.env.begin() as txn:
            self._meta(txn, space)
        db = self._vectors_db(space)
        txn = self.env.begin(write=True)  # the newest commit, even one a killed writer never published
        try:
            meta = self._meta(txn, space)
            items = int(txn.stat(db)["entries"])
            catalogue = int(txn.get(self._name("catalogue", space), b"0", db=self.meta_db))
            prefix = self._backfill_prefix(space)
            backfill = {
                key[len(prefix) :].decode(): _shard(value) for key, value in _prefixed(txn, self.meta_db, prefix)
            }
        finally:
            txn.abort()
        return _info(meta, items, catalogue, dict(sorted(backfill.items())))

    def spaces(self) -> list[str]:
        prefix = self._name("space", "")
        with self.env.begin() as txn:
            return sorted(key[len(prefix) :].decode() for key, _ in _prefixed(txn, self.meta_db, prefix))

    def delete_space(self, space: str) -> None:
        with self.env.begin() as txn:
            if txn.get(self._space_key(space), db=self.meta_db) is None:
                return
        db, times_db = self._vectors_db(space), self._event_times_db(space)
        with self.env.begin(write=True) as txn:
            self._drop_space(txn, space, db, times_db)

    def _drop_space(self, txn: Any, space: str, db: Any, times_db: Any) -> int:
        """Empty the space's databases and delete its records; returns the records deleted."""
        txn.drop(db, delete=False)
        txn.drop(times_db, delete=False)
        stale = [self._space_key(space), self._name("catalogue", space)]
        stale += [key for key, _ in _prefixed(txn, self.meta_db, self._backfill_prefix(space))]
        return sum(bool(txn.delete(key, db=self.meta_db)) for key in stale)

    def set_catalogue_size(self, space: str, n: int) -> None:
        with self.env.begin(write=True) as txn:
            self._meta(txn, space)
            txn.put(self._name("catalogue", space), str(int(n)).encode(), db=self.meta_db)

    def catalogue_size(self, space: str) -> int:
        with self.env.begin() as txn:
            return int(txn.get(self._name("catalogue", space), b"0", db=self.meta_db))

    def delete_scope(self) -> ScopeDeleted:
        """Every space's databases emptied, every record with the scope's prefix deleted; counts
        the space databases and records removed."""
        spaces = self.spaces()
        handles = {space: (self._vectors_db(space), self._event_times_db(space)) for space in spaces}
        prefix = self.scope.prefix.encode()
        with self.env.begin(write=True) as txn:
            removed = sum(2 + self._drop_space(txn, space, *handles[space]) for space in spaces)
            for db in (self.meta_db, self.history_db):
                stale = [key for key, _ in _prefixed(txn, db, prefix)]
                removed += sum(bool(txn.delete(key, db=db)) for key in stale)
        return ScopeDeleted(keys=removed, spaces=spaces)

    def report_backfill(self, space: str, shard: str, done: int, total: int) -> None:
        with self.env.begin(write=True) as txn:
            self._meta(txn, space)
            txn.put(self._backfill_prefix(space) + shard.encode(), _shard_json(done, total).encode(), db=self.meta_db)

    def put_history(self, user_id: int, item_ids: ItemIds, append: bool = False) -> None:
        ids = np.asarray(item_id_list(item_ids), dtype="<i8")
        key = self._history_key(user_id)
        with self.env.begin(write=True, db=self.history_db) as txn:
            old = txn.get(key) if append else None
            txn.put(key, (bytes(old) if old else b"") + ids.tobytes())

    def get_history(self, user_id: int, max_len: int) -> npt.NDArray[np.int64]:
        with self.env.begin(db=self.history_db) as txn:
            raw = txn.get(self._history_key(user_id))
        ids = np.frombuffer(raw, dtype="<i8").astype(np.int64) if raw else np.zeros(0, dtype=np.int64)
        return ids[-max_len:] if max_len > 0 else ids[:0]

    def close(self) -> None:
        """Environments are shared per process and live until exit; nothing to release per store."""


def _prefixed(txn: Any, db: Any, prefix: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, value) records of `db` whose key starts with `prefix`, in key order."""
    out = []
    with txn.cursor(db=db) as cursor:
        if cursor.set_range(prefix):
            for key, value in cursor:
                if not bytes(key).startswith(prefix):
                    break
                out.append((bytes(key), bytes(value)))
    return out


def store_password(url: str, password: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The store's password, the one rule every part follows: the one given (the operator reads it
    from the ranker's Secret), else the URL's own (`redis://:password@host`, a local run), else
    `MMRANK_STORE_PASSWORD` (where the operator puts the Secret's value for the pods it runs)."""
    if password:
        return password
    own = urllib.parse.urlsplit(url).password
    if own:
        return urllib.parse.unquote(own)
    return (os.environ if env is None else env).get(PASSWORD_ENV) or None


def without_password(url: str) -> str:
    """`url` with no password in it (its user kept): the client gets the password on its own, so
    the one `store_password` chose is the one used, and no URL it is given carries it."""
    return _with_secret(url, None)


def redacted(url: str) -> str:
    """`url` as logs may show it: a password in it replaced by `***`."""
    return _with_secret(url, "***")


def _with_secret(url: str, shown: str | None) -> str:
    """`url` with its password (if it has one) shown as `shown`, or left out when None."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    credentials = user if shown is None else f"{user}:{shown}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{credentials}@{host}" if credentials else host))


def redis_client(url: str, password: str | None = None, asyncio: bool = False, **kwargs: Any) -> Any:
    """A redis-py client (sync, or `redis.asyncio`) for `url`, with the password `store_password`
    chooses (redis-py would let a password in the URL win over one given beside it)."""
    if asyncio:
        import redis.asyncio as module
    else:
        import redis as module  # type: ignore[no-redef]  # sync or asyncio client: one name
    kwargs.setdefault("socket_timeout", 10)
    kwargs.setdefault("socket_connect_timeout", 5)
    chosen = store_password(url, password)
    if chosen:
        kwargs["password"] = chosen
    return module.Redis.from_url(without_password(url), **kwargs)


def open_store(url: str, scope: Scope = DEFAULT_SCOPE, *, password: str | None = None) -> EmbeddingStore:
    """`redis://host:port/db` or `file:///path` (a directory; created when missing), seen as the
    ranker `scope` (the local default when not given); a Redis store's password as
    `store_password` chooses it."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("redis", "rediss", "unix"):
        return RedisStore.from_url(url, scope, password=password)
    if parsed.scheme == "file":
        return FileStore(urllib.parse.unquote(parsed.path), scope=scope)
    if not parsed.scheme and url:
        return FileStore(os.path.expanduser(url), scope=scope)
    raise ValueError(f"unknown store URL {url!r}: use redis://host:port/db or file:///path")
