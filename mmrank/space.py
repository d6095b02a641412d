"""An embedding space on disk: every item's vector from one encoder version.

The ranker trains on a space directory; the store holds the same space online. A space is
`embeddings.npy` (float32 `[n_items, dim]`, row = item id) plus `space.json`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclasses.dataclass(frozen=True)
class EmbeddingSpace:
    version: str
    vectors: npt.NDArray[Any]
    present: npt.NDArray[Any]

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def coverage(self) -> float:
        return float(self.present.mean()) if len(self.present) else 0.0


def save_space(
    directory: str | Path, version: str, vectors: npt.NDArray[Any], present: npt.NDArray[Any] | None = None
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [n_items, dim], got shape {vectors.shape}")
    present = np.ones(len(vectors), dtype=bool) if present is None else np.asarray(present, dtype=bool)
    np.save(directory / "embeddings.npy", vectors)
    np.save(directory / "present.npy", present)
    meta = {"version": version, "dim": int(vectors.shape[1]), "items": int(present.sum()), "created": time.time()}
    (directory / "space.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load_space(directory: str | Path) -> EmbeddingSpace:
    directory = Path(directory)
    meta = json.loads((directory / "space.json").read_text())
    vectors = np.load(directory / "embeddings.npy")
    present_path = directory / "present.npy"
    present = np.load(present_path) if present_path.exists() else np.ones(len(vectors), dtype=bool)
    if vectors.shape[1] != meta["dim"]:
        raise ValueError(f"{directory}: space.json says dim {meta['dim']}, embeddings.npy has {vectors.shape[1]}")
    return EmbeddingSpace(str(meta["version"]), vectors, present)
