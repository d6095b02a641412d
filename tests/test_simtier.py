"""SimTier against the authors' definition (alimama-tech/MUSE, model/base_model/simtier.py).

The reference bins a cosine similarity s with `ceil(s * (1/w)) + 1/w`, the product in float32,
into `2/w + 2` bins, and returns `log(1 + count) * weight` per bin. Every expected bin below is
derived by hand from that formula (working shown beside it), not computed by the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmrank.predictors.model import Ranker, RankerConfig, RankerInputs, SimTier, cosine_matrix

# (similarity, expected bin with w = 0.1, working)
HAND_DERIVED = [
    (-1.0, 0, "ceil(-10) + 10"),
    (-0.95, 1, "float32(-0.95)*10 = -9.4999999 -> ceil -9, +10"),
    (-0.7, 3, "float32(-0.7)*10 rounds to -7.0 exactly -> -7 + 10: boundary closes tier (-0.8, -0.7]"),
    (-0.3, 7, "float32(-0.3)*10 rounds to -3.0 exactly -> -3 + 10"),
    (-0.05, 10, "ceil(-0.5) = -0 -> 10"),
    (0.0, 10, "ceil(0) + 10: tier (-0.1, 0]"),
    (0.05, 11, "ceil(0.5) = 1 -> 11"),
    (0.1, 11, "float32(0.1)*10 rounds to 1.0 exactly -> 1 + 10"),
    (0.3, 13, "float32(0.3)*10 = 3.0000001192 is a float32 tie, rounds to even 3.0 -> 3 + 10"),
    (0.31, 14, "ceil(3.1) = 4 -> 14"),
    (0.7, 17, "float32(0.7)*10 rounds to 7.0 -> 7 + 10"),
    (0.99, 20, "ceil(9.9) = 10 -> 20"),
    (1.0, 20, "ceil(10) + 10"),
]


@pytest.mark.parametrize("similarity, expected, working", HAND_DERIVED)
def test_tier_index_matches_reference_formula(similarity: float, expected: int, working: str) -> None:
    assert SimTier(0.1).tier_index(torch.tensor([similarity])).item() == expected, working


def test_twenty_two_bins_at_width_tenth_and_configurable_width() -> None:
    assert SimTier(0.1).n_bins == 22
    wide = SimTier(0.2)
    assert wide.n_bins == 12  # 2 * 5 + 2
    # w = 0.2: float32(0.3)*5 = 1.50000006 -> ceil 2 -> 7; float32(0.4)*5 rounds to 2.0 -> 7;
    # -1 -> ceil(-5) + 5 = 0; 1 -> 10; 0.41 -> ceil(2.05) = 3 -> 8
    got = wide.tier_index(torch.tensor([0.3, 0.4, -1.0, 1.0, 0.41])).tolist()
    assert got == [7, 7, 0, 10, 8]
    with pytest.raises(ValueError):
        SimTier(0.0)


def test_overshoot_of_identical_vectors_stays_in_the_top_tier() -> None:
    # float arithmetic can give 1 + 1e-7 for identical vectors; the reference would use bin 21
    # for it, we clamp so that identical items always share tier 20 (documented deviation).
    assert SimTier(0.1).tier_index(torch.tensor([1.0000001, -1.0000001])).tolist() == [20, 0]


def test_histogram_counts_log_and_weight_with_padding() -> None:
    tier = SimTier(0.1)
    with torch.no_grad():
        tier.weight.copy_(torch.arange(22, dtype=torch.float32) + 1.0)  # weight of bin k = k + 1
    # one row of 6 positions, the last one padding (its 0.3 must not count)
    cosine = torch.tensor([[0.3, 0.3, 1.0, -1.0, 0.05, 0.3]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    counts = tier.histogram(cosine, mask)[0]
    expected = torch.zeros(22)
    expected[13], expected[20], expected[0], expected[11] = 2, 1, 1, 1
    assert torch.equal(counts, expected)
    features = tier(cosine, mask)[0]
    assert features[13].item() == pytest.approx(math.log(3) * 14)
    assert features[20].item() == pytest.approx(math.log(2) * 21)
    assert features[0].item() == pytest.approx(math.log(2) * 1)
    assert features[21].item() == 0.0 and features[5].item() == 0.0


def test_short_left_padded_histories_count_only_valid_positions() -> None:
    tier = SimTier(0.1)
    cosine = torch.tensor(
        [
            [0.9, -0.5, 0.3, 0.3],  # 1 valid position: the newest
            [0.1, 0.1, 0.1, 0.1],
        ]
    )  # empty history
    mask = torch.tensor([[False, False, False, True], [False, False, False, False]])
    counts = tier.histogram(cosine, mask)
    assert counts[0].sum().item() == 1 and counts[0, 13].item() == 1
    assert counts[1].sum().item() == 0
    assert torch.all(tier(cosine, mask)[1] == 0)


def test_batched_candidates_share_one_history() -> None:
    """[B, C, L] similarities: each candidate gets its own histogram against the same history."""
    tier = SimTier(0.1)
    cand = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # B=1, C=2, D=2
    hist = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 0.0]]])  # L=3, last is padding
    cosine = cosine_matrix(cand, hist)  # [1, 2, 3]
    counts = tier.histogram(cosine, torch.tensor([[True, True, False]])[:, None, :].expand(1, 2, 3))
    # candidate 0: cos 1 -> 20, cos 0.6 -> float32(0.6)*10 rounds to 6.0 -> 16
    # candidate 1: cos 0 -> 10, cos 0.8 -> float32(0.8)*10 rounds to 8.0 -> 18
    assert counts[0, 0].nonzero().flatten().tolist() == [16, 20]
    assert counts[0, 1].nonzero().flatten().tolist() == [10, 18]


def test_ranker_does_not_count_missing_embeddings() -> None:
    """Through the whole model: behaviours or a candidate without an embedding add no count."""
    torch.manual_seed(0)
    model = Ranker(RankerConfig(variant="simtier", n_users=3, n_items=5, n_categories=2, n_brands=2, mm_dim=4))
    seen: list[torch.Tensor] = []
    histogram = model.simtier.histogram  # the counts are taken once and shared with MAKE: spy on them

    def spy(cosine: torch.Tensor, count_mask: torch.Tensor) -> torch.Tensor:
        seen.append(count_mask.clone())
        return histogram(cosine, count_mask)

    model.simtier.histogram = spy  # type: ignore[method-assign]  # a spy on the instance
    emb = torch.eye(4)
    x = RankerInputs(
        user=torch.tensor([0]),
        hist_item=torch.tensor([[0, 1, 2]]),
        hist_category=torch.zeros(1, 3, dtype=torch.long),
        hist_brand=torch.zeros(1, 3, dtype=torch.long),
        hist_mask=torch.tensor([[False, True, True]]),
        hist_emb=emb[:3][None],
        hist_found=torch.tensor([[True, True, False]]),
        cand_item=torch.tensor([[1, 3]]),
        cand_category=torch.zeros(1, 2, dtype=torch.long),
        cand_brand=torch.zeros(1, 2, dtype=torch.long),
        cand_emb=emb[[1, 3]][None],
        cand_found=torch.tensor([[True, False]]),
    )
    model(x)
    # only history position 1 is both valid and found; candidate 1 has no embedding at all
    assert seen[0].tolist() == [[[False, True, False], [False, False, False]]]
