"""The ranker's faster forward equals the plain one (issue 19 item 3: cost without changing results).

Random inputs, with an all-padding history row, a left-padded one, missing embeddings and
unknown ids. `reference_attention` is the attention as first written (project every behaviour,
then the bilinear form, then the key bias); the model now picks the cheaper order per shape.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmrank.predictors import train
from mmrank.predictors.model import VARIANTS, Ranker, RankerConfig, RankerInputs, TargetAttention

B, L, D = 4, 6, 8
VOCAB = {"n_users": 5, "n_items": 9, "n_categories": 3, "n_brands": 4}


def random_inputs(n_candidates: int, seed: int = 0) -> RankerInputs:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0] = False  # an empty history: every position is padding
    mask[1, :4] = False  # a short, left-padded one
    hist_found = mask & (torch.rand(B, L, generator=g) > 0.2)
    cand_found = torch.rand(B, n_candidates, generator=g) > 0.2

    def ids(shape: tuple[int, ...], n: int) -> torch.Tensor:
        return torch.randint(-1, n + 2, shape, generator=g)  # -1 and past-the-end ids: unknown

    return RankerInputs(
        user=ids((B,), VOCAB["n_users"]),
        hist_item=ids((B, L), VOCAB["n_items"]),
        hist_category=ids((B, L), VOCAB["n_categories"]),
        hist_brand=ids((B, L), VOCAB["n_brands"]),
        hist_mask=mask,
        hist_emb=torch.randn(B, L, D, generator=g),
        hist_found=hist_found,
        cand_item=ids((B, n_candidates), VOCAB["n_items"]),
        cand_category=ids((B, n_candidates), VOCAB["n_categories"]),
        cand_brand=ids((B, n_candidates), VOCAB["n_brands"]),
        cand_emb=torch.randn(B, n_candidates, D, generator=g),
        cand_found=cand_found,
    )


def reference_attention(
    att: TargetAttention, target: torch.Tensor, behaviours: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    scores = torch.bmm(att.query(target), att.key(behaviours).transpose(1, 2)) / math.sqrt(att.query.out_features)
    scores = scores + att.key_bias(behaviours).transpose(1, 2)
    scores = scores.masked_fill(~mask[:, None, :], -1e4)
    weights = torch.softmax(scores, dim=-1) * mask.any(dim=-1)[:, None, None].to(scores.dtype)
    return torch.bmm(weights, behaviours)


@pytest.mark.parametrize("n_candidates", [1, 7])
@pytest.mark.parametrize("keys_first", [True, False, None])
def test_attention_in_either_order_equals_the_reference_values_and_gradients(
    n_candidates: int, keys_first: bool | None
) -> None:
    torch.manual_seed(0)
    att = TargetAttention(D, D)
    x = random_inputs(n_candidates)
    expected = reference_attention(att, x.cand_emb, x.hist_emb, x.hist_mask)
    expected.square().sum().backward()
    expected_grads = [p.grad.clone() for p in att.parameters()]
    att.zero_grad()
    got = att(x.cand_emb, x.hist_emb, x.hist_mask, keys_first=keys_first)
    got.square().sum().backward()
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.all(got[0] == 0)  # the empty history pools to zeros
    for p, g in zip(att.parameters(), expected_grads, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-5)


def test_the_order_is_the_cheaper_one() -> None:
    att = TargetAttention(128, 128)
    assert not att.keys_first(n_candidates=1, n_behaviours=50)  # training: one candidate per row
    assert att.keys_first(n_candidates=200, n_behaviours=50)  # serving: one history, many candidates


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n_candidates", [1, 7])
def test_ranker_forward_is_the_same_in_either_attention_order(
    variant: str, n_candidates: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = Ranker(RankerConfig(variant=variant, mm_dim=D, history_length=L, **VOCAB)).eval()
    x = random_inputs(n_candidates, seed=1)
    logits = {}
    for order in (True, False):
        monkeypatch.setattr(TargetAttention, "keys_first", lambda self, c, n, order=order: order)
        with torch.no_grad():
            logits[order] = model(x)
    assert logits[True].shape == (B, n_candidates) and torch.isfinite(logits[True]).all()
    assert torch.allclose(logits[True], logits[False], atol=1e-5)


@pytest.mark.parametrize("variant", ["vector", "simtier-make"])
def test_pre_zeroed_training_batches_give_the_logits_of_raw_vectors(variant: str) -> None:
    """`to_inputs` gathers zeros for missing vectors and tells the model so; the same batch with
    the raw catalogue vectors, zeroed by the model itself, gives the same logits."""
    rng = np.random.default_rng(0)
    n_items, n = 9, 12
    present = rng.random(n_items) > 0.3
    catalogue = train.Catalogue(
        rng.integers(0, 3, n_items),
        rng.integers(0, 4, n_items),
        rng.normal(size=(n_items, D)).astype(np.float32),
        present,
        "v1",
    )
    history = rng.integers(-1, n_items + 2, (n, L))
    mask = rng.random((n, L)) > 0.3
    mask[0] = False
    data = train.Impressions(
        rng.integers(0, 5, n),
        rng.integers(-1, n_items + 2, n),
        np.zeros(n, np.float32),
        np.zeros(n, bool),
        history,
        mask,
    )
    x = train.to_inputs(data, np.arange(n), catalogue)
    assert x.embeddings_zeroed
    assert torch.all(x.hist_emb[~x.hist_found] == 0) and torch.all(x.cand_emb[~x.cand_found] == 0)
    raw = x._replace(
        hist_emb=torch.from_numpy(catalogue.vectors[np.clip(history, 0, n_items - 1)]),
        cand_emb=torch.from_numpy(catalogue.vectors[np.clip(data.item, 0, n_items - 1)][:, None]),
        embeddings_zeroed=False,
    )
    torch.manual_seed(0)
    model = Ranker(RankerConfig(variant=variant, mm_dim=D, history_length=L, **VOCAB)).eval()
    with torch.no_grad():
        assert torch.allclose(model(x), model(raw), atol=1e-5)
        if variant == "simtier-make":
            assert torch.allclose(model.make_logits(x), model.make_logits(raw), atol=1e-5)


def test_a_smaller_make_attends_and_pools_in_its_projected_width() -> None:
    """`make_dim` (issue 19's serving lever): MAKE projects the embeddings first, so its
    attention, its pooled vector and its middle layer are make_dim wide; nothing else changes."""
    config = RankerConfig(variant="simtier-make", mm_dim=D, make_dim=3, make_vector=True, **VOCAB)
    model = Ranker(config)
    assert model.make.project is not None and model.make.project.weight.shape == (3, D)
    assert model.make.attention.key.in_features == 3
    x = random_inputs(5)
    make = model.make(x.cand_emb, x.hist_emb, x.hist_mask & x.hist_found, torch.zeros(B, 5, model.simtier.n_bins))
    assert make.vector is not None and make.vector.shape == (B, 5, 3)
    logits = model(x)
    assert logits.shape == (B, 5) and torch.isfinite(logits).all()
    logits.sum().backward()  # MAKE trainable through the projection when fine-tuned
    full = Ranker(RankerConfig(variant="simtier-make", mm_dim=D, make_vector=True, **VOCAB))
    assert full.make.project is None and full.make.attention.key.in_features == D
    with pytest.raises(ValueError, match="make_dim"):
        RankerConfig(variant="simtier-make", make_dim=-1)
