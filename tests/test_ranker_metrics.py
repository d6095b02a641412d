"""AUC, GAUC and log-loss on cases worked out by hand, and the table's markdown plumbing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from mmrank.predictors import metrics, table


def test_auc_counts_correctly_ordered_pairs() -> None:
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered right
    assert metrics.auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert metrics.auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)  # a tie is half
    assert math.isnan(metrics.auc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_gauc_weights_users_by_impressions_and_skips_one_class_users() -> None:
    users = np.array([7, 7, 7, 7, 3, 3, 5, 5, 5, 9])
    labels = np.array([0, 0, 1, 1, 1, 0, 1, 1, 1, 0])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.2, 0.1, 0.2, 0.3, 0.5])
    # user 7: AUC 0.75 over 4 impressions; user 3: AUC 1 over 2; users 5 (all clicks) and 9
    # (one impression) have no AUC and no weight -> (4 * 0.75 + 2 * 1) / 6
    assert metrics.gauc(users, labels, scores) == pytest.approx(5 / 6)
    # the order of rows does not matter
    shuffled = np.random.default_rng(0).permutation(len(users))
    assert metrics.gauc(users[shuffled], labels[shuffled], scores[shuffled]) == pytest.approx(5 / 6)
    assert math.isnan(metrics.gauc(np.array([1, 1]), np.array([0, 0]), np.array([0.2, 0.3])))


def test_log_loss_and_metrics_from_logits() -> None:
    assert metrics.log_loss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(
        -(math.log(0.8) + math.log(0.6)) / 2
    )
    assert metrics.log_loss(np.array([1]), np.array([0.0])) == pytest.approx(-math.log(1e-7))  # clipped, finite
    got = metrics.ctr_metrics(np.array([1, 1]), np.array([0, 1]), np.array([0.0, 0.0]))
    assert got["logloss"] == pytest.approx(math.log(2)) and got["auc"] == pytest.approx(0.5)
    split = metrics.overall_and_cold(
        np.array([1, 1, 2, 2]),
        np.array([0, 1, 0, 1]),
        np.array([-1.0, 1.0, 1.0, -1.0]),
        np.array([False, False, True, True]),
    )
    assert split["overall"]["impressions"] == 4 and split["cold"]["impressions"] == 2
    assert split["cold"]["auc"] == pytest.approx(0.0) and split["overall"]["gauc"] == pytest.approx(0.5)


def _run(variant: str, seed: int, gauc: float, cold_gauc: float, epochs: int | None = None) -> dict:
    subset = lambda g: {"auc": g, "gauc": g, "logloss": 0.3}  # noqa: E731
    return {
        "variant": variant,
        "make_epochs": epochs,
        "seed": seed,
        "metrics": {"overall": subset(gauc), "cold": subset(cold_gauc)},
        "training": {},
    }


def test_lifts_are_paired_by_seed_and_rendered_beside_the_paper(tmp_path: Path) -> None:
    runs = [
        _run("id", 0, 0.60, 0.50),
        _run("id", 1, 0.62, 0.52),
        _run("simtier-make", 0, 0.63, 0.55, 2),
        _run("simtier-make", 1, 0.62, 0.52, 2),
    ]
    mean, spread = table.lift(runs, "SimTier+MAKE (MAKE 2 ep)", "overall", "gauc")
    assert mean == pytest.approx((5.0 + 0.0) / 2)  # +5 % on seed 0, 0 % on seed 1
    assert spread == pytest.approx(np.std([5.0, 0.0], ddof=1))
    markdown = table.render(runs)
    assert "| ID | 0.6100 ± 0.0141 |" in markdown
    assert "+1.25 %" in markdown and "+0.75 %" in markdown
    # the section in docs gets the table between markers; prose outside them survives a rerun
    results = tmp_path / "results.md"
    results.write_text(f"# Results\n\n{table.SECTION}\n\n_Not measured yet._\n\n## Other\n\nkeep me\n")
    table.replace_section(results, markdown)
    table.replace_section(results, markdown.replace("0.6100", "0.7000"))
    text = results.read_text()
    assert text.count(table.BEGIN) == 1 and "0.7000" in text and "Not measured" not in text
    assert text.endswith("## Other\n\nkeep me\n")
