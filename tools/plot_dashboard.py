"""Draw the mmrank Grafana dashboard's panels from real query results: one small plot per panel.

    python tools/plot_dashboard.py DATA.json OUT.png

DATA.json is what tests/test_dashboard.py writes from Prometheus' query_range answers over its
run: {"title", "seconds", "panels": [{"title", "unit", "series": [{"legend", "points": [[t, v]]}]}]},
t in seconds since the run started. `MMRANK_DASHBOARD_PNG=1 ./dev.sh test tests/test_dashboard.py`
runs the system and writes docs/img/dashboard.png with this tool.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

SCALE = {
    "percentunit": (100.0, "%"),
    "percent": (1.0, "%"),
    "s": (1000.0, "ms"),
    "reqps": (1.0, "req/s"),
    "short": (1.0, ""),
}


def draw(data: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = data["panels"]
    columns = 2
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(13, 3.0 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        factor, unit = SCALE.get(panel["unit"], (1.0, panel["unit"]))
        for series in panel["series"][:8]:
            points = [(t, v * factor) for t, v in series["points"] if math.isfinite(v)]
            if points:
                ax.plot(
                    [t for t, _ in points],
                    [v for _, v in points],
                    label=series["legend"],
                    linewidth=1.2,
                    marker="o" if len(points) < 5 else None,
                    markersize=4,
                )  # a short series stays visible
        values = [v * factor for s in panel["series"] for _, v in s["points"] if math.isfinite(v)]
        if values and min(values) >= 0:
            ax.set_ylim(0, max(values) * 1.12 or 1.0)  # lines at the top stay inside the frame
        ax.set_title(panel["title"], fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if panel["series"]:
            ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("seconds since the run started", fontsize=8)
    figure.suptitle(
        f"{data['title']} dashboard, drawn from Prometheus over a {data['seconds']:.0f} s run "
        "(tests/test_dashboard.py)",
        fontsize=11,
    )
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    plt.close(figure)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: plot_dashboard.py DATA.json OUT.png", file=sys.stderr)
        return 2
    draw(json.loads(Path(argv[0]).read_text()), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
