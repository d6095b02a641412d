"""Model-free baselines on a shop's test day, split into warm and cold impressions.

They show what the data lets a ranker learn before any ranker exists: a per-item click rate (what
an ID embedding can learn) knows nothing about cold items; the similarity of a candidate's concept
to the user's history (what a multimodal embedding can give, here from oracle vectors) ranks
clicks on cold and warm items alike; the hidden interest match is the ceiling of that signal.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from mmrank.shop import Shop, concept_vectors


def auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """ROC AUC by the rank-sum formula, ties counted half (numpy only: no sklearn import)."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    mean_rank = upper - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = mean_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def item_click_rate(shop: Shop, item_ids: npt.ArrayLike, smoothing: float = 10.0) -> npt.NDArray[np.float64]:
    """Each item's click rate on the train days, shrunk towards the global rate (cold: the global rate)."""
    imps = shop.impressions
    train = imps[imps["split"] == "train"]
    shows = np.bincount(train["item_id"].to_numpy(), minlength=shop.n_items)
    clicks = np.bincount(train["item_id"].to_numpy(), weights=train["clicked"].to_numpy(), minlength=shop.n_items)
    prior = float(train["clicked"].mean())
    rates = np.asarray((clicks + smoothing * prior) / (shows + smoothing), dtype=np.float64)
    picked: npt.NDArray[np.float64] = rates[np.asarray(item_ids)]
    return picked


def history_similarity(
    shop: Shop,
    user_ids: npt.NDArray[np.int64],
    ts: npt.NDArray[np.int64],
    item_ids: npt.NDArray[np.int64],
    max_len: int = 128,
    dim: int = 32,
    chunk: int = 4096,
) -> npt.NDArray[np.float32]:
    """Mean cosine between the candidate's oracle concept vector and the user's history vectors."""
    vectors = concept_vectors(shop, dim=dim)
    out = np.empty(len(item_ids), dtype=np.float32)
    for lo in range(0, len(item_ids), chunk):
        rows = slice(lo, lo + chunk)
        ids, mask = shop.history(user_ids[rows], ts[rows], max_len)
        sims = np.einsum("bld,bd->bl", vectors[ids], vectors[item_ids[rows]])
        out[rows] = np.where(mask, sims, 0).sum(axis=1) / np.maximum(mask.sum(axis=1), 1)
    return out


def test_day_baselines(shop: Shop) -> dict[str, dict[str, float]]:
    """AUC of each baseline on the test day's warm and cold impressions, plus click rates."""
    imps = shop.impressions
    test = imps[imps["split"] == "test"]
    users, ts, items = (test[c].to_numpy() for c in ("user_id", "ts", "item_id"))
    clicked, cold = test["clicked"].to_numpy(), test["cold"].to_numpy()
    scores: dict[str, npt.NDArray[Any]] = {
        "item click rate (ID)": item_click_rate(shop, items),
        "history concept similarity": history_similarity(shop, users, ts, items),
        "hidden interest match": shop.interest_match(users, items),
    }
    result = {
        name: {"warm": auc(clicked[~cold], s[~cold]), "cold": auc(clicked[cold], s[cold])} for name, s in scores.items()
    }
    result["click rate"] = {"warm": float(clicked[~cold].mean()), "cold": float(clicked[cold].mean())}
    result["impressions"] = {"warm": float((~cold).sum()), "cold": float(cold.sum())}
    return result
