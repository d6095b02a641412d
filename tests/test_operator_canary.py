"""Canary rollouts through the pure core, by value: what each backend renders at each step, when a
canary starts, how promotion and rollback change the children, the spaces and the status."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest

from harness import servers
from mmrank import api
from mmrank.operator import core
from mmrank.operator.analysis import Analysis
from mmrank.operator.reconcile import _merge_patch

T0, T1, T2, T3 = ("2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z", "2026-01-01T00:02:00Z", "2026-01-01T00:03:00Z")
PASSED = Analysis(
    "Passed", requests=900, error_rate=0.0, latency_p99_ms=12.0, click_rate_ratio=1.0, message="all checks passed"
)
FAILED = Analysis(
    "Failed",
    requests=900,
    error_rate=0.3,
    latency_p99_ms=12.0,
    click_rate_ratio=1.0,
    failed_checks=("errorRate",),
    message="error rate 0.3 > 0.01",
)


def manifest(
    ranker: str = "r1", encoder: str = "e1", serving: str = "KServe", replicas: int = 1, **rollout: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "mmrank.io/v1alpha1",
        "kind": "MultimodalRanker",
        "metadata": {"name": "shop", "namespace": "ads", "uid": "uid-1", "generation": 2},
        "spec": {
            "encoder": {"version": encoder, "modelUri": f"s3://models/encoder/{encoder}", "gpus": 0},
            "ranker": {
                "version": ranker,
                "modelUri": f"s3://models/ranker/{ranker}",
                "encoderVersion": encoder,
                "serving": serving,
                "replicas": replicas,
            },
            "embeddings": {
                "store": {"url": "redis://redis:6379/0"},
                "backfill": {"catalogueUri": "s3://catalogue/today"},
            },
            "rollout": {"steps": [10, 25, 50], "interval": "1m", **rollout},
        },
    }


def parse(body: dict[str, Any]) -> api.MultimodalRanker:
    return api.MultimodalRanker.model_validate(body)


def observe(
    status: dict[str, Any],
    now: str = T0,
    ready: tuple[str, ...] = ("e1", "e2"),
    coverage: dict[str, float] | None = None,
    serving: core.ServedRanker | None = None,
    analysis: Analysis | None = None,
    children: tuple[core.ChildRef, ...] = (),
) -> core.Observed:
    coverage = coverage if coverage is not None else {"e1": 1.0, "e2": 1.0}
    return core.Observed(
        now=now,
        status=status,
        spaces={k: core.SpaceState(v, int(v * 100)) for k, v in coverage.items()},
        encoders_ready={v: True for v in ready},
        ranker=serving,
        analysis=analysis,
        children=children,
    )


def served(ranker: str, encoder: str, ready: bool = True, canary: tuple[str, str] | None = None) -> core.ServedRanker:
    return core.ServedRanker(core.Version(ranker, encoder), ready, core.Version(*canary) if canary else None)


def apply(status: dict[str, Any], want: core.Desired) -> dict[str, Any]:
    """The status after the operator's merge patch."""
    out = dict(status)
    for key, value in _merge_patch(status, want.status).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def stable_r1(**kwargs: Any) -> dict[str, Any]:
    """Status after r1 on e1 became stable through this operator."""
    body = manifest(**kwargs)
    first = core.desired(parse(body), observe({}, ready=("e1",), coverage={"e1": 1.0}, serving=served("r1", "e1")))
    assert core.stable_of(first.status) == core.Version("r1", "e1")
    return apply({}, first)


def kinds(want: core.Desired) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["kind"], c["metadata"]["name"]): c for c in want.children}


def by_type(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


# --- when a canary starts -------------------------------------------------------------------------


def test_the_first_ranker_takes_all_traffic_without_a_canary() -> None:
    status = stable_r1()
    assert "canary" not in status and status["phase"] == "Ready"
    assert status["stable"]["ranker"]["modelUri"] == "s3://models/ranker/r1"


def test_a_new_encoder_and_ranker_wait_for_the_new_space_with_stable_serving() -> None:
    status = stable_r1()
    want = core.desired(
        parse(manifest("r2", "e2")), observe(status, coverage={"e1": 1.0, "e2": 0.4}, serving=served("r1", "e1"))
    )
    isvc = kinds(want)[("InferenceService", "shop-ranker")]
    assert isvc["spec"]["predictor"]["labels"]["mmrank.io/ranker-version"] == "r1" and "canary" not in isvc["spec"]
    assert ("Deployment", "shop-encoder-e2") in kinds(want) and any(
        k == "Job" and n.startswith("shop-backfill-e2-") for k, n in kinds(want)
    )
    embedder = kinds(want)[("Deployment", "shop-embedder")]["spec"]["template"]["spec"]["containers"][0]
    encoders = next(e["value"] for e in embedder["env"] if e["name"] == "MMRANK_ENCODERS")
    assert encoders.startswith("e2=") and ",e1=" in encoders  # both spaces stay fresh
    assert want.status["canary"] is None
    assert by_type(want.status)["CanaryHealthy"]["reason"] == "WaitingForEmbeddings"
    assert want.status["phase"] == "Backfilling"


def test_a_synced_space_starts_the_canary_at_the_first_step_on_kserve_standard() -> None:
    status = stable_r1()
    want = core.desired(parse(manifest("r2", "e2")), observe(status, serving=served("r1", "e1")))
    isvc = kinds(want)[("InferenceService", "shop-ranker")]
    assert isvc["spec"]["predictor"]["labels"]["mmrank.io/ranker-version"] == "r1"
    [canary] = isvc["spec"]["canary"]
    assert canary["trafficPercent"] == 10
    assert canary["predictor"]["labels"]["mmrank.io/ranker-version"] == "r2"
    env = {e["name"]: e.get("value") for e in canary["predictor"]["containers"][0]["env"]}
    assert env["MMRANK_SPACE"] == "e2" and env["MMRANK_RANKER_VERSION"] == "r2"
    assert want.status["canary"]["state"] == "Progressing" and want.status["canary"]["trafficPercent"] == 10
    assert want.status["canary"]["steps"] == [10, 25, 50] and want.status["phase"] == "Progressing"
    assert [h["reason"] for h in want.status["history"]] == ["CanaryStarted"]
    assert "CanaryStarted" in [d.reason for d in want.decisions]


def test_knative_mode_puts_the_canary_in_the_predictor_with_canary_traffic_percent() -> None:
    status = stable_r1(kserveMode="Knative")
    want = core.desired(parse(manifest("r2", "e2", kserveMode="Knative")), observe(status, serving=served("r1", "e1")))
    predictor = kinds(want)[("InferenceService", "shop-ranker")]["spec"]["predictor"]
    assert predictor["labels"]["mmrank.io/ranker-version"] == "r2" and predictor["canaryTrafficPercent"] == 10


@pytest.fixture(scope="module")
def isvc_schema() -> dict[str, Any]:
    crds = servers.kserve_crds_for_k8s_1_20(servers.shared_dir() / "schemas" / "kserve")
    crd = next(c for c in crds if c["spec"]["names"]["kind"] == "InferenceService")  # type: ignore[index]
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]  # type: ignore[index]


@pytest.mark.parametrize("mode", ["Standard", "Knative"])
def test_canary_inference_services_validate_against_kserves_crd(mode: str, isvc_schema: dict[str, Any]) -> None:
    status = stable_r1(kserveMode=mode)
    want = core.desired(parse(manifest("r2", "e2", kserveMode=mode)), observe(status, serving=served("r1", "e1")))
    jsonschema.validate(kinds(want)[("InferenceService", "shop-ranker")], isvc_schema)


def test_the_kubernetes_backend_splits_by_replicas_and_says_its_granularity() -> None:
    status = stable_r1(serving="Kubernetes", replicas=4)
    want = core.desired(
        parse(manifest("r2", "e2", serving="Kubernetes", replicas=4)), observe(status, serving=served("r1", "e1"))
    )
    got = kinds(want)
    assert got[("Deployment", "shop-ranker-r1")]["spec"]["replicas"] == 3
    assert got[("Deployment", "shop-ranker-r2")]["spec"]["replicas"] == 1
    service = got[("Service", "shop-ranker")]
    assert service["spec"]["selector"] == {
        "app.kubernetes.io/managed-by": "mmrank",
        "mmrank.io/ranker": "shop",
        "app.kubernetes.io/component": "ranker",
    }
    for version in ("r1", "r2"):
        pod_labels = got[("Deployment", f"shop-ranker-{version}")]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
    canary = want.status["canary"]
    assert canary["steps"] == [25, 50] and canary["trafficPercent"] == 25 and canary["granularityPercent"] == 25.0
    assert not [c for c in want.children if c["kind"] == "InferenceService"]


def test_a_kubernetes_backend_that_cannot_split_waits_and_says_why() -> None:
    status = stable_r1(serving="Kubernetes", replicas=1)
    want = core.desired(
        parse(manifest("r2", "e2", serving="Kubernetes", replicas=1)), observe(status, serving=served("r1", "e1"))
    )
    assert want.status["canary"] is None
    canary = by_type(want.status)["CanaryHealthy"]
    assert canary["status"] == "False" and canary["reason"] == "NoUsableStep" and "100 %" in canary["message"]
    assert kinds(want)[("Deployment", "shop-ranker-r1")]["spec"]["replicas"] == 1


# --- through the steps ----------------------------------------------------------------------------


def run_steps(
    body: dict[str, Any], analyses: list[Analysis], serving: core.ServedRanker
) -> tuple[dict[str, Any], list[core.Desired]]:
    status = stable_r1(**{k: v for k, v in body["spec"]["rollout"].items() if k not in ("steps", "interval")})
    wants = [core.desired(parse(body), observe(status, T0, serving=serving))]
    status = apply(status, wants[-1])
    for i, analysis in enumerate(analyses, start=1):
        now = f"2026-01-01T00:{i:02d}:00Z"
        wants.append(core.desired(parse(body), observe(status, now, serving=serving, analysis=analysis)))
        status = apply(status, wants[-1])
    return status, wants


def test_passing_steps_advance_then_promote_and_retire_the_old_encoder() -> None:
    body = manifest("r2", "e2")
    status, wants = run_steps(body, [PASSED, PASSED], served("r1", "e1", canary=("r2", "e2")))
    assert [w.status["canary"]["trafficPercent"] for w in wants] == [10, 25, 50]
    assert [kinds(w)[("InferenceService", "shop-ranker")]["spec"]["canary"][0]["trafficPercent"] for w in wants] == [
        10,
        25,
        50,
    ]
    promoted = core.desired(
        parse(body), observe(status, T3, serving=served("r1", "e1", canary=("r2", "e2")), analysis=PASSED)
    )
    assert promoted.status["canary"]["state"] == "Promoted" and promoted.status["canary"]["trafficPercent"] == 100
    isvc = kinds(promoted)[("InferenceService", "shop-ranker")]
    assert isvc["spec"]["predictor"]["labels"]["mmrank.io/ranker-version"] == "r2" and "canary" not in isvc["spec"]
    assert core.stable_of(promoted.status) == core.Version("r1", "e1")  # until r2 serves everything, ready
    status = apply(status, promoted)

    old_encoder = (core.ChildRef("Deployment", "shop-encoder-e1", "apps/v1", "e1", "encoder"),)
    done = core.desired(
        parse(body), observe(status, "2026-01-01T00:04:00Z", serving=served("r2", "e2"), children=old_encoder)
    )
    assert core.stable_of(done.status) == core.Version("r2", "e2") and done.status["canary"] is None
    assert done.status["stable"]["ranker"]["modelUri"] == "s3://models/ranker/r2"
    assert done.keep == [] and done.status["phase"] == "Ready"  # e1's encoder goes; its space is retained
    assert [s["version"] for s in done.status["embeddings"]["spaces"]] == ["e1", "e2"]
    assert [h["reason"] for h in apply(status, done)["history"]] == [
        "CanaryStarted",
        "StepPassed",
        "StepPassed",
        "Promoted",
        "PromotionComplete",
    ]


def test_failed_checks_roll_back_and_the_new_space_retires_under_retention() -> None:
    body = manifest("r2", "e2")
    status, wants = run_steps(body, [PASSED, FAILED, FAILED], served("r1", "e1", canary=("r2", "e2")))
    last = wants[-1]
    assert last.status["canary"]["state"] == "RolledBack" and last.status["canary"]["trafficPercent"] == 0
    assert last.status["phase"] == "RolledBack"
    assert by_type(last.status)["Ready"]["reason"] == "RolledBack"
    assert by_type(last.status)["CanaryHealthy"]["reason"] == "RolledBack"
    isvc = kinds(last)[("InferenceService", "shop-ranker")]
    assert "canary" not in isvc["spec"] and isvc["spec"]["predictor"]["labels"]["mmrank.io/ranker-version"] == "r1"
    assert ("Deployment", "shop-encoder-e2") not in kinds(last) and not any(k == "Job" for k, _ in kinds(last))
    embedder = kinds(last)[("Deployment", "shop-embedder")]["spec"]["template"]["spec"]["containers"][0]
    assert next(e["value"] for e in embedder["env"] if e["name"] == "MMRANK_ENCODERS").startswith("e1=")
    assert last.delete_spaces == [] and [s["version"] for s in last.status["embeddings"]["spaces"]] == ["e1", "e2"]
    rolled_back = [h for h in status["history"] if h["reason"] == "RolledBack"]
    assert rolled_back and rolled_back[0]["analysis"]["errorRate"] == 0.3

    # it stays rolled back while the spec names the same ranker, whatever the analysis says
    again = core.desired(
        parse(body), observe(status, "2026-01-01T00:09:00Z", serving=served("r1", "e1"), analysis=PASSED)
    )
    patch = _merge_patch(status, again.status)
    assert again.status["canary"]["state"] == "RolledBack" and "canary" not in patch and "history" not in patch

    # a new ranker version is a new rollout
    fresh = core.desired(
        parse(manifest("r3", "e2")), observe(status, "2026-01-01T00:10:00Z", serving=served("r1", "e1"))
    )
    assert fresh.status["canary"]["rankerVersion"] == "r3" and fresh.status["canary"]["state"] == "Progressing"


def test_retry_after_a_rollback_starts_again_at_the_first_step() -> None:
    body = manifest("r2", "e2")
    status, _ = run_steps(body, [FAILED, FAILED], served("r1", "e1", canary=("r2", "e2")))
    status["request"] = {"action": "Retry", "requestedAt": "2026-01-01T00:05:00Z", "requestedBy": "alice"}
    want = core.desired(parse(body), observe(status, "2026-01-01T00:05:01Z", serving=served("r1", "e1")))
    assert want.status["canary"]["state"] == "Progressing" and want.status["canary"]["trafficPercent"] == 10
    assert want.status["request"] is None
    assert want.status["history"][-1]["reason"] == "Retried" and "alice" in want.status["history"][-1]["message"]
    assert ("Deployment", "shop-encoder-e2") in kinds(want)  # its encoder comes back


def test_manual_promotion_waits_for_a_person() -> None:
    body = manifest("r2", "e2", promotion="Manual")
    status, wants = run_steps(body, [PASSED, PASSED, PASSED], served("r1", "e1", canary=("r2", "e2")))
    assert wants[-1].status["phase"] == "AwaitingPromotion" and wants[-1].status["canary"]["trafficPercent"] == 50
    assert by_type(wants[-1].status)["CanaryHealthy"]["reason"] == "AwaitingPromotion"
    status["request"] = {"action": "Promote", "requestedAt": "2026-01-01T00:05:00Z"}
    want = core.desired(
        parse(body), observe(status, "2026-01-01T00:05:01Z", serving=served("r1", "e1", canary=("r2", "e2")))
    )
    assert want.status["canary"]["state"] == "Promoted" and want.status["request"] is None


def test_a_promote_without_a_rollout_is_refused_and_changes_nothing_else() -> None:
    status = stable_r1()
    status["request"] = {"action": "Promote", "requestedAt": "2026-01-01T00:05:00Z"}
    want = core.desired(parse(manifest()), observe(status, "2026-01-01T00:05:01Z", serving=served("r1", "e1")))
    assert want.status["request"] is None and want.status["canary"] is None
    assert want.status["history"][-1]["reason"] == "PromoteRefused"
    assert [d for d in want.decisions if d.reason == "PromoteRefused"][0].type == "Warning"
    patch = _merge_patch(status, want.status)
    assert set(patch) == {"request", "history"}


def test_a_new_ranker_mid_rollout_supersedes_the_canary() -> None:
    status, _ = run_steps(manifest("r2", "e2"), [PASSED], served("r1", "e1", canary=("r2", "e2")))
    want = core.desired(
        parse(manifest("r3", "e2")), observe(status, T3, serving=served("r1", "e1", canary=("r2", "e2")))
    )
    assert [h["reason"] for h in want.status["history"][-2:]] == ["Superseded", "CanaryStarted"]
    assert want.status["canary"]["rankerVersion"] == "r3" and want.status["canary"]["trafficPercent"] == 10


def test_a_second_reconcile_of_a_canary_writes_nothing() -> None:
    status, _ = run_steps(manifest("r2", "e2"), [PASSED], served("r1", "e1", canary=("r2", "e2")))
    first = core.desired(
        parse(manifest("r2", "e2")), observe(status, T2, serving=served("r1", "e1", canary=("r2", "e2")))
    )
    assert _merge_patch(status, first.status) == {} and [d.reason for d in first.decisions] == []


def test_status_written_during_a_rollout_validates_against_the_models() -> None:
    status, _ = run_steps(manifest("r2", "e2"), [PASSED, FAILED], served("r1", "e1", canary=("r2", "e2")))
    parsed = api.RankerStatus.model_validate(copy.deepcopy(status))
    assert parsed.canary is not None and parsed.canary.failed_checks == 1 and len(parsed.history) == 3
