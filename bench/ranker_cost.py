"""What SimTier, MAKE and raw vectors cost over the ID model, on the same data.

For each variant: seconds of one ID-parameter epoch on the training impressions, seconds per
MAKE pre-training epoch (simtier-make; one epoch, fixed: the validation-day choice of the epoch
count is a hyper-parameter search and not counted), training in all, batch inference over the test impressions, and the
serving call — one user's C candidates against one shared history (`score_candidates`) — as a
median over repeats. Every figure is also printed as a ratio to the ID model's. With `--rounds N`
every variant is trained and timed N times, the variants interleaved round by round, and each
figure is the median of its N.

    .venv/bin/python bench/ranker_cost.py --data /tmp/shop-small --limit 50000 --rounds 3
    (without --data a `tiny` shop is generated in a temporary directory)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from mmrank.predictors import train
from mmrank.predictors.model import VARIANTS, RankerConfig


def serving_latency_ms(
    model: train.Ranker, test: train.Impressions, catalogue: train.Catalogue, candidates: int, repeats: int
) -> float:
    """Median ms of one score_candidates call: one history of L, `candidates` items."""
    row = int(np.argmax(test.history_mask.sum(1)))
    hist = torch.from_numpy(test.history[row])
    safe = hist.clamp(0, len(catalogue.vectors) - 1)
    cand = torch.from_numpy(np.resize(test.item, candidates))
    args = (
        int(test.user[row]),
        hist,
        torch.from_numpy(test.history_mask[row]),
        torch.from_numpy(catalogue.vectors[safe.numpy()]),
        torch.from_numpy(catalogue.present[safe.numpy()]),
        cand,
        torch.from_numpy(catalogue.vectors[cand.numpy()]),
        torch.from_numpy(catalogue.present[cand.numpy()]),
    )
    model.score_candidates(*args)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.score_candidates(*args)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def added_products_ms(
    candidates: int, history: int, dim: int, attention: int = 32, hidden: int = 32, bins: int = 22, repeats: int = 300
) -> float:
    """Median ms of only the matrix products SimTier and MAKE add to one serving call, on ready
    inputs: the candidates' cosines with the history, MAKE's query and key projections, its
    attention scores, its pooling of the history and its middle layer. What the two would cost
    if every other operation (norms, tiers, softmax, concatenation) were free."""
    g = torch.Generator().manual_seed(0)
    cand, hist = torch.randn(candidates, dim, generator=g), torch.randn(history, dim, generator=g)
    w_query, w_key = torch.randn(dim, attention, generator=g), torch.randn(dim, attention, generator=g)
    weights = torch.softmax(torch.randn(candidates, history, generator=g), -1)
    middle_in, w_middle = torch.randn(candidates, 3 * dim + bins, generator=g), torch.randn(3 * dim + bins, hidden)

    def products() -> None:
        cand @ hist.T  # cosines (before the norms)
        (cand @ w_query) @ (hist @ w_key).T  # MAKE's attention scores, keys first
        weights @ hist  # MAKE's pooling of the history
        middle_in @ w_middle  # MAKE's middle layer

    for _ in range(20):
        products()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        products()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def measure(
    data_dir: str,
    space_dir: str | None,
    history_length: int,
    candidates: int,
    repeats: int,
    batch_size: int,
    limit: int = 0,
    rounds: int = 1,
    make_dims: tuple[int, ...] = (),
) -> list[dict]:
    train_data, test_data, catalogue, vocab = train.load_data(data_dir, history_length, space_dir)
    if limit:
        train_data, test_data = (
            train_data.take(np.arange(min(limit, len(train_data)))),
            test_data.take(np.arange(min(limit, len(test_data)))),
        )
    print(
        f"{len(train_data)} training / {len(test_data)} test impressions, dim {catalogue.vectors.shape[1]}, "
        f"history {history_length}, batch {batch_size}, torch threads {torch.get_num_threads()}"
    )
    # each row: a variant, or SimTier+MAKE with a smaller MAKE (`--make-dim`, issue 19's serving lever)
    rows = {variant: {"variant": variant} for variant in VARIANTS}
    rows.update({f"simtier-make, MAKE in {d} d": {"variant": "simtier-make", "make_dim": d} for d in make_dims})

    def config_of(row: str) -> RankerConfig:
        return RankerConfig(**rows[row], mm_dim=catalogue.vectors.shape[1], history_length=history_length, **vocab)

    # warm-up: the first optimizer step of a process imports and initialises seconds of torch
    for variant in rows:
        config = config_of(variant)
        train.train_ranker(
            train_data.take(np.arange(min(2 * batch_size, len(train_data)))),
            catalogue,
            config,
            train.TrainSettings(batch_size=batch_size, make_epochs=1),
        )
    runs: dict[str, list[dict]] = {variant: [] for variant in rows}
    for round_ in range(rounds):  # variants interleaved round by round: a load change hits them all
        for variant in rows:
            config = config_of(variant)
            settings = train.TrainSettings(seed=0, batch_size=batch_size, make_epochs=1)
            model, report = train.train_ranker(train_data, catalogue, config, settings)
            start = time.perf_counter()
            train.predict(model, test_data, catalogue)
            infer = time.perf_counter() - start
            runs[variant].append(
                {
                    "id_epoch_s": report["id_seconds"],
                    "make_epoch_s": report.get("make_seconds", 0.0),
                    "inference_s": infer,
                    "serving_ms": serving_latency_ms(model, test_data, catalogue, candidates, repeats),
                    "mm_dim": catalogue.vectors.shape[1],
                }
            )
        if rounds > 1:
            print(
                f"round {round_ + 1}/{rounds}: "
                + ", ".join(
                    f"{v} {r[-1]['id_epoch_s'] + r[-1]['make_epoch_s']:.2f} s / {r[-1]['serving_ms']:.3f} ms"
                    for v, r in runs.items()
                ),
                flush=True,
            )
    if rounds > 1:
        print(paired_ratios(runs))
    # each figure: its median over the rounds
    return [
        {"variant": variant, **{key: statistics.median(run[key] for run in done) for key in done[0]}}
        for variant, done in runs.items()
    ]


def paired_ratios(runs: dict[str, list[dict]]) -> str:
    """Each variant over the ID model within each round (the two ran back to back), then the
    median and range over rounds: on a shared or virtual machine the speed drifts between rounds
    by more than the differences measured, and a ratio taken inside one round cancels the drift."""
    lines = ["paired by round (variant ÷ id in the same round): median [min–max]"]
    base = runs["id"]
    for variant, done in runs.items():
        if variant == "id":
            continue
        training = [
            (r["id_epoch_s"] + r["make_epoch_s"]) / (b["id_epoch_s"] + b["make_epoch_s"]) for r, b in zip(done, base)
        ]
        serving = [r["serving_ms"] / b["serving_ms"] for r, b in zip(done, base)]
        lines.append(
            f"  {variant}: training {statistics.median(training):.2f} [{min(training):.2f}–{max(training):.2f}], "
            f"serving {statistics.median(serving):.2f} [{min(serving):.2f}–{max(serving):.2f}]"
        )
    return "\n".join(lines)


def render(rows: list[dict], candidates: int) -> str:
    base = rows[0]
    lines = [
        f"| variant | ID epoch (s) | × ID | MAKE epoch (s) | training in all (s) | × ID | test-set inference (s) | "
        f"× ID | score {candidates} candidates (ms, median) | × ID |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        total = r["id_epoch_s"] + r["make_epoch_s"]
        lines.append(
            f"| {r['variant']} | {r['id_epoch_s']:.2f} | {r['id_epoch_s'] / base['id_epoch_s']:.2f} | "
            f"{r['make_epoch_s']:.2f} | {total:.2f} | {total / base['id_epoch_s']:.2f} | "
            f"{r['inference_s']:.2f} | {r['inference_s'] / base['inference_s']:.2f} | "
            f"{r['serving_ms']:.2f} | {r['serving_ms'] / base['serving_ms']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="shop directory (default: generate a tiny shop)")
    parser.add_argument("--embeddings", help="space directory (default: oracle concept vectors)")
    parser.add_argument("--history-length", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--make-dim",
        type=int,
        action="append",
        default=[],
        help="also time SimTier+MAKE with MAKE projected to this width (repeatable; issue 19's serving lever)",
    )
    parser.add_argument("--limit", type=int, default=0, help="use only the first N training and N test impressions")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="train and time every variant N times, interleaved; report each figure's median",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data
        if data_dir is None:
            from mmrank import shop

            shop.generate("tiny", seed=0, out=tmp)
            data_dir = tmp
        rows = measure(
            data_dir,
            args.embeddings,
            args.history_length,
            args.candidates,
            args.repeats,
            args.batch_size,
            args.limit,
            max(1, args.rounds),
            tuple(args.make_dim),
        )
    print(render(rows, args.candidates))
    added = added_products_ms(args.candidates, args.history_length, int(rows[0]["mm_dim"]))
    id_serving = rows[0]["serving_ms"]
    print(
        f"SimTier+MAKE's added matrix products alone at serving ({args.candidates} candidates, history "
        f"{args.history_length}): {added:.3f} ms, {added / id_serving:.2f}x the ID model's whole serving call "
        f"({id_serving:.3f} ms): serving SimTier+MAKE costs at least {1 + added / id_serving:.2f}x the ID model "
        "even if everything else it adds were free"
    )


if __name__ == "__main__":
    main()
