"""Subcommands of the predictor part: `ranker` (train, eval, table) and `predictor` (serve)."""

from __future__ import annotations

import argparse


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from mmrank.predictors import predictor_cli, ranker_cli

    ranker_cli.register_cli(subparsers)
    predictor_cli.register_cli(subparsers)
