"""The embedding store: vectors keyed by (space, item id), the online copy of every space.

A *space* is everything one encoder version produced. Vectors are kept as float16 (half the
bytes of float32, error ~1e-3 on unit vectors) or int8 with a per-vector float32 scale (a quarter,
error ~4e-3); `get` always returns float32. Two back ends share the `EmbeddingStore` interface:

- `redis://host:port/db` — production (password from the URL or `MMRANK_STORE_PASSWORD`).
  One hash per space (`mmrank:emb:<space>`, field = item id), read with HMGET and written with HSET: measured against pipelined string keys in
  `bench/store_layout.py` (docs/benchmarks.md, "Store layout"); the hash also gives the exact
  item count in O(1) (HLEN), so re-putting an item never counts it twice. Every put also takes
  the space's next version number and logs it per item, atomically with the vectors (one Lua
  script): `mmrank:embver:<space>` (epoch, seq, floor) and the sorted set
  `mmrank:embchanges:<space>` (item -> seq of its last write, the newest `CHANGE_LOG_LIMIT` kept).
  The predictor's item vector cache (predictors/item_cache.py) reads that log to drop what was
  rewritten, so a re-embedded item is never served from a stale copy.
- `file:///path` — the embedded store of the local quick start, one LMDB environment (chosen
  over SQLite by the same benchmark); several processes may share it.

Every stored vector keeps the event time it was computed from (unix seconds; the hash
`mmrank:emb-time:<space>` in Redis, a database beside the vectors in LMDB). `put` writes a row
only when its event time is at least the stored one, checked and written atomically (in the same
Lua script in Redis, one write transaction in LMDB), so an old event replayed after a new one, or
a late batch of a slower replica, never overwrites a newer vector. `event_times(space, ids)` reads
them alone (one HMGET, under 20 bytes per item).

The item-event stream names live here too (`ITEM_STREAM`, `DEAD_LETTER_STREAM`,
`EMBEDDER_GROUP`), so producers that only import the common package agree with the embedder.
This module must not import torch.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import os
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ITEM_STREAM = "mmrank:items"
DEAD_LETTER_STREAM = "mmrank:items:dead"
EMBEDDER_GROUP = "embedder"
DTYPES = ("float16", "int8")
CHANGE_LOG_LIMIT = 100_000  # newest item versions kept per space; a reader further behind starts afresh
PASSWORD_ENV = "MMRANK_STORE_PASSWORD"
_INT8_SCALE = struct.Struct("<f")


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


def check_vectors(vectors: np.ndarray, n: int, dim: int) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.shape != (n, dim):
        raise ValueError(f"expected vectors of shape ({n}, {dim}), got {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or infinity")
    return vectors


def encode_vectors(vectors: np.ndarray, dtype: str) -> list[bytes]:
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


def decode_vectors(blobs: Sequence[bytes | None], dim: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
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


def _row_dtype(dim: int, dtype: str) -> np.dtype:
    """One stored vector as a numpy record: float16 values, or a float32 scale and int8 values."""
    if dtype == "float16":
        return np.dtype([("v", "<f2", (dim,))])
    return np.dtype([("scale", "<f4"), ("v", "i1", (dim,))])


def item_id_list(item_ids: Iterable[int] | np.ndarray) -> list[int]:
    return [int(i) for i in np.asarray(item_ids, dtype=np.int64).reshape(-1)]


def event_time_list(event_times: Iterable[float] | np.ndarray | None, n: int) -> list[float]:
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
        raise ValueError(f"space {existing['version']!r} exists with dim={existing['dim']} "
                         f"dtype={existing['dtype']}, not dim={dim} dtype={dtype}")


def _info(meta: dict[str, Any], items: int, catalogue_size: int,
          backfill: dict[str, BackfillShard]) -> SpaceInfo:
    return SpaceInfo(version=meta["version"], dim=int(meta["dim"]), dtype=meta["dtype"], items=items,
                     created=float(meta["created"]), catalogue_size=catalogue_size,
                     coverage=coverage(items, catalogue_size), backfill=backfill)


def _shard(raw: bytes | str) -> BackfillShard:
    data = json.loads(raw)
    return BackfillShard(int(data["done"]), int(data["total"]), float(data["updated"]))


def _shard_json(done: int, total: int) -> str:
    return json.dumps({"done": int(done), "total": int(total), "updated": time.time()})


# --- the interface ------------------------------------------------------------------------------

class EmbeddingStore(abc.ABC):
    """Batch get and put of vectors per space, space metadata, backfill progress, user histories."""

    @abc.abstractmethod
    def create_space(self, space: str, dim: int, dtype: str = "float16") -> SpaceInfo:
        """Idempotent; a second call with another dim or dtype raises ValueError."""

    @abc.abstractmethod
    def put(self, space: str, item_ids: Iterable[int] | np.ndarray, vectors: np.ndarray,
            event_times: Iterable[float] | np.ndarray | None = None) -> np.ndarray:
        """Write vectors computed from events at `event_times` (None: now); returns bool [n],
        False where the stored vector comes from a later event and was kept. Atomic per row;
        putting an item again never counts it twice."""

    @abc.abstractmethod
    def get(self, space: str, item_ids: Iterable[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [n, dim], found bool [n]) in the order asked; missing rows are zero."""

    @abc.abstractmethod
    def event_times(self, space: str, item_ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """float64 [n]: the event time each stored vector was computed from, NaN where none is."""

    @abc.abstractmethod
    def space_info(self, space: str) -> SpaceInfo: ...

    @abc.abstractmethod
    def spaces(self) -> list[str]: ...

    @abc.abstractmethod
    def delete_space(self, space: str) -> None: ...

    @abc.abstractmethod
    def set_catalogue_size(self, n: int) -> None: ...

    @abc.abstractmethod
    def catalogue_size(self) -> int: ...

    @abc.abstractmethod
    def report_backfill(self, space: str, shard: str, done: int, total: int) -> None:
        """Progress of one backfill shard ("I/N"); also its checkpoint (items done, in order)."""

    @abc.abstractmethod
    def put_history(self, user_id: int, item_ids: Iterable[int] | np.ndarray, append: bool = False) -> None:
        """A user's behaviour sequence, oldest first; `append=True` adds to the end."""

    @abc.abstractmethod
    def get_history(self, user_id: int, max_len: int) -> np.ndarray:
        """The newest `max_len` item ids, oldest first, int64 (empty for an unknown user)."""

    def ping(self) -> bool:
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


# --- Redis --------------------------------------------------------------------------------------

class RedisStore(EmbeddingStore):
    """Production back end; `client` is a `redis.Redis` (decode_responses must be False)."""

    SPACES = "mmrank:spaces"
    CATALOGUE = "mmrank:catalogue_size"
    def __init__(self, client: Any) -> None:
        self.client = client
        self._meta: dict[str, dict[str, Any]] = {}
        self._put_versioned = client.register_script(_PUT_VERSIONED)

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        return cls(redis_client(url))

    @staticmethod
    def vectors_key(space: str) -> str:
        return f"mmrank:emb:{space}"

    @staticmethod
    def event_times_key(space: str) -> str:
        return f"mmrank:emb-time:{space}"

    @staticmethod
    def meta_key(space: str) -> str:
        return f"mmrank:space:{space}"

    @staticmethod
    def backfill_key(space: str) -> str:
        return f"mmrank:backfill:{space}"

    @staticmethod
    def versions_key(space: str) -> str:
        return f"mmrank:embver:{space}"

    @staticmethod
    def changes_key(space: str) -> str:
        return f"mmrank:embchanges:{space}"

    @staticmethod
    def history_key(user_id: int) -> str:
        return f"mmrank:history:{int(user_id)}"

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
        pipe.sadd(self.SPACES, space)
        pipe.execute()
        _same_layout(self._load_meta(space, cached=False), dim, dtype)
        return self.space_info(space)

    def put(self, space: str, item_ids: Iterable[int] | np.ndarray, vectors: np.ndarray,
            event_times: Iterable[float] | np.ndarray | None = None) -> np.ndarray:
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
        written = self._put_versioned(keys=[self.vectors_key(space), self.versions_key(space),
                                            self.changes_key(space), self.event_times_key(space)], args=args)
        return np.array(written, dtype=bool)

    def get(self, space: str, item_ids: Iterable[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = item_id_list(item_ids)
        meta = self._load_meta(space)
        blobs = self.client.hmget(self.vectors_key(space), ids) if ids else []
        return decode_vectors(blobs, int(meta["dim"]), meta["dtype"])

    def event_times(self, space: str, item_ids: Iterable[int] | np.ndarray) -> np.ndarray:
        ids = item_id_list(item_ids)
        self._load_meta(space)
        raw = self.client.hmget(self.event_times_key(space), ids) if ids else []
        return np.array([float(t) if t is not None else np.nan for t in raw], dtype=np.float64)

    def space_info(self, space: str) -> SpaceInfo:
        meta = self._load_meta(space, cached=False)
        pipe = self.client.pipeline(transaction=False)
        pipe.hlen(self.vectors_key(space))
        pipe.get(self.CATALOGUE)
        pipe.hgetall(self.backfill_key(space))
        items, catalogue, shards = pipe.execute()
        backfill = {k.decode(): _shard(v) for k, v in sorted(shards.items())}
        return _info(meta, int(items), int(catalogue or 0), backfill)

    def spaces(self) -> list[str]:
        return sorted(s.decode() for s in self.client.smembers(self.SPACES))

    def delete_space(self, space: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.srem(self.SPACES, space)
        pipe.unlink(self.meta_key(space), self.vectors_key(space), self.backfill_key(space),
                    self.versions_key(space), self.changes_key(space), self.event_times_key(space))
        pipe.execute()
        self._meta.pop(space, None)

    def set_catalogue_size(self, n: int) -> None:
        self.client.set(self.CATALOGUE, int(n))

    def catalogue_size(self) -> int:
        return int(self.client.get(self.CATALOGUE) or 0)

    def report_backfill(self, space: str, shard: str, done: int, total: int) -> None:
        self._load_meta(space)
        self.client.hset(self.backfill_key(space), shard, _shard_json(done, total))

    def put_history(self, user_id: int, item_ids: Iterable[int] | np.ndarray, append: bool = False) -> None:
        ids = item_id_list(item_ids)
        key = self.history_key(user_id)
        pipe = self.client.pipeline(transaction=True)
        if not append:
            pipe.delete(key)
        if ids:
            pipe.rpush(key, *ids)
        pipe.execute()

    def get_history(self, user_id: int, max_len: int) -> np.ndarray:
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
            _ENVS[key] = lmdb.open(key, map_size=map_size, max_dbs=256, subdir=True, lock=True,
                                   max_readers=512)
        return _ENVS[key]


def _id_key(item_id: int) -> bytes:
    return struct.pack(">q", item_id)


_EVENT_TIME = struct.Struct("<d")


class FileStore(EmbeddingStore):
    """Embedded back end: one LMDB environment, one named database per space.

    Keys are big-endian int64 item ids; each space has a database of vectors and one of their
    event times (float64); the `meta` database holds space metadata, backfill progress and the
    catalogue size as JSON, the `history` database user sequences.

    A reader sees the snapshot the lock file names. A writer killed after writing its commit to
    the data file but before publishing it in the lock file leaves that name one commit behind
    until the next write, in every process that has the environment open. `space_info` (coverage,
    backfill checkpoints: read after a pod was killed) therefore reads inside a write transaction,
    which starts from the newest commit in the data file, and aborts it.
    """

    def __init__(self, path: str | Path, map_size: int = 1 << 36) -> None:
        self.path = Path(path)
        self.env = _lmdb_env(self.path, map_size)
        self._dbs = _DBS.setdefault(str(self.path.resolve()), {})
        self.meta_db = self.env.open_db(b"meta")
        self.history_db = self.env.open_db(b"history")

    @staticmethod
    def _vectors_db_name(space: str) -> bytes:
        return f"emb:{space}".encode()

    @staticmethod
    def _event_times_db_name(space: str) -> bytes:
        return f"emb-time:{space}".encode()

    def _meta(self, txn: Any, space: str) -> dict[str, Any]:
        raw = txn.get(f"space:{space}".encode(), db=self.meta_db)
        if raw is None:
            raise SpaceNotFound(space)
        return json.loads(raw)

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
            key = f"space:{space}".encode()
            existing = txn.get(key, db=self.meta_db)
            if existing is None:
                txn.put(key, json.dumps(meta).encode(), db=self.meta_db)
            else:
                _same_layout(json.loads(existing), dim, dtype)
        self._vectors_db(space)
        self._event_times_db(space)
        return self.space_info(space)

    def put(self, space: str, item_ids: Iterable[int] | np.ndarray, vectors: np.ndarray,
            event_times: Iterable[float] | np.ndarray | None = None) -> np.ndarray:
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

    def get(self, space: str, item_ids: Iterable[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = item_id_list(item_ids)
        with self.env.begin() as txn:
            self._meta(txn, space)
        db = self._vectors_db(space)
        with self.env.begin(db=db, buffers=False) as txn:
            meta = self._meta(txn, space)
            blobs = [txn.get(_id_key(i), db=db) for i in ids]
        return decode_vectors(blobs, int(meta["dim"]), meta["dtype"])

    def event_times(self, space: str, item_ids: Iterable[int] | np.ndarray) -> np.ndarray:
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
            catalogue = int(txn.get(b"catalogue_size", b"0", db=self.meta_db))
            prefix = f"backfill:{space}:".encode()
            backfill: dict[str, BackfillShard] = {}
            with txn.cursor(db=self.meta_db) as cursor:
                if cursor.set_range(prefix):
                    for key, value in cursor:
                        if not key.startswith(prefix):
                            break
                        backfill[key[len(prefix):].decode()] = _shard(value)
        finally:
            txn.abort()
        return _info(meta, items, catalogue, dict(sorted(backfill.items())))

    def spaces(self) -> list[str]:
        with self.env.begin() as txn, txn.cursor(db=self.meta_db) as cursor:
            names = []
            if cursor.set_range(b"space:"):
                for key in cursor.iternext(keys=True, values=False):
                    if not key.startswith(b"space:"):
                        break
                    names.append(key[len(b"space:"):].decode())
        return sorted(names)

    def delete_space(self, space: str) -> None:
        with self.env.begin() as txn:
            if txn.get(f"space:{space}".encode(), db=self.meta_db) is None:
                return
        db, times_db = self._vectors_db(space), self._event_times_db(space)
        with self.env.begin(write=True) as txn:
            txn.drop(db, delete=False)
            txn.drop(times_db, delete=False)
            txn.delete(f"space:{space}".encode(), db=self.meta_db)
            prefix = f"backfill:{space}:".encode()
            with txn.cursor(db=self.meta_db) as cursor:
                stale = []
                if cursor.set_range(prefix):
                    for key in cursor.iternext(keys=True, values=False):
                        if not key.startswith(prefix):
                            break
                        stale.append(bytes(key))
            for key in stale:
                txn.delete(key, db=self.meta_db)

    def set_catalogue_size(self, n: int) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(b"catalogue_size", str(int(n)).encode(), db=self.meta_db)

    def catalogue_size(self) -> int:
        with self.env.begin() as txn:
            return int(txn.get(b"catalogue_size", b"0", db=self.meta_db))

    def report_backfill(self, space: str, shard: str, done: int, total: int) -> None:
        with self.env.begin(write=True) as txn:
            self._meta(txn, space)
            txn.put(f"backfill:{space}:{shard}".encode(), _shard_json(done, total).encode(), db=self.meta_db)

    def put_history(self, user_id: int, item_ids: Iterable[int] | np.ndarray, append: bool = False) -> None:
        ids = np.asarray(item_id_list(item_ids), dtype="<i8")
        key = _id_key(int(user_id))
        with self.env.begin(write=True, db=self.history_db) as txn:
            old = txn.get(key) if append else None
            txn.put(key, (bytes(old) if old else b"") + ids.tobytes())

    def get_history(self, user_id: int, max_len: int) -> np.ndarray:
        with self.env.begin(db=self.history_db) as txn:
            raw = txn.get(_id_key(int(user_id)))
        ids = np.frombuffer(raw, dtype="<i8").astype(np.int64) if raw else np.zeros(0, dtype=np.int64)
        return ids[-max_len:] if max_len > 0 else ids[:0]

    def close(self) -> None:
        """Environments are shared per process and live until exit; nothing to release per store."""


def redis_password(url: str) -> str | None:
    """The URL's own password, else `MMRANK_STORE_PASSWORD` (the operator mounts it from a Secret)."""
    return None if urllib.parse.urlparse(url).password else os.environ.get(PASSWORD_ENV) or None


def redis_client(url: str, asyncio: bool = False, **kwargs: Any) -> Any:
    """A redis-py client (sync, or `redis.asyncio`) for `url`, with the store's password."""
    if asyncio:
        import redis.asyncio as module
    else:
        import redis as module  # type: ignore[no-redef]  # sync or asyncio client: one name
    kwargs.setdefault("socket_timeout", 10)
    kwargs.setdefault("socket_connect_timeout", 5)
    password = redis_password(url)
    if password:
        kwargs.setdefault("password", password)
    return module.Redis.from_url(url, **kwargs)


def open_store(url: str) -> EmbeddingStore:
    """`redis://host:port/db` or `file:///path` (a directory; created when missing)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("redis", "rediss", "unix"):
        return RedisStore.from_url(url)
    if parsed.scheme == "file":
        return FileStore(urllib.parse.unquote(parsed.path))
    if not parsed.scheme and url:
        return FileStore(os.path.expanduser(url))
    raise ValueError(f"unknown store URL {url!r}: use redis://host:port/db or file:///path")
