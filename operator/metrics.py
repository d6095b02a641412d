"""The operator's Prometheus metrics (`mmrank operator run --metrics-port`).

What the operator does (reconciles, their errors and durations, canary decisions) and what it
knows about each ranker from its status (phase, coverage per space, minCoverage, backfill
progress, canary traffic, conditions). The per-ranker gauges let alerts join coverage with
minCoverage, which no workload exports. They carry `ranker_namespace` and `ranker` rather than
`namespace`: a scrape of the operator's pod adds its own `namespace` target label.

Pure functions decide the label values (`error_labels`, `canary_decision`, `phase_counts`,
`ranker_series`); `observe_*` and `forget` write them into prometheus_client's default registry
(which also carries the process' CPU and memory). The handlers call only those.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import Counter, Gauge, Histogram

from mmrank import api

RESULTS = ("ok", "retried", "failed")
# Canary decision per history reason (rollout.py, core.py); "wait" is an inconclusive analysis.
DECISIONS = {
    "CanaryStarted": "start",
    "StepPassed": "advance",
    "AnalysisFailed": "fail",
    "AwaitingPromotion": "await_promotion",
    "Promoted": "promote",
    "PromotionComplete": "complete",
    "RolledBack": "rollback",
    "Aborted": "abort",
    "Retried": "retry",
    "Superseded": "supersede",
    "PromoteRefused": "refused",
    "AbortRefused": "refused",
    "RetryRefused": "refused",
}
WAIT = "wait"
CONDITION_STATUSES = ("True", "False", "Unknown")
ANALYSIS_CHECKS = ("requests", "errorRate", "latencyP99Ms", "clickRateRatio")

RECONCILES = Counter(
    "mmrank_operator_reconciles",
    "Reconciles of a MultimodalRanker, by result: ok, retried "
    "(a transient error, retried with backoff), failed (reported, not retried)",
    ["result"],
)
ERRORS = Counter(
    "mmrank_operator_errors",
    "Reconcile errors, by the kind of object the failing API call was about (or the exception's kind) and the reason",
    ["kind", "reason"],
)
DURATION = Histogram(
    "mmrank_operator_reconcile_duration_seconds",
    "Seconds one reconcile took (gather, decide, apply, status), errors included",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RANKERS = Gauge("mmrank_operator_rankers", "MultimodalRankers this operator reconciles, by phase", ["phase"])
CANARY = Counter(
    "mmrank_operator_canary_decisions",
    "Canary decisions: start, advance, wait (inconclusive "
    "analysis), fail (a failed check below failureLimit), await_promotion, promote, complete, "
    "rollback, abort, retry, supersede, refused",
    ["decision"],
)
PER_RANKER = ["ranker_namespace", "ranker"]
COVERAGE = Gauge(
    "mmrank_operator_space_coverage",
    "Coverage of each embedding space of a ranker, as its status "
    'says; serving="true" for the space the stable ranker reads',
    [*PER_RANKER, "space", "serving"],
)
MIN_COVERAGE = Gauge("mmrank_operator_min_coverage", "spec.embeddings.minCoverage of a ranker", PER_RANKER)
BACKFILL = Gauge(
    "mmrank_operator_backfill_progress", "Completed / total backfill shards of a space", [*PER_RANKER, "space"]
)
TRAFFIC = Gauge(
    "mmrank_operator_canary_traffic_percent",
    "Share of requests the canary ranker gets now (0 without a canary in progress)",
    PER_RANKER,
)
ANALYSIS = Gauge(
    "mmrank_operator_canary_last_analysis",
    "The numbers of the last canary analysis (status.canary."
    "lastAnalysis, else the newest in status.history): requests, errorRate, latencyP99Ms, "
    "clickRateRatio (canary CTR / stable CTR)",
    [*PER_RANKER, "canary", "check"],
)
CONDITION = Gauge(
    "mmrank_operator_ranker_condition",
    "1 for the status of each condition of a ranker "
    "(EncoderReady, EmbeddingsSynced, RankerReady, CanaryHealthy, Ready), else 0",
    [*PER_RANKER, "condition", "status"],
)

for _result in RESULTS:  # every known series exists from the start: a rate, not "no data"
    RECONCILES.labels(result=_result)
for _phase in api.PHASES:
    RANKERS.labels(phase=_phase).set(0)
for _decision in {*DECISIONS.values(), WAIT}:
    CANARY.labels(decision=_decision)


# --- pure decisions -------------------------------------------------------------------------------


def error_labels(exc: BaseException) -> tuple[str, str]:
    """(kind, reason) of a reconcile error: for an API error, the kind of object the apiserver names
    in its Status details (e.g. deployments) and its reason (Conflict, Invalid, Forbidden); else the
    exception's class, with the object kind where our own error says it (`NoSuchKind`)."""
    body = getattr(exc, "body", None)
    status = getattr(exc, "status", None)
    if status is not None and isinstance(body, str | bytes):
        try:
            answer = json.loads(body)
        except ValueError:
            answer = {}
        if isinstance(answer, dict):
            details = answer.get("details") or {}
            kind = details.get("kind") if isinstance(details, dict) else None
            return str(kind or "unknown"), str(answer.get("reason") or f"HTTP{status}")
        return "unknown", f"HTTP{status}"
    if type(exc).__name__ == "NoSuchKind":
        return str(exc).split(" ")[-1] if str(exc) else "unknown", "NoSuchKind"
    return "unknown", type(exc).__name__


# Kubernetes' StatusReason for the HTTP codes an apiserver refuses a write with.
STATUS_REASONS = {
    0: "NoAnswer",
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    410: "Gone",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class Refused(Protocol):
    """A write the apiserver or the store refused (`faults.Refusal`)."""

    kind: str
    code: int
    transient: bool


def refusal_labels(refused: Refused) -> tuple[str, str]:
    """(kind, reason) of a refused child: its kind (ConfigMap, Deployment, Space, ...) and the
    apiserver's reason for the HTTP code."""
    return refused.kind, STATUS_REASONS.get(refused.code, f"HTTP{refused.code}")


def reconcile_result(refusals: Sequence[Refused]) -> str:
    """ok; retried when a refusal may pass next time (409, 429, 5xx, no answer); failed when one
    will not without a change (403, 422, a kind the cluster lacks)."""
    if any(not r.transient for r in refusals):
        return "failed"
    return "retried" if refusals else "ok"


def canary_decision(reason: str) -> str | None:
    return DECISIONS.get(reason)


def phase_counts(phases: Iterable[str]) -> dict[str, int]:
    """Rankers per phase, every phase present (0 where none is)."""
    counts = dict.fromkeys(api.PHASES, 0)
    for phase in phases:
        counts[phase] = counts.get(phase, 0) + 1
    return counts


@dataclasses.dataclass(frozen=True)
class RankerSeries:
    """One ranker's gauge values, read from its resource."""

    min_coverage: float
    traffic_percent: int
    coverage: dict[tuple[str, str], float]  # (space, serving) -> coverage
    backfill: dict[str, float]  # space -> progress
    conditions: dict[tuple[str, str], float]  # (condition, status) -> 0 or 1
    analysis: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)  # (canary, check) -> value


def ranker_series(body: Mapping[str, Any]) -> RankerSeries:
    """The gauges of a ranker from its spec and the status its last reconcile wrote."""
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    min_coverage = float((spec.get("embeddings") or {}).get("minCoverage", 0.99))
    canary = status.get("canary") or {}
    in_progress = canary.get("state") in ("Progressing", "AwaitingPromotion")
    traffic = int(canary.get("trafficPercent") or 0) if in_progress else 0
    serving = (status.get("stable") or {}).get("encoderVersion")
    coverage, backfill = {}, {}
    for space in (status.get("embeddings") or {}).get("spaces") or []:
        version = str(space.get("version"))
        coverage[(version, "true" if version == serving else "false")] = float(space.get("coverage") or 0.0)
        if space.get("backfill"):
            backfill[version] = float(space["backfill"].get("progress") or 0.0)
    conditions = {}
    for condition in status.get("conditions") or []:
        for value in CONDITION_STATUSES:
            conditions[(str(condition.get("type")), value)] = 1.0 if condition.get("status") == value else 0.0
    last, analysed = canary.get("lastAnalysis") or {}, canary.get("rankerVersion")
    judged = [h for h in status.get("history") or [] if h.get("analysis")]
    if not last and judged:  # a finished rollout leaves no status.canary; its analyses are in history
        last, analysed = judged[-1]["analysis"], judged[-1].get("rankerVersion")
    analysis = {
        (str(analysed), check): float(last[check])
        for check in ANALYSIS_CHECKS
        if isinstance(last.get(check), int | float)
    }
    return RankerSeries(min_coverage, traffic, coverage, backfill, conditions, analysis)


# --- the registry ----------------------------------------------------------------------------------


class _State:
    """What was last exported per ranker, so retired spaces and deleted rankers leave no series."""

    lock = threading.Lock()
    phases: dict[tuple[str, str], str] = {}
    labels: dict[tuple[str, str], list[tuple[Gauge, tuple[str, ...]]]] = {}


def _ranker_key(body: Mapping[str, Any]) -> tuple[str, str]:
    meta = body.get("metadata") or {}
    return str(meta.get("namespace") or "default"), str(meta.get("name") or "")


def _export(key: tuple[str, str], series: RankerSeries) -> None:
    wanted: list[tuple[Gauge, tuple[str, ...], float]] = [
        (MIN_COVERAGE, key, series.min_coverage),
        (TRAFFIC, key, float(series.traffic_percent)),
        *((COVERAGE, (*key, space, serving), value) for (space, serving), value in series.coverage.items()),
        *((BACKFILL, (*key, space), value) for space, value in series.backfill.items()),
        *((CONDITION, (*key, kind, status), value) for (kind, status), value in series.conditions.items()),
        *((ANALYSIS, (*key, canary, check), value) for (canary, check), value in series.analysis.items()),
    ]
    keep = {(id(gauge), values) for gauge, values, _ in wanted}
    for gauge, values in _State.labels.get(key, []):
        if (id(gauge), values) not in keep:
            gauge.remove(*values)
    for gauge, values, value in wanted:
        gauge.labels(*values).set(value)
    _State.labels[key] = [(gauge, values) for gauge, values, _ in wanted]


def _set_phases() -> None:
    for phase, count in phase_counts(_State.phases.values()).items():
        RANKERS.labels(phase=phase).set(count)


def observe_reconcile(
    body: Mapping[str, Any], seconds: float, phase: str, reasons: Iterable[str], refusals: Sequence[Refused] = ()
) -> None:
    """A reconcile that returned: its duration and refused writes, the ranker's phase and gauges,
    its canary decisions."""
    RECONCILES.labels(result=reconcile_result(refusals)).inc()
    DURATION.observe(seconds)
    for refused in refusals:
        kind, reason = refusal_labels(refused)
        ERRORS.labels(kind=kind, reason=reason).inc()
    for reason in reasons:
        decision = canary_decision(reason)
        if decision is not None:
            CANARY.labels(decision=decision).inc()
    key = _ranker_key(body)
    with _State.lock:
        _State.phases[key] = phase
        _set_phases()
        _export(key, ranker_series(body))


def observe_error(exc: BaseException, seconds: float, retried: bool) -> None:
    RECONCILES.labels(result="retried" if retried else "failed").inc()
    DURATION.observe(seconds)
    kind, reason = error_labels(exc)
    ERRORS.labels(kind=kind, reason=reason).inc()


def observe_analysis(verdict: str) -> None:
    """An analysis with too little data waits; the other verdicts become decisions in status."""
    if verdict == "Inconclusive":
        CANARY.labels(decision=WAIT).inc()


def forget(body: Mapping[str, Any]) -> None:
    """A deleted ranker: its series go, and it no longer counts in any phase."""
    key = _ranker_key(body)
    with _State.lock:
        _State.phases.pop(key, None)
        _set_phases()
        for gauge, values in _State.labels.pop(key, []):
            gauge.remove(*values)


class CountingAnalyser:
    """The canary analyser, counting inconclusive analyses (the "wait" decisions, which leave no
    trace in status). Other attributes (queries_sent, query) are the wrapped analyser's."""

    def __init__(self, analyser: Any) -> None:
        self.analyser = analyser

    def analyse(self, *args: Any, **kwargs: Any) -> Any:
        analysis = self.analyser.analyse(*args, **kwargs)
        observe_analysis(analysis.verdict)
        return analysis

    def __getattr__(self, name: str) -> Any:
        return getattr(self.analyser, name)


def serve(port: int, address: str = "0.0.0.0") -> None:  # noqa: S104 - a pod's port, scraped from outside
    """/metrics on `port` in a daemon thread; raises OSError when the port is taken."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=address)
