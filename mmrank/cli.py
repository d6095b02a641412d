"""The `mmrank` command. Each part registers its own subcommands.

A part's `register_cli(subparsers)` adds parsers whose handlers import the heavy modules
(torch, kopf) only when they run, so `mmrank --help` is quick and the operator never loads torch.
A command imports only the part that owns it, and a part absent from an image (the operator image
has no encoders or predictors) is left out of `--help` instead of breaking every command.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# (module, the commands it adds) in the order `mmrank --help` lists them.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mmrank.shop_cli", ("shop",)),
    ("mmrank.fetch", ("fetch",)),
    ("mmrank.encoders.cli", ("encoders", "embedder", "backfill")),
    ("mmrank.predictors.cli", ("ranker", "predictor")),
    ("mmrank.api_cli", ("crd", "validate")),
    ("mmrank.operator.cli", ("operator", "render")),
    ("mmrank.cluster_cli", ("cluster", "images")),
)


def parts_for(argv: Sequence[str]) -> list[str]:
    """The part modules to import for this command line: the one owning its command, or every
    part when no known command is named (`mmrank --help`, a typo that argparse reports)."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    for module_name, commands in PARTS:
        if command in commands:
            return [module_name]
    return [module_name for module_name, _ in PARTS]


def _missing_part(exc: ModuleNotFoundError, module_name: str) -> bool:
    """True when the part itself is not installed (not when the part fails on a missing import)."""
    return exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + "."))


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmrank",
        description="Multimodal CTR ranking on Kubernetes: data, encoder, ranker, embedder, "
        "predictor and operator.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = parts_for(list(argv) if argv is not None else sys.argv[1:])
    absent = []
    for module_name in wanted:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not _missing_part(exc, module_name):
                raise
            if len(wanted) == 1:
                raise SystemExit(f"mmrank: {module_name} is not installed here (this image or environment "
                                 "holds other parts of mmrank)") from exc
            absent.append(module_name)
            continue
        module.register_cli(subparsers)
    if absent:
        parser.epilog = f"not installed here: {', '.join(absent)}"
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = build_parser(argv).parse_args(argv)
    result = args.handler(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
