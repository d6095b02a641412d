"""The quick start's verdict line: which ranker won on the test day, by how many GAUC points."""

from __future__ import annotations

from harness.demo import DEMO_SHOP, ranker_verdict
from mmrank.shop_config import config_for


def _metrics(overall: float, cold: float) -> dict:
    return {"overall": {"gauc": overall}, "cold": {"gauc": cold}}


def test_verdict_names_the_winner_and_the_margin() -> None:
    line = ranker_verdict(_metrics(0.637, 0.502), _metrics(0.702, 0.606))
    assert line.startswith("SimTier+MAKE beat ID on the test day: GAUC 0.702 vs 0.637 (+6.5 points")
    assert "on cold items +10.4 points, 0.606 vs 0.502" in line


def test_verdict_says_so_when_id_wins() -> None:
    line = ranker_verdict(_metrics(0.61, 0.55), _metrics(0.60, 0.56))
    assert line.startswith("ID beat SimTier+MAKE") and "(-1.0 points for SimTier+MAKE" in line


def test_the_quick_start_shop_is_tiny_with_more_users() -> None:
    cfg = config_for("tiny", DEMO_SHOP)
    assert cfg.n_users == 1000 and cfg.n_items == config_for("tiny").n_items
