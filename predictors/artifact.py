"""A trained ranker on disk: what `mmrank ranker train --out DIR` writes and the predictor loads.

    DIR/ranker.json        version, variant, encoder_version (the space it was trained on), dim,
                           history_length, config (RankerConfig), item_features, metrics, training
    DIR/weights.pt         the state dict (MAKE included for simtier-make)
    DIR/item_features.npy  int64 [n_items, 2]: category, brand per item id known at training
                           time (-1 = unknown), so a request carrying only item ids can be scored

The encoder version is what keeps ranker and embeddings in sync: a ranker only ever scores
embeddings from the space it was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np
import numpy.typing as npt
import torch

from mmrank.predictors.model import Ranker, RankerConfig


class ItemFeatures(TypedDict):
    """ranker.json's `item_features`: where the table is and what its columns mean."""

    file: str
    dtype: str
    columns: list[str]
    rows: str
    unknown: int
    items: NotRequired[int]  # rows in the table (every artifact written since it was added)


class ArtifactMeta(TypedDict, total=False):
    """ranker.json; total=False: an artifact from before a key was added lacks it, and a predictor
    holds an empty one until it has loaded its artifact."""

    version: str
    variant: str
    encoder_version: str  # the space it was trained on
    dim: int
    history_length: int
    config: dict[str, Any]  # RankerConfig.to_json()
    item_features: ItemFeatures
    metrics: dict[str, Any]
    training: dict[str, Any]


ITEM_FEATURES: ItemFeatures = {
    "file": "item_features.npy",
    "dtype": "int64",
    "columns": ["category", "brand"],
    "rows": "item id",
    "unknown": -1,
}


def save_ranker(
    directory: str | Path,
    model: Ranker,
    encoder_version: str,
    item_features: npt.ArrayLike,
    version: str | None = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> ArtifactMeta:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    features = np.asarray(item_features, dtype=np.int64).reshape(-1, 2)
    torch.save(model.state_dict(), directory / "weights.pt")
    np.save(directory / ITEM_FEATURES["file"], features)
    meta: ArtifactMeta = {
        "version": version or f"{config.variant}-{encoder_version}",
        "variant": config.variant,
        "encoder_version": encoder_version,
        "dim": config.mm_dim,
        "history_length": config.history_length,
        "config": config.to_json(),
        "item_features": {**ITEM_FEATURES, "items": int(len(features))},
        "metrics": metrics or {},
        "training": training or {},
    }
    (directory / "ranker.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_meta(directory: str | Path) -> ArtifactMeta:
    meta: ArtifactMeta = json.loads((Path(directory) / "ranker.json").read_text())
    return meta


def load_ranker(directory: str | Path) -> tuple[Ranker, ArtifactMeta]:
    """-> (model in eval mode with its item feature table, the ranker.json dict)."""
    directory = Path(directory)
    meta = read_meta(directory)
    # an artifact from before issue 19 has no MAKE layout in its config: it was trained with
    # MAKE's vector into the ID model and no SimTier weights of MAKE's own
    model = Ranker(RankerConfig(**{"make_simtier": False, "make_vector": True, **meta["config"]}))
    model.load_state_dict(torch.load(directory / "weights.pt", map_location="cpu", weights_only=True))
    features_path = directory / meta.get("item_features", ITEM_FEATURES)["file"]
    if features_path.exists():
        model.item_features = torch.from_numpy(np.load(features_path).astype(np.int64))
    model.eval()
    return model, meta


def write_random_ranker(
    directory: str | Path,
    encoder_version: str,
    dim: int = 128,
    variant: str = "simtier-make",
    item_features: npt.ArrayLike | None = None,
    n_users: int = 100,
    history_length: int = 50,
    seed: int = 0,
    version: str | None = None,
) -> ArtifactMeta:
    """An untrained ranker artifact of the right shape: for serving tests that need a ranker
    pinned to a space without spending seconds on training."""
    features = np.zeros((0, 2), np.int64) if item_features is None else np.asarray(item_features, np.int64)
    torch.manual_seed(seed)
    config = RankerConfig(
        variant=variant,
        n_users=n_users,
        n_items=max(len(features), 1),
        n_categories=int(features[:, 0].max(initial=0)) + 1,
        n_brands=int(features[:, 1].max(initial=0)) + 1,
        mm_dim=dim,
        history_length=history_length,
    )
    return save_ranker(
        directory,
        Ranker(config),
        encoder_version,
        features,
        version=version,
        training={"untrained": True, "seed": seed},
    )
