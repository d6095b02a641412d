"""Ranking latency of the predictor under a fixed request rate, against the bare model forward.

    .venv/bin/python bench/ranking_latency.py [--rates 5,20,50] [--seconds 20] [--candidates 200]
                                              [--history 1000] [--dim 128] [--torch-threads 1]

Starts a real Redis and a real `mmrank predictor serve` process, fills a space of `--items`
vectors and one history per user, and drives `POST /v1/models/ranker:predict` from a separate
process at a fixed rate (open loop: a request is sent on schedule whether or not the earlier
ones have answered, so queueing shows up in the tail). Each request ranks `--candidates` random
items for a random user whose `--history` behaviours the store holds. Prints p50/p99 latency,
the answer codes (503: over `--max-concurrency`, refused at once), the mean store read the
server measured, the server's CPU time per scored request, and p50 divided by the median bare `score_candidates` forward on the same input
in this process (same torch thread count), for each rate in turn against one server.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from mmrank import servers
from mmrank.store import open_store

SPACE = "bench"


def setup(store_url: str, directory: Path, args: argparse.Namespace) -> None:
    from mmrank.predictors.artifact import write_random_ranker

    rng = np.random.default_rng(0)
    store = open_store(store_url)
    store.create_space(SPACE, args.dim)
    store.set_catalogue_size(args.items)
    for start in range(0, args.items, 5000):
        ids = np.arange(start, min(start + 5000, args.items))
        vectors = rng.normal(size=(len(ids), args.dim)).astype(np.float32)
        store.put(SPACE, ids, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    for user in range(args.users):
        store.put_history(user, rng.integers(0, args.items, args.history))
    store.close()
    features = np.stack([np.arange(args.items) % 50, np.arange(args.items) % 200], axis=1)
    write_random_ranker(directory, SPACE, dim=args.dim, item_features=features, n_users=args.users,
                        history_length=args.history, version="bench")


def bodies(args: argparse.Namespace, n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [json.dumps({"user": {"id": int(rng.integers(args.users))},
                        "candidates": rng.integers(0, args.items, args.candidates).tolist()}).encode()
            for _ in range(n)]


def drive(url: str, payloads: list[bytes], rate: float, out: multiprocessing.Queue) -> None:
    """The load generator (its own process): send payload i at t0 + i / rate, record latency."""
    import httpx

    async def run() -> list[tuple[float, int]]:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            start = time.perf_counter() + 0.5

            async def one(i: int, body: bytes) -> tuple[float, int]:
                await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
                sent = time.perf_counter()
                response = await client.post(url, content=body, headers={"content-type": "application/json"})
                return time.perf_counter() - sent, response.status_code

            return await asyncio.gather(*(one(i, b) for i, b in enumerate(payloads)))

    out.put(asyncio.run(run()))


def bare_forward(directory: Path, store_url: str, body: bytes, threads: int, repeats: int = 50) -> tuple[float, float]:
    """Median wall and CPU seconds of `score_candidates` alone on one request's input (vectors
    read once)."""
    import torch

    from mmrank.predictors.artifact import load_ranker

    torch.set_num_threads(threads)
    model, meta = load_ranker(directory)
    request = json.loads(body)
    store = open_store(store_url)
    history = store.get_history(request["user"]["id"], int(meta["history_length"]))
    cands = np.asarray(request["candidates"], dtype=np.int64)
    hist_emb, hist_found = store.get(SPACE, history)
    cand_emb, cand_found = store.get(SPACE, cands)
    store.close()
    t = torch.from_numpy
    inputs = (request["user"]["id"], t(history), torch.ones(len(history), dtype=torch.bool), t(hist_emb),
              t(hist_found), t(cands), t(cand_emb), t(cand_found))
    wall, cpu = [], []
    for _ in range(repeats + 5):
        started, started_cpu = time.perf_counter(), time.process_time()
        model.score_candidates(*inputs)
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return float(np.median(wall[5:])), float(np.median(cpu[5:]))


def store_breakdown(store_url: str, body: bytes, history: int, repeats: int = 50) -> dict[str, float]:
    """CPU ms of the parts of one request's store read, in this process (redis-py, and hiredis
    when it is installed): where the server's store time goes."""
    import redis.utils

    from mmrank.store import RedisStore, decode_vectors

    store = open_store(store_url)
    assert isinstance(store, RedisStore)
    request = json.loads(body)
    ids = np.concatenate([store.get_history(request["user"]["id"], history), request["candidates"]]).tolist()
    blobs = store.client.hmget(store.vectors_key(SPACE), ids)
    dim = len(next(b for b in blobs if b is not None)) // 2

    def cpu_ms(step) -> float:  # type: ignore[no-untyped-def]
        step()
        started = time.process_time()
        for _ in range(repeats):
            step()
        return (time.process_time() - started) / repeats * 1e3

    parts = {
        f"LRANGE {history} ids": cpu_ms(lambda: store.get_history(request["user"]["id"], history)),
        f"HMGET {len(ids)} fields": cpu_ms(lambda: store.client.hmget(store.vectors_key(SPACE), ids)),
        "decode (store's per-row loop)": cpu_ms(lambda: decode_vectors(blobs, dim, "float16")),
        "decode (one join + frombuffer)": cpu_ms(
            lambda: np.frombuffer(b"".join(blobs), dtype="<f2").reshape(-1, dim).astype(np.float32)),
    }
    store.close()
    return {"hiredis": float(redis.utils.HIREDIS_AVAILABLE), **parts}


def server_totals(url: str, name: str) -> np.ndarray:
    """(sum, count) of a histogram on the server's /metrics."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    totals = np.zeros(2)
    for line in text.splitlines():
        for i, suffix in enumerate(("_sum", "_count")):
            if line.startswith(f"{name}{suffix}{{"):
                totals[i] += float(line.rpartition(" ")[2])
    return totals


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc): robust where the machine is shared."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_rate(url: str, args: argparse.Namespace, rate: float, seed: int) -> dict[str, object]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    payloads = bodies(args, int(rate * args.seconds), seed=seed)
    proc = ctx.Process(target=drive, args=(url, payloads, rate, queue))
    proc.start()
    results = queue.get()
    proc.join()
    codes = {int(c): int(n) for c, n in zip(*np.unique([r[1] for r in results], return_counts=True))}
    ok = np.array([r[0] for r in results if r[1] == 200])
    return {"rate": rate, "codes": codes, "p50": float(np.percentile(ok, 50)), "p99": float(np.percentile(ok, 99)),
            "payload": payloads[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="50", help="requests per second, comma-separated: one run each")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--history", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--max-concurrency", type=int, default=8)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mmrank-bench-ranking-"))
    redis = servers.start_redis(workdir / "redis", appendonly=False)
    predictor = None
    try:
        setup(redis.url, workdir / "ranker", args)
        port = servers.free_port()
        argv = [sys.executable, "-m", "mmrank", "predictor", "serve", "--model-dir", str(workdir / "ranker"),
                "--store", redis.url, "--http-port", str(port), "--torch-threads", str(args.torch_threads),
                "--max-candidates", str(max(args.candidates, 500)), "--max-history", str(args.history),
                "--max-concurrency", str(args.max_concurrency), "--no-feedback-stream"]
        log = open(workdir / "predictor.log", "ab")  # noqa: SIM115 - the child owns it
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        predictor = servers.Server("predictor", process, workdir / "predictor.log", f"http://127.0.0.1:{port}",
                                   port, workdir)
        servers.wait_until(predictor, lambda: servers.http_ok(f"{predictor.url}/v2/models/ranker/ready"), 180, "ready")
        url = f"{predictor.url}/v1/models/ranker:predict"
        run_rate(url, argparse.Namespace(**{**vars(args), "seconds": 2.0}), 10.0, seed=1)  # warm-up
        rows = []
        for i, rate in enumerate(float(r) for r in args.rates.split(",")):
            before = server_totals(predictor.url, "mmrank_store_read_duration_seconds")
            cpu_before = cpu_seconds(process.pid)
            row = run_rate(url, args, rate, seed=2 + i)
            cpu = cpu_seconds(process.pid) - cpu_before
            read_sum, read_count = server_totals(predictor.url, "mmrank_store_read_duration_seconds") - before
            rows.append({**row, "store_read": read_sum / max(read_count, 1), "cpu": cpu / max(read_count, 1)})
        forward, forward_cpu = bare_forward(workdir / "ranker", redis.url, rows[0]["payload"], args.torch_threads)
        breakdown = store_breakdown(redis.url, rows[0]["payload"], args.history)
    finally:
        if predictor is not None:
            predictor.stop()
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"machine: {platform.machine()}, {multiprocessing.cpu_count()} cores, torch threads {args.torch_threads}, "
          f"max concurrency {args.max_concurrency}")
    print(f"input: {args.candidates} candidates x {args.history}-item history (from the store) x {args.dim} "
          f"dimensions; {args.seconds:g} s per rate")
    print(f"bare score_candidates forward: median {forward * 1e3:.2f} ms wall, {forward_cpu * 1e3:.2f} ms CPU")
    print(f"store read parts, CPU ms in this process (hiredis {'on' if breakdown.pop('hiredis') else 'off'}): "
          + ", ".join(f"{k} {v:.2f}" for k, v in breakdown.items()))
    print("| rate (req/s) | answers | p50 (ms) | p99 (ms) | p50 / bare forward | store read, server mean (ms) "
          "| server CPU per scored request (ms) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['rate']:g} | {row['codes']} | {row['p50'] * 1e3:.1f} | {row['p99'] * 1e3:.1f} | "
              f"{row['p50'] / forward:.2f} | {row['store_read'] * 1e3:.2f} | {row['cpu'] * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
