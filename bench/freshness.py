"""Freshness of new items: event time -> vector in the store, at a steady event rate.

Starts a real Redis and a real Triton serving the small item encoder (default `EncoderConfig`,
randomly initialised, Python backend), runs `mmrank embedder run` as its own process, publishes
item events (PNG image + title) at `--rate` per second for `--seconds`, and watches the store
(HMGET every `--poll` seconds) for each item's vector. Prints p50/p99/max freshness beside the
floor: Triton's own round trip for one item from a direct tritonclient call.

To explain a tail it also prints the stalls (runs of items fresher than `--stall` seconds only
after a wait, with when they began and how long they lasted), where the embedder's time went
(p50/p99 of `mmrank_embedder_stage_seconds` per stage: queued in the stream, validate, embed,
store, ack), Triton's own split of a request into queue and compute time, and Redis' latency
events over 10 ms (LATENCY LATEST: `aof-fsync-always`, `command`, ...).

`stalls_explained` reads the embedder's `--trace` (per batch: the wall time of each stage; GC
pauses; event-loop delays with the loop thread's own CPU in them) and splits every item's
freshness into queued / read / validate / launch / embed / store / seen (they add up to it);
for the items over `--stall` it counts the stage that took longest and the pauses that
overlapped them (the embedder's GC and loop delays, this process' own GC). `cpu_ms_per_item`
is the CPU each process used per item during the run: unlike wall times it hardly depends on
what else the machine runs, so it compares settings on a shared machine. `--trace-out FILE`
keeps the trace with each item's send and seen times.

Two settings decide the tail on a small CPU machine, and both are printed with the result:
- `--triton-threads` (default 1): torch's intra-op threads in Triton's Python-backend model
  (OMP_NUM_THREADS). torch's default, one per core, makes two threads contend with the
  embedder, Redis and this script for 2 cores, and Triton's compute time per request grows
  several-fold (compare `triton_requests` with `--triton-threads 0`).
- `--redis-fsync` (default everysec, Redis' default with an append-only file): `always`
  syncs the disk inside every write, in Redis' one thread, so every client stalls while the
  shared disk is slow (`aof-fsync-always` spikes).

    .venv/bin/python bench/freshness.py --rate 50 --seconds 30
    .venv/bin/python bench/freshness.py --rate 200 --seconds 30
    .venv/bin/python bench/freshness.py --rate 200 --seconds 20 --triton-threads 0   # the stalls, for comparison
    .venv/bin/python bench/freshness.py --rate 200 --seconds 20 --redis-fsync always
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np


def export_small_encoder(repo: Path) -> None:
    import torch

    from mmrank.encoders.export import export_repository
    from mmrank.encoders.model import EncoderConfig, ItemEncoder

    torch.manual_seed(0)
    export_repository(ItemEncoder(EncoderConfig()).eval(), repo, max_batch_size=64, max_queue_delay_us=1000)


def direct_latency(grpc_url: str, n: int = 100) -> list[float]:
    """Seconds per single-item request straight to Triton (the floor for freshness)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    image = np.random.default_rng(1).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    times = []
    for i in range(n + 5):
        a = grpcclient.InferInput("IMAGE", [1, 64, 64, 3], "UINT8")
        a.set_data_from_numpy(image)
        b = grpcclient.InferInput("TITLE", [1, 1], "BYTES")
        b.set_data_from_numpy(np.array([[f"blue shirt {i}".encode()]], dtype=object))
        start = time.perf_counter()
        client.infer("item_encoder", [a, b])
        if i >= 5:
            times.append(time.perf_counter() - start)
    client.close()
    return times


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {timeout} s")


def publish_steadily(client, rate: float, seconds: float, sent: dict[int, float]) -> None:  # type: ignore[no-untyped-def]
    from mmrank.encoders.item_events import encode_image, publish_item

    rng = np.random.default_rng(0)
    pngs = [encode_image(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(64)]
    start = time.time()
    for i in range(int(rate * seconds)):
        due = start + i / rate
        time.sleep(max(0.0, due - time.time()))
        now = time.time()
        publish_item(client, i, f"new cotton shirt {i}", pngs[i % len(pngs)], event_time=now)
        sent[i] = now


def histogram_quantile(
    q: float, metrics_text: str, name: str = "mmrank_embedding_freshness_seconds", **labels: str
) -> float:
    """Prometheus' histogram_quantile over the embedder's own histogram (linear within a bucket)."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets = sorted(
        (float(s.labels["le"]), s.value)
        for f in text_string_to_metric_families(metrics_text)
        for s in f.samples
        if s.name == f"{name}_bucket" and all(s.labels.get(k) == v for k, v in labels.items())
    )
    if not buckets or not buckets[-1][1]:
        return float("nan")
    total = buckets[-1][1]
    rank, lower, below = q * total, 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = upper, count
    return lower


def stalls(sent_at: np.ndarray, fresh: np.ndarray, threshold: float) -> list[dict[str, float]]:
    """Runs of consecutive items (in send order) each slower than `threshold` seconds: when the
    run began (seconds into the run), how many items, the longest wait."""
    runs: list[dict[str, float]] = []
    start = None
    for i, slow in enumerate(np.append(fresh > threshold, False)):
        if slow and start is None:
            start = i
        elif not slow and start is not None:
            runs.append(
                {
                    "at_s": round(float(sent_at[start] - sent_at[0]), 2),
                    "items": i - start,
                    "worst_s": round(float(fresh[start:i].max()), 3),
                }
            )
            start = None
    return runs


def redis_latency_events(client) -> dict[str, dict[str, float]]:  # type: ignore[no-untyped-def]
    """Redis' latency monitor: per event, the worst spike and how many spikes over the threshold."""
    events = {}
    for name, _, _, worst in client.execute_command("LATENCY", "LATEST"):
        name = name.decode() if isinstance(name, bytes) else name
        history = client.execute_command("LATENCY", "HISTORY", name)
        events[name] = {"worst_ms": int(worst), "spikes": len(history)}
    return events


def redis_forks(client) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Forks Redis made during the run (an AOF rewrite or an RDB save each fork the process and
    write its whole dataset from the child, beside the item stream's writes)."""
    persistence, stats = client.info("persistence"), client.info("stats")
    return {
        "total_forks": stats.get("total_forks"),
        "latest_fork_usec": stats.get("latest_fork_usec"),
        "aof_rewrites": persistence.get("aof_rewrites"),
        "rdb_saves": persistence.get("rdb_saves"),
        "aof_current_size_mb": round(persistence.get("aof_current_size", 0) / 2**20, 1),
    }


class GcPauses:
    """This process' own garbage collections (gc.callbacks): the poller stops during each, so an
    item stored meanwhile is seen late; the bench must not add stalls of its own."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float, float]] = []
        self.started = 0.0
        gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.time()
        else:
            self.pauses.append((info["generation"], self.started, time.time()))

    def summary(self) -> dict[str, Any]:
        worst = max((end - start for _, start, end in self.pauses), default=0.0)
        return {
            "collections": len(self.pauses),
            "full": sum(1 for g, _, _ in self.pauses if g == 2),
            "worst_ms": round(worst * 1000, 1),
        }


STAGES = ("queued", "read", "validate", "launch", "embed", "store", "seen")


def read_trace(path: Path) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """The embedder's --trace: each item's batch record (its last, if redelivered), and the pauses
    (GC, event-loop delays)."""
    by_item: dict[int, dict[str, Any]] = {}
    pauses = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "batch" in record:
            for item in record["items"]:
                by_item[item] = record
        else:
            pauses.append(record)
    return by_item, pauses


def item_stages(sent: float, seen: float, batch: dict[str, Any], space: str = "e1") -> dict[str, float]:
    """Where one item's freshness went, in seconds (they add up to it): queued (in the stream
    before the read that returned it began), read (that XREADGROUP, filling the batch),
    validate, launch (waiting for a free slot or an earlier batch of the same item), embed (the
    task's start and Triton), store, seen (stored to the bench's poll finding it)."""
    times = batch["spaces"].get(space, {})
    stored = times.get("stored", batch["acked"])
    embed_end = times.get("embed_end", stored)
    marks = [
        sent,
        max(sent, batch["read_start"]),
        batch["read"],
        batch["validated"],
        batch["launched"],
        embed_end,
        stored,
        max(seen, stored),
    ]
    return {stage: max(0.0, b - a) for stage, a, b in zip(STAGES, marks[:-1], marks[1:], strict=True)}


def explain(
    sent: dict[int, float], seen: dict[int, float], trace: Path, threshold: float, bench_gc: GcPauses
) -> dict[str, Any]:
    """Per stage p50/p99 over all items, and for the items slower than `threshold`: the stage
    that took most of each one's time, and the pauses (embedder GC, event-loop delays, the
    bench's own GC) that overlapped it."""
    by_item, pauses = read_trace(trace)
    first = min(sent.values(), default=0.0)
    pauses = [p for p in pauses if p["end"] >= first]  # not setup's (gc.freeze collects once before the run)
    windows = [
        ("embedder_gc" if "gc" in p else "embedder_loop_late", p.get("start", p.get("loop_late")), p["end"])
        for p in pauses
    ] + [("bench_gc", start, end) for _, start, end in bench_gc.pauses]
    splits, causes, overlapping = [], {}, {"embedder_gc": 0, "embedder_loop_late": 0, "bench_gc": 0}
    worst_pause = {"embedder_gc": 0.0, "embedder_loop_late": 0.0, "bench_gc": 0.0}
    for item, seen_at in seen.items():
        if item not in by_item:
            continue
        split = item_stages(sent[item], seen_at, by_item[item])
        splits.append(split)
        if seen_at - sent[item] <= threshold:
            continue
        top = max(split, key=lambda stage: split[stage])
        causes[top] = causes.get(top, 0) + 1
        hit = set()
        for kind, start, end in windows:
            if start < seen_at and end > sent[item]:
                hit.add(kind)
                worst_pause[kind] = max(worst_pause[kind], end - start)
        for kind in hit:
            overlapping[kind] += 1
    gcs = [p for p in pauses if "gc" in p]
    return {
        "items_traced": len(splits),
        "stage_p50_p99_ms": {
            stage: [round(float(np.percentile([s[stage] for s in splits], q)) * 1000, 1) for q in (50, 99)]
            for stage in STAGES
        }
        if splits
        else {},
        f"items_over_{threshold}_s_by_their_longest_stage": causes,
        "pauses_overlapping_those_items": {
            kind: {"items": overlapping[kind], "worst_ms": round(worst_pause[kind] * 1000, 1)} for kind in overlapping
        },
        "embedder_gc_pauses_over_2_ms": {
            "count": len(gcs),
            "full": sum(1 for p in gcs if p["gc"] == 2),
            "worst_ms": round(max((p["end"] - p["start"] for p in gcs), default=0) * 1000, 1),
        },
        "embedder_loop_delays_over_2_ms": {
            "count": sum(1 for p in pauses if "loop_late" in p),
            # the loop thread's own CPU in those delays: low, the CPU was elsewhere (other processes)
            "own_cpu_share": round(
                sum(p["cpu"] for p in pauses if "loop_late" in p)
                / max(sum(p["end"] - p["loop_late"] for p in pauses if "loop_late" in p), 1e-9),
                2,
            ),
            "worst_ms": round(
                max((p["end"] - p["loop_late"] for p in pauses if "loop_late" in p), default=0) * 1000, 1
            ),
            "worst_own_cpu_ms": round(
                max(((p["end"] - p["loop_late"], p["cpu"]) for p in pauses if "loop_late" in p), default=(0, 0))[1]
                * 1000,
                1,
            ),
        },
        "bench_gc": bench_gc.summary(),
    }


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) each process and its children processes used so far: what
    the run costs each part, whatever else the machine runs (wall times are not)."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(proc.name)] = (int(stat[1]), (int(stat[11]) + int(stat[12])) / ticks)
    used = {}
    for name, pid in pids.items():
        own = parents.get(pid, (0, 0.0))[1]
        used[name] = own + sum(cpu for ppid, cpu in parents.values() if ppid == pid)
    return used


def triton_threads(triton_pid: int) -> dict[str, int]:
    """Threads of Triton and of its Python-backend stubs (the model runs in a stub process)."""
    counts = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            status = (proc / "status").read_text()
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if int(proc.name) == triton_pid or ppid == triton_pid:
            name = status.split("\n", 1)[0].split(":", 1)[1].strip()
            threads = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
            counts[name] = counts.get(name, 0) + threads
    return counts


def triton_request_split(metrics_url: str) -> dict[str, float]:
    """Triton's own account per request (its counters, averaged): waiting for the model
    instance (queue) against running it (compute input + infer + output), in ms."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("nv_inference_") and not line.startswith("#"):
            name = line.split("{", 1)[0]
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    requests = totals.get("nv_inference_request_success", 0.0) or 1.0
    compute = sum(totals.get(f"nv_inference_compute_{p}_duration_us", 0.0) for p in ("input", "infer", "output"))
    return {
        "requests": int(totals.get("nv_inference_request_success", 0.0)),
        "executions": int(totals.get("nv_inference_exec_count", 0.0)),
        "queue_ms_per_request": round(totals.get("nv_inference_queue_duration_us", 0.0) / requests / 1000, 2),
        "compute_ms_per_request": round(compute / requests / 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--poll", type=float, default=0.005)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-wait", type=float, default=0.02)
    parser.add_argument("--stall", type=float, default=0.1, help="seconds of freshness that count as a stall")
    parser.add_argument(
        "--redis-fsync",
        choices=("everysec", "always"),
        default="everysec",
        help="appendfsync of the Redis append-only file",
    )
    parser.add_argument(
        "--triton-threads",
        type=int,
        default=1,
        help="torch threads in Triton's model (OMP_NUM_THREADS); 0: torch's default (one per core)",
    )
    parser.add_argument(
        "--trace-out", type=Path, help="keep the embedder's trace (JSON lines) and the items' send and seen times here"
    )
    parser.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="leave the embedder's and this process' startup objects in the garbage collector (to "
        "compare: a full collection then scans every imported module)",
    )
    args = parser.parse_args()

    import redis

    from harness import servers
    from mmrank.store import RedisStore

    work = Path(tempfile.mkdtemp(prefix="mmrank-freshness-"))
    export_small_encoder(work / "repo")
    if not args.no_gc_freeze:
        gc.collect()
        gc.freeze()  # torch, imported by the export: a full collection would scan ~190k objects (~90 ms CPU)
    bench_gc = GcPauses()
    redis_server = servers.start_redis(work / "redis")
    admin = redis.Redis.from_url(redis_server.url)
    admin.config_set("appendfsync", args.redis_fsync)
    admin.config_set("latency-monitor-threshold", 10)
    if args.triton_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.triton_threads)  # inherited by Triton's Python-backend stub
    triton = servers.start_triton(work / "repo", work / "triton")
    os.environ.pop("OMP_NUM_THREADS", None)
    http_port = servers.free_port()
    embedder = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mmrank",
            "embedder",
            "run",
            "--encoder",
            f"e1={triton.extra['grpc_url']}",
            "--store",
            redis_server.url,
            "--http-port",
            str(http_port),
            "--batch-size",
            str(args.batch_size),
            "--max-wait",
            str(args.max_wait),
            "--consumer",
            "bench",
            "--trace",
            str(work / "trace.jsonl"),
            *(["--no-gc-freeze"] if args.no_gc_freeze else []),
        ],
        cwd=work,
        stdout=open(work / "embedder.log", "wb"),  # noqa: SIM115 - the embedder's log, open while it runs
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{http_port}/readyz")
        floor = direct_latency(str(triton.extra["grpc_url"]))
        client = redis.Redis.from_url(redis_server.url)
        store = RedisStore(redis.Redis.from_url(redis_server.url))
        sent: dict[int, float] = {}
        seen: dict[int, float] = {}
        pids = {
            "triton (with its model stub)": triton.process.pid,
            "embedder": embedder.pid,
            "redis": redis_server.process.pid,
            "this bench": os.getpid(),
        }
        cpu_before = cpu_seconds(pids)
        publisher = threading.Thread(target=publish_steadily, args=(client, args.rate, args.seconds, sent))
        publisher.start()
        total = int(args.rate * args.seconds)
        deadline = time.time() + args.seconds + 60
        space_ready = False
        while len(seen) < total and time.time() < deadline:
            waiting = [i for i in list(sent) if i not in seen]
            space_ready = space_ready or "e1" in store.spaces()
            if waiting and space_ready:
                found = store.get("e1", waiting)[1]
                now = time.time()
                for i, hit in zip(waiting, found, strict=True):
                    if hit:
                        seen[i] = now
            time.sleep(args.poll)
        publisher.join()
        cpu_after = cpu_seconds(pids)
        order = sorted(seen)
        fresh = np.array([seen[i] - sent[i] for i in order])
        sent_at = np.array([sent[i] for i in order])
        slow = stalls(sent_at, fresh, args.stall)
        thirds = [np.percentile(part, [50, 99]).round(3).tolist() for part in np.array_split(fresh, 3)]
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        result = {
            "rate_per_s": args.rate,
            "seconds": args.seconds,
            "items": total,
            "stored": len(seen),
            "freshness_p50_s": round(float(np.percentile(fresh, 50)), 4),
            "freshness_p99_s": round(float(np.percentile(fresh, 99)), 4),
            "freshness_max_s": round(float(fresh.max()), 4),
            "triton_single_item_p50_s": round(float(np.percentile(floor, 50)), 4),
            "triton_single_item_p99_s": round(float(np.percentile(floor, 99)), 4),
            "p99_over_triton_p99": round(float(np.percentile(fresh, 99) / np.percentile(floor, 99)), 1),
            "p50_p99_by_third_of_the_run_s": thirds,
            "embedder_histogram_p50_s": round(histogram_quantile(0.5, metrics), 3),
            "embedder_histogram_p99_s": round(histogram_quantile(0.99, metrics), 3),
            "poll_interval_s": args.poll,
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "redis_appendfsync": args.redis_fsync,
            f"stalls_over_{args.stall}_s": {
                "count": len(slow),
                "items": sum(r["items"] for r in slow),
                "longest": sorted(slow, key=lambda r: -r["worst_s"])[:5],
            },
            "embedder_stage_p50_p99_s": {
                stage: [
                    round(histogram_quantile(q, metrics, "mmrank_embedder_stage_seconds", stage=stage), 4)
                    for q in (0.5, 0.99)
                ]
                for stage in ("queued", "validate", "embed", "store", "ack")
            },
            "redis_latency_events_over_10_ms": redis_latency_events(admin),
            "redis_forks": redis_forks(admin),
            "triton_threads": args.triton_threads or "default",
            "triton_process_threads": triton_threads(triton.process.pid),
            "cpu_ms_per_item": {
                name: round((cpu_after[name] - cpu_before[name]) * 1000 / max(len(seen), 1), 3) for name in pids
            },
            "stalls_explained": explain(sent, seen, work / "trace.jsonl", args.stall, bench_gc),
            "triton_requests": triton_request_split(str(triton.extra["metrics_url"])),
        }
        print(json.dumps(result, indent=2))
        if args.trace_out:
            shutil.copyfile(work / "trace.jsonl", args.trace_out)
            with open(args.trace_out, "a") as out:
                for i in order:
                    out.write(json.dumps({"item": i, "sent": sent[i], "seen": seen[i]}) + "\n")
    finally:
        embedder.terminate()
        embedder.wait(30)
        triton.stop()
        redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
