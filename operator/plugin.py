"""`kubectl mmrank`: read a canary and promote, abort or retry it, the way Argo Rollouts' plugin does.

Installed with the package as the console script `kubectl-mmrank`, so kubectl finds it on PATH:

    kubectl mmrank status  NAME [-n NAMESPACE]
    kubectl mmrank promote NAME [-n NAMESPACE] [--wait]
    kubectl mmrank abort   NAME [-n NAMESPACE] [--wait]
    kubectl mmrank retry   NAME [-n NAMESPACE] [--wait]

promote/abort/retry write `status.request` through the status subresource; the operator acts on
it, records the decision in `status.history` and an Event, and clears it. The plain-kubectl
equivalent:

    kubectl patch mmr NAME --subresource=status --type=merge \\
      -p '{"status":{"request":{"action":"Promote","requestedAt":"2026-11-29T03:20:00.000000Z"}}}'

A request the rollout cannot take (promote with no canary waiting, a second promote, retry of a
canary that was not rolled back) is refused here with the reason, and nothing is written.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from mmrank import api

ACTIONS = {"promote": "Promote", "abort": "Abort", "retry": "Retry"}


class PluginError(Exception):
    """A message for the person at the terminal; exit status 1."""


# --- pure: what a request may do, and the readable status ------------------------------------------


def refusal(action: str, status: Mapping[str, Any]) -> str | None:
    """Why `action` cannot be taken now (None: it can)."""
    canary = status.get("canary") or {}
    state = canary.get("state")
    version = canary.get("rankerVersion")
    if status.get("request"):
        pending = status["request"]
        return (
            f"a {pending.get('action', '?').lower()} requested at {pending.get('requestedAt', '?')} is still "
            "waiting for the operator; nothing was changed"
        )
    if not canary or state is None:
        stable = (status.get("stable") or {}).get("rankerVersion", "-")
        return f"no canary rollout in progress (ranker {stable} serves all traffic); nothing to {action}"
    if action == "Promote" and state != "AwaitingPromotion":
        if state == "Progressing":
            steps = canary.get("steps") or []
            return (
                f"canary {version} is at step {int(canary.get('step', 0)) + 1} of {len(steps)}; it can be "
                "promoted once every step has passed (phase AwaitingPromotion, promotion: Manual), or aborted"
            )
        if state == "Promoted":
            return f"canary {version} is already promoted"
        return f"canary {version} was rolled back; `kubectl mmrank retry` starts it again"
    if action == "Abort" and state not in ("Progressing", "AwaitingPromotion"):
        return f"canary {version} is {state}; there is nothing to abort"
    if action == "Retry" and state != "RolledBack":
        return f"canary {version} is {state}, not RolledBack; only a rolled-back canary can be retried"
    return None


def request_body(action: str, now: datetime.datetime, who: str) -> dict[str, Any]:
    stamp = now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"status": {"request": {"action": action, "requestedAt": stamp, "requestedBy": who[:253]}}}


def _number(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _analysis_line(analysis: Mapping[str, Any]) -> str:
    return (
        f"{analysis.get('verdict') or ('Passed' if analysis.get('passed') else 'Failed')} at "
        f"{analysis.get('time', '?')}: requests {analysis.get('requests', 0)}, "
        f"error rate {_number(analysis.get('errorRate'), '.4f')}, "
        f"p99 {_number(analysis.get('latencyP99Ms'), '.1f')} ms, "
        f"click-rate ratio {_number(analysis.get('clickRateRatio'), '.3f')}"
        + (f" — {analysis['message']}" if analysis.get("message") else "")
    )


def render_status(obj: Mapping[str, Any]) -> str:
    """The resource's rollout as a person reads it: steps, traffic, last analysis, history."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    rollout = spec.get("rollout") or {}
    analysis_spec = rollout.get("analysis") or {}
    stable = status.get("stable") or {}
    canary = status.get("canary") or {}
    lines = [
        f"Name:       {meta.get('namespace', 'default')}/{meta.get('name', '?')}",
        f"Phase:      {status.get('phase', '-')}",
        f"Stable:     {stable.get('rankerVersion', '-')} on space {stable.get('encoderVersion', '-')}",
    ]
    if canary:
        steps = canary.get("steps") or []
        current = int(canary.get("step", 0))
        marks = []
        for i, share in enumerate(steps):
            mark = "*" if i == current and canary.get("state") == "Progressing" else ("✓" if i < current else " ")
            marks.append(f"{mark}{share}%")
        lines += [
            f"Canary:     {canary.get('rankerVersion')} on space {canary.get('encoderVersion')} "
            f"({canary.get('state')})",
            f"Traffic:    {canary.get('trafficPercent', 0)} % canary / {100 - int(canary.get('trafficPercent', 0))} "
            f"% stable (granularity {canary.get('granularityPercent', 1)} %)",
            f"Steps:      {' → '.join(marks) or '-'} → 100% ({rollout.get('promotion', 'Automatic')} promotion, "
            f"every {rollout.get('interval', '5m')})",
            f"Checks:     failed {canary.get('failedChecks', 0)} of {analysis_spec.get('failureLimit', 2)} "
            f"allowed; error rate ≤ {analysis_spec.get('maxErrorRate', 0.01)}, p99 ≤ "
            f"{analysis_spec.get('maxLatencyP99Ms', 100)} ms, click-rate ratio ≥ "
            f"{analysis_spec.get('minClickRateRatio', 0.95)}, ≥ {analysis_spec.get('minRequests', 500)} requests",
        ]
        if canary.get("lastAnalysis"):
            lines.append(f"Analysis:   {_analysis_line(canary['lastAnalysis'])}")
    else:
        lines.append("Canary:     -")
    if status.get("request"):
        req = status["request"]
        lines.append(
            f"Pending:    {req.get('action')} requested at {req.get('requestedAt')} by {req.get('requestedBy') or '-'}"
        )
    conditions = status.get("conditions") or []
    if conditions:
        lines.append("Conditions:")
        lines += [
            f"  {c.get('type'):<17}{c.get('status'):<8}{c.get('reason', '')}: {c.get('message', '')}"
            for c in conditions
        ]
    history = status.get("history") or []
    if history:
        lines.append("History:")
        for entry in history:
            lines.append(
                f"  {entry.get('time')}  {entry.get('reason'):<18} {entry.get('trafficPercent', 0):>3} %  "
                f"{entry.get('message', '')}"
            )
    return "\n".join(lines) + "\n"


# --- I/O -------------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> tuple[Any, str]:
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    try:
        if args.kubeconfig or os.environ.get("KUBECONFIG") or os.path.exists(os.path.expanduser("~/.kube/config")):
            api_client = config.new_client_from_config(config_file=args.kubeconfig, context=args.context)
            _, active = config.list_kube_config_contexts(config_file=args.kubeconfig)
            namespace = (active or {}).get("context", {}).get("namespace") or "default"
        else:
            config.load_incluster_config()
            from kubernetes import client

            api_client = client.ApiClient()
            namespace = "default"
    except ConfigException as exc:
        raise PluginError(f"no cluster to talk to: {exc}") from exc
    return api_client, args.namespace or namespace


def _rankers(api_client: Any) -> Any:
    from kubernetes import dynamic

    return dynamic.DynamicClient(api_client).resources.get(api_version=api.API_VERSION, kind=api.KIND)


def _get(rankers: Any, name: str, namespace: str) -> dict[str, Any]:
    from kubernetes.client.exceptions import ApiException

    try:
        ranker: dict[str, Any] = rankers.get(name=name, namespace=namespace).to_dict()
        return ranker
    except ApiException as exc:
        if exc.status == 404:
            raise PluginError(f"multimodalranker {namespace}/{name} not found") from exc
        raise PluginError(f"cannot read multimodalranker {namespace}/{name}: {exc.reason}") from exc


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def ask(args: argparse.Namespace) -> int:
    api_client, namespace = _client(args)
    rankers = _rankers(api_client)
    obj = _get(rankers, args.name, namespace)
    action = ACTIONS[args.command]
    why = refusal(action, obj.get("status") or {})
    if why:
        raise PluginError(f"{args.command} refused: {why}")
    body = request_body(action, datetime.datetime.now(datetime.UTC), args.requested_by or _who())
    body["metadata"] = {"resourceVersion": obj["metadata"]["resourceVersion"]}
    from kubernetes.client.exceptions import ApiException

    try:
        rankers.status.patch(
            body=body, name=args.name, namespace=namespace, content_type="application/merge-patch+json"
        )
    except ApiException as exc:
        if exc.status == 409:
            raise PluginError("the resource changed while the request was written; run the command again") from exc
        raise PluginError(f"could not write the request: {exc.reason}") from exc
    print(f"multimodalranker {namespace}/{args.name}: {args.command} requested")
    if args.wait:
        return _wait(rankers, args.name, namespace, body["status"]["request"]["requestedAt"], args.timeout)
    return 0


def _wait(rankers: Any, name: str, namespace: str, requested_at: str, timeout: float) -> int:
    """Until the operator has handled the request: print the decision it recorded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _get(rankers, name, namespace).get("status") or {}
        if (status.get("request") or {}).get("requestedAt") != requested_at:
            handled = [h for h in status.get("history") or [] if h.get("time", "") >= requested_at[:19]]
            for entry in handled[-2:]:
                print(f"{entry.get('reason')}: {entry.get('message')}")
            return 0
        time.sleep(0.5)
    raise PluginError(f"the operator did not handle the request within {timeout:g} s (is it running?)")


def show(args: argparse.Namespace) -> int:
    api_client, namespace = _client(args)
    sys.stdout.write(render_status(_get(_rankers(api_client), args.name, namespace)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubectl mmrank", description="Read and steer MultimodalRanker canaries.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, help_text in (
        ("status", "the rollout: steps, traffic, last analysis, history"),
        ("promote", "promote a canary waiting in AwaitingPromotion"),
        ("abort", "roll the canary back now: all traffic to stable"),
        ("retry", "start a rolled-back canary again from the first step"),
    ):
        p = sub.add_parser(command, help=help_text)
        p.add_argument("name", help="MultimodalRanker name")
        p.add_argument("-n", "--namespace", help="namespace (default: the context's)")
        p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
        p.add_argument("--context", default=None, help="kubeconfig context")
        if command != "status":
            p.add_argument(
                "--wait", action="store_true", help="wait until the operator has acted and print what it did"
            )
            p.add_argument("--timeout", type=float, default=120.0, help="seconds --wait waits")
            p.add_argument("--requested-by", default=None, help="name recorded in the history (default: $USER)")
        p.set_defaults(handler=show if command == "status" else ask)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
