"""The predictor's item vector cache on the real Redis store: what it saves, and that a re-embedded
item is never served from a stale copy (the store's version log, mmrank/store.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from harness import servers
from mmrank.predictors.item_cache import DENSE_IDS, SYNC_LIMIT, ItemVectorCache, LogState, sync_decision
from mmrank.store import RedisStore, open_store

SPACE, DIM = "e1", 8


def vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def store(redis_server: servers.Server) -> Any:
    store = open_store(redis_server.url)
    assert isinstance(store, RedisStore)
    store.create_space(SPACE, DIM)
    store.put(SPACE, np.arange(100), vectors(100, seed=1))
    store.put_history(7, [3, 4, 5])
    yield store
    store.close()


def read(
    cache: ItemVectorCache, store: Any, ids: list[int], user: int | None = None
) -> tuple[Any, np.ndarray, np.ndarray]:
    history, log = cache.sync(store, SPACE, user, 10)
    found_vectors, found, hits = cache.vectors(store, SPACE, DIM, log, np.asarray(ids, dtype=np.int64))
    assert 0 <= hits <= int(found.sum())
    return history, found_vectors, found


def test_a_second_read_comes_from_the_cache_and_equals_the_store(store: Any) -> None:
    cache = ItemVectorCache(capacity=1000)
    history, first, found = read(cache, store, [5, 17, 5, 500], user=7)
    assert history.tolist() == [3, 4, 5] and found.tolist() == [True, True, True, False]
    assert (cache.stats.hits, cache.stats.misses) == (0, 4)
    _, second, _ = read(cache, store, [17, 5, 500])
    assert (cache.stats.hits, cache.stats.misses) == (2, 5)  # 500 has no vector: asked again, never cached
    expected, _ = store.get(SPACE, [5, 17, 500])
    np.testing.assert_array_equal(first[[0, 1, 3]], expected[[0, 1, 2]])
    np.testing.assert_array_equal(second, expected[[1, 0, 2]])


def test_a_re_embedded_item_is_never_served_stale(store: Any) -> None:
    cache = ItemVectorCache(capacity=1000)
    read(cache, store, [5, 6])
    new = vectors(1, seed=2)
    assert store.put(SPACE, [5], new).tolist() == [True]  # the embedder rewrote item 5
    _, got, _ = read(cache, store, [5, 6])
    np.testing.assert_array_equal(got[0], store.get(SPACE, [5])[0][0])  # the new vector (float16 in the store)
    assert np.abs(got[0] - new[0]).max() < 2e-3 and cache.stats.dropped == 1
    assert cache.stats.hits == 1  # item 6 still came from the cache


def test_a_read_racing_with_a_rewrite_does_not_refill_the_cache_with_the_old_vector(store: Any) -> None:
    """Request A reads item 5 from Redis; before A stores it in the cache, the embedder rewrites 5
    and request B applies that change. A's copy is older than the change: it must not be kept."""
    cache = ItemVectorCache(capacity=1000)
    read(cache, store, [1])  # the cache holds the space
    new = vectors(1, seed=3)

    class RewriteDuringRead(RedisStore):
        def get(self, space: str, item_ids: Any) -> tuple[np.ndarray, np.ndarray]:
            answer = super().get(space, item_ids)  # A's (old) vector of item 5
            store.put(SPACE, [5], new)
            read(cache, store, [1])  # B: its sync drops item 5
            return answer

    racing = RewriteDuringRead(store.client)
    _, old, _ = read(cache, racing, [5])
    assert np.abs(old[0] - new[0]).max() > 0.1  # A was answered with what it read
    _, after, _ = read(cache, store, [5])
    assert np.abs(after[0] - new[0]).max() < 2e-3


def test_a_re_created_space_or_a_trimmed_log_starts_the_cache_afresh(store: Any) -> None:
    cache = ItemVectorCache(capacity=1000)
    read(cache, store, [5])
    store.delete_space(SPACE)
    store.create_space(SPACE, DIM)
    store.put(SPACE, [5], vectors(1, seed=4))
    _, got, found = read(cache, store, [5])
    assert found.all() and np.abs(got[0] - vectors(1, seed=4)[0]).max() < 2e-3 and cache.stats.resets >= 1
    log = LogState(b"1.0", seq=10, floor=8, since=7, changed=())
    assert sync_decision(b"1.0", log) == "reset"  # changes 8 and older were dropped from the log
    assert sync_decision(b"1.0", LogState(b"1.0", 10, 8, 8, (5,))) == "apply"
    assert sync_decision(b"1.0", LogState(b"2.0", 10, 0, 9, ())) == "reset"  # another epoch
    assert sync_decision(b"1.0", LogState(b"1.0", 10, 0, 9, tuple(range(SYNC_LIMIT)))) == "reset"
    assert sync_decision(None, LogState(None, 0, 0, None, ())) == "bypass"  # no log: read through


def test_when_full_the_oldest_entries_give_up_their_slots(store: Any) -> None:
    cache = ItemVectorCache(capacity=4)
    read(cache, store, [1, 2, 3, 4])
    read(cache, store, [5, 6])  # 1 and 2 leave
    before = cache.stats.hits
    _, got, _ = read(cache, store, [3, 4, 5, 6, 1])
    assert cache.stats.hits - before == 4
    np.testing.assert_array_equal(got, store.get(SPACE, [3, 4, 5, 6, 1])[0])


def test_ids_beyond_the_dense_index_are_cached_and_dropped_too(store: Any) -> None:
    big = DENSE_IDS + 12345
    store.put(SPACE, [big], vectors(1, seed=5))
    cache = ItemVectorCache(capacity=100)
    read(cache, store, [big, 3])
    _, got, found = read(cache, store, [big, 3])
    assert found.all() and cache.stats.hits == 2
    store.put(SPACE, [big], vectors(1, seed=6))
    _, got, _ = read(cache, store, [big])
    assert np.abs(got[0] - vectors(1, seed=6)[0]).max() < 2e-3 and cache.stats.dropped == 1
