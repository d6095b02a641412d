"""Judge an item encoder by what SCL is for: do items that mean the same thing sit together?

- `concept_top1`: share of held-out items whose nearest other item of the catalogue has the same
  concept.
- `concept_recall@10`: of the same-concept items an item's 10 nearest neighbours could hold
  (min(10, same-concept items − 1)), the share they do hold.
  Held-out items without another item of their concept cannot score and are left out of both.
- `query_recall@10`: share of held-out searches whose bought item is among the 10 items of the
  whole catalogue nearest to the query vector.

Held-out items were never seen in pre-training (splits.json `heldout_items`), nor were held-out
searches (`split == "heldout"`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def top_k(queries: np.ndarray, keys: np.ndarray, k: int, exclude_self: bool = False, chunk: int = 1024) -> np.ndarray:
    """Indices [Q, k] of the k keys with the highest dot product, best first."""
    k = min(k, len(keys) - (1 if exclude_self else 0))
    out = np.zeros((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ keys.T
        if exclude_self:
            rows = np.arange(scores.shape[0])
            scores[rows, rows + start] = -np.inf
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(scores, part, axis=1).argsort(axis=1)[:, ::-1]
        out[start : start + chunk] = np.take_along_axis(part, order, axis=1)
    return out


def concept_accuracy(
    queries: np.ndarray, query_items: np.ndarray, vectors: np.ndarray, concepts: Sequence[Any], k: int = 10
) -> dict[str, float]:
    """Concept agreement of each query item's k nearest other items of the catalogue `vectors`.

    Only query items with at least one other item of their concept count (the others cannot score).
    """
    labels = np.asarray(concepts)
    query_items = np.asarray(query_items)
    neighbours = np.zeros((len(query_items), k), dtype=np.int64)
    for start in range(0, len(query_items), 1024):
        rows = query_items[start : start + 1024]
        scores = queries[start : start + 1024] @ vectors.T
        scores[np.arange(len(rows)), rows] = -np.inf  # an item is not its own neighbour
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.take_along_axis(scores, part, axis=1).argsort(axis=1)[:, ::-1]
        neighbours[start : start + 1024] = np.take_along_axis(part, order, axis=1)
    same = labels[neighbours] == labels[query_items][:, None]
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    peers = counts[inverse][query_items] - 1
    scored = peers > 0
    attainable = np.minimum(k, peers[scored])
    return {
        "concept_top1": float(same[scored, 0].mean()),
        f"concept_recall@{k}": float((same[scored].sum(axis=1) / attainable).mean()),
        "scored_items": int(scored.sum()),
    }


def query_recall(query_vectors: np.ndarray, item_vectors: np.ndarray, bought: np.ndarray, k: int = 10) -> float:
    hits = top_k(query_vectors, item_vectors, k) == np.asarray(bought)[:, None]
    return float(hits.any(axis=1).mean())


def query_vectors(encoder: Any, shop: Any, searches: Any) -> np.ndarray:
    """Text queries → text vectors; queries with an image → fused (image, query text), as in training."""
    import torch

    from mmrank.encoders.model import encode_texts

    vectors = encode_texts(encoder, searches["query_text"].tolist())
    image_items = searches["query_image_item"].to_numpy(np.int64)
    rows = np.flatnonzero(image_items >= 0)
    if len(rows):
        with torch.no_grad():
            for start in range(0, len(rows), 256):
                chunk = rows[start : start + 256]
                image = encoder.encode_image(torch.from_numpy(shop.images[image_items[chunk]]))
                text = torch.from_numpy(vectors[chunk])
                vectors[chunk] = encoder.fuse(image, text).numpy()
    return vectors


def evaluate(encoder: Any, shop: Any, k: int = 10) -> dict[str, Any]:
    from mmrank.encoders.model import encode_items

    items = shop.items.sort_values("item_id")
    item_vectors = encode_items(encoder, shop.images, items["title"].tolist())
    heldout = np.asarray(shop.splits["heldout_items"], dtype=np.int64)
    concepts = items["concept"].to_numpy()
    metrics: dict[str, Any] = concept_accuracy(item_vectors[heldout], heldout, item_vectors, concepts, k)
    searches = shop.searches[shop.searches["split"] == "heldout"]
    metrics[f"query_recall@{k}"] = query_recall(
        query_vectors(encoder, shop, searches), item_vectors, searches["bought_item"].to_numpy(np.int64), k
    )
    metrics.update(
        {"heldout_items": int(len(heldout)), "heldout_searches": int(len(searches)), "catalogue": int(len(items))}
    )
    return metrics
