"""The synthetic multimodal shop: load it, read users' histories, get oracle concept vectors.

`generate(size, seed, out)` makes (or copies from a cache) a shop directory; `load(dir)` reads it.
The files are described in docs/architecture.md ("Shop data") and the process in docs/data.md.
pandas and pyarrow are imported inside the functions that need them, so importing this module
stays cheap for the operator and the API.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from mmrank.shop_config import ShopConfig, config_for

if TYPE_CHECKING:
    import pandas as pd

FILES = (
    "manifest.json",
    "items.parquet",
    "images.npy",
    "searches.parquet",
    "behaviours.parquet",
    "impressions.parquet",
    "splits.json",
    "truth.npz",
)


@dataclasses.dataclass
class Shop:
    """A loaded shop. `truth` holds what no model may read (item quality, users' interests): it is
    here for sanity checks, oracles and the docs' plots."""

    directory: Path
    manifest: dict[str, Any]
    items: pd.DataFrame
    searches: pd.DataFrame
    behaviours: pd.DataFrame
    impressions: pd.DataFrame
    images: npt.NDArray[np.uint8]
    splits: dict[str, Any]
    truth: dict[str, npt.NDArray[Any]]
    _index: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int, int] | None = dataclasses.field(
        default=None, repr=False
    )

    @property
    def config(self) -> ShopConfig:
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in self.manifest["config"].items()}
        return ShopConfig(**values)

    @property
    def vocab(self) -> dict[str, list[str]]:
        """Names of the integer ids in `items` (category, colour, material, brand, family)."""
        vocab: dict[str, list[str]] = self.manifest["vocab"]
        return vocab

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return int(self.manifest["counts"]["users"])

    def history(
        self,
        user_ids: Any,
        before_ts: Any,
        max_len: int,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        """The last `max_len` items each user clicked strictly before `before_ts` (scalar or per user).

        Returns (item_ids int64 [B, L], mask bool [B, L]), newest last, left-padded with 0 / False.
        """
        users = np.atleast_1d(np.asarray(user_ids, dtype=np.int64))
        before = np.broadcast_to(np.asarray(before_ts, dtype=np.int64), users.shape)
        keys, items, ts_min, span = self._history_index()
        clipped = np.clip(before - ts_min, 0, span)
        start = np.searchsorted(keys, users * (span + 1), side="left")
        end = np.searchsorted(keys, users * (span + 1) + clipped, side="left")
        n = np.minimum(end - start, max_len)
        col = np.arange(max_len)[None, :]
        mask = col >= (max_len - n)[:, None]
        src = end[:, None] - max_len + col
        ids = np.where(mask, items[np.clip(src, 0, max(len(items) - 1, 0))] if len(items) else 0, 0)
        return ids.astype(np.int64), mask

    def _history_index(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int, int]:
        """Behaviours sorted by (user, ts), keyed user * (span + 1) + (ts - ts_min) for searchsorted."""
        if self._index is None:
            users = self.behaviours["user_id"].to_numpy(np.int64)
            ts = self.behaviours["ts"].to_numpy(np.int64)
            ts_min = int(ts.min()) if len(ts) else 0
            span = int(ts.max()) - ts_min + 1 if len(ts) else 1
            order = np.lexsort((np.arange(len(ts)), ts, users))
            keys = users[order] * (span + 1) + (ts[order] - ts_min)
            self._index = (keys, self.behaviours["item_id"].to_numpy(np.int64)[order], ts_min, span)
        return self._index

    def interest_match(self, user_ids: Any, item_ids: Any) -> npt.NDArray[np.float32]:
        """The hidden interest match in [0, 1] of users with items (pairwise, broadcast)."""
        from mmrank.shop_gen import concept_similarity

        cfg = self.config
        users = np.asarray(user_ids, dtype=np.int64)
        concepts = self.items["concept"].to_numpy(np.int64)[np.asarray(item_ids, dtype=np.int64)]
        anchors, strength = self.truth["user_anchors"][users], self.truth["user_strength"][users]
        sims = concept_similarity(anchors, np.asarray(concepts)[..., None], cfg) * strength
        match: npt.NDArray[np.float32] = sims.max(axis=-1).astype(np.float32)
        return match


def require_parquet() -> None:
    """Fail with the reason when pyarrow cannot load (pyarrow >= 26 needs numpy 2; we pin numpy 1.26)."""
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"the shop's Parquet files need a pyarrow that loads with this numpy ({exc}); "
            "pyarrow==25.0.1 works with numpy 1.26"
        ) from exc


def load(directory: str | Path, mmap_images: bool = True) -> Shop:
    """Read a shop directory written by `mmrank shop generate` (images memory-mapped by default)."""
    require_parquet()
    import pandas as pd

    directory = Path(directory)
    missing = [name for name in FILES if not (directory / name).exists()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a complete shop: missing {missing}")
    manifest = json.loads((directory / "manifest.json").read_text())
    with np.load(directory / "truth.npz") as truth:
        hidden = {k: truth[k] for k in truth.files}
    return Shop(
        directory=directory,
        manifest=manifest,
        items=pd.read_parquet(directory / "items.parquet"),
        searches=pd.read_parquet(directory / "searches.parquet"),
        behaviours=pd.read_parquet(directory / "behaviours.parquet"),
        impressions=pd.read_parquet(directory / "impressions.parquet"),
        images=np.load(directory / "images.npy", mmap_mode="r" if mmap_images else None),
        splits=json.loads((directory / "splits.json").read_text()),
        truth=hidden,
    )


def concept_vectors(shop: Shop, dim: int = 128, seed: int = 0, noise: float = 0.0) -> npt.NDArray[np.float32]:
    """L2-normalised oracle embeddings float32 [n_items, dim] from the hidden concept.

    A concept's vector is a weighted sum of random unit vectors for its category, family, colour
    and material (weights = the square roots of the interest-similarity weights), so cosine
    similarity between concepts follows the same graded overlap that users' interests do.
    `noise` adds per-item Gaussian noise of that norm (relative to 1) before normalising.
    """
    cfg = shop.config
    rng = np.random.default_rng(seed)

    def unit(n: int) -> npt.NDArray[np.float64]:
        v = rng.standard_normal((n, dim))
        unit_rows: npt.NDArray[np.float64] = v / np.linalg.norm(v, axis=1, keepdims=True)
        return unit_rows

    cat_v, fam_v, col_v, mat_v = (
        unit(cfg.n_categories),
        unit(cfg.n_families),
        unit(cfg.n_colours),
        unit(cfg.n_materials),
    )
    category = shop.items["category"].to_numpy(np.int64)
    vectors = (
        np.sqrt(cfg.w_category) * cat_v[category]
        + np.sqrt(cfg.w_family) * fam_v[category // 4]
        + np.sqrt(cfg.w_colour) * col_v[shop.items["colour"].to_numpy(np.int64)]
        + np.sqrt(cfg.w_material) * mat_v[shop.items["material"].to_numpy(np.int64)]
    )
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    if noise > 0:
        vectors = vectors + noise * unit(len(vectors))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    result: npt.NDArray[np.float32] = vectors.astype(np.float32)
    return result


# --- generate, with a cache so every test can ask for a tiny shop cheaply ------------------------


def _code_version() -> str:
    digest = hashlib.sha256()
    for name in ("shop_config.py", "shop_gen.py", "shop_images.py"):
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("MMRANK_SHOP_CACHE", Path.home() / ".cache" / "mmrank" / "shops"))


def generate(
    size: str,
    seed: int,
    out: str | Path,
    config: dict[str, Any] | None = None,
    progress: bool = False,
    cache: bool = True,
) -> Path:
    """Make the shop of (size, seed, config overrides) in `out` and return `out`.

    A shop is a pure function of its inputs and of the generator's code, so one generated copy is
    kept under ~/.cache/mmrank/shops (MMRANK_SHOP_CACHE) and later calls copy it (tiny: ~10 MB).
    """
    cfg = config_for(size, config)
    out = Path(out)
    if not cache:
        from mmrank.shop_gen import generate_into

        return generate_into(out, cfg, seed, size, progress)
    key = hashlib.sha256(json.dumps([size, seed, cfg.to_dict()], sort_keys=True).encode()).hexdigest()[:16]
    cached = cache_dir() / f"{_code_version()}-{size}-{seed}-{key}"
    if not (cached / "manifest.json").exists():
        _fill_cache(cached, cfg, seed, size, progress)
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(cached / name, out / name)
    return out


def _fill_cache(cached: Path, cfg: ShopConfig, seed: int, size: str, progress: bool) -> None:
    """Generate into a temporary folder and rename it, under a lock so parallel callers wait."""
    from mmrank.shop_gen import generate_into

    cached.parent.mkdir(parents=True, exist_ok=True)
    _prune_other_versions(cached.parent)
    with open(cached.parent / (cached.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (cached / "manifest.json").exists():
            return
        tmp = Path(tempfile.mkdtemp(prefix=cached.name + ".", dir=cached.parent))
        try:
            generate_into(tmp, cfg, seed, size, progress)
            tmp.rename(cached)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _prune_other_versions(root: Path) -> None:
    """Drop cached shops made by another version of the generator: they can never be hit again."""
    current = _code_version()
    for entry in root.iterdir():
        if not entry.name.startswith(current + "-"):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
