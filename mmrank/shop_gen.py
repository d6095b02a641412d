"""The generative process of the synthetic shop (docs/data.md describes it step by step).

Each step is a function of the config and its own random stream (spawned from the seed), so a
shop is a pure function of (config, seed) and changing one knob does not reshuffle unrelated
parts. `write_shop` turns the drawn arrays into the files of docs/architecture.md ("Shop data").
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mmrank.shop_config import COLOURS, FAMILIES, FILLERS, MATERIAL_PRICE, MATERIALS, QUERY_FILLERS, ShopConfig

FORMAT = 1
T0 = 1_767_225_600  # 2026-01-01 00:00 UTC: the start of day 0
DAY = 86_400
IMAGE_CHUNK = 256
STREAMS = ("catalogue", "titles", "images", "users", "history", "impressions", "searches")


# --- vocabulary --------------------------------------------------------------------------------


def category_names(cfg: ShopConfig) -> list[str]:
    return [members[c % 4][0] for c in range(cfg.n_categories) for members in [FAMILIES[c // 4][1]]]


def vocab(cfg: ShopConfig, brands: list[str]) -> dict[str, list[str]]:
    return {
        "category": category_names(cfg),
        "family": [FAMILIES[f][0] for f in range(cfg.n_families)],
        "colour": [c[0] for c in COLOURS[: cfg.n_colours]],
        "material": [m[0] for m in MATERIALS[: cfg.n_materials]],
        "brand": brands,
    }


def concept_of(category: np.ndarray, colour: np.ndarray, material: np.ndarray, cfg: ShopConfig) -> np.ndarray:
    return ((np.asarray(category) * cfg.n_colours + colour) * cfg.n_materials + material).astype(np.int32)


def concept_attributes(cfg: ShopConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(category, colour, material) of every concept id."""
    concept = np.arange(cfg.n_concepts)
    return (
        concept // (cfg.n_colours * cfg.n_materials),
        (concept // cfg.n_materials) % cfg.n_colours,
        concept % cfg.n_materials,
    )


# --- catalogue ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Catalogue:
    category: np.ndarray
    colour: np.ndarray
    material: np.ndarray
    brand: np.ndarray
    price_bucket: np.ndarray
    quality: np.ndarray
    day_added: np.ndarray
    brand_names: list[str]
    titles: list[str] = dataclasses.field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.category)


def brand_names(n: int, rng: np.random.Generator) -> list[str]:
    syllables = (
        "ka",
        "lo",
        "mi",
        "ra",
        "ve",
        "zu",
        "no",
        "ti",
        "sa",
        "be",
        "do",
        "fi",
        "gu",
        "pe",
        "xo",
        "ly",
        "qua",
        "ro",
        "ne",
        "ta",
        "shi",
        "mor",
        "len",
        "dax",
    )
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        parts = rng.choice(len(syllables), size=int(rng.integers(2, 4)))
        name = "".join(syllables[p] for p in parts).capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def draw_catalogue(cfg: ShopConfig, rng: np.random.Generator) -> Catalogue:
    """Attributes, brand, price and hidden quality of every item, oldest first."""
    n = cfg.n_items
    category = rng.integers(0, cfg.n_categories, n)
    colour = rng.integers(0, cfg.n_colours, n)
    material = rng.integers(0, cfg.n_materials, n)
    names = brand_names(cfg.n_brands, rng)
    brand_family = np.arange(cfg.n_brands) % cfg.n_families
    brand_tier = rng.uniform(0, 1, cfg.n_brands)
    family = category // 4
    per_family = [np.flatnonzero(brand_family == f) for f in range(cfg.n_families)]
    in_family = np.array([per_family[f][rng.integers(0, len(per_family[f]))] for f in family], dtype=np.int64)
    brand = np.where(rng.uniform(size=n) < cfg.brand_in_family, in_family, rng.integers(0, cfg.n_brands, n))
    level = 0.5 * np.asarray(MATERIAL_PRICE)[material] + 0.5 * brand_tier[brand] + rng.normal(0, 0.12, n)
    price = np.clip(np.floor(level * cfg.n_price_buckets), 0, cfg.n_price_buckets - 1)
    quality = rng.normal(0, cfg.quality_std, n)
    day_added = np.full(n, -1, dtype=np.int64)
    arrivals = np.repeat(np.arange(cfg.n_train_days + 1), cfg.new_items_per_day)
    day_added[cfg.n_initial_items :] = arrivals
    return Catalogue(category, colour, material, brand, price.astype(np.int64), quality, day_added, names)


def draw_titles(cat: Catalogue, cfg: ShopConfig, rng: np.random.Generator) -> list[str]:
    """Brand + some attribute synonyms + filler words, sometimes a misleading colour/material."""
    n = cat.n
    say_cat = rng.uniform(size=n) < cfg.p_title_category
    say_col = rng.uniform(size=n) < cfg.p_title_colour
    say_mat = rng.uniform(size=n) < cfg.p_title_material
    mislead = rng.uniform(size=n) < cfg.p_title_misleading
    n_fill = rng.integers(0, cfg.max_fillers + 1, n)
    picks = rng.integers(0, 1 << 30, (n, 8))
    titles = []
    for i in range(n):
        p = picks[i]
        fill = [FILLERS[(p[4] + 7 * j) % len(FILLERS)] for j in range(n_fill[i])]
        words = fill[: n_fill[i] // 2] + [cat.brand_names[cat.brand[i]]]
        if say_col[i]:
            syn = COLOURS[cat.colour[i]][2]
            words.append(syn[p[1] % len(syn)])
        if say_mat[i]:
            syn = MATERIALS[cat.material[i]][1]
            words.append(syn[p[2] % len(syn)])
        if say_cat[i]:
            syn = FAMILIES[cat.category[i] // 4][1][cat.category[i] % 4]
            words.append(syn[p[3] % len(syn)])
        words += fill[n_fill[i] // 2 :]
        if mislead[i]:
            if p[5] % 2 == 0 and cfg.n_colours > 1:
                wrong = (cat.colour[i] + 1 + p[6] % (cfg.n_colours - 1)) % cfg.n_colours
                word = COLOURS[wrong][2][0]
            elif cfg.n_materials > 1:
                wrong = (cat.material[i] + 1 + p[6] % (cfg.n_materials - 1)) % cfg.n_materials
                word = MATERIALS[wrong][1][0]
            else:
                word = ""
            if word:
                words.insert(int(p[6] % (len(words) + 1)), word)
        titles.append(" ".join(words))
    return titles


def draw_images(
    cat: Catalogue, cfg: ShopConfig, rng: np.random.Generator, progress: Callable[[int], None] | None = None
) -> np.ndarray:
    """Pictures in chunks. Some show a sibling category's silhouette or no texture, so the
    picture alone leaves the concept in doubt (the title often settles it)."""
    from mmrank.shop_images import render

    shown_category, shown_material = shown_attributes(cat, cfg, rng)
    images = np.empty((cat.n, 64, 64, 3), dtype=np.uint8)
    for start in range(0, cat.n, IMAGE_CHUNK):
        rows = slice(start, min(start + IMAGE_CHUNK, cat.n))
        images[rows] = render(shown_category[rows], cat.colour[rows], shown_material[rows], cfg, rng)
        if progress:
            progress(rows.stop - rows.start)
    return images


def shown_attributes(cat: Catalogue, cfg: ShopConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(category whose silhouette is drawn, material whose texture is drawn or -1 for none)."""
    family = cat.category // 4
    siblings = np.minimum(4, cfg.n_categories - 4 * family)
    step = 1 + np.floor(rng.uniform(size=cat.n) * np.maximum(siblings - 1, 1)).astype(np.int64)
    other = family * 4 + (cat.category % 4 + step) % np.maximum(siblings, 1)
    swap = (rng.uniform(size=cat.n) < cfg.p_image_sibling_shape) & (siblings > 1)
    plain = rng.uniform(size=cat.n) < cfg.p_image_plain
    return np.where(swap, other, cat.category), np.where(plain, -1, cat.material)


# --- users and interests -----------------------------------------------------------------------


def draw_users(cfg: ShopConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Anchor concepts [U, K] and their strengths [U, K] (the first anchor is the strongest)."""
    anchors = rng.integers(0, cfg.n_concepts, (cfg.n_users, cfg.interests_per_user)).astype(np.int32)
    strength = rng.uniform(0.6, 1.0, (cfg.n_users, cfg.interests_per_user))
    strength[:, 0] = 1.0
    return anchors, strength.astype(np.float32)


def concept_similarity(a: np.ndarray, b: np.ndarray, cfg: ShopConfig) -> np.ndarray:
    """Graded overlap of concepts a and b (broadcast): 1 for the same concept, 0 for nothing shared.

    Same category counts w_category, same family but another category w_family, plus w_colour and
    w_material; normalised so the same concept scores 1.
    """
    cat, col, mat = concept_attributes(cfg)
    ca, cb = cat[a], cat[b]
    score = (
        cfg.w_category * (ca == cb)
        + cfg.w_family * ((ca // 4 == cb // 4) & (ca != cb))
        + cfg.w_colour * (col[a] == col[b])
        + cfg.w_material * (mat[a] == mat[b])
    )
    return score / (cfg.w_category + cfg.w_colour + cfg.w_material)


def interest_matrix(anchors: np.ndarray, strength: np.ndarray, cfg: ShopConfig) -> np.ndarray:
    """interest_match(user, concept) = max over the user's anchors of strength * similarity."""
    concepts = np.arange(cfg.n_concepts)
    match = np.zeros((len(anchors), cfg.n_concepts), dtype=np.float32)
    for k in range(anchors.shape[1]):
        sim = concept_similarity(anchors[:, k, None], concepts[None, :], cfg)
        np.maximum(match, strength[:, k, None] * sim, out=match)
    return match


class ConceptPool:
    """Items of a pool grouped by concept, to draw items for many users at once.

    A draw picks a concept with probability ~ exp(sharpness * match) * (items of that concept in
    the pool), then an item inside the concept (uniformly, or ~ item weights).
    """

    def __init__(self, items: np.ndarray, concept: np.ndarray, n_concepts: int, item_weights: np.ndarray | None = None):
        order = np.argsort(concept[items], kind="stable")
        self.items = items[order]
        self.counts = np.bincount(concept[self.items], minlength=n_concepts)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        w = np.ones(len(self.items)) if item_weights is None else item_weights[self.items]
        self.cum = np.concatenate([[0.0], np.cumsum(w)])

    def __len__(self) -> int:
        return len(self.items)

    def draw(
        self, match: np.ndarray, n_per_row: np.ndarray, sharpness: float, uniform_share: float, rng: np.random.Generator
    ) -> np.ndarray:
        """Items for each row of `match` ([B, n_concepts]), n_per_row[b] of them, flattened."""
        logits = sharpness * (match - match.max(axis=1, keepdims=True))
        weights = np.exp(logits) * self.counts[None, :]
        cdf = np.cumsum(weights, axis=1)
        cdf /= cdf[:, -1:]
        rows = np.repeat(np.arange(len(match)), n_per_row)
        u = np.minimum(rng.uniform(size=len(rows)), 1.0 - 1e-9)  # keeps rows + u inside row `rows`
        concept = np.minimum(_rowwise_search(cdf, rows, u), cdf.shape[1] - 1)
        lo, hi = self.cum[self.starts[concept]], self.cum[self.starts[concept] + self.counts[concept]]
        target = lo + rng.uniform(size=len(rows)) * (hi - lo)
        picked = np.clip(
            np.searchsorted(self.cum, target, side="right") - 1,
            self.starts[concept],
            self.starts[concept] + self.counts[concept] - 1,
        )
        items = self.items[picked]
        uniform = rng.uniform(size=len(rows)) < uniform_share
        items[uniform] = self.items[rng.integers(0, len(self.items), int(uniform.sum()))]
        return items


def _rowwise_search(cdf: np.ndarray, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """searchsorted of u[i] in cdf[rows[i]] for all i at once (rows offset to one flat array)."""
    flat = (cdf + np.arange(len(cdf))[:, None]).ravel()
    pos = np.searchsorted(flat, rows + u, side="right")
    return pos - rows * cdf.shape[1]


# --- behaviour before day 0 --------------------------------------------------------------------


def draw_history(
    cat: Catalogue, concept: np.ndarray, match: np.ndarray, cfg: ShopConfig, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Clicks before day 0: items ~ exp(sharpness * match) by concept and ~ exp(b * quality) inside."""
    sigma = 0.8
    lengths = np.exp(rng.normal(np.log(cfg.mean_history) - sigma**2 / 2, sigma, cfg.n_users))
    lengths = np.clip(np.rint(lengths), 1, cfg.max_history).astype(np.int64)
    pool = ConceptPool(
        np.flatnonzero(cat.day_added < 0), concept, cfg.n_concepts, np.exp(cfg.click_quality * cat.quality)
    )
    items = []
    for start in range(0, cfg.n_users, 512):
        rows = slice(start, min(start + 512, cfg.n_users))
        items.append(pool.draw(match[rows], lengths[rows], cfg.history_sharpness, 0.0, rng))
    users = np.repeat(np.arange(cfg.n_users), lengths)
    ts = rng.integers(T0 - cfg.history_days * DAY, T0, len(users))
    order = np.lexsort((ts, users))
    return {"user_id": users[order], "item_id": np.concatenate(items)[order], "ts": ts[order]}


# --- impressions and clicks --------------------------------------------------------------------


def click_logit(match: np.ndarray, quality: np.ndarray, position: np.ndarray, cfg: ShopConfig) -> np.ndarray:
    """The known click function, without its noise: a*match + b*quality - decay*position + bias."""
    return cfg.click_bias + cfg.click_match * match + cfg.click_quality * quality - cfg.click_position_decay * position


def _sessions(day: int, cfg: ShopConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    counts = rng.poisson(cfg.sessions_per_day, cfg.n_users)
    users = np.repeat(np.arange(cfg.n_users), counts)
    ts = T0 + day * DAY + rng.integers(0, DAY, len(users))
    return users, ts


def draw_impressions(
    cat: Catalogue,
    concept: np.ndarray,
    match: np.ndarray,
    cfg: ShopConfig,
    rng: np.random.Generator,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Slates of candidates per session, and clicks from `click_logit` plus noise, day by day.

    Train-day candidates come from the items on sale that day. On the test day each slot is, with
    probability cold_share, an item never impressed in the train days (mostly that day's
    arrivals), else one that was.
    """
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("user_id", "item_id", "day", "ts", "position", "cold")}
    impressed = np.zeros(cat.n, dtype=bool)
    k = cfg.slate_size
    for day in range(cfg.n_train_days + 1):
        users, ts = _sessions(day, cfg, rng)
        on_sale = cat.day_added <= day
        slot_users = np.repeat(users, k)
        if day < cfg.test_day:
            pools = [
                (ConceptPool(np.flatnonzero(on_sale), concept, cfg.n_concepts), np.ones(len(slot_users), dtype=bool))
            ]
        else:
            cold_slot = rng.uniform(size=len(slot_users)) < cfg.cold_share
            pools = [
                (ConceptPool(np.flatnonzero(on_sale & ~impressed), concept, cfg.n_concepts), cold_slot),
                (ConceptPool(np.flatnonzero(impressed), concept, cfg.n_concepts), ~cold_slot),
            ]
        items = np.empty(len(slot_users), dtype=np.int64)
        for pool, slots in pools:
            if slots.any():
                if len(pool) == 0:
                    raise ValueError(f"day {day}: no items to draw candidates from; raise n_items/new_items_per_day")
                idx = np.flatnonzero(slots)
                items[idx] = _draw_for(pool, slot_users[idx], match, cfg, rng)
        if day < cfg.test_day:
            impressed[items] = True
        out["user_id"].append(slot_users)
        out["item_id"].append(items)
        out["day"].append(np.full(len(items), day))
        out["ts"].append(np.repeat(ts, k))
        out["position"].append(np.tile(np.arange(k), len(users)))
        out["cold"].append(~impressed[items] if day == cfg.test_day else np.zeros(len(items), dtype=bool))
        if progress:
            progress(1)
    res = {key: np.concatenate(v) for key, v in out.items()}
    m = match[res["user_id"], concept[res["item_id"]]]
    logit = click_logit(m, cat.quality[res["item_id"]], res["position"], cfg)
    logit = logit + rng.normal(0, cfg.click_noise, len(logit))
    res["clicked"] = (rng.uniform(size=len(logit)) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    order = np.lexsort((res["position"], res["user_id"], res["ts"]))
    return {key: v[order] for key, v in res.items()}


def _draw_for(
    pool: ConceptPool, slot_users: np.ndarray, match: np.ndarray, cfg: ShopConfig, rng: np.random.Generator
) -> np.ndarray:
    """One draw per slot, grouped by user so each user's interest row is used once."""
    order = np.argsort(slot_users, kind="stable")
    users, counts = np.unique(slot_users[order], return_counts=True)
    drawn = np.empty(len(slot_users), dtype=np.int64)
    parts = []
    for lo in range(0, len(users), 512):
        batch = slice(lo, lo + 512)
        parts.append(pool.draw(match[users[batch]], counts[batch], cfg.retrieval_sharpness, cfg.retrieval_random, rng))
    drawn[order] = np.concatenate(parts) if parts else drawn[:0]
    return drawn


# --- search logs -------------------------------------------------------------------------------


def item_sets(cat: Catalogue, cfg: ShopConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(pretrain_items, heldout_items): items on sale before the test day, split at random."""
    before = np.flatnonzero(cat.day_added < cfg.test_day)
    held = rng.uniform(size=len(before)) < cfg.heldout_share
    return before[~held], before[held]


def draw_searches(
    cat: Catalogue, concept: np.ndarray, sets: dict[str, np.ndarray], cfg: ShopConfig, rng: np.random.Generator
) -> dict[str, Any]:
    """Query (attribute words, sometimes a picture of another item of the concept) -> bought item,
    plus items of the same category clicked but not bought (hard negatives)."""
    split = np.where(rng.uniform(size=cfg.n_searches) < cfg.heldout_share, "heldout", "train")
    if len(sets["heldout"]) == 0:
        split[:] = "train"
    bought = np.empty(cfg.n_searches, dtype=np.int64)
    image = np.full(cfg.n_searches, -1, dtype=np.int64)
    clicked: list[list[int]] = [[] for _ in range(cfg.n_searches)]
    for name, items in sets.items():
        rows = np.flatnonzero(split == name)
        if len(rows) == 0:
            continue
        bought[rows] = items[rng.integers(0, len(items), len(rows))]
        image[rows] = _same_concept_other(bought[rows], items, concept, rng, cfg.p_query_image)
        for r, negs in zip(rows, _hard_negatives(bought[rows], items, cat, concept, cfg, rng), strict=False):
            clicked[r] = negs
    texts = _query_texts(cat, bought, cfg, rng)
    return {
        "query_id": np.arange(cfg.n_searches, dtype=np.int64),
        "query_text": texts,
        "query_image_item": image,
        "bought_item": bought,
        "clicked_items": clicked,
        "split": split,
    }


def _same_concept_other(
    bought: np.ndarray, items: np.ndarray, concept: np.ndarray, rng: np.random.Generator, p: float
) -> np.ndarray:
    order = np.argsort(concept[items], kind="stable")
    grouped = items[order]
    keys = concept[grouped]
    lo, hi = np.searchsorted(keys, concept[bought], "left"), np.searchsorted(keys, concept[bought], "right")
    count = hi - lo
    pick = grouped[np.minimum(lo + rng.integers(0, np.maximum(count, 1)), len(grouped) - 1)]
    ok = (rng.uniform(size=len(bought)) < p) & (count >= 2) & (pick != bought)
    return np.where(ok, pick, -1)


def _hard_negatives(
    bought: np.ndarray,
    items: np.ndarray,
    cat: Catalogue,
    concept: np.ndarray,
    cfg: ShopConfig,
    rng: np.random.Generator,
) -> list[list[int]]:
    order = np.argsort(cat.category[items], kind="stable")
    grouped = items[order]
    keys = cat.category[grouped]
    lo = np.searchsorted(keys, cat.category[bought], "left")
    count = np.searchsorted(keys, cat.category[bought], "right") - lo
    n_neg = rng.integers(0, cfg.max_hard_negatives + 1, len(bought))
    offsets = rng.integers(0, 1 << 30, (len(bought), max(cfg.max_hard_negatives, 1)))
    picks = grouped[np.minimum(lo[:, None] + offsets % np.maximum(count, 1)[:, None], len(grouped) - 1)]
    keep = (np.arange(picks.shape[1])[None, :] < n_neg[:, None]) & (concept[picks] != concept[bought][:, None])
    return [sorted(set(row[k].tolist())) for row, k in zip(picks, keep, strict=False)]


def _query_texts(cat: Catalogue, bought: np.ndarray, cfg: ShopConfig, rng: np.random.Generator) -> list[str]:
    n = len(bought)
    say = rng.uniform(size=(n, 3)) < np.array([cfg.p_query_category, cfg.p_query_colour, cfg.p_query_material])
    say[~say.any(axis=1), 0] = True
    picks = rng.integers(0, 1 << 30, (n, 5))
    filler = rng.uniform(size=n) < 0.25
    texts = []
    for i, item in enumerate(bought):
        p = picks[i]
        words = []
        if say[i, 1]:
            syn = COLOURS[cat.colour[item]][2]
            words.append(syn[p[0] % len(syn)])
        if say[i, 2]:
            syn = MATERIALS[cat.material[item]][1]
            words.append(syn[p[1] % len(syn)])
        if say[i, 0]:
            syn = FAMILIES[cat.category[item] // 4][1][cat.category[item] % 4]
            words.append(syn[p[2] % len(syn)])
        if filler[i]:
            words.insert(int(p[3] % (len(words) + 1)), QUERY_FILLERS[p[4] % len(QUERY_FILLERS)])
        texts.append(" ".join(words))
    return texts


# --- the whole shop ----------------------------------------------------------------------------


def streams(seed: int) -> dict[str, np.random.Generator]:
    children = np.random.SeedSequence(seed).spawn(len(STREAMS))
    return {name: np.random.default_rng(child) for name, child in zip(STREAMS, children, strict=False)}


def generate_into(out: Path, cfg: ShopConfig, seed: int, size: str = "custom", progress: bool = False) -> Path:
    """Draw the whole shop from (cfg, seed) and write its files into `out`."""
    from tqdm import tqdm

    from mmrank.shop import require_parquet

    require_parquet()

    rngs = streams(seed)
    steps = 1 + -(-cfg.n_items // IMAGE_CHUNK) + 1 + (cfg.n_train_days + 1) + 2
    with tqdm(total=steps, desc=f"shop {size}", unit="step", disable=not progress) as bar:

        def tick(_: int = 1) -> None:
            bar.update(1)

        bar.set_postfix_str("catalogue")
        cat = draw_catalogue(cfg, rngs["catalogue"])
        cat.titles = draw_titles(cat, cfg, rngs["titles"])
        concept = concept_of(cat.category, cat.colour, cat.material, cfg)
        tick()
        bar.set_postfix_str("images")
        images = draw_images(cat, cfg, rngs["images"], progress=tick)
        bar.set_postfix_str("users and history")
        anchors, strength = draw_users(cfg, rngs["users"])
        match = interest_matrix(anchors, strength, cfg)
        history = draw_history(cat, concept, match, cfg, rngs["history"])
        tick()
        bar.set_postfix_str("impressions")
        imps = draw_impressions(cat, concept, match, cfg, rngs["impressions"], progress=tick)
        bar.set_postfix_str("searches")
        search_rng = rngs["searches"]
        pretrain, heldout = item_sets(cat, cfg, search_rng)
        searches = draw_searches(cat, concept, {"train": pretrain, "heldout": heldout}, cfg, search_rng)
        tick()
        bar.set_postfix_str("writing")
        write_shop(
            out, cfg, seed, size, cat, concept, images, history, imps, searches, pretrain, heldout, anchors, strength
        )
        tick()
    return out


def _behaviours(history: dict[str, np.ndarray], imps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    clicked = imps["clicked"] == 1
    users = np.concatenate([history["user_id"], imps["user_id"][clicked]])
    items = np.concatenate([history["item_id"], imps["item_id"][clicked]])
    ts = np.concatenate([history["ts"], imps["ts"][clicked]])
    order = np.lexsort((np.arange(len(ts)), users, ts))
    return {"user_id": users[order], "item_id": items[order], "day": (ts[order] - T0) // DAY, "ts": ts[order]}


def write_shop(
    out: Path,
    cfg: ShopConfig,
    seed: int,
    size: str,
    cat: Catalogue,
    concept: np.ndarray,
    images: np.ndarray,
    history: dict[str, np.ndarray],
    imps: dict[str, np.ndarray],
    searches: dict[str, Any],
    pretrain: np.ndarray,
    heldout: np.ndarray,
    anchors: np.ndarray,
    strength: np.ndarray,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    i64, i32 = pa.int64(), pa.int32()

    def table(columns: dict[str, tuple[Any, pa.DataType]]) -> pa.Table:
        return pa.table({k: pa.array(v, type=t) for k, (v, t) in columns.items()})

    pq.write_table(
        table(
            {
                "item_id": (np.arange(cat.n), i64),
                "category": (cat.category, i32),
                "colour": (cat.colour, i32),
                "material": (cat.material, i32),
                "concept": (concept, i32),
                "brand": (cat.brand, i32),
                "price_bucket": (cat.price_bucket, i32),
                "title": (cat.titles, pa.string()),
                "day_added": (cat.day_added, i32),
            }
        ),
        out / "items.parquet",
    )
    np.save(out / "images.npy", images)
    pq.write_table(
        table(
            {
                "query_id": (searches["query_id"], i64),
                "query_text": (searches["query_text"], pa.string()),
                "query_image_item": (searches["query_image_item"], i64),
                "bought_item": (searches["bought_item"], i64),
                "clicked_items": (searches["clicked_items"], pa.list_(i64)),
                "split": (searches["split"].tolist(), pa.string()),
            }
        ),
        out / "searches.parquet",
    )
    beh = _behaviours(history, imps)
    pq.write_table(
        table(
            {
                "user_id": (beh["user_id"], i64),
                "item_id": (beh["item_id"], i64),
                "day": (beh["day"], i32),
                "ts": (beh["ts"], i64),
            }
        ),
        out / "behaviours.parquet",
    )
    split = np.where(imps["day"] < cfg.test_day, "train", "test")
    pq.write_table(
        table(
            {
                "user_id": (imps["user_id"], i64),
                "item_id": (imps["item_id"], i64),
                "day": (imps["day"], i32),
                "ts": (imps["ts"], i64),
                "position": (imps["position"], i32),
                "clicked": (imps["clicked"], pa.int8()),
                "split": (split.tolist(), pa.string()),
                "cold": (imps["cold"], pa.bool_()),
            }
        ),
        out / "impressions.parquet",
    )
    test = imps["day"] == cfg.test_day
    splits = {
        "train_days": list(range(cfg.n_train_days)),
        "test_day": cfg.test_day,
        "cold_items": sorted(set(imps["item_id"][test & imps["cold"]].tolist())),
        "pretrain_items": pretrain.tolist(),
        "heldout_items": heldout.tolist(),
    }
    (out / "splits.json").write_text(json.dumps(splits) + "\n")
    save_npz(
        out / "truth.npz",
        {"quality": cat.quality.astype(np.float32), "user_anchors": anchors, "user_strength": strength},
    )
    files = [
        "items.parquet",
        "images.npy",
        "searches.parquet",
        "behaviours.parquet",
        "impressions.parquet",
        "splits.json",
        "truth.npz",
    ]
    manifest = {
        "format": FORMAT,
        "size": size,
        "seed": seed,
        "config": cfg.to_dict(),
        "counts": {
            "items": cat.n,
            "users": cfg.n_users,
            "concepts": cfg.n_concepts,
            "searches": cfg.n_searches,
            "behaviours": int(len(beh["ts"])),
            "impressions": int(len(imps["ts"])),
            "train_impressions": int((~test).sum()),
            "test_impressions": int(test.sum()),
            "cold_test_impressions": int((test & imps["cold"]).sum()),
            "cold_items": len(splits["cold_items"]),
            "clicks": int(imps["clicked"].sum()),
        },
        "vocab": vocab(cfg, cat.brand_names),
        "files": {name: sha256(out / name) for name in files},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with fixed entry dates, so the file's bytes depend on the arrays only."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(zipfile.ZipInfo(name + ".npy", date_time=(2026, 1, 1, 0, 0, 0)), buffer.getvalue())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
