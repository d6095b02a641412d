"""One suite for both embedding-store back ends: the real Redis and the embedded LMDB file store."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mmrank import store as store_mod
from mmrank.store import EmbeddingStore, SpaceNotFound, open_store


@pytest.fixture(params=["redis", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EmbeddingStore]:
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        url = server.url
    else:
        url = f"file://{tmp_path / 'store'}"
    opened = open_store(url)
    yield opened
    opened.close()


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("dtype, tolerance", [("float16", 1e-3), ("int8", 1e-2)])
def test_put_then_get_returns_the_vectors_within_the_dtype_precision(
    store: EmbeddingStore, dtype: str, tolerance: float
) -> None:
    store.create_space("e1", 128, dtype)
    vectors = unit_vectors(50, 128)
    store.put("e1", np.arange(100, 150), vectors)
    got, found = store.get("e1", [149, 7, 100])
    assert got.dtype == np.float32 and got.shape == (3, 128)
    assert found.tolist() == [True, False, True]
    np.testing.assert_allclose(got[0], vectors[49], atol=tolerance)
    np.testing.assert_allclose(got[2], vectors[0], atol=tolerance)
    assert not got[1].any()


def test_spaces_are_independent_and_listed(store: EmbeddingStore) -> None:
    store.create_space("e1", 8)
    store.create_space("e2", 4, "int8")
    store.put("e1", [1], np.ones((1, 8)))
    store.put("e2", [2], np.full((1, 4), -0.5))
    assert store.spaces() == ["e1", "e2"]
    assert store.get("e1", [1, 2])[1].tolist() == [True, False]
    assert store.get("e2", [1, 2])[1].tolist() == [False, True]
    np.testing.assert_allclose(store.get("e2", [2])[0], np.full((1, 4), -0.5), atol=1e-2)


def test_reputting_an_item_overwrites_it_and_counts_it_once(store: EmbeddingStore) -> None:
    store.create_space("e1", 16)
    store.set_catalogue_size("e1", 10)
    store.put("e1", range(5), unit_vectors(5, 16, seed=1))
    newer = unit_vectors(5, 16, seed=2)
    store.put("e1", range(5), newer)
    info = store.space_info("e1")
    assert info.items == 5
    assert info.coverage == pytest.approx(0.5)
    np.testing.assert_allclose(store.get("e1", range(5))[0], newer, atol=1e-3)


def test_an_older_event_never_overwrites_a_newer_vector(store: EmbeddingStore) -> None:
    store.create_space("e1", 8)
    newer, older, again = unit_vectors(3, 8, seed=5)
    assert store.put("e1", [1], newer[None], event_times=[200.0]).tolist() == [True]
    assert store.put("e1", [1], older[None], event_times=[100.0]).tolist() == [False], "a replayed old event"
    np.testing.assert_allclose(store.get("e1", [1])[0][0], newer, atol=1e-3)
    assert store.put("e1", [1], again[None], event_times=[200.0]).tolist() == [True], "the same event re-embedded"
    np.testing.assert_allclose(store.get("e1", [1])[0][0], again, atol=1e-3)
    # One batch: a stale row is kept, the rest written; a repeated item keeps its newest row.
    rows = unit_vectors(4, 8, seed=6)
    written = store.put("e1", [1, 2, 3, 3], rows, event_times=[150.0, 50.0, 20.0, 10.0])
    assert written.tolist() == [False, True, True, False]
    got, found = store.get("e1", [1, 2, 3])
    np.testing.assert_allclose(got, np.stack([again, rows[1], rows[2]]), atol=1e-3)
    times = store.event_times("e1", [1, 2, 3, 4])
    assert times[:3].tolist() == [200.0, 50.0, 20.0] and np.isnan(times[3])
    assert store.space_info("e1").items == 3


def test_a_put_without_event_times_is_stamped_now(store: EmbeddingStore) -> None:
    import time

    store.create_space("e1", 4)
    before = time.time()
    assert store.put("e1", [1, 2], np.eye(2, 4)).tolist() == [True, True]
    assert (store.event_times("e1", [1, 2]) >= before).all()
    assert store.put("e1", [1], np.eye(1, 4), event_times=[before - 60]).tolist() == [False]
    with pytest.raises(ValueError, match="event times"):
        store.put("e1", [1, 2], np.eye(2, 4), event_times=[1.0])
    with pytest.raises(ValueError, match="NaN"):
        store.put("e1", [1], np.eye(1, 4), event_times=[float("nan")])
    with pytest.raises(SpaceNotFound):
        store.event_times("nope", [1])


def test_racing_writers_leave_the_vector_of_the_newest_event(store: EmbeddingStore) -> None:
    """Four threads write one item with shuffled event times: check and write are one step, so
    the vector left is always the newest event's (a read-then-write would let an older one in)."""
    import threading

    store.create_space("e1", 4)
    times = np.random.default_rng(7).permutation(400).astype(float)
    vectors = np.zeros((400, 4), dtype=np.float32)
    vectors[:, 0] = 1.0
    vectors[:, 1] = times / 400  # each event's vector names its time

    def write(part: np.ndarray) -> None:
        for i in part:
            store.put("e1", [9], vectors[i][None], event_times=[times[i]])

    threads = [threading.Thread(target=write, args=(part,)) for part in np.array_split(np.arange(400), 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.event_times("e1", [9]).tolist() == [399.0]
    np.testing.assert_allclose(store.get("e1", [9])[0][0], [1.0, 399 / 400, 0, 0], atol=1e-3)


def test_the_change_log_records_written_rows_only(redis_server) -> None:  # type: ignore[no-untyped-def]
    """The predictor's cache reads the version log (mmrank:embver / mmrank:embchanges): a put
    whose rows were all stale changes nothing there."""
    store = open_store(redis_server.url)
    store.create_space("e1", 4)
    store.put("e1", [1, 2], np.eye(2, 4), event_times=[10.0, 10.0])
    store.put("e1", [1], np.eye(1, 4), event_times=[5.0])
    client = store.client  # type: ignore[attr-defined]
    assert int(client.hget(store.versions_key("e1"), "seq")) == 1  # type: ignore[attr-defined]
    store.put("e1", [1, 2], np.eye(2, 4), event_times=[11.0, 9.0])
    assert int(client.hget(store.versions_key("e1"), "seq")) == 2  # type: ignore[attr-defined]
    changes = client.zrange(store.changes_key("e1"), 0, -1, withscores=True)  # type: ignore[attr-defined]
    assert changes == [(b"2", 1.0), (b"1", 2.0)]


def test_space_info_reports_metadata_coverage_and_backfill(store: EmbeddingStore) -> None:
    created = store.create_space("e3", 32, "int8")
    assert created.items == 0 and created.coverage == 0.0 and created.catalogue_size == 0
    store.put("e3", range(4), unit_vectors(4, 32))
    assert store.space_info("e3").coverage == 0.0, "unknown catalogue size must never count as covered"
    store.set_catalogue_size("e3", 8)
    store.report_backfill("e3", "0/2", 3, 4)
    store.report_backfill("e3", "1/2", 4, 4)
    store.report_backfill("e3", "0/2", 4, 4)
    info = store.space_info("e3")
    assert (info.version, info.dim, info.dtype, info.items, info.catalogue_size) == ("e3", 32, "int8", 4, 8)
    assert info.coverage == pytest.approx(0.5)
    assert info.created <= created.created + 1e-6
    assert sorted(info.backfill) == ["0/2", "1/2"]
    assert (info.backfill_done, info.backfill_total) == (8, 8)
    store.set_catalogue_size("e3", 2)
    assert store.space_info("e3").coverage == 1.0


def test_the_catalogue_size_is_kept_per_space_and_leaves_with_it(store: EmbeddingStore) -> None:
    """A backfill of e2 over a larger catalogue must not lower e1's coverage (it was one global
    key): each space counts against the catalogue its own backfill saw."""
    for space, size in (("e1", 4), ("e2", 8)):
        store.create_space(space, 8)
        store.put(space, range(4), np.ones((4, 8)))
        store.set_catalogue_size(space, size)
    assert (store.space_info("e1").coverage, store.space_info("e2").coverage) == (1.0, 0.5)
    store.delete_space("e1")
    assert (store.catalogue_size("e1"), store.catalogue_size("e2")) == (0, 8)
    assert store.create_space("e1", 8).coverage == 0.0, "a recreated space starts with an unknown catalogue"
    with pytest.raises(SpaceNotFound):
        store.set_catalogue_size("never-created", 3)


def test_create_space_is_idempotent_but_refuses_another_layout(store: EmbeddingStore) -> None:
    first = store.create_space("e1", 8)
    store.put("e1", [3], np.ones((1, 8)))
    again = store.create_space("e1", 8)
    assert again.created == first.created and again.items == 1
    with pytest.raises(ValueError, match="dim=8"):
        store.create_space("e1", 16)
    with pytest.raises(ValueError):
        store.create_space("e1", 8, "int8")


def test_missing_space_and_bad_vectors_are_errors(store: EmbeddingStore) -> None:
    with pytest.raises(SpaceNotFound):
        store.get("nope", [1])
    with pytest.raises(SpaceNotFound):
        store.put("nope", [1], np.ones((1, 8)))
    with pytest.raises(SpaceNotFound):
        store.space_info("nope")
    store.create_space("e1", 8)
    with pytest.raises(ValueError, match="shape"):
        store.put("e1", [1, 2], np.ones((2, 7)))
    with pytest.raises(ValueError, match="NaN"):
        store.put("e1", [1], np.full((1, 8), np.nan))
    with pytest.raises(ValueError):
        store.create_space("bad name", 8)
    assert store.space_info("e1").items == 0


def test_delete_space_removes_vectors_metadata_and_progress(store: EmbeddingStore) -> None:
    store.create_space("old", 8)
    store.create_space("new", 8)
    store.put("old", range(3), np.ones((3, 8)))
    store.report_backfill("old", "0/1", 3, 3)
    store.delete_space("old")
    store.delete_space("never-created")
    assert store.spaces() == ["new"]
    with pytest.raises(SpaceNotFound):
        store.space_info("old")
    recreated = store.create_space("old", 8)
    assert recreated.items == 0 and recreated.backfill == {}
    assert np.isnan(store.event_times("old", [0])).all()
    assert store.put("old", [0], np.ones((1, 8)), event_times=[0.0]).tolist() == [True], "no event time left over"


def test_history_keeps_order_replaces_or_appends_and_truncates(store: EmbeddingStore) -> None:
    store.put_history(7, [5, 6, 7])
    store.put_history(7, [8, 9], append=True)
    assert store.get_history(7, 10).tolist() == [5, 6, 7, 8, 9]
    assert store.get_history(7, 2).tolist() == [8, 9]
    assert store.get_history(7, 0).tolist() == []
    store.put_history(7, [1])
    assert store.get_history(7, 10).tolist() == [1]
    unknown = store.get_history(99, 5)
    assert unknown.dtype == np.int64 and unknown.size == 0


def test_a_second_process_sees_what_the_first_wrote(store: EmbeddingStore, tmp_path: Path) -> None:
    store.create_space("e1", 4)
    store.set_catalogue_size("e1", 3)
    url = store.client.connection_pool.connection_kwargs if isinstance(store, store_mod.RedisStore) else None
    target = f"redis://{url['host']}:{url['port']}/{url.get('db', 0)}" if url else f"file://{store.path}"  # type: ignore[attr-defined]
    code = (
        "import numpy as np, sys; from mmrank.store import open_store; "
        "s = open_store(sys.argv[1]); s.put('e1', [0, 1], np.eye(2, 4)); print(s.space_info('e1').items)"
    )
    done = subprocess.run([sys.executable, "-c", code, target], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"
    got, found = store.get("e1", [0, 1, 2])
    assert found.tolist() == [True, True, False]
    np.testing.assert_allclose(got[:2], np.eye(2, 4), atol=1e-3)
    assert store.space_info("e1").coverage == pytest.approx(2 / 3)


def test_codec_roundtrip_for_zero_and_large_vectors() -> None:
    vectors = np.array([[0.0, 0.0, 0.0], [300.0, -2.0, 1e-3]], dtype=np.float32)
    for dtype in store_mod.DTYPES:
        blobs = store_mod.encode_vectors(vectors, dtype)
        got, found = store_mod.decode_vectors([*blobs, None], 3, dtype)
        assert found.tolist() == [True, True, False]
        assert not got[0].any() and not got[2].any()
        np.testing.assert_allclose(got[1], vectors[1], rtol=1e-2, atol=300 / 127)
    assert len(store_mod.encode_vectors(vectors, "float16")[0]) == 6
    assert len(store_mod.encode_vectors(vectors, "int8")[0]) == 3 + 4


def test_open_store_rejects_unknown_schemes() -> None:
    with pytest.raises(ValueError, match="redis://"):
        open_store("http://example.com/x")


def test_store_module_does_not_import_torch() -> None:
    code = "import sys, mmrank.store; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_a_password_comes_from_the_environment_when_the_url_has_none(
    redis_client, redis_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    redis_client.config_set("requirepass", "s3cret")
    with pytest.raises(redis.AuthenticationError):
        open_store(redis_server.url).spaces()
    monkeypatch.setenv("MMRANK_STORE_PASSWORD", "s3cret")
    store = open_store(redis_server.url)
    store.create_space("e1", 4)
    assert store.spaces() == ["e1"]


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_batch_decode_keeps_order_and_gaps_and_refuses_a_truncated_vector(dtype):
    from mmrank.store import decode_vectors, encode_vectors

    vectors = np.random.default_rng(3).standard_normal((6, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    blobs: list = encode_vectors(vectors, dtype)
    blobs[0] = blobs[4] = None
    out, found = decode_vectors(blobs, 16, dtype)
    assert found.tolist() == [False, True, True, True, False, True]
    assert not out[~found].any()
    np.testing.assert_allclose(out[found], vectors[found], atol=5e-3)
    blobs[2] = blobs[2][:-1]
    with pytest.raises(ValueError):
        decode_vectors(blobs, 16, dtype)


def test_space_info_sees_the_last_commit_of_a_writer_killed_while_committing(tmp_path: Path) -> None:
    """LMDB readers take the snapshot the lock file names; a writer killed after writing its
    commit but before publishing it there leaves every reader one commit behind until the next
    write (what made test_backfill's killed-half-way read flaky). Kills a writer until that
    happens, and checks that space_info, which reads through a write transaction, sees the commit."""
    import signal
    import time

    url = f"file://{tmp_path / 'store'}"
    store = open_store(url)
    store.create_space("e1", 4)
    writer = (
        "import sys; from mmrank.store import open_store; s = open_store(sys.argv[1]); i = s.catalogue_size('e1')\n"
        "while True:\n    i += 1; s.set_catalogue_size('e1', i)"
    )
    lagging = 0
    for _ in range(40):
        started = store.space_info("e1").catalogue_size
        process = subprocess.Popen([sys.executable, "-c", writer, url])
        deadline = time.monotonic() + 30
        while store.catalogue_size("e1") < started + 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        seen_by_a_reader = store.catalogue_size("e1")  # a read transaction
        newest = store.space_info("e1").catalogue_size
        assert newest >= seen_by_a_reader
        lagging += newest > seen_by_a_reader
        if lagging:
            break
    assert lagging, "no kill left the readers behind in 40 tries"
