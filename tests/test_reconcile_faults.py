"""A reconcile that never wedges (issue 17), on the real kube-apiserver.

The reconcile runs as a plain function here (no kopf), once per step, so every fault lands where
the test puts it: faults are injected at the API layer by wrapping the kubernetes client's
`call_api`, which answers chosen requests with 409, 429, 403 or 5xx exactly as a Status from the
apiserver would arrive (a `kubernetes` ApiException), and sends every other request to the real
server. No Deployment or Job controller runs: the tests play them through `/status`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from kubernetes.client.exceptions import ApiException

from harness import servers
from mmrank.operator import observe
from mmrank.operator.kube import Kube
from mmrank.operator.reconcile import Outcome, reconcile
from tests.test_operator_apiserver import Cluster, manifest, our_crd

pytestmark = [pytest.mark.apiserver, pytest.mark.slow]

STORE = "redis://redis.test:6379/0"
STATUS_TEXT = {
    403: "Forbidden",
    409: "Conflict",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclasses.dataclass
class Fault:
    """Answer requests whose method is `method` and whose path contains `path` with `code`,
    `times` times (None: until cleared)."""

    method: str
    path: str
    code: int
    times: int | None = None
    message: str = "injected by the test"

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method)) and self.path in path and (self.times is None or self.times > 0)


class FaultyApi:
    """The kubernetes ApiClient with `call_api` wrapped: matching requests never reach the server."""

    def __init__(self, api_client: Any) -> None:
        self.faults: list[Fault] = []
        self.seen: list[tuple[str, str, int]] = []  # (method, path, injected code; minus the server's own)
        self._call = api_client.call_api
        self.hook: Callable[[str, str], None] | None = None
        api_client.call_api = self._call_api

    def _call_api(self, method: str, resource_path: str, *args: Any, **kwargs: Any) -> Any:
        """(method, url, ...): the signature of kubernetes' ApiClient.call_api."""
        if self.hook is not None:
            self.hook(method, resource_path)
        for fault in self.faults:
            if fault.matches(method, resource_path):
                if fault.times is not None:
                    fault.times -= 1
                self.seen.append((method, resource_path, fault.code))
                error = ApiException(status=fault.code, reason=STATUS_TEXT.get(fault.code, "Error"))
                error.body = json.dumps(
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "message": fault.message,
                        "code": fault.code,
                    }
                )
                raise error
        answer = self._call(method, resource_path, *args, **kwargs)
        status = int(getattr(answer, "status", 200) or 200)
        self.seen.append((method, resource_path, 0 if 200 <= status < 300 else -status))  # minus: the server's own
        return answer


@pytest.fixture(scope="module")
def crds(_kube_session: Any, kserve_crds: list) -> None:
    if isinstance(_kube_session, str):
        pytest.fail(f"real server unavailable: {_kube_session}", pytrace=False)
    from kubernetes import config

    api_client = config.new_client_from_config(config_file=str(_kube_session.extra["kubeconfig"]))
    servers.install_crds(api_client, [*kserve_crds, our_crd()])


@pytest.fixture
def cluster(crds: None, kube: Any) -> Cluster:
    return Cluster(kube.api_client, f"t-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def faulty(kube: Any) -> Iterator[tuple[Kube, FaultyApi]]:
    """The operator's adapter on its own client, with faults injectable below it."""
    from kubernetes import config

    api_client = config.new_client_from_config(config_file=kube.kubeconfig)
    api = FaultyApi(api_client)
    yield Kube(api_client), api
    api_client.close()


def run(kube: Kube, store: observe.CoverageObserver, cluster: Cluster, name: str = "shop") -> Outcome:
    """One reconcile of the resource as the apiserver holds it now; nothing may escape it."""
    return reconcile(kube, store, cluster.ranker(name))


def kinds(cluster: Cluster) -> set[tuple[str, str]]:
    return set(cluster.children())


def jobs(cluster: Cluster) -> list[str]:
    return sorted(n for k, n in kinds(cluster) if k == "Job")


def body(**backfill: Any) -> dict:
    out = manifest("PLACEHOLDER", STORE)
    out["spec"]["embeddings"]["backfill"].update(backfill)
    return out


def create(cluster: Cluster, **backfill: Any) -> None:
    out = body(**backfill)
    out["metadata"]["namespace"] = cluster.namespace
    cluster.create(out)


def first_children(cluster: Cluster) -> set[tuple[str, str]]:
    return {
        ("ConfigMap", "shop-encoder-e1"),
        ("Service", "shop-encoder-e1"),
        ("Deployment", "shop-encoder-e1"),
        ("Deployment", "shop-embedder"),
        ("Service", "shop-embedder"),
        *(("Job", j) for j in jobs(cluster)),
    }


# --- 1. one refused child does not stop the others, the deletions or the status ------------------


@pytest.mark.parametrize(
    ("code", "phase", "reason"),
    [(403, "Failed", "ChildRefused"), (422, "Failed", "ChildRefused"), (503, "Backfilling", "ChildRetrying")],
)
def test_one_refused_child_leaves_the_others_and_the_status_written(
    cluster: Cluster, faulty: tuple[Kube, FaultyApi], code: int, phase: str, reason: str
) -> None:
    kube, api = faulty
    create(cluster)
    api.faults.append(Fault("PATCH", "/deployments/shop-embedder", code, message="deployments.apps is refused"))
    outcome = run(kube, observe.FixedCoverage({"e1": 0.0}), cluster)
    children = kinds(cluster)
    assert ("Deployment", "shop-embedder") not in children
    assert {
        ("ConfigMap", "shop-encoder-e1"),
        ("Service", "shop-encoder-e1"),
        ("Deployment", "shop-encoder-e1"),
    } <= children
    assert len(jobs(cluster)) == 1  # applied after the refused embedder
    status = cluster.status()
    assert status["observedGeneration"] == cluster.ranker()["metadata"]["generation"]
    assert status["phase"] == phase
    applied = cluster.condition("ChildrenApplied")
    assert applied["status"] == "False" and applied["reason"] == reason
    assert f"apply Deployment shop-embedder refused ({code}): deployments.apps is refused" in applied["message"]
    assert cluster.condition("Ready")["status"] == "False"
    assert [d.reason for d in outcome.decisions if d.type == "Warning" and d.reason == reason] == [reason]
    assert outcome.retry == (code >= 500)

    # the same refusal again: no second Warning; once it stops, everything converges
    assert [d for d in run(kube, observe.FixedCoverage({"e1": 0.0}), cluster).decisions if d.reason == reason] == []
    api.faults.clear()
    healed = run(kube, observe.FixedCoverage({"e1": 0.0}), cluster)
    assert ("Deployment", "shop-embedder") in kinds(cluster)
    assert cluster.condition("ChildrenApplied")["status"] == "True" and cluster.status()["phase"] == "Backfilling"
    assert "ChildrenApplied" in [d.reason for d in healed.decisions]


def test_a_refused_deletion_leaves_the_rest_done_and_is_retried(
    cluster: Cluster, faulty: tuple[Kube, FaultyApi]
) -> None:
    kube, api = faulty
    create(cluster)
    run(kube, observe.FixedCoverage({"e1": 0.0}), cluster)
    [job] = jobs(cluster)
    cluster.deployment_ready("shop-encoder-e1")
    cluster.job_complete(job)
    api.faults.append(Fault("DELETE", f"/jobs/{job}", 500))
    run(kube, observe.FixedCoverage({"e1": 1.0}), cluster)  # covered: the Job is no longer wanted
    assert jobs(cluster) == [job]
    assert ("InferenceService", "shop-ranker") in kinds(cluster)  # the ranker was applied all the same
    assert "delete Job" in cluster.condition("ChildrenApplied")["message"]
    api.faults.clear()
    run(kube, observe.FixedCoverage({"e1": 1.0}), cluster)
    assert jobs(cluster) == [] and cluster.condition("ChildrenApplied")["status"] == "True"


# --- 7. 409 / 429 / 5xx at the API layer: no exception escapes, and it converges ----------------


@pytest.mark.parametrize("code", [409, 429, 500, 503])
def test_every_request_failing_now_and_then_converges_once_the_faults_stop(
    cluster: Cluster, faulty: tuple[Kube, FaultyApi], code: int
) -> None:
    """Every other request (lists, applies, deletes, the status patch, the re-read after a
    conflict) is answered `code` for a while; each reconcile returns, and once the faults stop
    the next ones reach the state a fault-free run reaches."""
    kube, api = faulty
    create(cluster)
    store = observe.FixedCoverage({"e1": 0.0})
    count = [0]

    def every_other(method: str, path: str) -> None:
        count[0] += 1
        api.faults[:] = [Fault("*", "/", code, times=1)] if count[0] % 2 == 0 else []

    api.hook = every_other
    outcomes = [run(kube, store, cluster) for _ in range(8)]
    assert any(c for _, _, c in api.seen if c == code), "no fault was injected"
    assert any(o.retry for o in outcomes)
    api.hook = None
    api.faults.clear()
    for _ in range(3):
        run(kube, store, cluster)
    assert kinds(cluster) == first_children(cluster) and len(jobs(cluster)) == 1
    status = cluster.status()
    assert status["phase"] == "Backfilling" and cluster.condition("ChildrenApplied")["status"] == "True"
    assert status["observedGeneration"] == cluster.ranker()["metadata"]["generation"]
    before = cluster.ranker()["metadata"]["resourceVersion"]
    assert run(kube, store, cluster).applied == [] and cluster.ranker()["metadata"]["resourceVersion"] == before


# --- 2. a Job's immutable fields: a new Job, never a 422 ----------------------------------------


def test_changing_batch_size_or_parallelism_mid_backfill_replaces_the_job(
    cluster: Cluster, faulty: tuple[Kube, FaultyApi]
) -> None:
    kube, _ = faulty
    create(cluster)
    store = observe.FixedCoverage({"e1": 0.2})
    run(kube, store, cluster)
    [first] = jobs(cluster)
    job_api = cluster.res("batch/v1", "Job")
    live = job_api.get(name=first, namespace=cluster.namespace).to_dict()

    # what the apiserver says to an in-place change (the wedge of issue 17)
    changed = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": first, "namespace": cluster.namespace},
        "spec": {
            "template": {
                **live["spec"]["template"],
                "metadata": {
                    **live["spec"]["template"]["metadata"],
                    "labels": {**live["spec"]["template"]["metadata"]["labels"], "x": "y"},
                },
            }
        },
    }
    with pytest.raises(ApiException) as refused:
        job_api.server_side_apply(
            body=changed, name=first, namespace=cluster.namespace, field_manager="test", force_conflicts=True
        )
    assert refused.value.status == 422 and "immutable" in str(refused.value.body)

    cluster.patch_spec({"embeddings": {"backfill": {"batchSize": 64}}})
    outcome = run(kube, store, cluster)
    [second] = jobs(cluster)
    assert second != first and not outcome.refusals
    assert ("Job", first) in outcome.deleted and ("Job", second) in outcome.applied
    args = job_api.get(name=second, namespace=cluster.namespace).to_dict()["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    assert args[args.index("--batch-size") + 1] == "64"

    cluster.patch_spec({"embeddings": {"backfill": {"parallelism": 3}}})
    outcome = run(kube, store, cluster)
    [third] = jobs(cluster)
    assert third not in (first, second) and not outcome.refusals
    assert job_api.get(name=third, namespace=cluster.namespace).to_dict()["spec"]["completions"] == 1  # 1.20: one pod
    space = cluster.status()["embeddings"]["spaces"][0]
    assert space["backfill"]["job"] == third and space["backfill"]["attempts"] == 1
    assert cluster.condition("ChildrenApplied")["status"] == "True"
    assert cluster.status()["observedGeneration"] == cluster.ranker()["metadata"]["generation"]


# --- 3. a failed backfill Job: retried with backoff, counted, then Failed ------------------------


def job_failed(cluster: Cluster, name: str) -> None:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    cluster._patch_status(
        "batch/v1",
        "Job",
        name,
        {
            "failed": 6,
            "startTime": stamp,
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "Job has reached the specified backoff limit",
                    "lastProbeTime": stamp,
                    "lastTransitionTime": stamp,
                }
            ],
        },
    )


def test_a_failed_backfill_job_is_retried_with_backoff_then_the_space_is_failed(
    cluster: Cluster, faulty: tuple[Kube, FaultyApi]
) -> None:
    kube, _ = faulty
    create(cluster, maxAttempts=2, retryBackoff="2s")
    store = observe.FixedCoverage({"e1": 0.2})
    run(kube, store, cluster)
    [first] = jobs(cluster)
    job_failed(cluster, first)
    outcome = run(kube, store, cluster)
    assert jobs(cluster) == []  # the failed Job is removed
    backfill = cluster.status()["embeddings"]["spaces"][0]["backfill"]
    assert backfill["state"] == "Retrying" and backfill["attempts"] == 1 and backfill["retryAt"]
    assert "BackoffLimitExceeded: Job has reached the specified backoff limit" in backfill["lastFailure"]
    assert cluster.condition("EmbeddingsSynced")["reason"] == "BackfillRetrying"
    assert [d.reason for d in outcome.decisions if d.type == "Warning"] == ["BackfillRetrying"]
    run(kube, store, cluster)
    assert jobs(cluster) == []  # still backing off
    retry_at = datetime.datetime.fromisoformat(backfill["retryAt"].replace("Z", "+00:00")).timestamp()
    time.sleep(max(0.0, retry_at - time.time()) + 1.0)
    run(kube, store, cluster)
    [second] = jobs(cluster)
    assert second != first and second.endswith("-2")
    assert cluster.status()["embeddings"]["spaces"][0]["backfill"]["attempts"] == 2
    job_failed(cluster, second)
    outcome = run(kube, store, cluster)
    assert jobs(cluster) == [] and cluster.status()["phase"] == "Failed"
    backfill = cluster.status()["embeddings"]["spaces"][0]["backfill"]
    assert backfill["state"] == "Failed" and "attempt 2 of 2" in backfill["lastFailure"]
    assert "no more attempts" in cluster.condition("EmbeddingsSynced")["message"]
    assert "BackfillFailed" in [d.reason for d in outcome.decisions if d.type == "Warning"]
    time.sleep(2.5)
    run(kube, store, cluster)
    assert jobs(cluster) == []  # no Job until the spec changes


# --- 4. an encoder version's modelUri and dimension are fixed once set ---------------------------


def test_changing_the_model_of_an_existing_encoder_version_is_refused(
    cluster: Cluster, faulty: tuple[Kube, FaultyApi]
) -> None:
    kube, _ = faulty
    create(cluster)
    store = observe.FixedCoverage({"e1": 0.5})
    run(kube, store, cluster)
    deployment = cluster.children()[("Deployment", "shop-encoder-e1")]
    space = cluster.status()["embeddings"]["spaces"][0]
    assert (space["modelUri"], space["dimension"]) == ("s3://models/encoder/e1", 128)

    cluster.patch_spec({"encoder": {"modelUri": "s3://models/encoder/other"}})  # 1.20 has no CEL to stop it
    outcome = run(kube, store, cluster)
    accepted = cluster.condition("SpecAccepted")
    assert accepted["status"] == "False" and accepted["reason"] == "ImmutableFieldChanged"
    assert "'s3://models/encoder/e1'" in accepted["message"] and "new spec.encoder.version" in accepted["message"]
    assert cluster.status()["phase"] == "Failed" and cluster.condition("Ready")["reason"] == "ImmutableFieldChanged"
    assert "ImmutableFieldChanged" in [d.reason for d in outcome.decisions if d.type == "Warning"]
    after = cluster.children()[("Deployment", "shop-encoder-e1")]
    assert after["metadata"]["generation"] == deployment["metadata"]["generation"]  # nothing applied
    fetch = after["spec"]["template"]["spec"]["initContainers"][0]["args"]
    assert "s3://models/encoder/e1" in fetch and "s3://models/encoder/other" not in fetch
    assert cluster.status()["observedGeneration"] == cluster.ranker()["metadata"]["generation"]

    cluster.patch_spec({"encoder": {"modelUri": "s3://models/encoder/e1"}})  # put back: accepted again
    run(kube, store, cluster)
    assert cluster.condition("SpecAccepted")["status"] == "True" and cluster.status()["phase"] == "Backfilling"


# --- 6. status writes guarded by resourceVersion: two writers racing ----------------------------


def test_a_status_write_racing_another_writer_loses_none_of_its_history(
    cluster: Cluster, faulty: tuple[Kube, FaultyApi]
) -> None:
    """Writer B (another operator, or kubectl mmrank) writes the status history between this
    reconcile's read and its write: the write gets 409 from the real apiserver, the reconcile is
    redone from the fresh status, and B's entry survives beside the operator's own."""
    kube, api = faulty
    create(cluster)
    store = observe.FixedCoverage({"e1": 0.0})
    stale = cluster.ranker()
    theirs = {
        "time": "2026-01-01T00:00:00Z",
        "reason": "Retried",
        "message": "written by the other operator",
        "rankerVersion": "r0",
        "step": 0,
        "trafficPercent": 0,
    }
    raced = []

    def other_writer(method: str, path: str) -> None:
        if method == "PATCH" and path.endswith("/status") and "multimodalrankers" in path and not raced:
            raced.append(path)
            cluster._patch_status(
                "mmrank.io/v1alpha1", "MultimodalRanker", "shop", {"history": [theirs], "phase": "Provisioning"}
            )

    api.hook = other_writer
    outcome = reconcile(kube, store, stale)
    api.hook = None
    assert raced and not outcome.retry
    assert ("PATCH", raced[0], -409) in api.seen  # the real apiserver refused the stale write
    status = cluster.status()
    assert status["history"] == [theirs]  # not lost to the stale write
    assert status["phase"] == "Backfilling" and cluster.condition("ChildrenApplied")["status"] == "True"


def test_two_operators_reconciling_at_once_keep_every_history_entry(
    cluster: Cluster, kube: Any, faulty: tuple[Kube, FaultyApi]
) -> None:
    """Two reconcilers (two clients, as two operator processes would have) run the same resource
    from threads while requests keep arriving; every request is answered once, and the history
    holds each answer: no write based on a stale read overwrote another."""
    import threading

    first, _ = faulty
    second = Kube(kube.api_client)
    create(cluster)
    store = observe.FixedCoverage({"e1": 0.0})
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop(adapter: Kube) -> None:
        while not stop.is_set():
            try:
                reconcile(adapter, store, cluster.ranker())
            except BaseException as exc:  # noqa: BLE001 - the test reports it
                errors.append(exc)
                return

    threads = [threading.Thread(target=loop, args=(k,), daemon=True) for k in (first, second)]
    for thread in threads:
        thread.start()
    asked = []
    for i in range(6):
        stamp = f"2026-01-01T00:00:{i:02d}.000000Z"
        asked.append(stamp)
        cluster._patch_status(
            "mmrank.io/v1alpha1",
            "MultimodalRanker",
            "shop",
            {"request": {"action": "Promote", "requestedAt": stamp, "requestedBy": f"p{i}"}},
        )
        deadline = time.monotonic() + 20
        while "request" in cluster.status() and time.monotonic() < deadline:
            time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    history = cluster.status().get("history") or []
    answered = [h for h in history if h["reason"] == "PromoteRefused"]
    assert len(answered) == 6, history  # one answer per request, none lost


# --- 5. coverage counts catalogue items only (a real Redis store) -------------------------------


def test_items_outside_the_catalogue_do_not_count_as_coverage(redis_server: Any) -> None:
    from mmrank.store import Scope, open_store

    scope = "ads/shop"
    store = open_store(redis_server.url).for_scope(Scope.parse(scope))
    vectors = np.eye(8, dtype=np.float32)
    store.create_space("e1", 8)
    store.set_catalogue_size("e1", 100)
    store.put("e1", np.arange(95), vectors[np.arange(95) % 8])
    store.report_backfill("e1", "0/2", 50, 50)
    store.report_backfill("e1", "1/2", 45, 50)
    store.put("e1", np.arange(1000, 1010), vectors[np.arange(10) % 8])  # posted to the embedder, never catalogued
    seen = observe.StoreCoverage().spaces(redis_server.url, None, ["e1"], scope=scope)["e1"]
    assert seen.items == 105 and seen.coverage == pytest.approx(0.95)  # not 105 / 100 clamped to 1.0
    store.report_backfill("e1", "1/2", 50, 50)
    assert observe.StoreCoverage().spaces(redis_server.url, None, ["e1"], scope=scope)["e1"].coverage == 1.0
