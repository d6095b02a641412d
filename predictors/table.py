"""The paper's offline comparison on our shop: ID / Vector / SimTier / SimTier+MAKE over seeds.

One MAKE pre-training per seed serves every MAKE row: its state is saved after 1, 2 and 4
epochs and each snapshot gets its own one-epoch ID model, all from the same seed.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# Sheng et al., CIKM 2024: SimTier+MAKE over the ID model, offline; online, new ads (< 1 day)
# gained about twice what all ads gained (CTR +6.9 % vs +3.5 %).
PAPER_LIFT = {"gauc": 1.25, "auc": 0.75}
BEGIN, END = "<!-- ranker-table:begin -->", "<!-- ranker-table:end -->"
SECTION = "## CTR ranker: ID / Vector / SimTier / SimTier+MAKE (issue 6)"


def run_table(
    data_dir: str,
    space_dir: str | None,
    seeds: Iterable[int],
    make_epochs: tuple[int, ...],
    settings: Any,
    history_length: int = 50,
    tier_width: float = 0.1,
    log: Callable[[str], None] = lambda line: None,
) -> list[dict[str, Any]]:
    """Train and evaluate every (variant, seed); -> one dict per run with its metrics."""
    import dataclasses

    from mmrank.predictors import train
    from mmrank.predictors.model import Ranker, RankerConfig

    train_data, test_data, catalogue, vocab = train.load_data(data_dir, history_length, space_dir)
    log(
        f"{len(train_data)} training and {len(test_data)} test impressions "
        f"({int(test_data.cold.sum())} on cold items), space {catalogue.encoder_version}"
    )

    def config(variant: str) -> RankerConfig:
        return RankerConfig(
            variant=variant,
            mm_dim=catalogue.vectors.shape[1],
            history_length=history_length,
            tier_width=tier_width,
            **vocab,
        )

    runs = []

    def record(variant: str, seed: int, model: Any, report: dict, epochs: int | None = None) -> None:
        metrics = train.evaluate(model, test_data, catalogue)
        runs.append({"variant": variant, "make_epochs": epochs, "seed": seed, "metrics": metrics, "training": report})
        log(
            f"seed {seed} {label(variant, epochs):<22} GAUC {metrics['overall']['gauc']:.4f} "
            f"AUC {metrics['overall']['auc']:.4f} cold GAUC {metrics['cold']['gauc']:.4f} "
            f"({report.get('id_seconds', 0) + report.get('make_seconds', 0):.1f}s)"
        )

    for seed in seeds:
        run_settings = dataclasses.replace(settings, seed=seed)
        for variant in ("id", "vector", "simtier"):
            model, report = train.train_ranker(train_data, catalogue, config(variant), run_settings)
            record(variant, seed, model, report)
        started = time.perf_counter()
        holder = Ranker(config("simtier-make"))
        snapshots = train.pretrain_make(
            holder,
            train_data,
            catalogue,
            dataclasses.replace(run_settings, make_epochs=max(make_epochs)),
            snapshots=make_epochs,
        )
        make_seconds = time.perf_counter() - started
        for epochs in make_epochs:
            model, report = train.train_ranker(
                train_data,
                catalogue,
                config("simtier-make"),
                dataclasses.replace(run_settings, make_epochs=epochs),
                make_state=snapshots[epochs],
            )
            report["make_seconds"] = round(make_seconds * epochs / max(make_epochs), 2)
            record("simtier-make", seed, model, report, epochs)
    return runs


def run_table_parallel(
    data_dir: str, space_dir: str | None, seeds: Iterable[int], jobs: int, threads: int = 1, **kwargs: Any
) -> list[dict[str, Any]]:
    """`run_table` with one worker process per seed (at most `jobs` at once), each on `threads`
    torch threads: the seeds are independent, and one thread per process wastes least on a
    shared machine. Results come back in seed order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    seeds = list(seeds)
    if jobs <= 1 or len(seeds) == 1:
        return run_table(data_dir, space_dir, seeds, **kwargs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_one_seed, data_dir, space_dir, seed, threads, kwargs) for seed in seeds]
        return [run for future in futures for run in future.result()]


def _one_seed(
    data_dir: str, space_dir: str | None, seed: int, threads: int, kwargs: dict[str, Any]
) -> list[dict[str, Any]]:
    import sys

    import torch

    if threads:
        torch.set_num_threads(threads)
    kwargs = {**kwargs, "log": lambda line: print(line, file=sys.stderr, flush=True)}
    return run_table(data_dir, space_dir, [seed], **kwargs)


def label(variant: str, make_epochs: int | None) -> str:
    names = {"id": "ID", "vector": "Vector", "simtier": "SimTier", "simtier-make": "SimTier+MAKE"}
    return names[variant] + (f" (MAKE {make_epochs} ep)" if make_epochs else "")


def summarise(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one run)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def grouped(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(label(run["variant"], run["make_epochs"]), []).append(run)
    return groups


def lift(runs: list[dict[str, Any]], row: str, subset: str, metric: str, relative: bool = True) -> tuple[float, float]:
    """Lift of `row` over ID paired by seed, mean and spread over seeds: relative in %, or
    absolute in points (x 100) when not `relative`."""
    groups = grouped(runs)
    base = {r["seed"]: r["metrics"][subset][metric] for r in groups["ID"]}
    values = [(r["metrics"][subset][metric], base[r["seed"]]) for r in groups[row] if r["seed"] in base]
    return summarise([100.0 * (v / b - 1.0) if relative else 100.0 * (v - b) for v, b in values])


def render(runs: list[dict[str, Any]], command: str = "mmrank ranker table") -> str:
    """The markdown table (metrics as mean ± spread over seeds) and the lifts over ID."""
    groups = grouped(runs)
    seeds = sorted({r["seed"] for r in runs})
    columns = [
        ("overall", "auc", "AUC"),
        ("overall", "gauc", "GAUC"),
        ("overall", "logloss", "log-loss"),
        ("cold", "auc", "cold AUC"),
        ("cold", "gauc", "cold GAUC"),
        ("cold", "logloss", "cold log-loss"),
    ]
    lines = [
        f"`{command}` — mean ± sample std over seeds {', '.join(map(str, seeds))}; cold = test "
        "impressions of items never impressed in the training days.",
        "",
        "| model | " + " | ".join(c[2] for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for row, group in groups.items():
        cells = []
        for subset, metric, _ in columns:
            mean, spread = summarise([r["metrics"][subset][metric] for r in group])
            cells.append(f"{mean:.4f} ± {spread:.4f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Lift over ID, paired by seed (mean ± std): relative in %, and in absolute points "
        "(× 100) in brackets; beside it the paper's offline figures:",
        "",
        "| model | GAUC | AUC | cold GAUC | cold AUC | cold / overall GAUC lift |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in groups:
        if row == "ID":
            continue
        cells = []
        for subset, metric in (("overall", "gauc"), ("overall", "auc"), ("cold", "gauc"), ("cold", "auc")):
            (rel, rel_sd), (pts, _) = lift(runs, row, subset, metric), lift(runs, row, subset, metric, relative=False)
            cells.append(f"{rel:+.2f} % ± {rel_sd:.2f} ({pts:+.2f} pts)")
        g, cg = lift(runs, row, "overall", "gauc"), lift(runs, row, "cold", "gauc")
        ratio = f"{cg[0] / g[0]:.1f}×" if abs(g[0]) > 1e-9 else "n/a"
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {ratio} |")
    lines.append(
        f"| paper: SimTier+MAKE (Taobao) | +{PAPER_LIFT['gauc']:.2f} % | +{PAPER_LIFT['auc']:.2f} % | "
        "— | — | ≈ 2× online (new ads CTR +6.9 % vs all +3.5 %) |"
    )
    return "\n".join(lines) + "\n"


def replace_section(path: Path, table_markdown: str) -> None:
    """Put the table between the BEGIN/END markers of the ranker section (prose around them
    stays); without markers, the section's body becomes the markers and the table."""
    text = path.read_text()
    block = f"{BEGIN}\n{table_markdown.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda m: block, text, flags=re.S)
    elif SECTION in text:
        start = text.index(SECTION) + len(SECTION)
        following = text.find("\n## ", start)
        end = len(text) if following < 0 else following + 1
        text = text[:start] + "\n\n" + block + "\n" + ("\n" if following >= 0 else "") + text[end:]
    else:
        text = text.rstrip() + f"\n\n{SECTION}\n\n{block}\n"
    path.write_text(text)
