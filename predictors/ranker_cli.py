"""Subcommands: `mmrank ranker train | eval | table | matrix`. Torch is imported inside the handlers."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from mmrank.cli import (
    CommandError,
    existing_dir,
    existing_file,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from mmrank.shop_config import MATRIX_DEFAULT, MATRIX_SHOPS

VARIANTS = ("id", "vector", "simtier", "simtier-make")


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ranker", help="Train, evaluate and compare the CTR ranker (ID, SimTier, MAKE)")
    sub = parser.add_subparsers(dest="ranker_command", metavar="ACTION", required=True)

    train = sub.add_parser("train", help="Train one variant (id parameters for one epoch) and write its artifact")
    _data_args(train)
    train.add_argument("--variant", choices=VARIANTS, default="simtier-make")
    train.add_argument("--out", required=True, help="artifact directory (ranker.json, weights.pt, item_features.npy)")
    train.add_argument("--version", help="ranker version recorded in ranker.json (default: variant-space)")
    _training_args(train)
    train.add_argument(
        "--make-vector-input",
        action="store_true",
        help="ablation: MAKE's attention-pooled vector also enters the ID model's first layer",
    )
    train.add_argument(
        "--no-make-tiers",
        action="store_true",
        help="ablation: MAKE's module without its own SimTier weights (issue 6's MAKE)",
    )
    train.add_argument(
        "--make-dim",
        type=non_negative_int,
        default=0,
        help="lever: MAKE projects the embeddings to this width before attending and pooling "
        "(default 0: their own width)",
    )
    train.add_argument(
        "--make-finetune-lr",
        type=non_negative_float,
        default=0.0,
        help="keep training MAKE during the ID epoch at this Adam rate (default 0: frozen)",
    )
    train.set_defaults(handler=_train)

    evaluate = sub.add_parser(
        "eval", help="AUC, GAUC and log-loss of an artifact on the test day, overall and cold items"
    )
    evaluate.add_argument("--model", required=True, type=existing_dir, help="artifact directory")
    _data_args(evaluate)
    evaluate.set_defaults(handler=_eval)

    table = sub.add_parser("table", help="The offline table: ID / Vector / SimTier / SimTier+MAKE over seeds")
    _data_args(table)
    table.add_argument("--seeds", type=positive_int, default=3)
    table.add_argument("--make-epochs-list", default="1,2,4", help="MAKE pre-training epochs compared")
    table.add_argument("--jobs", type=positive_int, default=1, help="seeds trained in parallel worker processes")
    table.add_argument(
        "--from-json", type=existing_file, help="render the runs a previous --json wrote instead of training"
    )
    table.add_argument("--json", help="also write every run's figures here")
    table.add_argument("--results", help="replace the ranker section of this markdown file (docs/results.md)")
    _training_args(table, with_make_epochs=False)
    table.set_defaults(handler=_table)

    matrix = sub.add_parser(
        "matrix",
        help="ID / Vector / SimTier / SimTier+MAKE over shop configurations x "
        "embedding spaces x seeds: one table and one picture",
    )
    matrix.add_argument("--workdir", required=True, help="shops, spaces and the SCL encoder go here (reused)")
    matrix.add_argument(
        "--shops",
        default=",".join(MATRIX_DEFAULT),
        help="named shop configurations (mmrank.shop_config.MATRIX_SHOPS), comma-separated",
    )
    matrix.add_argument("--spaces", default="oracle,scl", help="oracle and/or scl, comma-separated")
    matrix.add_argument("--seeds", type=positive_int, default=3)
    matrix.add_argument("--jobs", type=positive_int, default=1, help="worker processes (one torch thread each)")
    matrix.add_argument(
        "--scl-checkpoint",
        type=existing_dir,
        help="SCL encoder checkpoint for the scl space (default: train one on the first shop)",
    )
    matrix.add_argument("--scl-steps", type=positive_int, default=300, help="steps when training that encoder")
    matrix.add_argument(
        "--max-make-epochs",
        type=positive_int,
        default=3,
        help="MAKE's epochs are chosen on the validation day among 1..this",
    )
    matrix.add_argument("--history-length", type=positive_int, default=50)
    matrix.add_argument("--batch-size", type=positive_int, default=256)
    matrix.add_argument("--json", help="also write every run's figures here")
    matrix.add_argument("--from-json", type=existing_file, help="render a previous --json instead of training")
    matrix.add_argument("--results", help="replace the matrix section of this markdown file (docs/results.md)")
    matrix.add_argument("--picture", help="write the lift picture here (PNG)")
    matrix.set_defaults(handler=_matrix)


def _data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=existing_dir, help="shop directory (mmrank shop generate --out)")
    parser.add_argument(
        "--embeddings",
        type=existing_dir,
        help="space directory (mmrank encoders embed / mmrank shop concept-space); "
        "default: the shop's oracle concept vectors",
    )


def _training_args(parser: argparse.ArgumentParser, with_make_epochs: bool = True) -> None:
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--history-length", type=positive_int, default=50)
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--tier-width", type=positive_float, default=0.1)
    parser.add_argument(
        "--threads",
        type=non_negative_int,
        default=1,
        help="torch threads (1 is fastest on a shared machine; 0: torch's default)",
    )
    if with_make_epochs:
        parser.add_argument(
            "--make-epochs",
            type=_make_epochs,
            default=0,
            metavar="N|auto",
            help="MAKE pre-training epochs (simtier-make); auto (default): chosen on the last "
            "training day as validation, among 1..--max-make-epochs",
        )
        parser.add_argument("--max-make-epochs", type=positive_int, default=4)


def _make_epochs(text: str) -> int:
    if text == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of epochs or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least 1 epoch (or 'auto'), got {text!r}")
    return value


def _settings(args: argparse.Namespace, seed: int | None = None, make_epochs: int | None = None):  # noqa: ANN202
    from mmrank.predictors.train import TrainSettings

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return TrainSettings(
        seed=args.seed if seed is None else seed,
        batch_size=args.batch_size,
        make_epochs=getattr(args, "make_epochs", 0) if make_epochs is None else make_epochs,
        max_make_epochs=getattr(args, "max_make_epochs", 4),
    )


def _train(args: argparse.Namespace) -> int:
    from mmrank.predictors import artifact, train
    from mmrank.predictors.model import RankerConfig

    train_data, test_data, catalogue, vocab = train.load_data(args.data, args.history_length, args.embeddings)
    config = RankerConfig(
        variant=args.variant,
        mm_dim=catalogue.vectors.shape[1],
        history_length=args.history_length,
        tier_width=args.tier_width,
        make_vector=args.make_vector_input,
        make_simtier=not args.no_make_tiers,
        make_dim=args.make_dim,
        **vocab,
    )
    settings = dataclasses.replace(_settings(args), make_finetune_lr=args.make_finetune_lr)
    model, report = train.train_ranker(train_data, catalogue, config, settings)
    metrics = train.evaluate(model, test_data, catalogue)
    meta = artifact.save_ranker(
        args.out,
        model,
        catalogue.encoder_version,
        catalogue.item_features,
        version=args.version,
        metrics=metrics,
        training={**report, "data": str(Path(args.data).resolve())},
    )
    print(
        json.dumps(
            {
                "out": args.out,
                "version": meta["version"],
                "encoder_version": meta["encoder_version"],
                "metrics": metrics,
                "training": report,
            },
            indent=2,
        )
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    if not (Path(args.model) / "ranker.json").is_file():
        raise CommandError(
            f"{args.model}: no ranker artifact (ranker.json missing; `mmrank ranker train --out DIR` writes one)"
        )
    from mmrank.predictors import artifact, train

    model, meta = artifact.load_ranker(args.model)
    _, test_data, catalogue, _ = train.load_data(args.data, meta["history_length"], args.embeddings)
    if catalogue.encoder_version != meta["encoder_version"]:
        print(
            f"ranker {meta['version']} was trained on space {meta['encoder_version']!r}, "
            f"not {catalogue.encoder_version!r}: its scores would mean nothing",
            file=sys.stderr,
        )
        return 2
    print(json.dumps({"version": meta["version"], "metrics": train.evaluate(model, test_data, catalogue)}, indent=2))
    return 0


def _table(args: argparse.Namespace) -> int:
    from mmrank.predictors import table

    if args.from_json:
        try:
            runs = json.loads(Path(args.from_json).read_text())
        except ValueError as exc:
            raise CommandError(f"--from-json {args.from_json}: not JSON ({exc})") from exc
    else:
        runs = _table_runs(args)
    markdown = table.render(runs, command=_table_command(args))
    print(markdown)
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(runs, indent=2) + "\n")
    if args.results:
        table.replace_section(Path(args.results), markdown)
    return 0


def _table_runs(args: argparse.Namespace) -> list[dict]:
    from mmrank.predictors import table

    try:
        make_epochs = tuple(int(e) for e in args.make_epochs_list.split(","))
    except ValueError:
        raise CommandError(
            f"--make-epochs-list wants whole numbers separated by commas, got {args.make_epochs_list!r}"
        ) from None
    if any(e < 1 for e in make_epochs):
        raise CommandError(f"--make-epochs-list: each is at least 1 epoch, got {args.make_epochs_list!r}")
    common = dict(
        make_epochs=make_epochs,
        settings=_settings(args),
        history_length=args.history_length,
        tier_width=args.tier_width,
    )
    seeds = range(args.seed, args.seed + args.seeds)
    if args.jobs > 1:
        runs = table.run_table_parallel(args.data, args.embeddings, seeds, args.jobs, args.threads, **common)
    else:
        runs = table.run_table(
            args.data, args.embeddings, seeds, log=lambda line: print(line, file=sys.stderr, flush=True), **common
        )
    return runs


def _table_command(args: argparse.Namespace) -> str:
    """The command line that reproduces the table (paths as given)."""
    parts = ["mmrank ranker table", f"--data {args.data}"]
    if args.embeddings:
        parts.append(f"--embeddings {args.embeddings}")
    parts += [f"--seeds {args.seeds}", f"--make-epochs-list {args.make_epochs_list}"]
    if args.jobs > 1:
        parts.append(f"--jobs {args.jobs}")
    if args.history_length != 50:
        parts.append(f"--history-length {args.history_length}")
    return " ".join(parts)


def _matrix(args: argparse.Namespace) -> int:
    from mmrank.predictors import matrix

    shops = [name.strip() for name in args.shops.split(",") if name.strip()]
    unknown = [name for name in shops if name not in MATRIX_SHOPS]
    if not shops or unknown:
        raise CommandError(f"--shops: unknown {unknown or 'empty list'}; choose among {', '.join(MATRIX_SHOPS)}")
    spaces = [space.strip() for space in args.spaces.split(",") if space.strip()]
    if not spaces or any(space not in matrix.SPACES for space in spaces):
        raise CommandError(f"--spaces: choose among {', '.join(matrix.SPACES)}, got {args.spaces!r}")
    if args.from_json:
        try:
            result = json.loads(Path(args.from_json).read_text())
        except ValueError as exc:
            raise CommandError(f"--from-json {args.from_json}: not JSON ({exc})") from None
    else:

        def log(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        specs = [matrix.ShopSpec(name, *MATRIX_SHOPS[name]) for name in shops]
        prepared = matrix.prepare(workdir, specs, spaces, args.scl_checkpoint, args.scl_steps, log)
        from mmrank.predictors.train import TrainSettings

        settings = TrainSettings(batch_size=args.batch_size, make_epochs=0, max_make_epochs=args.max_make_epochs)
        result = matrix.run_matrix(
            prepared,
            spaces,
            list(range(args.seeds)),
            settings,
            history_length=args.history_length,
            jobs=args.jobs,
            log=log,
        )
        result["command"] = _matrix_command(args)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    picture_ref = None
    if args.picture:
        picture = matrix.plot(result, Path(args.picture))
        if args.results:
            import os

            picture_ref = os.path.relpath(picture, Path(args.results).resolve().parent)
    markdown = matrix.render(result, result.get("command", _matrix_command(args)), picture_ref)
    print(markdown)
    if args.results:
        matrix.replace_section(Path(args.results), markdown)
    return 0


def _matrix_command(args: argparse.Namespace) -> str:
    parts = [
        "mmrank ranker matrix",
        f"--shops {args.shops}",
        f"--spaces {args.spaces}",
        f"--seeds {args.seeds}",
        f"--max-make-epochs {args.max_make_epochs}",
    ]
    if args.scl_checkpoint:
        parts.append("--scl-checkpoint CKPT")
    else:
        parts.append(f"--scl-steps {args.scl_steps}")
    if args.jobs > 1:
        parts.append(f"--jobs {args.jobs}")
    return " ".join(parts)
