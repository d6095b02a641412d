"""Soak of the bounded streams: Redis memory and entry counts while events flow for minutes.

Starts a real Redis (no persistence: memory is what is measured) and a real Triton serving the
small test encoder (`EncoderConfig(image_channels=(8, 16), text_width=32, text_layers=1)`,
randomly initialised, Python backend), runs `mmrank embedder run` as its own process, and
publishes item events (64x64 PNG of noise, about 12 KB, + title) at `--rate` per second for
`--seconds`, item ids cycling over `--items` (a catalogue whose items keep changing), with
`--bad` of them invalid (empty title: dead letters). Every `--sample` seconds (default 1: the
stream grows between trims and drops at each, so a sampling period that is a multiple of the
trim interval would only ever see it just trimmed) it records the item stream's and the
dead-letter stream's length, the group's pending count, the memory of each key (MEMORY USAGE)
and Redis' `used_memory`. Prints, per 10 samples, the last one with the window's maxima, and a
JSON summary (maxima over all samples) with what the item stream would hold without trimming.

    .venv/bin/python bench/soak_streams.py --rate 50 --seconds 180
"""

from __future__ import annotations

import argparse
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

import numpy as np


def export_small_encoder(repo: Path) -> None:
    import torch

    from mmrank.encoders.export import export_repository
    from mmrank.encoders.model import EncoderConfig, ItemEncoder

    torch.manual_seed(0)
    config = EncoderConfig(image_channels=(8, 16), text_width=32, text_layers=1, text_heads=2, vocab_size=512)
    export_repository(ItemEncoder(config).eval(), repo, max_batch_size=64, max_queue_delay_us=1000)


def wait_http(url: str, timeout: float = 120) -> None:
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


def publish(client, args: argparse.Namespace, sent: list[int], stop: threading.Event) -> None:  # type: ignore[no-untyped-def]
    from mmrank.encoders.item_events import encode_image, event_fields
    from mmrank.store import ITEM_STREAM

    rng = np.random.default_rng(0)
    pngs = [encode_image(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(64)]
    bad_every = int(round(1 / args.bad)) if args.bad > 0 else 0
    start = time.time()
    for i in range(int(args.rate * args.seconds)):
        if stop.is_set():
            return
        time.sleep(max(0.0, start + i / args.rate - time.time()))
        title = " " if bad_every and i % bad_every == bad_every - 1 else f"cotton shirt {i}"
        client.xadd(ITEM_STREAM, event_fields(i % args.items, title, pngs[i % len(pngs)]))
        sent[0] = i + 1


def sample(client) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from mmrank.store import DEAD_LETTER_STREAM, EMBEDDER_GROUP, ITEM_STREAM, RedisStore

    pipe = client.pipeline(transaction=False)
    pipe.xlen(ITEM_STREAM)
    pipe.xlen(DEAD_LETTER_STREAM)
    pipe.xpending(ITEM_STREAM, EMBEDDER_GROUP)
    for key in (ITEM_STREAM, DEAD_LETTER_STREAM, RedisStore(client).vectors_key("e1")):  # the local default scope
        pipe.memory_usage(key, samples=0)
    pipe.info("memory")
    items, dead, pending, items_bytes, dead_bytes, vectors_bytes, memory = pipe.execute()
    return {
        "stream_entries": items,
        "dead_letters": dead,
        "pending": int(pending["pending"]),
        "stream_mib": round((items_bytes or 0) / 2**20, 2),
        "dead_letters_mib": round((dead_bytes or 0) / 2**20, 2),
        "vectors_mib": round((vectors_bytes or 0) / 2**20, 2),
        "used_memory_mib": round(memory["used_memory"] / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--items", type=int, default=2000, help="catalogue size the item ids cycle over")
    parser.add_argument("--bad", type=float, default=0.05, help="share of invalid events (dead letters)")
    parser.add_argument("--sample", type=float, default=1.0)
    parser.add_argument("--dead-letter-max-len", type=int, default=100)
    parser.add_argument("--trim-interval", type=float, default=5.0)
    args = parser.parse_args()

    import redis

    from harness import servers

    work = Path(tempfile.mkdtemp(prefix="mmrank-soak-"))
    export_small_encoder(work / "repo")
    redis_server = servers.start_redis(work / "redis", appendonly=False)
    triton = servers.start_triton(work / "repo", work / "triton")
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
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(http_port),
            "--consumer",
            "soak",
            "--dead-letter-max-len",
            str(args.dead_letter_max_len),
            "--trim-interval",
            str(args.trim_interval),
        ],
        cwd=work,
        stdout=open(work / "embedder.log", "wb"),  # noqa: SIM115 - the embedder's log, open while it runs
        stderr=subprocess.STDOUT,
    )
    stop = threading.Event()
    try:
        wait_http(f"http://127.0.0.1:{http_port}/readyz")
        client = redis.Redis.from_url(redis_server.url)
        before = sample(client)
        sent = [0]
        publisher = threading.Thread(target=publish, args=(client, args, sent, stop), daemon=True)
        began = time.time()
        publisher.start()
        samples = []
        while publisher.is_alive():
            time.sleep(args.sample)
            row = {"t_s": round(time.time() - began), "events_sent": sent[0], **sample(client)}
            samples.append(row)
            if len(samples) % 10 == 0:
                window = samples[-10:]
                print(
                    json.dumps(
                        {
                            **row,
                            **{
                                f"window_max_{k}": max(s[k] for s in window)
                                for k in ("stream_entries", "stream_mib", "used_memory_mib")
                            },
                        }
                    ),
                    flush=True,
                )
        publisher.join()
        deadline = time.time() + 60
        while sample(client)["pending"] and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(args.trim_interval + 1)
        after = {"events_sent": sent[0], **sample(client)}
        entry_bytes = (
            max((s["stream_mib"] * 2**20 / s["stream_entries"]) for s in samples if s["stream_entries"])
            if any(s["stream_entries"] for s in samples)
            else 0.0
        )
        summary = {
            "rate_per_s": args.rate,
            "seconds": args.seconds,
            "catalogue_items": args.items,
            "bad_share": args.bad,
            "events_sent": sent[0],
            "before": before,
            "after_drain": after,
            "max_stream_entries": max(s["stream_entries"] for s in samples),
            "max_stream_mib": max(s["stream_mib"] for s in samples),
            "max_dead_letters": max(s["dead_letters"] for s in samples),
            "max_used_memory_mib": max(s["used_memory_mib"] for s in samples),
            "untrimmed_stream_would_hold_mib": round(sent[0] * entry_bytes / 2**20, 1),
            "load_average": os.getloadavg(),
        }
        print(json.dumps(summary, indent=2))
    finally:
        stop.set()
        embedder.terminate()
        embedder.wait(30)
        triton.stop()
        redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
