"""Subcommands of the encoder part: `encoders` (train, eval, export, embed), `embedder`, `backfill`."""

from __future__ import annotations

import argparse


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from mmrank.encoders import embedder_cli, encoder_cli

    encoder_cli.register_cli(subparsers)
    embedder_cli.register_cli(subparsers)
