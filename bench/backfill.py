"""Backfill throughput against Triton's own best for the same model.

Starts a real Redis and a real Triton serving the small item encoder (default `EncoderConfig`,
randomly initialised, Python backend). First the ceiling: a direct tritonclient (async gRPC) loop
over the same items, sweeping requests in flight, best items/s kept. Then `backfill()` (one
shard, the same batch size) into a fresh space of the Redis store: images and titles read,
Triton called, vectors written, checkpoint reported after each window. The two alternate
`--repeats` times (a shared machine's load drifts); prints all runs and best backfill / best direct.

    .venv/bin/python bench/backfill.py --items 2048 --batch-size 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


async def triton_best(
    grpc_url: str, images: np.ndarray, titles: list[str], batch_size: int, in_flight_options: list[int]
) -> dict[int, float]:
    """items/s of a plain async tritonclient loop, per number of requests in flight."""
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)

    async def infer(start: int) -> None:
        stop = min(start + batch_size, len(titles))
        a = grpcclient.InferInput("IMAGE", [stop - start, 64, 64, 3], "UINT8")
        a.set_data_from_numpy(np.ascontiguousarray(images[start:stop]))
        b = grpcclient.InferInput("TITLE", [stop - start, 1], "BYTES")
        b.set_data_from_numpy(np.array([[t.encode()] for t in titles[start:stop]], dtype=object))
        await client.infer("item_encoder", [a, b])

    results = {}
    await infer(0)  # warm up
    for in_flight in in_flight_options:
        starts = list(range(0, len(titles), batch_size))
        began = time.perf_counter()
        for i in range(0, len(starts), in_flight):
            await asyncio.gather(*(infer(s) for s in starts[i : i + in_flight]))
        results[in_flight] = len(titles) / (time.perf_counter() - began)
    await client.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--in-flight", type=int, default=4, help="backfill's requests in flight")
    parser.add_argument("--repeats", type=int, default=2, help="alternating sweep + backfill rounds; best of each")
    args = parser.parse_args()

    import torch

    from harness import servers
    from mmrank.encoders.backfill import ArrayCatalogue, BackfillConfig, backfill
    from mmrank.encoders.export import export_repository
    from mmrank.encoders.model import EncoderConfig, ItemEncoder
    from mmrank.encoders.triton_client import EncoderTarget
    from mmrank.store import open_store

    work = Path(tempfile.mkdtemp(prefix="mmrank-backfill-bench-"))
    torch.manual_seed(0)
    export_repository(
        ItemEncoder(EncoderConfig()).eval(), work / "repo", max_batch_size=args.batch_size, max_queue_delay_us=1000
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.items, 64, 64, 3), dtype=np.uint8)
    titles = [f"{rng.choice(['red', 'blue'])} cotton shirt {i}" for i in range(args.items)]
    redis_server = servers.start_redis(work / "redis")
    triton = servers.start_triton(work / "repo", work / "triton")
    try:
        grpc = str(triton.extra["grpc_url"])
        store = open_store(redis_server.url)
        catalogue = ArrayCatalogue(np.arange(args.items, dtype=np.int64), images, titles)
        sweeps, runs = [], []
        for repeat in range(args.repeats):  # alternate, so both see the same neighbours on a shared machine
            sweeps.append(asyncio.run(triton_best(grpc, images, titles, args.batch_size, [1, 2, 4, 8])))
            config = BackfillConfig(
                f"bench{repeat}",
                EncoderTarget(f"bench{repeat}", grpc),
                redis_server.url,
                "-",
                batch_size=args.batch_size,
                in_flight=args.in_flight,
                progress=False,
            )
            runs.append(asyncio.run(backfill(config, store, catalogue)))
        best = max(v for sweep in sweeps for v in sweep.values())
        backfill_best = max(r["items_per_s"] for r in runs)
        print(
            json.dumps(
                {
                    "items": args.items,
                    "batch_size": args.batch_size,
                    "backfill_in_flight": args.in_flight,
                    "triton_direct_items_per_s": [{k: round(v, 1) for k, v in sweep.items()} for sweep in sweeps],
                    "triton_best_items_per_s": round(best, 1),
                    "backfill_items_per_s": [r["items_per_s"] for r in runs],
                    "ratio": round(backfill_best / best, 3),
                    "coverage": [r["coverage"] for r in runs],
                    "cpus": os.cpu_count(),
                    "load_average": [round(x, 1) for x in os.getloadavg()],
                },
                indent=2,
            )
        )
    finally:
        triton.stop()
        redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
