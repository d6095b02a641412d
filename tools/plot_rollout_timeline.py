"""Draw docs/img/rollout-timeline.png from the timelines the rollout scenarios write.

    MMRANK_ROLLOUT_TIMELINE_DIR=/tmp/timeline ./dev.sh test tests/test_rollout_scenarios.py
    .venv/bin/python tools/plot_rollout_timeline.py /tmp/timeline docs/img/rollout-timeline.png

One panel per scenario: the canary's share of the requests as the load generator routed them
(a step line), and the click-rate ratio each analysis measured (points, right axis), with the
operator's decisions written where they happened.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (
    ("test_a_healthy_canary_is_promoted_through_every_step", "healthy canary: promoted step by step"),
    (
        "test_a_canary_with_a_20_percent_lower_click_rate_is_rolled_back_in_time",
        "canary with a 20 % lower click rate: rolled back",
    ),
)


def panel(ax: plt.Axes, timeline: dict, title: str) -> None:
    samples = timeline["samples"]
    times = [s["t"] for s in samples] + [samples[-1]["t"] + 1.0]
    shares = [100 * s["share"] for s in samples] + [100 * samples[-1]["share"]]
    ax.step(times, shares, where="post", color="tab:blue", linewidth=2, label="canary share of requests (%)")
    ax.set_ylim(-5, 105)
    ax.set_ylabel("canary traffic, %")
    ax.set_title(title, fontsize=10)
    ratio_ax = ax.twinx()
    points = [
        (d["t"], d["analysis"]["clickRateRatio"])
        for d in timeline["decisions"]
        if (d.get("analysis") or {}).get("clickRateRatio") is not None
    ]
    if points:
        ratio_ax.plot(*zip(*points, strict=False), "o", color="tab:orange", label="click-rate ratio (canary / stable)")
    ratio_ax.set_ylim(0.5, 1.3)
    ratio_ax.set_ylabel("click-rate ratio")
    for decision in timeline["decisions"]:
        ax.axvline(decision["t"], color="grey", linewidth=0.6, linestyle=":")
        ax.annotate(decision["reason"], (decision["t"], 102), rotation=90, fontsize=7, va="top", ha="right")
    lines = ax.get_legend_handles_labels()
    extra = ratio_ax.get_legend_handles_labels()
    ax.legend(lines[0] + extra[0], lines[1] + extra[1], loc="center right", fontsize=7)


def main(folder: str, out: str) -> int:
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 3.2 * len(PANELS)), sharex=False)
    for ax, (name, title) in zip(axes, PANELS, strict=False):
        timeline = json.loads((Path(folder) / f"{name}.json").read_text())
        panel(ax, timeline, f"{title} (steps {timeline['steps']}, interval {timeline['interval_s']} s)")
    axes[-1].set_xlabel("seconds since the canary started")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
