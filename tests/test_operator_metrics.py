"""The operator's metrics by value: the label decisions, and the series one ranker leaves behind
(read back from prometheus_client's registry, what /metrics serves)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException
from prometheus_client import REGISTRY

from mmrank import api
from mmrank.operator import metrics
from mmrank.operator.analysis import Analysis

ROOT = Path(__file__).resolve().parent.parent


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def api_error(status: int, reason: str, kind: str | None) -> ApiException:
    error = ApiException(status=status, reason=reason)
    details = {"name": "x", "kind": kind} if kind else {}
    error.body = json.dumps({"kind": "Status", "status": "Failure", "reason": reason, "details": details})
    return error


@pytest.mark.parametrize(
    ("error", "labels"),
    [
        (api_error(403, "Forbidden", "configmaps"), ("configmaps", "Forbidden")),
        (api_error(422, "Invalid", "deployments"), ("deployments", "Invalid")),
        (api_error(409, "Conflict", None), ("unknown", "Conflict")),
        (ConnectionRefusedError("refused"), ("unknown", "ConnectionRefusedError")),
    ],
)
def test_an_error_is_labelled_by_the_kind_the_apiserver_names_and_its_reason(
    error: BaseException, labels: tuple[str, str]
) -> None:
    assert metrics.error_labels(error) == labels


def test_an_api_error_without_a_status_body_keeps_its_code() -> None:
    error = ApiException(status=502, reason="Bad Gateway")
    error.body = "<html>proxy</html>"
    assert metrics.error_labels(error) == ("unknown", "HTTP502")


class Refusal:
    def __init__(self, kind: str, code: int, transient: bool) -> None:
        self.kind, self.code, self.transient = kind, code, transient


def test_refused_children_make_the_result_and_their_labels() -> None:
    forbidden, conflict, silent = (
        Refusal("ConfigMap", 403, False),
        Refusal("Deployment", 409, True),
        Refusal("Space", 0, True),
    )
    assert metrics.reconcile_result([]) == "ok"
    assert metrics.reconcile_result([conflict, silent]) == "retried"
    assert metrics.reconcile_result([conflict, forbidden]) == "failed"
    assert [metrics.refusal_labels(r) for r in (forbidden, conflict, silent)] == [
        ("ConfigMap", "Forbidden"),
        ("Deployment", "Conflict"),
        ("Space", "NoAnswer"),
    ]
    assert metrics.refusal_labels(Refusal("Job", 418, False)) == ("Job", "HTTP418")


def test_every_rollout_decision_the_operator_records_has_a_canary_decision() -> None:
    import ast

    recorded = set()
    for source in ("operator/rollout.py", "operator/core.py"):
        for node in ast.walk(ast.parse((ROOT / source).read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            position = {"_record": 2, "Record": 1}.get(name or "")
            if position is not None and len(node.args) > position and isinstance(node.args[position], ast.Constant):
                recorded.add(node.args[position].value)
    assert recorded and recorded <= set(metrics.DECISIONS), recorded - set(metrics.DECISIONS)
    assert metrics.canary_decision("StepPassed") == "advance" and metrics.canary_decision("RolledBack") == "rollback"
    assert metrics.canary_decision("Created") is None


def test_phase_counts_name_every_phase() -> None:
    counts = metrics.phase_counts(["Ready", "Ready", "Backfilling"])
    assert counts == {**dict.fromkeys(api.PHASES, 0), "Ready": 2, "Backfilling": 1}


STATUS = {
    "stable": {"rankerVersion": "r1", "encoderVersion": "e1"},
    "canary": {
        "rankerVersion": "r2",
        "encoderVersion": "e2",
        "state": "Progressing",
        "trafficPercent": 25,
        "lastAnalysis": {
            "requests": 600,
            "errorRate": 0.002,
            "latencyP99Ms": 41.5,
            "clickRateRatio": 0.97,
            "verdict": "Passed",
        },
    },
    "embeddings": {
        "spaces": [
            {"version": "e1", "coverage": 1.0, "items": 100},
            {
                "version": "e2",
                "coverage": 0.4,
                "items": 40,
                "backfill": {"completedShards": 2, "totalShards": 4, "progress": 0.5},
            },
        ]
    },
    "conditions": [{"type": "Ready", "status": "True"}, {"type": "CanaryHealthy", "status": "Unknown"}],
}


def body(name: str, status: dict, min_coverage: float = 0.95) -> dict:
    return {
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"embeddings": {"minCoverage": min_coverage}},
        "status": status,
    }


def test_ranker_series_read_the_status() -> None:
    series = metrics.ranker_series(body("x", STATUS))
    assert series.min_coverage == 0.95 and series.traffic_percent == 25
    assert series.coverage == {("e1", "true"): 1.0, ("e2", "false"): 0.4}
    assert series.backfill == {"e2": 0.5}
    assert series.conditions[("Ready", "True")] == 1.0 and series.conditions[("Ready", "False")] == 0.0
    assert series.conditions[("CanaryHealthy", "Unknown")] == 1.0
    assert series.analysis == {
        ("r2", "requests"): 600.0,
        ("r2", "errorRate"): 0.002,
        ("r2", "latencyP99Ms"): 41.5,
        ("r2", "clickRateRatio"): 0.97,
    }
    rolled_back = {**STATUS, "canary": {**STATUS["canary"], "state": "RolledBack", "trafficPercent": 0}}
    assert metrics.ranker_series(body("x", rolled_back)).traffic_percent == 0
    assert metrics.ranker_series({"metadata": {"name": "y"}, "spec": {}}) == metrics.RankerSeries(0.99, 0, {}, {}, {})
    done = {
        **STATUS,
        "canary": None,
        "history": [
            {"reason": "StepPassed", "rankerVersion": "r2", "analysis": {"requests": 90, "clickRateRatio": 1.1}},
            {"reason": "Promoted", "rankerVersion": "r2", "analysis": {"requests": 120, "clickRateRatio": 0.98}},
            {"reason": "PromotionComplete", "rankerVersion": "r2"},
        ],
    }
    assert metrics.ranker_series(body("x", done)).analysis == {
        ("r2", "requests"): 120.0,
        ("r2", "clickRateRatio"): 0.98,
    }


def test_a_ranker_leaves_series_that_follow_its_status_and_go_with_it() -> None:
    before = value("mmrank_operator_reconciles_total", result="ok") or 0.0
    started = value("mmrank_operator_canary_decisions_total", decision="start") or 0.0
    metrics.observe_reconcile(body("gauged", STATUS), 0.02, "Progressing", ["CanaryStarted", "Created"])
    assert value("mmrank_operator_reconciles_total", result="ok") == before + 1
    assert value("mmrank_operator_canary_decisions_total", decision="start") == started + 1
    assert value("mmrank_operator_rankers", phase="Progressing") >= 1
    on = {"ranker_namespace": "shop", "ranker": "gauged"}
    assert value("mmrank_operator_space_coverage", **on, space="e2", serving="false") == 0.4
    assert value("mmrank_operator_backfill_progress", **on, space="e2") == 0.5
    assert value("mmrank_operator_canary_traffic_percent", **on) == 25
    assert value("mmrank_operator_canary_last_analysis", **on, canary="r2", check="clickRateRatio") == 0.97

    retired = {**STATUS, "embeddings": {"spaces": [STATUS["embeddings"]["spaces"][0]]}}
    metrics.observe_reconcile(body("gauged", retired), 0.01, "Ready", [], [Refusal("ConfigMap", 403, False)])
    assert value("mmrank_operator_space_coverage", **on, space="e2", serving="false") is None
    assert value("mmrank_operator_backfill_progress", **on, space="e2") is None
    assert value("mmrank_operator_errors_total", kind="ConfigMap", reason="Forbidden") >= 1

    metrics.forget(body("gauged", retired))
    assert value("mmrank_operator_min_coverage", **on) is None
    assert value("mmrank_operator_space_coverage", **on, space="e1", serving="true") is None


def test_an_inconclusive_analysis_counts_as_wait() -> None:
    class Analyser:
        queries_sent = 7

        def analyse(self, *args: object) -> Analysis:
            return Analysis("Inconclusive", message="waiting for traffic")

    before = value("mmrank_operator_canary_decisions_total", decision="wait") or 0.0
    counting = metrics.CountingAnalyser(Analyser())
    assert counting.analyse("http://p", "r2", "r1", 30, api.AnalysisSpec()).verdict == "Inconclusive"
    assert value("mmrank_operator_canary_decisions_total", decision="wait") == before + 1
    assert counting.queries_sent == 7  # the wrapped analyser's, for the benchmarks


# --- scrape annotations on what the operator creates ----------------------------------------------

SCRAPED = {"encoder": "8002", "embedder": "8080", "ranker": "8080"}


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_every_pod_that_serves_metrics_is_annotated_for_scraping(example: str) -> None:
    """Deployments: prometheus.io/* on the pod template; the InferenceService: KServe's
    enable-prometheus-scraping with our port and path (KServe annotates its pods from them)."""
    import yaml

    from mmrank.operator.cli import render_documents

    documents = [d for d in yaml.safe_load_all((ROOT / "examples" / example).read_text()) if d]
    seen = set()
    for body in (d for d in documents if d.get("kind") == "MultimodalRanker"):
        for child in render_documents([body], {body["spec"]["encoder"]["version"]: 1.0}):
            component = child["metadata"]["labels"].get("app.kubernetes.io/component")
            if child["kind"] == "Deployment" and component in SCRAPED:
                annotations = child["spec"]["template"]["metadata"]["annotations"]
                assert (
                    annotations["prometheus.io/scrape"],
                    annotations["prometheus.io/port"],
                    annotations["prometheus.io/path"],
                ) == ("true", SCRAPED[component], "/metrics"), child
                seen.add(component)
            elif child["kind"] == "InferenceService":
                annotations = child["metadata"]["annotations"]
                assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
                assert (annotations["prometheus.kserve.io/port"], annotations["prometheus.kserve.io/path"]) == (
                    "8080",
                    "/metrics",
                )
                assert child["spec"]["predictor"]["labels"]["mmrank.io/ranker"] == body["metadata"]["name"]
                seen.add("ranker")
            elif child["kind"] == "Job":  # a backfill serves no metrics: the operator exports its progress
                assert "prometheus.io/scrape" not in (child["spec"]["template"]["metadata"].get("annotations") or {})
    assert {"encoder", "embedder", "ranker"} <= seen
