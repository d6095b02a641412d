"""Items/s of the item encoder through Triton, dynamic batching on vs off, and vs torch directly.

    .venv/bin/python bench/encoder_throughput.py [--checkpoint DIR] [--seconds 10] [--clients 16]
        [--request-items 1] [--threads 2]

The embedder's traffic is many small requests (one new item each), so the clients send
`--request-items` items per request from `--clients` threads. Triton serves two copies of the
same exported Python-backend model, one with `dynamic_batching` and one without; in this process torch runs the same TorchScript file
Triton runs (and the eager module), item by item and in batches of `--max-batch-size`,
tokenizing included. Triton's
model and torch get the same number of threads (`--threads`, via OMP_NUM_THREADS for Triton's
Python stub). Prints items/s of each and the ratios.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def random_items(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "wool", "silk", "hat", "scarf", "boots", "lamp", "oak", "steel", "mug", "shirt"]
    titles = [" ".join(rng.choice(words, size=int(rng.integers(3, 8)))) for _ in range(n)]
    return rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8), titles


def triton_items_per_second(url: str, model: str, clients: int, request_items: int, seconds: float) -> float:
    """Closed loop: each client sends its next request when the previous one is answered."""
    import tritonclient.http as httpclient

    images, titles = random_items(request_items * clients, seed=1)
    stop = time.monotonic() + seconds
    done = [0] * clients

    def client(index: int) -> None:
        conn = httpclient.InferenceServerClient(url)
        rows = slice(index * request_items, (index + 1) * request_items)
        image = httpclient.InferInput("IMAGE", [request_items, 64, 64, 3], "UINT8")
        image.set_data_from_numpy(images[rows])
        title = httpclient.InferInput("TITLE", [request_items, 1], "BYTES")
        title.set_data_from_numpy(np.array([[t.encode()] for t in titles[rows]], dtype=object))
        while time.monotonic() < stop:
            conn.infer(model, [image, title])
            done[index] += request_items
        conn.close()

    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return sum(done) / (time.monotonic() - began)


def torch_items_per_second(embed: Callable[[np.ndarray, list[str]], object], batch: int, seconds: float) -> float:
    """Items/s of `embed(images, titles)` (tokenizing included) called in this process."""
    images, titles = random_items(max(batch, 64), seed=2)
    count, began = 0, time.monotonic()
    while time.monotonic() - began < seconds:
        for start in range(0, len(titles), batch):
            embed(images[start : start + batch], titles[start : start + batch])
            count += len(titles[start : start + batch])
    return count / (time.monotonic() - began)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a trained encoder (default: a randomly initialised default one)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--request-items", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by Triton's Python stub
    import torch

    from harness import servers
    from mmrank.encoders.export import export_repository, load_exported
    from mmrank.encoders.model import ItemEncoder, encode_items, load_encoder

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = load_encoder(args.checkpoint) if args.checkpoint else ItemEncoder()
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mmrank-bench-") as tmp:
        repo = Path(tmp) / "repo"
        for name, dynamic in (("item_encoder_batched", True), ("item_encoder_unbatched", False)):
            export_repository(
                encoder,
                repo,
                model_name=name,
                max_batch_size=args.max_batch_size,
                max_queue_delay_us=args.max_queue_delay_us,
                dynamic_batching=dynamic,
            )
        server = servers.start_triton(repo, Path(tmp) / "triton")
        try:
            for name in ("item_encoder_batched", "item_encoder_unbatched"):
                triton_items_per_second(server.url, name, args.clients, args.request_items, 1.0)  # warm up
                figures[name] = triton_items_per_second(
                    server.url, name, args.clients, args.request_items, args.seconds
                )
        finally:
            server.stop()
        # The same TorchScript file Triton runs, called directly, and the eager module.
        script, tokenizer = load_exported(repo / "item_encoder_batched" / "1")

        def run_script(images: np.ndarray, titles: list[str]) -> object:
            return script(images, tokenizer.encode(titles))

        def run_eager(images: np.ndarray, titles: list[str]) -> object:
            return encode_items(encoder, images, titles, batch_size=len(titles))

        big = args.max_batch_size
        for label, embed in (("torchscript", run_script), ("torch_eager", run_eager)):
            embed(*random_items(2))  # warm up
            figures[f"{label}_batch_1"] = torch_items_per_second(embed, 1, args.seconds)
            figures[f"{label}_batch_{big}"] = torch_items_per_second(embed, big, args.seconds)
    on, off = figures["item_encoder_batched"], figures["item_encoder_unbatched"]
    ratios = {
        "triton dynamic batching on / off": on / off,
        "triton batching on / torchscript item by item": on / figures["torchscript_batch_1"],
        f"triton batching on / torchscript batch {big}": on / figures[f"torchscript_batch_{big}"],
        "triton batching off / torchscript item by item": off / figures["torchscript_batch_1"],
        "torchscript / torch eager, batch 1": figures["torchscript_batch_1"] / figures["torch_eager_batch_1"],
        f"torchscript / torch eager, batch {big}": figures[f"torchscript_batch_{big}"]
        / figures[f"torch_eager_batch_{big}"],
    }
    print(
        f"setup: {args.clients} clients x {args.request_items} item(s) per request, {args.threads} threads, "
        f"{args.seconds:.0f} s per run, cpu_count={os.cpu_count()}"
    )
    for name, value in figures.items():
        print(f"{name:32s} {value:10.1f} items/s")
    for name, value in ratios.items():
        print(f"{name:48s} {value:6.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "ratios": ratios, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
