"""The `mmrank` command. Each part registers its own subcommands.

A part's `register_cli(subparsers)` adds parsers whose handlers import the heavy modules
(torch, kopf) only when they run, so `mmrank --help` is quick and the operator never loads torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# (module, what it adds) in the order `mmrank --help` lists them.
PARTS: tuple[tuple[str, str], ...] = (
    ("mmrank.shop_cli", "shop"),
    ("mmrank.encoders.cli", "encoders, embedder, backfill"),
    ("mmrank.predictors.cli", "ranker, predictor"),
    ("mmrank.api_cli", "crd, validate"),
    ("mmrank.operator.cli", "operator, render"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmrank",
        description="Multimodal CTR ranking on Kubernetes: data, encoder, ranker, embedder, "
        "predictor and operator.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name, _ in PARTS:
        importlib.import_module(module_name).register_cli(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = args.handler(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
