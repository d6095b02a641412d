"""Offline metrics of a CTR model: AUC, GAUC, log-loss (numpy only; no torch).

GAUC is the paper's headline metric: the AUC of each user's impressions, weighted by that user's
number of impressions. A user whose impressions are all clicks or all non-clicks has no AUC and
is skipped (weight and all), as in the DIN paper's definition.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Impression-weighted mean of per-user AUC over users with both classes; NaN if none."""
    users, labels, scores = np.asarray(users), np.asarray(labels), np.asarray(scores, dtype=np.float64)
    order = np.argsort(users, kind="stable")
    users, labels, scores = users[order], labels[order], scores[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    total, weight = 0.0, 0
    for start, end in zip(starts, ends, strict=False):
        user_labels = labels[start:end]
        positives = int(user_labels.sum())
        if positives == 0 or positives == end - start:
            continue
        total += (end - start) * roc_auc_score(user_labels, scores[start:end])
        weight += end - start
    return total / weight if weight else float("nan")


def log_loss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of click probabilities (clipped to [eps, 1 - eps])."""
    labels = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1 - eps)
    if len(labels) == 0:
        return float("nan")
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def ctr_metrics(users: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """AUC, GAUC and log-loss of one set of impressions, from the model's logits."""
    logits = np.asarray(logits, dtype=np.float64)
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    return {
        "auc": auc(labels, logits),
        "gauc": gauc(users, labels, logits),
        "logloss": log_loss(labels, probabilities),
        "impressions": int(len(labels)),
        "clicks": int(np.asarray(labels).sum()),
    }


def overall_and_cold(
    users: np.ndarray, labels: np.ndarray, logits: np.ndarray, cold: np.ndarray
) -> dict[str, dict[str, float]]:
    """Metrics on all test impressions and on those of cold items (never impressed in training)."""
    cold = np.asarray(cold, dtype=bool)
    return {
        "overall": ctr_metrics(users, labels, logits),
        "cold": ctr_metrics(users[cold], labels[cold], np.asarray(logits)[cold]),
    }
