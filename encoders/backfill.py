"""Backfill: re-embed the whole catalogue into a new space, one shard per Indexed Job index.

Shard I of N owns the contiguous rows [I*n//N, (I+1)*n//N) of the catalogue and walks them in
order, `in_flight` Triton requests of `batch_size` items at a time (the next window is embedded
while the previous one is written). After each window is stored it reports `done` to the store
(`report_backfill(space, "I/N", done, total)`): that is both the progress the operator reads and
the checkpoint a restarted pod resumes from, so a kill costs at most two windows of repeated work
(the one being written, the one being embedded), and a repeated item overwrites its own vector (the space's item
count, hence coverage, never counts it twice). Failures end the process: the Job restarts the pod.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mmrank.encoders.triton_client import EncoderTarget, TritonEncoder
from mmrank.store import DEFAULT_SCOPE, EmbeddingStore, Scope, SpaceNotFound, open_store


@dataclasses.dataclass
class BackfillConfig:
    space: str
    target: EncoderTarget
    store_url: str
    catalogue: str
    shard: int = 0
    shards: int = 1
    batch_size: int = 64
    in_flight: int = 4
    dtype: str = "float16"
    progress: bool = True
    scope: Scope = DEFAULT_SCOPE  # the ranker whose space this is

    @property
    def shard_name(self) -> str:
        return f"{self.shard}/{self.shards}"


def parse_shard(text: str, env: Mapping[str, str]) -> tuple[int, int]:
    """ "I/N" -> (I, N); "/N" takes I from JOB_COMPLETION_INDEX (a Kubernetes Indexed Job)."""
    index, sep, count = text.partition("/")
    if not sep:
        raise ValueError(f"--shard must be I/N, got {text!r}")
    index = index or env.get("JOB_COMPLETION_INDEX", "")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise ValueError(
            f"--shard must be I/N with integers (I from JOB_COMPLETION_INDEX when empty), got {text!r}"
        ) from None
    if not 0 <= i < n:
        raise ValueError(f"shard index must be in [0, {n}), got {i}")
    return i, n


def shard_range(n_items: int, shard: int, shards: int) -> tuple[int, int]:
    return shard * n_items // shards, (shard + 1) * n_items // shards


def resume_point(done: int | None, recorded_total: int | None, total: int) -> int:
    """Where a shard restarts: its checkpoint, unless the shard changed size (then from scratch)."""
    if done is None or recorded_total != total:
        return 0
    return max(0, min(done, total))


def stored_runs(checkpoints: Mapping[str, tuple[int, int]], n_items: int) -> list[tuple[int, int]]:
    """Rows [start, stop) the checkpoints of every sharding say are stored, for a catalogue of
    `n_items` (a checkpoint whose shard size differs is from another catalogue: ignored)."""
    runs = []
    for name, (done, total) in checkpoints.items():
        try:
            index, count = parse_shard(name, {})
        except ValueError:
            continue
        start, stop = shard_range(n_items, index, count)
        if stop - start == total and done > 0:
            runs.append((start, start + min(done, total)))
    return sorted(runs)


def resume_from(checkpoints: Mapping[str, tuple[int, int]], n_items: int, shard: int, shards: int) -> int:
    """Where shard I of N starts: past the stored prefix of its rows, whatever sharding stored them.

    A changed `parallelism` (a new Job with another N) finds no checkpoint of its own; the old
    shards' checkpoints still say which rows are stored, so a new shard skips the part of its range
    they cover from its start (rows stored further in are embedded again: a repeated row rewrites
    its own vector, never counted twice). Its own checkpoint is one of them."""
    start, stop = shard_range(n_items, shard, shards)
    reach = start
    for run_start, run_stop in stored_runs(checkpoints, n_items):
        if run_start <= reach < run_stop:
            reach = run_stop
    return min(reach, stop) - start


def windows(start: int, stop: int, batch_size: int, in_flight: int) -> list[list[tuple[int, int]]]:
    """Rows [start, stop) as windows of up to `in_flight` batches of `batch_size` rows."""
    batches = [(i, min(i + batch_size, stop)) for i in range(start, stop, batch_size)]
    return [batches[i : i + in_flight] for i in range(0, len(batches), in_flight)]


class Catalogue(Protocol):
    """What a backfill reads: the catalogue in a fixed order (row i), its ids, titles, images."""

    def __len__(self) -> int: ...

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(item ids int64 [k], images uint8 [k, 64, 64, 3], titles) of rows [start, stop)."""
        ...


@dataclasses.dataclass
class ArrayCatalogue:
    """A catalogue already in memory (benchmarks, or a source that is not a shop directory)."""

    item_ids: np.ndarray
    images: np.ndarray
    titles: list[str]

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        return self.item_ids[start:stop], np.asarray(self.images[start:stop], dtype=np.uint8), self.titles[start:stop]


class ShopCatalogue:
    """The shop's catalogue (docs/architecture.md, "Shop data"): row = item id, images mapped
    from disk so a shard reads only its own rows."""

    def __init__(self, directory: str | Path) -> None:
        import pyarrow.parquet as pq

        directory = Path(directory)
        table = pq.read_table(directory / "items.parquet", columns=["item_id", "title"])
        order = np.argsort(table.column("item_id").to_numpy())
        self.item_ids = table.column("item_id").to_numpy()[order].astype(np.int64)
        titles = table.column("title").to_pylist()
        self.titles = [titles[i] for i in order]
        self.images = np.load(directory / "images.npy", mmap_mode="r")
        if len(self.images) < int(self.item_ids.max(initial=-1)) + 1:
            raise ValueError(
                f"{directory}: images.npy has {len(self.images)} rows for item ids up to {self.item_ids.max()}"
            )

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        ids = self.item_ids[start:stop]
        return ids, np.asarray(self.images[ids], dtype=np.uint8), self.titles[start:stop]


def checkpoint(store: EmbeddingStore, space: str, shard_name: str) -> tuple[int | None, int | None]:
    shard = store.space_info(space).backfill.get(shard_name)
    return (shard.done, shard.total) if shard else (None, None)


def checkpoints(store: EmbeddingStore, space: str) -> dict[str, tuple[int, int]]:
    """Every shard's checkpoint of the space, of this sharding and any earlier one."""
    return {name: (shard.done, shard.total) for name, shard in store.space_info(space).backfill.items()}


async def store_window(
    store: EmbeddingStore,
    config: BackfillConfig,
    ids: np.ndarray,
    vectors: np.ndarray,
    done: int,
    total: int,
    on_progress: Callable[[int], None],
) -> None:
    """Write one window, then move the checkpoint past it (while Triton embeds the next one).

    Rows go in with event time 0: the backfill fills what no item event has written, and never
    overwrites the vector of an event the embedder stored meanwhile (a rerun rewrites its own)."""
    await asyncio.to_thread(store.put, config.space, ids, vectors, np.zeros(len(ids)))
    await asyncio.to_thread(store.report_backfill, config.space, config.shard_name, done, total)
    on_progress(len(ids))


async def backfill(
    config: BackfillConfig,
    store: EmbeddingStore,
    catalogue: Catalogue,
    on_progress: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:
    encoder = TritonEncoder(config.target)
    writing: asyncio.Task[None] | None = None
    try:
        _, dim = await encoder.describe()
        await asyncio.to_thread(store.create_space, config.space, dim, config.dtype)
        await asyncio.to_thread(store.set_catalogue_size, config.space, len(catalogue))
        start, stop = shard_range(len(catalogue), config.shard, config.shards)
        total = stop - start
        done = resume_from(checkpoints(store, config.space), len(catalogue), config.shard, config.shards)
        resumed_from = done
        await asyncio.to_thread(store.report_backfill, config.space, config.shard_name, done, total)
        on_progress(done)
        began = time.perf_counter()
        for window in windows(start + done, stop, config.batch_size, config.in_flight):
            parts = [catalogue.rows(a, b) for a, b in window]
            vectors = await asyncio.gather(*(encoder.embed(images, titles) for _, images, titles in parts))
            if writing is not None:
                await writing  # the checkpoint only ever moves past windows that are stored
            ids = np.concatenate([p[0] for p in parts])
            done += len(ids)
            writing = asyncio.create_task(
                store_window(store, config, ids, np.concatenate(vectors), done, total, on_progress)
            )
        if writing is not None:
            await writing
        elapsed = time.perf_counter() - began
    finally:
        if writing is not None and not writing.done():
            writing.cancel()
        await encoder.close()
    info = store.space_info(config.space)
    embedded = done - resumed_from
    return {
        "space": config.space,
        "shard": config.shard_name,
        "done": done,
        "total": total,
        "resumed_from": resumed_from,
        "embedded": embedded,
        "items_per_s": round(embedded / elapsed, 1) if elapsed > 0 and embedded else 0.0,
        "space_items": info.items,
        "coverage": info.coverage,
    }


def run(config: BackfillConfig) -> dict[str, Any]:
    """The CLI's entry: open the store and catalogue, show a progress bar, backfill one shard."""
    from tqdm import tqdm

    store = open_store(config.store_url, config.scope)
    catalogue = ShopCatalogue(config.catalogue)
    start, stop = shard_range(len(catalogue), config.shard, config.shards)
    with tqdm(
        total=stop - start,
        desc=f"backfill {config.space} {config.shard_name}",
        unit="item",
        disable=not config.progress,
        mininterval=0.5,
    ) as bar:
        result = asyncio.run(backfill(config, store, catalogue, bar.update))
    store.close()
    return result


__all__ = [
    "ArrayCatalogue",
    "BackfillConfig",
    "Catalogue",
    "ShopCatalogue",
    "SpaceNotFound",
    "backfill",
    "parse_shard",
    "run",
    "shard_range",
]
