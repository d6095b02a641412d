"""`mmrank ranker matrix` and MAKE's epoch choice on the validation day.

The decisions (ordering misses, cold ratio, epoch choice) are pure and tested with hand-made
figures; the command itself runs once on a tiny matrix (one tiny shop, the oracle and a 1-step
SCL space, one seed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrank import cli, shop
from mmrank.predictors import matrix, train
from mmrank.predictors.model import Ranker, RankerConfig

HISTORY = 20


def test_ordering_misses_names_each_broken_pair() -> None:
    assert matrix.ordering_misses({"id": 0.60, "vector": 0.62, "simtier": 0.65, "simtier-make": 0.66}) == []
    assert matrix.ordering_misses({"id": 0.60, "vector": 0.62, "simtier": 0.61, "simtier-make": 0.61}) == [
        "SimTier ≤ Vector",
        "SimTier+MAKE ≤ SimTier",
    ]
    assert matrix.ordering_misses({"id": 0.60, "vector": 0.59, "simtier": 0.65, "simtier-make": 0.66}) == [
        "Vector ≤ ID"
    ]


def test_cold_ratio_is_undefined_without_an_overall_gain() -> None:
    assert matrix.cold_ratio(1.0, 2.5) == 2.5
    assert math.isnan(matrix.cold_ratio(0.0, 3.0)) and math.isnan(matrix.cold_ratio(-0.5, 1.0))


def test_choose_epochs_takes_the_best_and_the_fewest_among_equals() -> None:
    assert train.choose_epochs({1: 0.61, 2: 0.63, 3: 0.62}) == 2
    assert train.choose_epochs({1: 0.63, 2: 0.63, 3: 0.60}) == 1
    assert train.choose_epochs({1: float("nan"), 2: 0.55}) == 2
    assert train.choose_epochs({1: float("nan"), 2: float("nan")}) == 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    out = tmp_path_factory.mktemp("shop")
    shop.generate("tiny", seed=0, out=out)
    return train.load_data(str(out), HISTORY)


def test_make_epochs_are_chosen_on_the_last_training_day_not_the_test_day(tiny: tuple) -> None:
    train_data, test_data, catalogue, vocab = tiny
    fit, validation = train_data.split_last_day()
    assert validation.day is not None and fit.day is not None and test_data.day is not None
    assert set(validation.day) == {train_data.day.max()} and fit.day.max() < validation.day.min()
    assert len(fit) + len(validation) == len(train_data) and test_data.day.min() > validation.day.max()
    config = RankerConfig(variant="simtier-make", mm_dim=catalogue.vectors.shape[1], history_length=HISTORY, **vocab)
    settings = train.TrainSettings(max_make_epochs=2, batch_size=64)
    epochs, curve = train.select_make_epochs(Ranker(config), train_data, catalogue, settings)
    assert sorted(curve) == [1, 2] and epochs == train.choose_epochs(curve)
    assert all(0.0 <= gauc <= 1.0 for gauc in curve.values())
    # the ranker's own recipe (make_epochs 0 = choose) chooses the same way and records its curve
    _, report = train.train_ranker(train_data, catalogue, config, settings)
    assert sorted(report["make_validation_gauc"]) == [1, 2]
    assert report["make_epochs"] == train.choose_epochs(report["make_validation_gauc"])


def test_one_day_of_impressions_cannot_choose_epochs(tiny: tuple) -> None:
    train_data = tiny[0]
    one_day = train_data.take(np.flatnonzero(train_data.day == 0))
    with pytest.raises(ValueError, match="two training days"):
        one_day.split_last_day()


def test_matrix_command_on_a_tiny_matrix(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "results.md"
    results.write_text("# Results\n\nprose before\n")
    argv = [
        "ranker",
        "matrix",
        "--workdir",
        str(tmp_path / "work"),
        "--shops",
        "tiny",
        "--spaces",
        "oracle,scl",
        "--seeds",
        "1",
        "--scl-steps",
        "1",
        "--max-make-epochs",
        "1",
        "--history-length",
        str(HISTORY),
        "--json",
        str(tmp_path / "m.json"),
        "--picture",
        str(tmp_path / "img" / "m.png"),
        "--results",
        str(results),
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "m.json").read_text())
    cells = {(r["shop"], r["space"], r["variant"]) for r in result["runs"]}
    assert cells == {("tiny", s, v) for s in ("oracle", "scl") for v in matrix.VARIANT_ORDER}
    ids = [r for r in result["runs"] if r["variant"] == "id"]
    assert ids[0]["metrics"] == ids[1]["metrics"]  # one ID model serves both spaces
    assert result["cells"]["tiny/oracle"]["make_epochs"] == 1
    assert 0.5 < result["truth"]["tiny"]["auc"] <= 1.0
    text = results.read_text()
    assert text.startswith("# Results\n\nprose before\n") and matrix.BEGIN in text and matrix.END in text
    assert "| tiny | oracle |" in text and "| tiny | scl |" in text and "](img/m.png)" in text
    assert (tmp_path / "img" / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the runs re-render to the same table without training
    assert (
        cli.main(
            [
                *argv[:2],
                "--workdir",
                str(tmp_path / "work"),
                "--from-json",
                str(tmp_path / "m.json"),
                "--picture",
                str(tmp_path / "img" / "m.png"),
                "--results",
                str(results),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == printed


def test_matrix_refuses_unknown_shops_and_spaces(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["ranker", "matrix", "--workdir", str(tmp_path), "--shops", "huge"]) == 1
    assert "huge" in capsys.readouterr().err
    assert cli.main(["ranker", "matrix", "--workdir", str(tmp_path), "--shops", "tiny", "--spaces", "clip"]) == 1
    assert "oracle" in capsys.readouterr().err
    assert not (tmp_path / "shops").exists()


def test_an_artifact_from_before_issue_19_still_loads(tmp_path: Path) -> None:
    """ranker.json without the MAKE layout keys = issue 6's MAKE (vector in, no tiers of its own)."""
    from mmrank.predictors import artifact

    torch.manual_seed(0)
    old = Ranker(
        RankerConfig(variant="simtier-make", n_users=4, n_items=3, mm_dim=8, make_simtier=False, make_vector=True)
    )
    artifact.save_ranker(tmp_path, old, "e1", np.zeros((3, 2), np.int64))
    meta = json.loads((tmp_path / "ranker.json").read_text())
    for key in ("make_simtier", "make_vector"):
        del meta["config"][key]
    (tmp_path / "ranker.json").write_text(json.dumps(meta))
    loaded, _ = artifact.load_ranker(tmp_path)
    assert loaded.make.simtier is None and loaded.config.make_vector
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in loaded.state_dict().items())
