"""`mmrank shop generate | concept-space | grid | click-plot | baselines`: make, embed, picture, check."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mmrank.cli import (
    CommandError,
    add_progress_flag,
    existing_dir,
    existing_file,
    file_problem,
    non_negative_float,
    non_negative_int,
    positive_int,
    show_progress,
)


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("shop", help="Generate the synthetic multimodal shop (data for everything else)")
    sub = parser.add_subparsers(dest="shop_command", metavar="SHOP_COMMAND", required=True)

    gen = sub.add_parser("generate", help="Draw a shop (deterministic in size, seed and config) into DIR")
    gen.add_argument("--size", choices=("tiny", "small", "medium"), default="tiny")
    gen.add_argument("--seed", type=non_negative_int, default=0)
    gen.add_argument("--out", required=True, type=Path, help="output directory")
    gen.add_argument("--config", type=existing_file, help="JSON or YAML file of knob overrides (see docs/data.md)")
    add_progress_flag(gen)
    gen.set_defaults(handler=_generate)

    space = sub.add_parser("concept-space", help="Write oracle embeddings from the hidden concepts as a space")
    space.add_argument("--data", required=True, type=existing_dir, help="shop directory")
    space.add_argument("--out", required=True, type=Path, help="space directory")
    space.add_argument("--dim", type=positive_int, default=128)
    space.add_argument("--noise", type=non_negative_float, default=0.0, help="per-item noise norm before normalising")
    space.add_argument("--version", default="oracle", help="encoder version the space is named for")
    space.add_argument("--seed", type=non_negative_int, default=0)
    space.set_defaults(handler=_concept_space)

    grid = sub.add_parser("grid", help="PNG grid of random items with their titles")
    grid.add_argument("--data", required=True, type=existing_dir)
    grid.add_argument("--out", required=True, type=Path)
    grid.add_argument("--rows", type=positive_int, default=4)
    grid.add_argument("--cols", type=positive_int, default=6)
    grid.add_argument("--seed", type=non_negative_int, default=0)
    grid.set_defaults(handler=_grid)

    plot = sub.add_parser("click-plot", help="PNG of click rate against hidden interest match")
    plot.add_argument("--data", required=True, type=existing_dir)
    plot.add_argument("--out", required=True, type=Path)
    plot.set_defaults(handler=_click_plot)

    base = sub.add_parser("baselines", help="AUC of model-free baselines on the test day, warm vs cold")
    base.add_argument("--data", required=True, type=existing_dir)
    base.set_defaults(handler=_baselines)


def _generate(args: argparse.Namespace) -> int:
    from mmrank.shop_config import config_for, read_overrides
    from mmrank.shop_gen import generate_into

    try:
        cfg = config_for(args.size, read_overrides(args.config) if args.config else None)
    except Exception as exc:  # noqa: BLE001 - JSON, YAML, unknown knobs, wrong types: the file is at fault
        raise CommandError(f"--config {file_problem(args.config, exc)}") from exc
    if args.out.exists() and not args.out.is_dir():
        raise CommandError(f"--out {args.out}: not a directory")
    started = time.perf_counter()
    generate_into(args.out, cfg, args.seed, args.size, progress=show_progress(args))
    counts = json.loads((args.out / "manifest.json").read_text())["counts"]
    print(
        f"shop {args.size} seed {args.seed} -> {args.out} in {time.perf_counter() - started:.1f}s: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    return 0


def _concept_space(args: argparse.Namespace) -> int:
    from mmrank.shop import concept_vectors, load
    from mmrank.space import save_space

    shop = load(args.data)
    vectors = concept_vectors(shop, dim=args.dim, seed=args.seed, noise=args.noise)
    save_space(args.out, args.version, vectors)
    print(f"space {args.version!r}: {len(vectors)} items x {args.dim} -> {args.out}")
    return 0


def _grid(args: argparse.Namespace) -> int:
    from mmrank.shop import load
    from mmrank.shop_plots import item_grid

    item_grid(load(args.data), args.out, rows=args.rows, cols=args.cols, seed=args.seed)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _click_plot(args: argparse.Namespace) -> int:
    from mmrank.shop import load
    from mmrank.shop_plots import click_rate_plot

    click_rate_plot(load(args.data), args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _baselines(args: argparse.Namespace) -> int:
    from mmrank.shop import load
    from mmrank.shop_baselines import test_day_baselines

    result = test_day_baselines(load(args.data))
    print(f"{'test day':32s} {'warm':>8s} {'cold':>8s}")
    for name, row in result.items():
        fmt = "{:8.0f}" if name == "impressions" else "{:8.3f}"
        print(f"{name:32s} " + " ".join(fmt.format(row[k]) for k in ("warm", "cold")))
    return 0
