"""The ranker comparison over several shops and embedding spaces: `mmrank ranker matrix`.

One cell is (shop configuration, embedding space); in each, ID / Vector / SimTier / SimTier+MAKE
train on the same impressions for every seed. The goal the table is judged by (issue 19): GAUC
ordered ID < Vector < SimTier < SimTier+MAKE, and SimTier+MAKE's lift on cold items at least twice
its overall lift. Every miss is shown, not hidden.

Work is split so that nothing is trained twice: MAKE's epoch count is chosen once per cell (seed 0,
on the validation day: `train.select_make_epochs`), the ID model (it reads no embeddings) once per
(shop, seed) and shared by both spaces. The trained SCL space comes from one encoder (trained on
the first shop, or given) embedding every shop's catalogue: the shops share the generator's
vocabulary, so one encoder serves them all, as one production encoder serves a growing catalogue.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

VARIANT_ORDER = ("id", "vector", "simtier", "simtier-make")
NAMES = {"id": "ID", "vector": "Vector", "simtier": "SimTier", "simtier-make": "SimTier+MAKE"}
BEGIN, END = "<!-- ranker-matrix:begin -->", "<!-- ranker-matrix:end -->"
SECTION = "## The ranker over shops and spaces (issue 19)"
SPACES = ("oracle", "scl")


# --- pure decisions ------------------------------------------------------------------------------


def ordering_misses(gauc: dict[str, float]) -> list[str]:
    """The adjacent pairs of ID < Vector < SimTier < SimTier+MAKE that a cell's mean GAUC breaks,
    e.g. ["SimTier+MAKE ≤ SimTier"]; [] when the order holds."""
    present = [v for v in VARIANT_ORDER if v in gauc]
    return [f"{NAMES[b]} ≤ {NAMES[a]}" for a, b in zip(present, present[1:], strict=False) if not gauc[b] > gauc[a]]


def cold_ratio(overall_lift: float, cold_lift: float) -> float:
    """Cold lift ÷ overall lift; NaN when the overall lift is not positive (no ratio means anything)."""
    return cold_lift / overall_lift if overall_lift > 1e-12 else float("nan")


def paired_lifts(runs: list[dict[str, Any]], variant: str, subset: str) -> list[float]:
    """GAUC lift of `variant` over ID in points (× 100), one per seed, paired by seed."""
    base = {r["seed"]: r["metrics"][subset]["gauc"] for r in runs if r["variant"] == "id"}
    return [
        100.0 * (r["metrics"][subset]["gauc"] - base[r["seed"]])
        for r in runs
        if r["variant"] == variant and r["seed"] in base
    ]


def mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# --- the work ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShopSpec:
    name: str
    size: str
    overrides: dict[str, Any]


def prepare(
    workdir: Path,
    shops: list[ShopSpec],
    spaces: Iterable[str],
    scl_checkpoint: str | None,
    scl_steps: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Generate each shop, its click-function AUC, and the SCL space of each (the encoder trained
    once, on the first shop, unless a checkpoint is given). -> {shop: {"dir", "spaces", "truth"}}."""
    from mmrank import shop as shop_module

    prepared: dict[str, Any] = {}
    for spec in shops:
        directory = workdir / "shops" / spec.name
        shop_module.generate(spec.size, 0, directory, config=spec.overrides)
        prepared[spec.name] = {
            "dir": str(directory),
            "spaces": {"oracle": None},
            "truth": click_function_auc(shop_module.load(directory)),
        }
        log(f"shop {spec.name}: {json.dumps(prepared[spec.name]['truth'])}")
    if "scl" in spaces:
        checkpoint = scl_checkpoint
        if checkpoint is None:
            checkpoint = str(workdir / "scl-encoder")
            if not (Path(checkpoint) / "encoder.pt").exists():
                _mmrank(
                    [
                        "encoders",
                        "train",
                        "--data",
                        prepared[shops[0].name]["dir"],
                        "--objective",
                        "scl",
                        "--out",
                        checkpoint,
                        "--steps",
                        str(scl_steps),
                        "--batch-size",
                        "64",
                        "--seed",
                        "0",
                        "--threads",
                        "1",
                        "--no-progress",
                    ],
                    log,
                )
        for spec in shops:
            out = workdir / "spaces" / f"{spec.name}-scl"
            if not (out / "embeddings.npy").exists():
                _mmrank(
                    [
                        "encoders",
                        "embed",
                        "--data",
                        prepared[spec.name]["dir"],
                        "--checkpoint",
                        checkpoint,
                        "--out",
                        str(out),
                        "--version",
                        "scl",
                    ],
                    log,
                )
            prepared[spec.name]["spaces"]["scl"] = str(out)
    return prepared


def _mmrank(args: list[str], log: Callable[[str], None]) -> None:
    log("$ mmrank " + " ".join(args))
    done = subprocess.run([sys.executable, "-m", "mmrank", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`mmrank {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()[-800:]}")


def click_function_auc(shop: Any) -> dict[str, float]:
    """AUC of the shop's own noiseless click logit on the test day (overall and cold), the
    ceiling a ranker is measured against, and the test day's cold share."""
    import numpy as np

    from mmrank.shop_baselines import auc
    from mmrank.shop_gen import click_logit

    imps = shop.impressions
    test = imps[imps["split"] == "test"]
    users, items = test["user_id"].to_numpy(), test["item_id"].to_numpy()
    logit = click_logit(
        shop.interest_match(users, items), shop.truth["quality"][items], test["position"].to_numpy(), shop.config
    )
    clicked, cold = test["clicked"].to_numpy(), test["cold"].to_numpy(bool)
    return {
        "auc": round(auc(clicked, logit), 4),
        "cold_auc": round(auc(clicked[cold], logit[cold]), 4),
        "cold_share": round(float(np.mean(cold)), 3),
        "train_impressions": int((imps["split"] == "train").sum()),
    }


def run_matrix(
    prepared: dict[str, Any],
    spaces: list[str],
    seeds: list[int],
    settings: Any,
    history_length: int = 50,
    jobs: int = 1,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Phase 1: MAKE's epochs per cell (seed 0, validation day). Phase 2: every (shop, seed).
    -> {"cells": {cell: {"make_epochs", "make_validation_gauc"}}, "runs": [...], "truth": {...}}."""
    cells = [(shop, space) for shop in prepared for space in spaces]
    selection_tasks = [
        (
            prepared[shop]["dir"],
            prepared[shop]["spaces"][space],
            history_length,
            dataclasses.replace(settings, seed=seeds[0]),
        )
        for shop, space in cells
    ]
    chosen = dict(zip(cells, _map(_select_task, selection_tasks, jobs), strict=True))
    for (shop, space), (epochs, curve) in chosen.items():
        log(f"{shop} / {space}: MAKE {epochs} epoch(s) (validation-day GAUC by epoch {curve})")
    train_tasks = [
        (
            prepared[shop]["dir"],
            {space: (prepared[shop]["spaces"][space], chosen[(shop, space)][0]) for space in spaces},
            history_length,
            dataclasses.replace(settings, seed=seed),
            shop,
        )
        for shop in prepared
        for seed in seeds
    ]
    runs = [run for part in _map(_train_task, train_tasks, jobs) for run in part]
    for run in runs:
        log(
            f"{run['shop']:<10} {run['space']:<6} seed {run['seed']} {NAMES[run['variant']]:<13} "
            f"GAUC {run['metrics']['overall']['gauc']:.4f} cold {run['metrics']['cold']['gauc']:.4f}"
        )
    return {
        "cells": {
            f"{shop}/{space}": {"make_epochs": e, "make_validation_gauc": c} for (shop, space), (e, c) in chosen.items()
        },
        "runs": runs,
        "truth": {shop: prepared[shop]["truth"] for shop in prepared},
    }


def _map(fn: Callable[..., Any], tasks: list[tuple], jobs: int) -> list[Any]:
    """Run tasks in `jobs` spawned worker processes (one torch thread each), results in order."""
    if jobs <= 1:
        return [fn(*task) for task in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [future.result() for future in [pool.submit(fn, *task) for task in tasks]]


def _select_task(shop_dir: str, space_dir: str | None, history_length: int, settings: Any) -> tuple[int, dict]:
    import torch

    from mmrank.predictors import train
    from mmrank.predictors.model import Ranker

    torch.set_num_threads(1)
    train_data, _, catalogue, vocab = train.load_data(shop_dir, history_length, space_dir)
    torch.manual_seed(settings.seed)
    model = Ranker(_config("simtier-make", catalogue, vocab, history_length))
    return train.select_make_epochs(model, train_data, catalogue, settings)


def _train_task(
    shop_dir: str, spaces: dict[str, tuple[str | None, int]], history_length: int, settings: Any, shop_name: str
) -> list[dict[str, Any]]:
    import torch

    from mmrank.predictors import train

    torch.set_num_threads(1)
    runs: list[dict[str, Any]] = []
    id_run: dict[str, Any] | None = None
    for space, (space_dir, make_epochs) in spaces.items():
        train_data, test_data, catalogue, vocab = train.load_data(shop_dir, history_length, space_dir)
        for variant in VARIANT_ORDER:
            if variant == "id" and id_run is not None:  # reads no embeddings: same model in every space
                runs.append({**id_run, "space": space})
                continue
            started = time.perf_counter()
            run_settings = dataclasses.replace(settings, make_epochs=make_epochs)
            model, report = train.train_ranker(
                train_data, catalogue, _config(variant, catalogue, vocab, history_length), run_settings
            )
            run = {
                "shop": shop_name,
                "space": space,
                "variant": variant,
                "seed": settings.seed,
                "metrics": train.evaluate(model, test_data, catalogue),
                "training": report,
                "seconds": round(time.perf_counter() - started, 2),
            }
            if variant == "id":
                id_run = run
            runs.append(run)
    return runs


def _config(variant: str, catalogue: Any, vocab: dict[str, int], history_length: int) -> Any:
    from mmrank.predictors.model import RankerConfig

    return RankerConfig(variant=variant, mm_dim=catalogue.vectors.shape[1], history_length=history_length, **vocab)


# --- the table and the picture -------------------------------------------------------------------


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per cell: mean GAUC per variant, lifts over ID (points, mean ± sd over seeds),
    cold lifts, the ordering's misses and the cold ratio of SimTier+MAKE."""
    rows = []
    by_cell: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in result["runs"]:
        by_cell.setdefault((run["shop"], run["space"]), []).append(run)
    for (shop, space), runs in by_cell.items():
        gauc = {
            v: statistics.fmean(r["metrics"]["overall"]["gauc"] for r in runs if r["variant"] == v)
            for v in VARIANT_ORDER
            if any(r["variant"] == v for r in runs)
        }
        id_auc = statistics.fmean(r["metrics"]["overall"]["auc"] for r in runs if r["variant"] == "id")
        lifts = {v: mean_sd(paired_lifts(runs, v, "overall")) for v in VARIANT_ORDER[1:]}
        cold = {v: mean_sd(paired_lifts(runs, v, "cold")) for v in VARIANT_ORDER[1:]}
        cell = result.get("cells", {}).get(f"{shop}/{space}", {})
        rows.append(
            {
                "shop": shop,
                "space": space,
                "gauc": gauc,
                "id_auc": id_auc,
                "lift": lifts,
                "cold_lift": cold,
                "misses": ordering_misses(gauc),
                "cold_ratio": cold_ratio(lifts["simtier-make"][0], cold["simtier-make"][0]),
                "make_epochs": cell.get("make_epochs"),
                "seeds": sorted({r["seed"] for r in runs}),
                "truth": result.get("truth", {}).get(shop, {}),
            }
        )
    return rows


def render(result: dict[str, Any], command: str, picture: str | None = None) -> str:
    rows = summary(result)
    seeds = sorted({s for row in rows for s in row["seeds"]})
    lines = [
        f"`{command}` — seeds {', '.join(map(str, seeds))}; GAUC lift over ID in points (× 100), "
        "mean ± sample std over seeds, paired by seed; cold = test impressions of items never impressed in "
        "the training days.",
        "",
        "| shop | space | click fn AUC | ID AUC | ID GAUC | Vector | SimTier | SimTier+MAKE | "
        "cold: Vector | cold: SimTier | cold: SimTier+MAKE | cold ÷ overall (S+M) | MAKE epochs | "
        "ID < Vector < SimTier < S+M |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:

        def fmt(pair: tuple[float, float]) -> str:
            return f"{pair[0]:+.2f} ± {pair[1]:.2f}"

        ratio = row["cold_ratio"]
        ratio_text = "n/a" if ratio != ratio else f"{ratio:.1f}×" + ("" if ratio >= 2 else " (< 2×)")
        truth = row["truth"]
        lines.append(
            f"| {row['shop']} | {row['space']} | {truth.get('auc', float('nan')):.3f} | {row['id_auc']:.3f} | "
            f"{row['gauc']['id']:.4f} | "
            + " | ".join(fmt(row["lift"][v]) for v in VARIANT_ORDER[1:])
            + " | "
            + " | ".join(fmt(row["cold_lift"][v]) for v in VARIANT_ORDER[1:])
            + f" | {ratio_text} | {row['make_epochs'] if row['make_epochs'] is not None else '—'} | "
            + ("holds" if not row["misses"] else "**misses: " + "; ".join(row["misses"]) + "**")
            + " |"
        )
    if picture:
        lines += ["", f"![GAUC lift over ID by shop and space, cold beside overall]({picture})"]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    """Grouped bars: GAUC lift over ID (points) per cell and variant, overall and cold side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(result)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows)) * 1.6, 4.2), sharey=True)
    colours = {"vector": "#9ecae1", "simtier": "#4292c6", "simtier-make": "#08306b"}
    width = 0.26
    for ax, key, title in ((axes[0], "lift", "all test impressions"), (axes[1], "cold_lift", "cold items")):
        for k, variant in enumerate(VARIANT_ORDER[1:]):
            xs = [i + (k - 1) * width for i in range(len(rows))]
            means = [row[key][variant][0] for row in rows]
            sds = [row[key][variant][1] for row in rows]
            ax.bar(xs, means, width, yerr=sds, capsize=2, color=colours[variant], label=NAMES[variant])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)), [f"{row['shop']}\n{row['space']}" for row in rows], fontsize=8)
        ax.set_title(f"GAUC lift over ID, {title}")
        ax.set_ylabel("GAUC points (× 100)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def replace_section(path: Path, markdown: str) -> None:
    """Put the matrix between its markers in `path` (the prose around them stays); without the
    markers, append the section."""
    import re

    text = path.read_text()
    block = f"{BEGIN}\n{markdown.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda m: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n{SECTION}\n\n{block}\n"
    path.write_text(text)
