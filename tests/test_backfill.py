"""Backfill of a new space through the real Triton (the exported item encoder) into the real stores."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness import servers
from mmrank.encoders.backfill import (
    BackfillConfig,
    ShopCatalogue,
    backfill,
    parse_shard,
    resume_point,
    shard_range,
    windows,
)
from mmrank.encoders.triton_client import EncoderTarget
from mmrank.store import open_store

pytestmark = [pytest.mark.triton]
N_ITEMS = 480


def write_catalogue(directory: Path, n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """The two shop files the backfill reads (docs/architecture.md, "Shop data"), rows shuffled
    in the parquet file so the catalogue must order them by item id itself."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    titles = [f"{rng.choice(['red', 'blue', 'green'])} cotton shirt {i}" for i in range(n)]
    order = rng.permutation(n)
    pq.write_table(
        pa.table({"item_id": order.astype(np.int64), "title": [titles[i] for i in order]}), directory / "items.parquet"
    )
    np.save(directory / "images.npy", pixels)
    return pixels, titles


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[servers.Server, Any]]:
    import torch

    from mmrank.encoders.export import export_repository
    from mmrank.encoders.model import EncoderConfig, ItemEncoder

    torch.manual_seed(2)
    encoder = ItemEncoder(
        EncoderConfig(image_channels=(8, 16), text_width=32, text_layers=1, text_heads=2, vocab_size=512)
    ).eval()
    repo = tmp_path_factory.mktemp("repo")
    export_repository(encoder, repo, model_name="enc", max_batch_size=64, max_queue_delay_us=1000)
    server = servers.start_triton(repo, tmp_path_factory.mktemp("triton"))
    yield server, encoder
    server.stop()


def inferred_items(server: servers.Server, model: str = "enc") -> int:
    """Items Triton has embedded so far (its own counter, batch items included)."""
    with urllib.request.urlopen(str(server.extra["metrics_url"]), timeout=5) as response:
        text = response.read().decode()
    prefix = f'nv_inference_count{{model="{model}",'
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)))


# --- pure parts -------------------------------------------------------------------------------


def test_shards_cover_every_row_exactly_once() -> None:
    for n in (0, 1, 7, 480, 1001):
        for shards in (1, 2, 3, 8):
            rows = [r for i in range(shards) for r in range(*shard_range(n, i, shards))]
            assert rows == list(range(n))


def test_shard_argument_reads_the_indexed_job_index() -> None:
    assert parse_shard("2/4", {}) == (2, 4)
    assert parse_shard("/4", {"JOB_COMPLETION_INDEX": "3"}) == (3, 4)
    for bad in ("4/4", "x/2", "3", "/2"):
        with pytest.raises(ValueError):
            parse_shard(bad, {})


def test_resume_point_trusts_the_checkpoint_only_for_the_same_shard_size() -> None:
    assert resume_point(None, None, 100) == 0
    assert resume_point(40, 100, 100) == 40
    assert resume_point(40, 90, 100) == 0
    assert resume_point(140, 100, 100) == 100


def test_windows_split_rows_into_batches_in_flight() -> None:
    got = windows(10, 45, 10, 2)
    assert got == [[(10, 20), (20, 30)], [(30, 40), (40, 45)]]
    assert windows(5, 5, 10, 2) == []


# --- with the real servers --------------------------------------------------------------------


def test_two_shards_fill_a_new_space_to_full_coverage(
    triton: tuple[servers.Server, Any], redis_server: servers.Server, tmp_path: Path
) -> None:
    from mmrank.encoders.model import encode_items

    server, encoder = triton
    pixels, titles = write_catalogue(tmp_path / "shop", N_ITEMS)
    store = open_store(redis_server.url)
    catalogue = ShopCatalogue(tmp_path / "shop")
    target = EncoderTarget("e2", str(server.extra["grpc_url"]), "enc")
    results = [
        asyncio.run(
            backfill(
                BackfillConfig(
                    "e2",
                    target,
                    redis_server.url,
                    str(tmp_path / "shop"),
                    shard=i,
                    shards=2,
                    batch_size=32,
                    in_flight=3,
                ),
                store,
                catalogue,
            )
        )
        for i in range(2)
    ]
    info = store.space_info("e2")
    assert (info.items, info.catalogue_size, info.coverage) == (N_ITEMS, N_ITEMS, 1.0)
    assert {k: (v.done, v.total) for k, v in info.backfill.items()} == {"0/2": (240, 240), "1/2": (240, 240)}
    assert [r["embedded"] for r in results] == [240, 240]
    rows = np.array([0, 1, 239, 240, 479])
    got, found = store.get("e2", rows)
    assert found.all()
    np.testing.assert_allclose(got, encode_items(encoder, pixels[rows], [titles[i] for i in rows]), atol=3e-3)


def test_a_backfill_fills_the_space_and_catalogue_size_of_its_own_ranker_only(
    triton: tuple[servers.Server, Any], redis_server: servers.Server, tmp_path: Path
) -> None:
    """`mmrank backfill run` as the operator's Job runs it (MMRANK_SCOPE in its environment), on a
    Redis where another ranker already has a space of the same name with another catalogue."""
    from mmrank.store import Scope

    server, _ = triton
    write_catalogue(tmp_path / "shop", 40)
    neighbour = open_store(redis_server.url, Scope("ads", "shop-eu"))
    neighbour.create_space("e1", 128)
    neighbour.put("e1", [0, 1, 2], np.eye(3, 128, dtype=np.float32))
    neighbour.set_catalogue_size("e1", 7)
    argv = [
        sys.executable,
        "-m",
        "mmrank",
        "backfill",
        "run",
        "--space",
        "e1",
        "--shard",
        "0/1",
        "--encoder",
        f"{server.extra['grpc_url']}/enc",
        "--store",
        redis_server.url,
        "--catalogue",
        str(tmp_path / "shop"),
        "--no-progress",
    ]
    done = subprocess.run(
        argv, env={**os.environ, "MMRANK_SCOPE": "ads/shop"}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    info = open_store(redis_server.url, Scope("ads", "shop")).space_info("e1")
    assert (info.items, info.catalogue_size, info.coverage) == (40, 40, 1.0)
    other = neighbour.space_info("e1")
    assert (other.items, other.catalogue_size, other.backfill) == (3, 7, {})
    assert open_store(redis_server.url).spaces() == [], "nothing written as the local default ranker"
    bad = subprocess.run([*argv, "--scope", "shop"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "NAMESPACE/NAME" in bad.stderr


def test_backfill_killed_half_way_resumes_to_full_coverage_without_counting_work_twice(
    triton: tuple[servers.Server, Any], tmp_path: Path
) -> None:
    from mmrank import shop

    server, _ = triton
    shop.generate("tiny", seed=0, out=tmp_path / "shop")
    n_items = len(ShopCatalogue(tmp_path / "shop"))
    url = f"file://{tmp_path / 'store'}"
    batch, in_flight = 8, 1  # small windows: a kill half way is easy to hit even on a fast machine
    argv = [
        sys.executable,
        "-m",
        "mmrank",
        "backfill",
        "run",
        "--space",
        "e3",
        "--shard",
        "0/1",
        "--encoder",
        f"{server.extra['grpc_url']}/enc",
        "--store",
        url,
        "--catalogue",
        str(tmp_path / "shop"),
        "--batch-size",
        str(batch),
        "--in-flight",
        str(in_flight),
        "--progress",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    before = inferred_items(server)
    first = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = open_store(url)

    def progress() -> int:
        # space_info reads through a write transaction: it sees the killed writer's last commit
        # even when the kill left the lock file naming the one before (a plain read would not).
        try:
            shard = store.space_info("e3").backfill.get("0/1")
        except KeyError:
            return 0
        return shard.done if shard else 0

    deadline = time.monotonic() + 90
    while progress() < n_items // 2:
        assert first.poll() is None, first.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "the backfill never reached half way"
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    checkpoint = progress()
    assert n_items // 2 <= checkpoint < n_items, "killed after it finished: nothing left to resume"
    assert store.space_info("e3").coverage < 1.0

    second = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert result["resumed_from"] == checkpoint
    assert result["embedded"] == n_items - checkpoint
    assert (result["done"], result["total"], result["space_items"], result["coverage"]) == (
        n_items,
        n_items,
        n_items,
        1.0,
    )
    info = store.space_info("e3")
    assert (info.items, info.coverage, info.backfill["0/1"].done) == (n_items, 1.0, n_items)
    # Triton's own count: the whole catalogue once, plus at most the two windows the kill lost
    # (one being written, one being embedded).
    repeated = inferred_items(server) - before - n_items
    assert 0 <= repeated <= 2 * batch * in_flight
    assert f"{n_items}/{n_items}" in second.stderr, "the progress bar reports the shard"
