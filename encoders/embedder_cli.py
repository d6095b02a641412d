"""Subcommands: `mmrank embedder run` (real-time embedding) and `mmrank backfill run` (a new space).

Handlers import the embedder and backfill modules only when they run.
"""

from __future__ import annotations

import argparse
import os

from mmrank.cli import (
    CommandError,
    add_progress_flag,
    duration,
    existing_dir,
    port,
    positive_duration,
    positive_int,
    show_progress,
)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    embedder = subparsers.add_parser("embedder", help="Embed new items in real time into every live space")
    embedder_sub = embedder.add_subparsers(dest="embedder_command", metavar="COMMAND", required=True)
    run = embedder_sub.add_parser(
        "run",
        help="Read item events, embed them with every live encoder, write the store",
        description="Reads the ranker's item stream mmrank:{NAMESPACE/NAME}:items (its consumer group) and "
        "POST /items, calls each encoder version on Triton, writes each space, acknowledges after every write. "
        "Encoders also from MMRANK_ENCODERS, the store from MMRANK_STORE_URL, the stream's Redis from "
        "MMRANK_REDIS_URL, the ranker from MMRANK_SCOPE.",
    )
    run.add_argument(
        "--encoder",
        action="append",
        default=[],
        metavar="SPACE=HOST:PORT[/MODEL]",
        help="a live encoder version (repeat; gRPC address of its Triton)",
    )
    run.add_argument("--store", help="store URL: redis://host:port/db or file:///path")
    run.add_argument("--redis", help="Redis URL of the item stream (default: the store, when it is Redis)")
    add_scope_flag(run)
    run.add_argument(
        "--stream",
        help="stream key of item events (default $MMRANK_ITEM_STREAM, else the ranker's "
        "own: mmrank:{NAMESPACE/NAME}:items); a named stream may be shared by several rankers",
    )
    run.add_argument(
        "--group",
        help="consumer group, within the ranker's scope (default $MMRANK_CONSUMER_GROUP "
        "or embedder: mmrank:{NAMESPACE/NAME}:embedder)",
    )
    run.add_argument("--batch-size", type=positive_int, default=32)
    run.add_argument(
        "--max-wait",
        type=duration,
        default=0.05,
        help="seconds (or a duration: 50ms) to fill a batch after its first event",
    )
    run.add_argument("--in-flight", type=positive_int, default=2, help="batches being embedded at once")
    run.add_argument("--consumer", default=None, help="consumer name in the group (default: host name)")
    run.add_argument(
        "--claim-idle",
        type=positive_duration,
        default=30.0,
        help="seconds (or a duration: 30s, 1m) after which another replica's unacknowledged events are taken over",
    )
    run.add_argument(
        "--max-deliveries",
        type=positive_int,
        default=5,
        help="an event delivered more often without an acknowledgement is dead-lettered",
    )
    run.add_argument(
        "--forget-consumer-after",
        type=positive_duration,
        default=600.0,
        help="seconds (or a duration: 10m) idle after which a consumer with nothing pending leaves the group",
    )
    run.add_argument(
        "--trim-interval",
        type=positive_duration,
        default=5.0,
        help="seconds (or a duration: 5s) between trims of the acknowledged events from the stream",
    )
    run.add_argument(
        "--stream-max-len",
        type=positive_int,
        default=100_000,
        help="POST /items answers 503 stream_full while the stream holds this many events",
    )
    run.add_argument("--dead-letter-max-len", type=positive_int, default=10_000, help="dead letters kept (newest)")
    run.add_argument("--dtype", default="float16", choices=("float16", "int8"), help="storage of new spaces")
    run.add_argument("--http-host", default="0.0.0.0")
    run.add_argument("--http-port", type=port, default=8080, help="POST /items, /healthz, /readyz, /metrics (0: any)")
    run.add_argument(
        "--trace",
        default="",
        metavar="FILE",
        help="debug: append a JSON line per batch with each stage's wall time, and one per garbage "
        "collection or event-loop delay over 2 ms (bench/freshness.py reads it to explain stalls)",
    )
    run.add_argument(
        "--gc-freeze",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="freeze the objects alive after setup out of the garbage collector (default), so a full "
        "collection does not stop the event loop to scan every imported module",
    )
    run.set_defaults(handler=run_embedder)

    backfill = subparsers.add_parser("backfill", help="Re-embed the catalogue into a new space (sharded, resumable)")
    backfill_sub = backfill.add_subparsers(dest="backfill_command", metavar="COMMAND", required=True)
    brun = backfill_sub.add_parser(
        "run",
        help="Embed one shard of the catalogue into a space, resuming from its checkpoint",
        description="One shard per Kubernetes Indexed Job index: --shard '$(JOB_COMPLETION_INDEX)/N'. "
        "Progress (the checkpoint) and coverage are written to the store.",
    )
    brun.add_argument("--space", required=True, help="the space (encoder version) to fill")
    brun.add_argument(
        "--shard",
        default=os.environ.get("MMRANK_SHARD", "0/1"),
        help="I/N: this shard of N (default $MMRANK_SHARD, or JOB_COMPLETION_INDEX/N with --shard /N)",
    )
    brun.add_argument(
        "--encoder",
        required=False,
        metavar="HOST:PORT[/MODEL]",
        help="gRPC address of the encoder's Triton (default $MMRANK_ENCODER_URL)",
    )
    brun.add_argument("--store", help="store URL (default $MMRANK_STORE_URL)")
    add_scope_flag(brun)
    brun.add_argument(
        "--catalogue", required=True, type=existing_dir, help="shop directory (mmrank shop generate --out DIR)"
    )
    brun.add_argument("--batch-size", type=positive_int, default=64)
    brun.add_argument("--in-flight", type=positive_int, default=4, help="Triton requests in flight at once")
    brun.add_argument("--dtype", default="float16", choices=("float16", "int8"))
    add_progress_flag(brun)
    brun.set_defaults(handler=run_backfill)


def add_scope_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scope",
        metavar="NAMESPACE/NAME",
        help="the ranker whose keys and streams these are (default $MMRANK_SCOPE, which the operator "
        "sets, else default/local for local runs)",
    )


def run_embedder(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from mmrank.encoders.embedder import Embedder
    from mmrank.encoders.embedder_app import serve
    from mmrank.encoders.embedder_config import config_from_env

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = config_from_env(
            args.encoder,
            args.store,
            args.redis,
            scope=args.scope,
            batch_size=args.batch_size,
            max_wait=args.max_wait,
            in_flight=args.in_flight,
            consumer=args.consumer,
            claim_idle=args.claim_idle,
            max_deliveries=args.max_deliveries,
            forget_consumer_after=args.forget_consumer_after,
            trim_interval=args.trim_interval,
            stream_max_len=args.stream_max_len,
            dead_letter_max_len=args.dead_letter_max_len,
            dtype=args.dtype,
            http_host=args.http_host,
            http_port=args.http_port,
            trace=args.trace,
            freeze_gc=args.gc_freeze,
            **{k: v for k, v in (("stream", args.stream), ("group", args.group)) if v},
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from exc

    async def main() -> None:
        embedder = Embedder(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, embedder.stop_event.set)
        await serve(embedder, lambda port: print(f"embedder: http on port {port}", flush=True))

    asyncio.run(main())
    return 0


def run_backfill(args: argparse.Namespace) -> int:
    import json

    from tritonclient.utils import InferenceServerException

    from mmrank.encoders.backfill import BackfillConfig, parse_shard, run
    from mmrank.encoders.embedder_config import ENV_STORE
    from mmrank.encoders.triton_client import parse_encoder
    from mmrank.store import scope_from_env

    encoder = args.encoder or os.environ.get("MMRANK_ENCODER_URL", "")
    store = args.store or os.environ.get(ENV_STORE, "")
    if not encoder or not store:
        raise CommandError(
            "backfill needs --encoder HOST:PORT[/MODEL] and --store URL (or their environment variables)"
        )
    try:
        index, count = parse_shard(args.shard, os.environ)
        scope = scope_from_env(args.scope)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    try:
        result = run(
            BackfillConfig(
                space=args.space,
                target=parse_encoder(f"{args.space}={encoder}"),
                store_url=store,
                scope=scope,
                catalogue=args.catalogue,
                shard=index,
                shards=count,
                batch_size=args.batch_size,
                in_flight=args.in_flight,
                dtype=args.dtype,
                progress=show_progress(args),
            )
        )
    except InferenceServerException as exc:
        raise CommandError(f"encoder {encoder}: {' '.join(str(exc).split())}") from exc
    print(json.dumps(result), flush=True)
    return 0
