"""Which layout the embedding store uses, decided by measurement.

Redis: one string key per (space, item) written with pipelined MSET and read with MGET, against
one hash per space written with HSET and read with HMGET. Embedded: LMDB against SQLite (WAL).
Same vectors (float16, 128 dims), same batches (put 256, get 256 random ids), on a real
redis-server started here. Prints items/s and bytes per item; the ratios are what decide.

    .venv/bin/python bench/store_layout.py --items 20000
"""

from __future__ import annotations

import argparse
import sqlite3
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from harness import servers
from mmrank.store import FileStore, RedisStore, encode_vectors


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def batches(n: int, size: int) -> list[np.ndarray]:
    return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]


def redis_strings(client, blobs: list[bytes], reads: list[np.ndarray], size: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    def put() -> None:
        for ids in batches(len(blobs), size):
            client.mset({f"mmrank:e:s:{i}": blobs[i] for i in ids})

    def get() -> None:
        for ids in reads:
            client.mget([f"mmrank:e:s:{i}" for i in ids])

    return {"put": timed(put), "get": timed(get)}


def redis_strings_counted(client, blobs: list[bytes], reads: list[np.ndarray], size: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """String keys plus a set of ids per space: what strings need to count items exactly."""

    def put() -> None:
        for ids in batches(len(blobs), size):
            pipe = client.pipeline(transaction=True)
            pipe.mset({f"mmrank:e:s:{i}": blobs[i] for i in ids})
            pipe.sadd("mmrank:e:ids", *[int(i) for i in ids])
            pipe.execute()

    def get() -> None:
        for ids in reads:
            client.mget([f"mmrank:e:s:{i}" for i in ids])

    return {"put": timed(put), "get": timed(get)}


def redis_hash(client, blobs: list[bytes], reads: list[np.ndarray], size: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    def put() -> None:
        for ids in batches(len(blobs), size):
            client.hset("mmrank:e:h", mapping={int(i): blobs[i] for i in ids})

    def get() -> None:
        for ids in reads:
            client.hmget("mmrank:e:h", [int(i) for i in ids])

    return {"put": timed(put), "get": timed(get)}


def measure_redis(blobs: list[bytes], reads: list[np.ndarray], size: int) -> dict[str, dict[str, float]]:
    import redis

    out = {}
    for name, fn in (
        ("redis string keys (MSET/MGET)", redis_strings),
        ("redis string keys + id set (count)", redis_strings_counted),
        ("redis hash per space (HSET/HMGET)", redis_hash),
    ):
        server = servers.start_redis(appendonly=False)
        try:
            client = redis.Redis.from_url(server.url)
            before = client.info("memory")["used_memory"]
            result = fn(client, blobs, reads, size)
            result["bytes/item"] = (client.info("memory")["used_memory"] - before) / len(blobs)
            out[name] = result
        finally:
            server.stop()
    # The store as shipped, for reference (its encoding and key names included).
    server = servers.start_redis(appendonly=False)
    try:
        store = RedisStore.from_url(server.url)
        out["RedisStore (as shipped)"] = measure_store(store, len(blobs), reads, size)
    finally:
        server.stop()
    return out


def measure_store(store, n: int, reads: list[np.ndarray], size: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    store.create_space("bench", 128)
    vectors = np.random.default_rng(0).normal(size=(n, 128)).astype(np.float32)
    put = timed(lambda: [store.put("bench", ids, vectors[ids]) for ids in batches(n, size)])
    get = timed(lambda: [store.get("bench", ids) for ids in reads])
    return {"put": put, "get": get}


def measure_sqlite(path: Path, blobs: list[bytes], reads: list[np.ndarray], size: int) -> dict[str, float]:
    db = sqlite3.connect(path / "store.sqlite")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE emb (item_id INTEGER PRIMARY KEY, vec BLOB)")

    def put() -> None:
        for ids in batches(len(blobs), size):
            with db:
                db.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?)", [(int(i), blobs[i]) for i in ids])

    def get() -> None:
        for ids in reads:
            marks = ",".join("?" * len(ids))
            dict(db.execute(f"SELECT item_id, vec FROM emb WHERE item_id IN ({marks})", [int(i) for i in ids]))

    result = {"put": timed(put), "get": timed(get)}
    db.close()
    result["bytes/item"] = sum(p.stat().st_size for p in path.glob("store.sqlite*")) / len(blobs)
    return result


def measure_lmdb(path: Path, blobs: list[bytes], reads: list[np.ndarray], size: int) -> dict[str, float]:
    import lmdb

    env = lmdb.open(str(path / "lmdb"), map_size=1 << 32, max_dbs=4)
    db = env.open_db(b"emb")

    def put() -> None:
        for ids in batches(len(blobs), size):
            with env.begin(write=True, db=db) as txn, txn.cursor() as cursor:
                cursor.putmulti([(struct.pack(">q", int(i)), blobs[i]) for i in ids])

    def get() -> None:
        for ids in reads:
            with env.begin(db=db) as txn:
                [txn.get(struct.pack(">q", int(i))) for i in ids]

    result = {"put": timed(put), "get": timed(get)}
    info = env.info()
    result["bytes/item"] = (info["last_pgno"] + 1) * env.stat()["psize"] / len(blobs)
    env.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reads", type=int, default=200, help="random get batches")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(args.items, 128)).astype(np.float32)
    blobs = encode_vectors(vectors, "float16")
    reads = [rng.integers(0, args.items, args.batch) for _ in range(args.reads)]
    results = measure_redis(blobs, reads, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite (WAL, one table)"] = measure_sqlite(Path(tmp), blobs, reads, args.batch)
        results["lmdb (one named db)"] = measure_lmdb(Path(tmp), blobs, reads, args.batch)
        results["FileStore (as shipped, LMDB)"] = measure_store(
            FileStore(Path(tmp) / "fs"), args.items, reads, args.batch
        )
    n_get = args.reads * args.batch
    print(f"{args.items} items x 128 float16, put batches of {args.batch}, {args.reads} random get batches")
    print(f"{'layout':38s} {'put items/s':>12s} {'get items/s':>12s} {'bytes/item':>11s}")
    for name, r in results.items():
        per_item = f"{r['bytes/item']:11.0f}" if "bytes/item" in r else f"{'-':>11s}"
        print(f"{name:38s} {args.items / r['put']:12.0f} {n_get / r['get']:12.0f} {per_item}")


if __name__ == "__main__":
    main()
