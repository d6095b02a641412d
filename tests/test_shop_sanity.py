"""Sanity checks that would catch a broken generator: the hidden structure is there and shows.

- a simple classifier recovers the concept from picture + title far better than from either;
- the test day's share of cold impressions is the configured one.
(Click rate against interest match and determinism are in test_shop.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

from mmrank import shop as shop_mod

ATTRIBUTES = ("category", "colour", "material")


def image_features(images: np.ndarray) -> np.ndarray:
    """Colour histogram of the foreground (pixels unlike the border) + radial FFT energy + area."""
    n = len(images)
    pixels = images.astype(np.float32)
    border = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], axis=1)
    foreground = np.abs(pixels - np.median(border, axis=1)[:, None, None, :]).sum(-1) > 60
    q = (images // 64).astype(np.int64)
    code = q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2] + 64 * np.arange(n)[:, None, None]
    code = np.where(foreground, code, 64 * n)
    hist = np.bincount(code.ravel(), minlength=64 * n + 1)[: 64 * n].reshape(n, 64).astype(np.float64)
    hist /= np.maximum(hist.sum(axis=1, keepdims=True), 1)
    grey = pixels.mean(-1)
    spectrum = np.abs(np.fft.rfft2(grey - grey.mean(axis=(1, 2), keepdims=True)))
    radius = np.hypot(np.fft.fftfreq(64)[:, None] * 64, np.fft.rfftfreq(64)[None, :] * 64).astype(int).clip(0, 31)
    radial = np.log1p(spectrum.reshape(n, -1) @ np.eye(32)[radius.ravel()])
    x = np.hstack([hist, radial, foreground.mean(axis=(1, 2))[:, None]])
    return (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)


def title_features(titles: list[str]) -> np.ndarray:
    from sklearn.feature_extraction.text import CountVectorizer

    return CountVectorizer(binary=True).fit_transform(titles).toarray().astype(np.float64)


def concept_accuracy(x: np.ndarray, labels: dict[str, np.ndarray], train: np.ndarray) -> float:
    """Share of held-out items whose category, colour and material are all predicted right."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    right = np.ones((~train).sum(), dtype=bool)
    for y in labels.values():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(max_iter=200, C=0.5, tol=1e-3).fit(x[train], y[train])
        right &= model.predict(x[~train]) == y[~train]
    return float(right.mean())


@pytest.fixture(scope="module")
def catalogue_shop(tmp_path_factory: pytest.TempPathFactory) -> shop_mod.Shop:
    knobs = {"n_items": 1200, "new_items_per_day": 20, "n_users": 10, "n_searches": 10}
    return shop_mod.load(shop_mod.generate("tiny", 0, tmp_path_factory.mktemp("catalogue"), knobs), mmap_images=False)


def test_picture_and_title_together_recover_the_concept_far_better_than_either(catalogue_shop):
    items = catalogue_shop.items
    labels = {a: items[a].to_numpy() for a in ATTRIBUTES}
    train = np.arange(len(items)) < int(0.75 * len(items))
    x_image, x_title = image_features(np.asarray(catalogue_shop.images)), title_features(items["title"].tolist())
    image = concept_accuracy(x_image, labels, train)
    title = concept_accuracy(x_title, labels, train)
    both = concept_accuracy(np.hstack([x_image, x_title]), labels, train)
    chance = 1 / catalogue_shop.config.n_concepts
    print(f"concept accuracy: image {image:.3f}, title {title:.3f}, both {both:.3f}, chance {chance:.4f}")
    assert image > 10 * chance and title > 10 * chance, (image, title)  # each modality carries signal
    assert both > 1.5 * max(image, title), (image, title, both)
    assert both > 0.35, (image, title, both)


@pytest.mark.parametrize("cold_share", [0.0, 0.5])
def test_the_test_day_has_the_configured_share_of_cold_impressions(tmp_path, cold_share):
    knobs = {
        "n_items": 400,
        "new_items_per_day": 30,
        "n_users": 120,
        "n_searches": 10,
        "cold_share": cold_share,
        "mean_history": 10,
    }
    shop = shop_mod.load(shop_mod.generate("tiny", 5, tmp_path, knobs, cache=False))
    test = shop.impressions[shop.impressions["split"] == "test"]
    share = float(test["cold"].mean())
    assert abs(share - cold_share) < 4 * np.sqrt(max(cold_share * (1 - cold_share), 1e-4) / len(test)) + 1e-9
    assert shop.manifest["counts"]["cold_test_impressions"] == int(test["cold"].sum())


def test_tiny_default_cold_share_matches_its_config(tmp_path):
    shop = shop_mod.load(shop_mod.generate("tiny", 0, tmp_path))
    test = shop.impressions[shop.impressions["split"] == "test"]
    expected = shop.config.cold_share
    assert abs(float(test["cold"].mean()) - expected) < 4 * np.sqrt(expected * (1 - expected) / len(test))


@pytest.fixture(scope="module")
def clicks_shop(tmp_path_factory: pytest.TempPathFactory) -> shop_mod.Shop:
    knobs = {"n_users": 600, "mean_history": 20, "n_searches": 10}
    return shop_mod.load(shop_mod.generate("tiny", 7, tmp_path_factory.mktemp("clicks"), knobs))


def test_concepts_score_cold_items_that_item_ids_cannot_and_ids_learn_quality(clicks_shop):
    """The paper's claim is testable here: on cold test items a per-item click rate knows nothing
    (AUC 0.5) while the concept's similarity to the user's history still ranks clicks; on warm
    items the per-item click rate tracks the hidden quality that no concept shows."""
    from mmrank.shop_baselines import item_click_rate, test_day_baselines

    shop = clicks_shop
    result = test_day_baselines(shop)
    print({k: {s: round(v, 3) for s, v in r.items()} for k, r in result.items()})
    assert result["impressions"]["cold"] > 1000
    assert result["item click rate (ID)"]["cold"] == 0.5
    assert result["history concept similarity"]["cold"] > 0.56
    assert result["item click rate (ID)"]["warm"] > 0.53
    assert result["hidden interest match"]["cold"] > result["history concept similarity"]["cold"]
    test = shop.impressions[(shop.impressions["split"] == "test") & ~shop.impressions["cold"]]
    items = test["item_id"].to_numpy()
    assert np.corrcoef(shop.truth["quality"][items], item_click_rate(shop, items))[0, 1] > 0.3


def test_auc_matches_the_pairwise_definition():
    from mmrank.shop_baselines import auc

    rng = np.random.default_rng(0)
    labels, scores = rng.uniform(size=200) < 0.3, rng.integers(0, 8, 200).astype(float)
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc(labels, scores) == pytest.approx(pairwise)
    assert auc(labels, np.ones(200)) == 0.5
