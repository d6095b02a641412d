"""The ranker trained on a real `tiny` shop: CLI, artifact, serving path, recipe, table.

One tiny shop and its oracle concept space are generated once per module; every training here
runs on it in a second or two.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrank import cli, shop
from mmrank.predictors import artifact, table, train
from mmrank.predictors.model import RankerConfig, id_index
from mmrank.space import save_space

HISTORY = 20


@pytest.fixture(scope="module")
def shop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shop")
    shop.generate("tiny", seed=0, out=out)
    return out


@pytest.fixture(scope="module")
def space_dir(shop_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    vectors = shop.concept_vectors(shop.load(shop_dir), dim=32, seed=0)
    present = np.ones(len(vectors), dtype=bool)
    present[::17] = False  # a few items the space has not embedded yet
    return save_space(tmp_path_factory.mktemp("space"), "concepts-v1", vectors, present)


@pytest.fixture(scope="module")
def data(shop_dir: Path, space_dir: Path) -> tuple:
    return train.load_data(str(shop_dir), HISTORY, str(space_dir))


def _config(data: tuple, variant: str) -> RankerConfig:
    _, _, catalogue, vocab = data
    return RankerConfig(variant=variant, mm_dim=catalogue.vectors.shape[1], history_length=HISTORY, **vocab)


def test_train_cli_writes_an_artifact_pinned_to_its_space(
    shop_dir: Path, space_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "ranker"
    assert (
        cli.main(
            [
                "ranker",
                "train",
                "--data",
                str(shop_dir),
                "--embeddings",
                str(space_dir),
                "--variant",
                "simtier-make",
                "--make-epochs",
                "1",
                "--history-length",
                str(HISTORY),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    meta = json.loads((out / "ranker.json").read_text())
    assert meta["encoder_version"] == "concepts-v1" == printed["encoder_version"]
    assert meta["variant"] == "simtier-make" and meta["dim"] == 32 and meta["history_length"] == HISTORY
    assert meta["item_features"]["file"] == "item_features.npy"
    assert set(meta["metrics"]) == {"overall", "cold"} and meta["training"]["make_epochs"] == 1
    features = np.load(out / "item_features.npy")
    items = shop.load(shop_dir).items.sort_values("item_id")
    assert features.shape == (len(items), 2)
    assert (features[:, 0] == items["category"].to_numpy()).all() and (
        features[:, 1] == items["brand"].to_numpy()
    ).all()
    model, loaded = artifact.load_ranker(out)
    assert loaded == meta and not model.training

    # eval reproduces the training run's test metrics from the artifact alone
    assert (
        cli.main(["ranker", "eval", "--model", str(out), "--data", str(shop_dir), "--embeddings", str(space_dir)]) == 0
    )
    evaluated = json.loads(capsys.readouterr().out)["metrics"]
    for subset in ("overall", "cold"):
        assert evaluated[subset] == pytest.approx(meta["metrics"][subset])
    # and refuses a space the ranker was not trained on
    other = save_space(tmp_path / "other", "concepts-v2", np.load(space_dir / "embeddings.npy"))
    assert cli.main(["ranker", "eval", "--model", str(out), "--data", str(shop_dir), "--embeddings", str(other)]) == 2
    assert "concepts-v1" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["vector", "simtier-make"])
def test_serving_path_equals_training_path(data: tuple, variant: str, tmp_path: Path) -> None:
    """score_candidates (one history shared by C candidates, features from the artifact's table)
    gives the logits the batched training forward gives each (history, candidate) row."""
    train_data, test_data, catalogue, _ = data
    model, _ = train.train_ranker(train_data, catalogue, _config(data, variant), train.TrainSettings(make_epochs=1))
    artifact.save_ranker(tmp_path, model, catalogue.encoder_version, catalogue.item_features)
    served, _ = artifact.load_ranker(tmp_path)
    row = int(np.argmax(test_data.history_mask.sum(1)))
    candidates = np.r_[test_data.item[:7], len(catalogue.category) + 5]  # the last one is unknown
    rows = np.full(len(candidates), row)
    batch = train.Impressions(
        test_data.user[rows],
        candidates,
        test_data.label[rows],
        test_data.cold[rows],
        test_data.history[rows],
        test_data.history_mask[rows],
    )
    expected = train.predict(model, batch, catalogue)
    hist = test_data.history[row]
    known = candidates < len(catalogue.vectors)
    cand_emb = np.where(known[:, None], catalogue.vectors[np.minimum(candidates, len(catalogue.vectors) - 1)], 0)
    got = served.score_candidates(
        int(test_data.user[row]),
        torch.from_numpy(hist),
        torch.from_numpy(test_data.history_mask[row]),
        torch.from_numpy(catalogue.vectors[hist]),
        torch.from_numpy(catalogue.present[hist] & test_data.history_mask[row]),
        torch.from_numpy(candidates),
        torch.from_numpy(cand_emb.astype(np.float32)),
        torch.from_numpy(catalogue.present[np.minimum(candidates, len(catalogue.present) - 1)] & known),
    )
    assert got.shape == (len(candidates),)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_make_trains_alone_first_then_stays_frozen_through_the_id_epoch(data: tuple) -> None:
    train_data, _, catalogue, _ = data
    torch.manual_seed(0)
    model = train.Ranker(_config(data, "simtier-make"))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    settings = train.TrainSettings(make_epochs=2)
    snapshots = train.pretrain_make(model, train_data, catalogue, settings, snapshots=(1, 2))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, initial[k])}
    assert changed and all(k.startswith("make.") for k in changed)  # ID parameters untouched
    assert not torch.equal(snapshots[1]["out.weight"], snapshots[2]["out.weight"])
    make_before = {k: v.clone() for k, v in model.make.state_dict().items()}
    train.train_id_epoch(model, train_data, catalogue, settings)
    assert all(torch.equal(v, make_before[k]) for k, v in model.make.state_dict().items())
    assert not torch.equal(model.user_emb.weight, initial["user_emb.weight"])


def test_make_keeps_training_in_the_id_epoch_only_when_asked(data: tuple) -> None:
    """`make_finetune_lr` > 0: MAKE's weights move during the ID epoch (and its own tier weights
    with them); MAKE's module carries SimTier weights of its own, separate from the ranker's."""
    train_data, _, catalogue, _ = data
    torch.manual_seed(0)
    model = train.Ranker(_config(data, "simtier-make"))
    assert model.make.simtier is not None and model.make.simtier.weight is not model.simtier.weight
    before = {k: v.clone() for k, v in model.make.state_dict().items()}
    train.train_id_epoch(model, train_data, catalogue, train.TrainSettings(make_finetune_lr=0.001))
    moved = {k for k, v in model.make.state_dict().items() if not torch.equal(v, before[k])}
    assert "simtier.weight" in moved and "out.weight" in moved


def test_unseen_ids_share_the_unknown_row(data: tuple) -> None:
    train_data, _, catalogue, _ = data
    model, _ = train.train_ranker(train_data, catalogue, _config(data, "id"), train.TrainSettings())
    seen = np.zeros(model.config.n_items, bool)
    seen[train_data.item] = True
    seen[train_data.history[train_data.history_mask]] = True
    weights = model.item_emb.weight.detach()
    unseen_rows = id_index(torch.from_numpy(np.flatnonzero(~seen)), model.config.n_items)
    assert (~seen).any() and torch.all(weights[unseen_rows] == 0) and torch.all(weights[0] == 0)
    assert torch.all(weights[id_index(torch.from_numpy(np.flatnonzero(seen)), model.config.n_items)].abs().sum(1) > 0)


def test_models_learn_and_similarity_tiers_help_on_the_shop(data: tuple) -> None:
    """The shop's clicks follow interest in concepts, which the oracle space encodes: every
    variant must beat chance, and SimTier must beat the ID model on test AUC."""
    train_data, test_data, catalogue, _ = data
    auc = {}
    for variant in ("id", "simtier"):  # small batches: tiny's one epoch is only ~200 steps of 32
        model, _ = train.train_ranker(train_data, catalogue, _config(data, variant), train.TrainSettings(batch_size=32))
        auc[variant] = train.evaluate(model, test_data, catalogue)["overall"]["auc"]
    # measured over seeds 0-2: ID 0.524-0.556, SimTier 0.033-0.036 above it
    assert auc["id"] > 0.51, auc
    assert auc["simtier"] > max(auc["id"] + 0.015, 0.54), auc


def test_table_command_runs_every_row_and_writes_the_section(
    shop_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    results = tmp_path / "results.md"
    results.write_text(f"# Results\n\n{table.SECTION}\n\n_Not measured yet._\n")
    assert (
        cli.main(
            [
                "ranker",
                "table",
                "--data",
                str(shop_dir),
                "--seeds",
                "2",
                "--make-epochs-list",
                "1,2",
                "--history-length",
                str(HISTORY),
                "--json",
                str(tmp_path / "runs.json"),
                "--results",
                str(results),
            ]
        )
        == 0
    )
    runs = json.loads((tmp_path / "runs.json").read_text())
    rows = {(r["variant"], r["make_epochs"]) for r in runs}
    assert rows == {("id", None), ("vector", None), ("simtier", None), ("simtier-make", 1), ("simtier-make", 2)}
    assert sorted({r["seed"] for r in runs}) == [0, 1] and len(runs) == 10
    text = results.read_text()
    for row in ("| ID |", "| Vector |", "| SimTier |", "| SimTier+MAKE (MAKE 1 ep) |", "| SimTier+MAKE (MAKE 2 ep) |"):
        assert row in text
    assert "+1.25 %" in text and table.BEGIN in text
    printed = capsys.readouterr().out
    # the runs re-render to the same table without training again
    assert (
        cli.main(
            [
                "ranker",
                "table",
                "--data",
                str(shop_dir),
                "--seeds",
                "2",
                "--make-epochs-list",
                "1,2",
                "--history-length",
                str(HISTORY),
                "--from-json",
                str(tmp_path / "runs.json"),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == printed


@pytest.mark.parametrize("variant", ["id", "vector", "simtier", "simtier-make"])
def test_a_new_user_with_no_history_and_unknown_items_still_get_scores(variant: str, tmp_path: Path) -> None:
    """Serving edge: an empty history (L = 0), an item beyond the vocabulary, a missing
    embedding. Scores are finite, and SimTier/MAKE see nothing to count or attend."""
    artifact.write_random_ranker(tmp_path, "e1", dim=8, variant=variant, item_features=np.array([[0, 1], [1, 0]]))
    model, meta = artifact.load_ranker(tmp_path)
    assert meta["encoder_version"] == "e1" and meta["variant"] == variant
    empty = torch.zeros(0, dtype=torch.long)
    logits = model.score_candidates(
        5,
        empty,
        empty.bool(),
        torch.zeros(0, 8),
        empty.bool(),
        torch.tensor([0, 1, 99]),
        torch.randn(3, 8),
        torch.tensor([True, False, True]),
    )
    assert logits.shape == (3,) and torch.isfinite(logits).all()
