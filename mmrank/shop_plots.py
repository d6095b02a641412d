"""The pictures of docs/data.md: a grid of items with their titles, and click rate against match.

matplotlib is imported inside the functions (the Agg backend: no display needed).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import numpy.typing as npt

from mmrank.shop import Shop


def item_grid(shop: Shop, out: str | Path, rows: int = 4, cols: int = 6, seed: int = 0) -> Path:
    """A grid of random items: picture, title, and (small, grey) the hidden concept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(shop.n_items, size=min(rows * cols, shop.n_items), replace=False))
    voc = shop.vocab
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.55, rows * 1.95), dpi=80)
    for ax, item in zip(np.ravel(axes), picks, strict=False):
        row = shop.items.iloc[int(item)]
        ax.imshow(np.asarray(shop.images[item]), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("\n".join(textwrap.wrap(row["title"], 20)[:2]), fontsize=7)
        concept = (
            f"{voc['colour'][row['colour']]} {voc['material'][row['material']]} {voc['category'][row['category']]}"
        )
        ax.set_xlabel(concept, fontsize=6, color="grey")
    for ax in np.ravel(axes)[len(picks) :]:
        ax.axis("off")
    fig.tight_layout(pad=0.3)
    out = Path(out)
    _save_small_png(fig, out)
    plt.close(fig)
    return out


def _save_small_png(fig: object, out: Path) -> None:
    """Save as a 256-colour PNG: the committed pictures stay well under 300 KB."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")  # type: ignore[attr-defined]  # `fig`: a Figure typed object
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(256).save(out, optimize=True)


def click_rate_by_match(shop: Shop, bins: int = 10) -> dict[str, npt.NDArray[np.float64]]:
    """Impressions bucketed by hidden interest match: centre, click rate, count, model's mean prob."""
    from mmrank.shop_gen import click_logit

    imps = shop.impressions
    match = shop.interest_match(imps["user_id"].to_numpy(), imps["item_id"].to_numpy())
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(match, edges) - 1, 0, bins - 1)
    clicked = imps["clicked"].to_numpy(np.float64)
    count = np.bincount(which, minlength=bins)
    rate = np.bincount(which, weights=clicked, minlength=bins) / np.maximum(count, 1)
    quality = shop.truth["quality"][imps["item_id"].to_numpy()]
    prob = 1 / (1 + np.exp(-click_logit(match, quality, imps["position"].to_numpy(), shop.config)))
    expected = np.bincount(which, weights=prob, minlength=bins) / np.maximum(count, 1)
    return {"centre": (edges[:-1] + edges[1:]) / 2, "rate": rate, "count": count, "expected": expected}


def click_rate_plot(shop: Shop, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = click_rate_by_match(shop)
    seen = curve["count"] > 0
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=90)
    ax.plot(curve["centre"][seen], curve["rate"][seen], "o-", label="observed click rate")
    ax.plot(curve["centre"][seen], curve["expected"][seen], "--", color="grey", label="click function (no noise), mean")
    for x, y, n in zip(curve["centre"][seen], curve["rate"][seen], curve["count"][seen], strict=False):
        ax.annotate(f"{n}", (x, y), textcoords="offset points", xytext=(0, 6), fontsize=6, ha="center")
    ax.set_xlabel("interest match(user, item concept)")
    ax.set_ylabel("click rate")
    ax.set_title(
        f"{shop.manifest['size']} shop, seed {shop.manifest['seed']}: {len(shop.impressions):,} impressions", fontsize=9
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    _save_small_png(fig, out)
    plt.close(fig)
    return out
