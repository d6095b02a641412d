"""Resuming a backfill whose sharding changed (issue 17: a new `parallelism` mid-backfill).

A changed parallelism is a new Job with another shard count N; its shards find no checkpoint of
their own, and must still skip what the old shards stored (and never skip what they did not)."""

from __future__ import annotations

import itertools

import pytest

from mmrank.encoders.backfill import resume_from, shard_range, stored_runs


def test_a_new_shard_skips_the_prefix_the_old_sharding_stored() -> None:
    # 100 rows, 2 old shards: 0/2 stored rows 0-39, 1/2 stored rows 50-59
    old = {"0/2": (40, 50), "1/2": (10, 50)}
    assert stored_runs(old, 100) == [(0, 40), (50, 60)]
    # 4 new shards: [0,25) fully stored, [25,50) stored up to 40, [50,75) up to 60, [75,100) nothing
    assert [resume_from(old, 100, i, 4) for i in range(4)] == [25, 15, 10, 0]


def test_its_own_checkpoint_and_another_catalogue_size() -> None:
    assert resume_from({"1/4": (7, 25)}, 100, 1, 4) == 7
    assert resume_from({"1/4": (7, 30)}, 100, 1, 4) == 0  # recorded for another catalogue
    assert resume_from({"0/1": (100, 100)}, 100, 3, 4) == 25  # the one-pod path stored everything
    assert resume_from({}, 100, 0, 1) == 0
    assert resume_from({"garbage": (5, 5)}, 100, 0, 1) == 0


@pytest.mark.parametrize(("old_n", "new_n"), [(2, 4), (4, 2), (3, 5), (1, 4), (4, 1)])
def test_resume_never_skips_a_row_that_was_not_stored(old_n: int, new_n: int) -> None:
    """Every combination of old progress: what a new shard skips was stored by some old shard."""
    n = 60
    sizes = [shard_range(n, i, old_n) for i in range(old_n)]
    for dones in itertools.product(*[range(0, b - a + 1, max(1, (b - a) // 3)) for a, b in sizes]):
        old = {f"{i}/{old_n}": (d, b - a) for i, ((a, b), d) in enumerate(zip(sizes, dones, strict=True))}
        stored = {r for a, b in stored_runs(old, n) for r in range(a, b)}
        for shard in range(new_n):
            start, stop = shard_range(n, shard, new_n)
            skip = resume_from(old, n, shard, new_n)
            assert 0 <= skip <= stop - start
            assert set(range(start, start + skip)) <= stored
            assert start + skip == stop or start + skip not in stored  # and skips all it may
