"""Subcommands: `mmrank predictor serve` (the KServe model server) and `mmrank predictor schema`."""

from __future__ import annotations

import argparse
import os
import sys

from mmrank.cli import fraction, non_negative_int, port, positive_duration, positive_int


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("predictor", help="Serve the ranker with KServe (v1, v2 REST and gRPC)")
    commands = parser.add_subparsers(dest="predictor_command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="Run the model server: ready only while the ranker's space is covered",
        description="Serve a ranker artifact with KServe's ModelServer. The model is not ready while "
        "the embedding space it was trained on is unreachable or below --min-coverage; the reason is "
        "logged and answered by GET /v1/models/<name> and /v2/models/<name>/ready.",
    )
    serve.add_argument(
        "--model-dir",
        default=os.environ.get("MMRANK_MODEL_DIR", "/mnt/models"),
        help="ranker artifact directory (KServe mounts storageUri at /mnt/models)",
    )
    serve.add_argument(
        "--store",
        default=os.environ.get("MMRANK_STORE_URL"),
        help="embedding store URL, redis://host:port/db or file:///path (env MMRANK_STORE_URL)",
    )
    serve.add_argument(
        "--scope",
        default=os.environ.get("MMRANK_SCOPE"),
        metavar="NAMESPACE/NAME",
        help="the ranker whose store keys and feedback stream these are (env MMRANK_SCOPE, which the "
        "operator sets; default default/local for local runs)",
    )
    serve.add_argument(
        "--model-name",
        default=os.environ.get("MMRANK_MODEL_NAME", "ranker"),
        help="name in /v1/models/<name>:predict and /v2/models/<name>/infer",
    )
    serve.add_argument(
        "--host",
        default=os.environ.get("MMRANK_HOST", "0.0.0.0"),
        help="address REST and gRPC listen on (env MMRANK_HOST; 127.0.0.1: this machine only)",
    )
    serve.add_argument("--http-port", type=port, default=os.environ.get("PORT", "8080"), help="REST port (env PORT)")
    serve.add_argument(
        "--grpc-port",
        type=port,
        default=os.environ.get("GRPC_PORT", "8081"),
        help="KServe's gRPC port (GRPCInferenceService, v2; env GRPC_PORT); 0: no gRPC",
    )
    serve.add_argument(
        "--space",
        default=os.environ.get("MMRANK_SPACE"),
        help="the space this deployment is for (env MMRANK_SPACE); never ready when the ranker was trained on another",
    )
    serve.add_argument(
        "--ranker-version",
        default=os.environ.get("MMRANK_RANKER_VERSION"),
        help="variant label of metrics and request ids (env MMRANK_RANKER_VERSION; default: the artifact's version)",
    )
    serve.add_argument(
        "--history-length",
        type=positive_int,
        default=None,
        help="newest behaviours read per user (default: the artifact's history_length)",
    )
    serve.add_argument(
        "--min-coverage",
        type=fraction,
        default=0.99,
        help="not ready below this share of the catalogue embedded in the ranker's space",
    )
    serve.add_argument(
        "--recheck-seconds",
        type=positive_duration,
        default=5.0,
        help="how often readiness is re-read (seconds, or a duration: 5s, 1m)",
    )
    serve.add_argument("--max-candidates", type=positive_int, default=500)
    serve.add_argument(
        "--max-history",
        type=positive_int,
        default=1000,
        help="longest history a request may carry (raised to --history-length if smaller)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=1 << 20,
        help="larger ranking bodies are answered 413 (gRPC: RESOURCE_EXHAUSTED)",
    )
    serve.add_argument(
        "--body-timeout-seconds",
        type=positive_duration,
        default=5.0,
        help="a ranking body not all received within this (seconds, or a duration: 5s, 500ms) is answered 408",
    )
    serve.add_argument(
        "--max-instances", type=positive_int, default=16, help="ranking requests in one v1 `instances` body"
    )
    serve.add_argument(
        "--max-concurrency",
        type=positive_int,
        default=8,
        help="ranking requests in flight (REST and gRPC, counted once the body is in); "
        "beyond it the answer is 503 at once",
    )
    serve.add_argument(
        "--item-cache-size",
        type=non_negative_int,
        default=200_000,
        help="item vectors cached per process (Redis store; dropped when re-embedded), float32: "
        "at most 100 MB at 128 dimensions, resident as they fill; 0: off",
    )
    serve.add_argument(
        "--torch-threads", type=non_negative_int, default=0, help="intra-op threads (0: torch's default)"
    )
    serve.add_argument(
        "--malloc-keep-mib",
        type=non_negative_int,
        default=128,
        help="freed memory glibc keeps in the process for the next ranking instead of returning it "
        "to the kernel (MiB; raises the resident set by up to this much); 0: glibc's defaults",
    )
    serve.add_argument(
        "--no-feedback-stream",
        action="store_true",
        help="do not consume the ranker's feedback Redis Stream (mmrank:{NAMESPACE/NAME}:feedback)",
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="log a line per request (uvicorn access and KServe timing); metrics carry it anyway",
    )
    serve.set_defaults(handler=_serve)

    schema = commands.add_parser("schema", help="Write the JSON schema of the v1 request body")
    schema.add_argument("--out", default=None, help="file (default: predictors/v1_request.schema.json)")
    schema.set_defaults(handler=_schema)


def port_in_use(host: str, port: int) -> str | None:
    """Why `port` cannot be listened on at `host` (None: it can), asked before the model loads, so
    a taken port is one line instead of a server that starts and stops."""
    import socket

    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and gRPC bind
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    for flag, number in (("--http-port", args.http_port), ("--grpc-port", args.grpc_port)):
        problem = port_in_use(args.host, number)
        if problem:
            print(f"mmrank predictor serve: {flag} {number} on {args.host}: {problem}", file=sys.stderr)
            return 2
    if not args.store:
        print("mmrank predictor serve: --store (or MMRANK_STORE_URL) is required", file=sys.stderr)
        return 2
    if not (Path(args.model_dir) / "ranker.json").is_file():
        print(
            f"mmrank predictor serve: no ranker artifact in {args.model_dir} (ranker.json missing; "
            "write one with `mmrank ranker train --out DIR`)",
            file=sys.stderr,
        )
        return 2
    from mmrank.store import scope_from_env

    try:
        scope = scope_from_env(args.scope)
    except ValueError as exc:
        print(f"mmrank predictor serve: --scope: {exc}", file=sys.stderr)
        return 2
    import torch

    from mmrank.predictors.ranker_model import RankerModel
    from mmrank.predictors.requests import Limits
    from mmrank.predictors.server import serve

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    limits = Limits(
        max_candidates=args.max_candidates,
        max_history=max(args.max_history, args.history_length or 0),
        max_body_bytes=args.max_body_bytes,
        max_concurrency=args.max_concurrency,
        max_instances=args.max_instances,
        body_timeout_seconds=args.body_timeout_seconds,
    )
    # The store's password: the URL's own, else MMRANK_STORE_PASSWORD (mmrank.store.store_password).
    model = RankerModel(
        args.model_name,
        args.model_dir,
        args.store,
        limits=limits,
        min_coverage=args.min_coverage,
        recheck_seconds=args.recheck_seconds,
        feedback_stream=not args.no_feedback_stream,
        expected_space=args.space,
        version=args.ranker_version,
        history_length=args.history_length,
        item_cache_size=args.item_cache_size,
        scope=scope,
    )
    serve(
        model,
        args.http_port,
        grpc_port=args.grpc_port,
        host=args.host,
        workers_threads=max(4, args.max_concurrency + 2),
        access_log=args.access_log,
        malloc_keep_mib=args.malloc_keep_mib,
    )
    return 0


def _schema(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmrank.predictors.requests import SCHEMA_PATH, write_schema

    print(write_schema(Path(args.out) if args.out else SCHEMA_PATH))
    return 0
