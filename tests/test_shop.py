"""The shop's files, loader, histories and oracle vectors (docs/architecture.md, "Shop data")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmrank import shop as shop_mod
from mmrank.shop_config import config_for
from mmrank.shop_gen import sha256


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shop_mod.generate("tiny", seed=0, out=tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> shop_mod.Shop:
    return shop_mod.load(tiny_dir)


def test_tiny_shop_has_every_file_with_the_contract_columns(tiny):
    cfg = tiny.config
    assert len(tiny.items) == cfg.n_items
    assert tiny.items["item_id"].tolist() == list(range(cfg.n_items))
    assert str(tiny.items["item_id"].dtype) == "int64" and str(tiny.items["price_bucket"].dtype) == "int32"
    assert {"category", "colour", "material", "concept", "brand", "title", "day_added"} <= set(tiny.items)
    assert tiny.images.shape == (cfg.n_items, 64, 64, 3) and tiny.images.dtype == np.uint8
    assert list(tiny.searches.columns) == [
        "query_id",
        "query_text",
        "query_image_item",
        "bought_item",
        "clicked_items",
        "split",
    ]
    assert list(tiny.behaviours.columns) == ["user_id", "item_id", "day", "ts"]
    assert list(tiny.impressions.columns) == ["user_id", "item_id", "day", "ts", "position", "clicked", "split", "cold"]
    assert str(tiny.impressions["clicked"].dtype) == "int8" and str(tiny.impressions["cold"].dtype) == "bool"
    assert set(tiny.impressions["split"]) == {"train", "test"}
    assert set(tiny.splits) == {"train_days", "test_day", "cold_items", "pretrain_items", "heldout_items"}
    assert tiny.splits["test_day"] == cfg.test_day and tiny.splits["train_days"] == list(range(cfg.n_train_days))


def test_manifest_checksums_match_the_files(tiny_dir, tiny):
    files = tiny.manifest["files"]
    assert set(files) == set(shop_mod.FILES) - {"manifest.json"}
    for name, digest in files.items():
        assert sha256(tiny_dir / name) == digest, name
    assert tiny.manifest["counts"]["impressions"] == len(tiny.impressions)
    assert tiny.manifest["seed"] == 0 and tiny.manifest["config"]["n_items"] == tiny.n_items


def test_same_seed_and_config_give_identical_files_and_another_seed_does_not(tmp_path):
    overrides = {"n_items": 300, "new_items_per_day": 20, "n_users": 40, "n_searches": 300}
    a = shop_mod.generate("tiny", 3, tmp_path / "a", overrides, cache=False)
    b = shop_mod.generate("tiny", 3, tmp_path / "b", overrides, cache=False)
    c = shop_mod.generate("tiny", 4, tmp_path / "c", overrides, cache=False)
    for name in shop_mod.FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "images.npy").read_bytes() != (c / "images.npy").read_bytes()
    assert (a / "impressions.parquet").read_bytes() != (c / "impressions.parquet").read_bytes()


def test_generate_serves_later_calls_from_its_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMRANK_SHOP_CACHE", str(tmp_path / "cache"))
    overrides = {"n_items": 200, "new_items_per_day": 10, "n_users": 20, "n_searches": 100}
    first = shop_mod.generate("tiny", 1, tmp_path / "first", overrides)
    monkeypatch.setattr("mmrank.shop_gen.generate_into", lambda *a, **k: pytest.fail("regenerated"))
    second = shop_mod.generate("tiny", 1, tmp_path / "second", overrides)
    assert json.loads((first / "manifest.json").read_text()) == json.loads((second / "manifest.json").read_text())
    assert len(list((tmp_path / "cache").glob("*-tiny-1-*/manifest.json"))) == 1


def test_config_rejects_unknown_knobs_and_impossible_values():
    with pytest.raises(ValueError, match="unknown shop config keys"):
        config_for("tiny", {"n_itemz": 5})
    with pytest.raises(ValueError, match="cold_share"):
        config_for("tiny", {"cold_share": 1.5})
    with pytest.raises(ValueError, match="unknown size"):
        config_for("huge")


def _brute_history(shop: shop_mod.Shop, user: int, before: int, max_len: int) -> list[int]:
    b = shop.behaviours
    rows = b[(b["user_id"] == user) & (b["ts"] < before)]
    order = np.lexsort((np.arange(len(rows)), rows["ts"].to_numpy()))
    return rows["item_id"].to_numpy()[order][-max_len:].tolist() if max_len else []


def test_history_is_the_last_clicks_strictly_before_ts_newest_last_left_padded(tiny):
    imps = tiny.impressions[tiny.impressions["split"] == "test"].drop_duplicates(["user_id", "ts"]).head(40)
    users, ts = imps["user_id"].to_numpy(), imps["ts"].to_numpy()
    for max_len in (5, 64):
        ids, mask = tiny.history(users, ts, max_len)
        assert ids.shape == mask.shape == (len(users), max_len) and ids.dtype == np.int64 and mask.dtype == bool
        for row, (u, t) in enumerate(zip(users, ts, strict=False)):
            expected = _brute_history(tiny, int(u), int(t), max_len)
            n = len(expected)
            assert ids[row, max_len - n :].tolist() == expected
            assert mask[row].tolist() == [False] * (max_len - n) + [True] * n
            assert (ids[row, : max_len - n] == 0).all()
    # a scalar cut-off applies to every user; before any click there is no history
    ids, mask = tiny.history([0, 1], -1, 8)
    assert not mask.any() and (ids == 0).all()


def test_history_never_contains_the_clicks_of_the_impression_itself(tiny):
    clicked = tiny.impressions[tiny.impressions["clicked"] == 1].head(50)
    ids, mask = tiny.history(clicked["user_id"].to_numpy(), clicked["ts"].to_numpy(), 1000)
    ts_of = tiny.behaviours.groupby("user_id")["ts"]
    for row, (u, t) in enumerate(zip(clicked["user_id"], clicked["ts"], strict=False)):
        assert mask[row].sum() == int((ts_of.get_group(u) < t).sum())


def test_concept_vectors_are_unit_and_their_cosines_follow_the_concept_overlap(tiny):
    vec = shop_mod.concept_vectors(tiny, dim=128, seed=0)
    assert vec.shape == (tiny.n_items, 128) and vec.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    items = tiny.items
    cos = vec @ vec.T
    concept = items["concept"].to_numpy()
    same_concept = concept[:, None] == concept[None, :]
    same_cat = items["category"].to_numpy()[:, None] == items["category"].to_numpy()[None, :]
    np.testing.assert_allclose(cos[same_concept], 1.0, atol=1e-5)
    # graded: same category (other colour/material) sits between same concept and unrelated items
    assert cos[same_cat & ~same_concept].mean() > cos[~same_cat].mean() + 0.2
    noisy = shop_mod.concept_vectors(tiny, dim=128, seed=0, noise=0.5)
    assert 0.5 < float((noisy * vec).sum(axis=1).mean()) < 0.99
    assert not np.allclose(shop_mod.concept_vectors(tiny, dim=128, seed=1), vec)


def test_new_items_arrive_every_day_and_cold_items_were_never_impressed_in_training(tiny):
    cfg = tiny.config
    added = tiny.items["day_added"]
    assert (added == -1).sum() == cfg.n_initial_items
    for day in range(cfg.test_day + 1):
        assert (added == day).sum() == cfg.new_items_per_day
    imps = tiny.impressions
    train_items = set(imps.loc[imps["split"] == "train", "item_id"])
    test = imps[imps["split"] == "test"]
    assert not (set(tiny.splits["cold_items"]) & train_items)
    assert test["cold"].tolist() == [i not in train_items for i in test["item_id"]]
    # nothing is impressed before it is on sale
    assert (imps["day"].to_numpy() >= added.to_numpy()[imps["item_id"].to_numpy()]).all()


def test_searches_pair_queries_with_bought_items_and_same_category_hard_negatives(tiny):
    s, items = tiny.searches, tiny.items
    pretrain, heldout = set(tiny.splits["pretrain_items"]), set(tiny.splits["heldout_items"])
    assert not pretrain & heldout and not (pretrain | heldout) & set(tiny.splits["cold_items"])
    assert s.loc[s["split"] == "train", "bought_item"].isin(pretrain).all()
    assert s.loc[s["split"] == "heldout", "bought_item"].isin(heldout).all()
    concept, category = items["concept"].to_numpy(), items["category"].to_numpy()
    with_image = s[s["query_image_item"] >= 0]
    assert 0 < len(with_image) < len(s)
    assert (concept[with_image["query_image_item"]] == concept[with_image["bought_item"]]).all()
    assert (with_image["query_image_item"] != with_image["bought_item"]).all()
    negatives = [(b, n) for b, ns in zip(s["bought_item"], s["clicked_items"], strict=False) for n in ns]
    assert negatives and all(category[n] == category[b] and concept[n] != concept[b] for b, n in negatives)
    assert (s["query_text"].str.len() > 0).all()


def test_click_rate_rises_with_interest_match(tiny):
    from mmrank.shop_plots import click_rate_by_match

    curve = click_rate_by_match(tiny, bins=5)
    rate = curve["rate"][curve["count"] > 50]
    assert len(rate) >= 4
    assert (np.diff(rate) > 0).all(), rate
    assert rate[-1] > 3 * rate[0]


def test_cli_generates_a_shop_and_writes_a_concept_space(tmp_path, capsys):
    from mmrank.cli import main
    from mmrank.space import load_space

    config = tmp_path / "knobs.json"
    config.write_text(json.dumps({"n_items": 200, "new_items_per_day": 10, "n_users": 20, "n_searches": 100}))
    assert (
        main(
            [
                "shop",
                "generate",
                "--size",
                "tiny",
                "--seed",
                "2",
                "--out",
                str(tmp_path / "shop"),
                "--config",
                str(config),
                "--no-progress",
            ]
        )
        == 0
    )
    manifest = json.loads((tmp_path / "shop" / "manifest.json").read_text())
    assert manifest["config"]["n_items"] == 200 and manifest["seed"] == 2
    assert (
        main(
            [
                "shop",
                "concept-space",
                "--data",
                str(tmp_path / "shop"),
                "--out",
                str(tmp_path / "space"),
                "--dim",
                "32",
                "--version",
                "oracle-v1",
            ]
        )
        == 0
    )
    space = load_space(tmp_path / "space")
    assert space.version == "oracle-v1" and space.vectors.shape == (200, 32) and space.present.all()
    capsys.readouterr()
    assert main(["shop", "baselines", "--data", str(tmp_path / "shop")]) == 0
    rows = {line[:32].strip(): line[32:].split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["item click rate (ID)"][1] == "0.500"
    assert int(rows["impressions"][0]) + int(rows["impressions"][1]) == manifest["counts"]["test_impressions"]


def test_every_knob_is_documented_and_the_doc_pictures_exist(repo_root):
    import dataclasses

    from mmrank.shop_config import ShopConfig

    doc = (repo_root / "docs" / "data.md").read_text()
    missing = [f.name for f in dataclasses.fields(ShopConfig) if f"| `{f.name}` |" not in doc]
    assert not missing, f"knobs missing from docs/data.md: {missing}"
    for picture in ("img/shop-grid.png", "img/shop-click-rate.png"):
        assert f"({picture})" in doc
        path = repo_root / "docs" / picture
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size < 300_000
