"""Subcommands of the operator part: `mmrank operator run` and `mmrank render -f FILE`.

kopf and the kubernetes client are imported inside the handlers, so `mmrank --help` stays quick.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import TYPE_CHECKING, Any

from mmrank.cli import CommandError, describe, file_problem, port, positive_duration, positive_int

if TYPE_CHECKING:
    import kopf


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    operator = subparsers.add_parser("operator", help="Run the MultimodalRanker operator (kopf)")
    commands = operator.add_subparsers(dest="operator_command", metavar="COMMAND", required=True)
    run = commands.add_parser(
        "run",
        help="Reconcile MultimodalRankers in a namespace or the whole cluster",
        description="Reconcile MultimodalRankers. Uses the in-cluster service account, "
        "or KUBECONFIG outside a cluster.",
    )
    run.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="namespace to watch (repeatable; default: every namespace)",
    )
    peers = run.add_mutually_exclusive_group()
    peers.add_argument(
        "--standalone", action="store_true", help="no peering with other operator replicas (a single replica, tests)"
    )
    peers.add_argument(
        "--peering",
        metavar="NAME",
        default=None,
        help="kopf peering object shared by the replicas (ClusterKopfPeering, or a KopfPeering "
        "per --namespace; created if missing): one replica reconciles, the others stand by",
    )
    run.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority; default: seniority (minus the start time in ns), so the oldest "
        "replica leads and any priority >= 0 outranks every replica",
    )
    run.add_argument(
        "--peering-lifetime",
        type=positive_int,
        default=15,
        metavar="SECONDS",
        help="how long peers trust this replica's last keep-alive; a killed leader is replaced "
        "within about this (default 15)",
    )
    run.add_argument(
        "--interval",
        type=positive_duration,
        default=os.environ.get("MMRANK_OPERATOR_INTERVAL", "30"),
        help="seconds, or a duration (30s, 1m30s), between level-triggered reconciles of each "
        "ranker (default 30; env MMRANK_OPERATOR_INTERVAL)",
    )
    run.add_argument("--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    run.add_argument(
        "--readiness",
        default=None,
        help="readiness endpoint, e.g. http://0.0.0.0:8081/readyz: 200 once logged in and taking part "
        "in the peering (standalone: once the apiserver answers)",
    )
    run.add_argument(
        "--metrics-port",
        type=port,
        default=os.environ.get("MMRANK_METRICS_PORT", "0"),
        help="serve Prometheus metrics on this port at /metrics (the chart uses 9090; default 0: "
        "off; env MMRANK_METRICS_PORT)",
    )
    run.add_argument("--verbose", action="store_true")
    run.set_defaults(handler=_run)

    render = subparsers.add_parser(
        "render",
        help="Print the children the operator would create, as YAML, "
        "without a cluster (what `helm template` is to a chart)",
    )
    render.add_argument("-f", "--filename", required=True, help="MultimodalRanker manifest (`-` reads stdin)")
    render.add_argument(
        "--coverage",
        action="append",
        default=[],
        metavar="SPACE=FRACTION",
        help="store coverage of a space (default 0: a fresh store), e.g. --coverage e1=0.5",
    )
    render.add_argument("--status", action="store_true", help="also print the status the operator would write")
    render.set_defaults(handler=_render)


def check_cluster_access(timeout: float = 10.0) -> None:
    """Fail at once, in one line, without credentials or an apiserver to talk to: kopf would log a
    traceback and wait forever (in a pod, a restart is the better answer)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except Exception as exc:  # noqa: BLE001 - missing, unreadable or malformed kubeconfig alike
            raise CommandError(
                f"no Kubernetes credentials (not in a pod, and the kubeconfig: {describe(exc)})"
            ) from exc
    try:
        client.VersionApi().get_code(_request_timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - refused, TLS, DNS, timeout: the apiserver is not there for us
        host = client.Configuration.get_default_copy().host
        raise CommandError(f"cannot reach the Kubernetes API at {host}: {describe(exc)}") from exc


def handler_registry(args: argparse.Namespace) -> kopf.OperatorRegistry:
    """The operator's kopf handlers as `operator run` configured them (the timer's interval)."""
    import kopf

    from mmrank.operator import handlers

    return handlers.register(kopf.OperatorRegistry(), interval=args.interval)


def _run(args: argparse.Namespace) -> int:
    check_cluster_access()
    import kopf
    import urllib3

    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    kopf.configure(verbose=args.verbose, log_prefix=True)  # each line names its object
    registry = handler_registry(args)
    if args.metrics_port:
        from mmrank.operator import metrics

        try:
            metrics.serve(args.metrics_port)
        except OSError as exc:
            raise CommandError(f"cannot serve metrics on port {args.metrics_port}: {describe(exc)}") from exc
    from mmrank.operator import peering

    peering.config = peering.Config(
        name=args.peering, namespaces=args.namespace, identity=peering.own_identity(), readiness=args.readiness
    )
    settings = kopf.OperatorSettings()
    settings.peering.lifetime = args.peering_lifetime
    priority = None
    if args.peering:
        try:
            peering.ensure_objects(args.peering, args.namespace)
        except LookupError as exc:
            raise CommandError(str(exc)) from exc
        priority = args.priority if args.priority is not None else peering.seniority(time.time_ns())
    kopf.run(
        standalone=True if args.standalone else None,
        peering_name=args.peering,
        priority=priority,
        identity=peering.config.identity,  # type: ignore[arg-type]  # kopf's Identity: a NewType of str it does not export
        registry=registry,
        settings=settings,
        namespaces=args.namespace,
        clusterwide=not args.namespace,
        liveness_endpoint=args.liveness,
    )
    return 0


def parse_coverage(values: list[str]) -> dict[str, float]:
    out = {}
    for value in values:
        space, _, fraction = value.partition("=")
        try:
            share = float(fraction)
        except ValueError:
            share = -1.0
        if not space or not 0.0 <= share <= 1.0:
            raise CommandError(f"--coverage wants SPACE=FRACTION with a fraction in [0, 1], got {value!r}")
        out[space] = share
    return out


def render_documents(
    documents: list[Any], coverage: dict[str, float], with_status: bool = False
) -> list[dict[str, Any]]:
    """Children (and optionally the status) for each MultimodalRanker document, offline: the
    encoders count as ready and the store reports `coverage` (0 for spaces not named)."""
    from mmrank.operator import children as build
    from mmrank.operator import core, observe, reconcile

    out: list[dict[str, Any]] = []
    store = observe.FixedCoverage(coverage)
    for document in documents:
        if not isinstance(document, dict) or document.get("kind") != "MultimodalRanker":
            continue
        body = {
            **document,
            "metadata": {"namespace": "default", "uid": "<uid>", "generation": 1, **document.get("metadata", {})},
        }
        ranker = reconcile.parse(body)
        versions = [ranker.spec.encoder.version]
        observed = core.Observed(
            now=reconcile.now(), spaces=store.spaces("", None, versions), encoders_ready={v: True for v in versions}
        )
        want = core.desired(ranker, observed)
        out.extend(want.children)
        if with_status:
            out.append(
                {"kind": "MultimodalRankerStatus", "name": ranker.metadata.name, "status": build.plain(want.status)}
            )
    return out


def _render(args: argparse.Namespace) -> int:
    import yaml
    from pydantic import ValidationError

    from mmrank import api

    coverage = parse_coverage(args.coverage)
    try:
        text = sys.stdin.read() if args.filename == "-" else pathlib.Path(args.filename).read_text(encoding="utf-8")
        manifests = [d for d in yaml.safe_load_all(text) if d]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CommandError(f"cannot read a YAML manifest: {file_problem(args.filename, exc)}") from exc
    try:
        documents = render_documents(manifests, coverage, args.status)
    except ValidationError as exc:
        found = [
            problem
            for document in manifests
            if isinstance(document, dict) and document.get("kind") == "MultimodalRanker"
            for problem in api.problems(document)
        ]
        raise CommandError(f"{args.filename}: invalid MultimodalRanker: {'; '.join(found) or describe(exc)}") from None
    sys.stdout.write(to_yaml(documents))
    return 0


def to_yaml(documents: list[dict[str, Any]]) -> str:
    """A YAML stream kubectl applies as is: no anchors, multi-line strings as literal blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):  # type: ignore[misc]  # PyYAML ships no annotations: an Any base
        def ignore_aliases(self, data: Any) -> bool:
            return True

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    stream: str = yaml.dump_all(documents, Dumper=Dumper, sort_keys=False, width=120)
    return stream
