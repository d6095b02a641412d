"""The operator's pure core by value: children, embedding sync, status; every child validated
against Kubernetes' schemas (kubernetes-validate) and KServe's CRD schema. No cluster."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from harness import servers
from mmrank import api
from mmrank.operator import children as build
from mmrank.operator import core, observe
from mmrank.operator.cli import render_documents
from mmrank.operator.kube import CHILD_KINDS, contains, is_transient, lower, stamped, up_to_date
from mmrank.operator.reconcile import _merge_patch

NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T00:05:00Z"


def manifest(encoder: str = "e1", ranker: str = "r1", **spec_extra: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "mmrank.io/v1alpha1",
        "kind": "MultimodalRanker",
        "metadata": {"name": "shop", "namespace": "ads", "uid": "uid-1", "generation": 3},
        "spec": {
            "encoder": {
                "version": encoder,
                "modelUri": f"s3://models/encoder/{encoder}",
                "gpus": 1,
                "nodeSelector": {"nvidia.com/gpu.product": "A10"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
            "ranker": {"version": ranker, "modelUri": f"s3://models/ranker/{ranker}", "encoderVersion": encoder},
            "embeddings": {
                "store": {
                    "url": "redis://redis.ads.svc:6379/0",
                    "passwordSecretRef": {"name": "redis-auth", "key": "password"},
                },
                "minCoverage": 0.99,
                "backfill": {"parallelism": 4, "catalogueUri": "s3://catalogue/snapshots/today"},
            },
        },
    }
    body["spec"].update(spec_extra)
    return body


def ranker(**kwargs: Any) -> api.MultimodalRanker:
    return api.MultimodalRanker.model_validate(manifest(**kwargs))


def observed(
    coverage: dict[str, float] | None = None,
    ready: tuple[str, ...] = (),
    status: dict | None = None,
    serving: core.ServedRanker | None = None,
    jobs: dict | None = None,
    now: str = NOW,
    children: tuple[core.ChildRef, ...] = (),
) -> core.Observed:
    return core.Observed(
        now=now,
        status=status or {},
        spaces={k: core.SpaceState(coverage=v, items=int(v * 1000)) for k, v in (coverage or {}).items()},
        encoders_ready={v: True for v in ready},
        ranker=serving,
        jobs=jobs or {},
        children=children,
    )


def kinds(want: core.Desired) -> dict[tuple[str, str], dict]:
    return {(c["kind"], c["metadata"]["name"]): c for c in want.children}


def by_type(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status["conditions"]}


def backfill_jobs(want: core.Desired, version: str = "e1") -> list[dict]:
    """The backfill Jobs of a space (named <ranker>-backfill-<version>-<shape>-<attempt>)."""
    return [
        c for c in want.children if c["kind"] == "Job" and c["metadata"]["name"].startswith(f"shop-backfill-{version}-")
    ]


def backfill_job(want: core.Desired, version: str = "e1") -> dict:
    jobs = backfill_jobs(want, version)
    assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]
    return jobs[0]


# --- children by value --------------------------------------------------------------------------


def test_fresh_ranker_gets_encoder_embedder_and_backfill_but_no_traffic() -> None:
    want = core.desired(ranker(), observed({"e1": 0.0}))
    job = backfill_job(want)["metadata"]["name"]
    assert sorted(kinds(want)) == [
        ("ConfigMap", "shop-encoder-e1"),
        ("Deployment", "shop-embedder"),
        ("Deployment", "shop-encoder-e1"),
        ("Job", job),
        ("Service", "shop-embedder"),
        ("Service", "shop-encoder-e1"),
    ]
    assert job.endswith("-1") and build.shape_of_job_name(job)
    assert want.status["phase"] == "Backfilling"
    synced = by_type(want.status)["EmbeddingsSynced"]
    assert synced["status"] == "False" and "coverage 0.0000" in synced["message"] and "0.99" in synced["message"]
    # the Job being created is in status at once, so the next reconcile has nothing to write
    assert want.status["embeddings"]["spaces"] == [
        {
            "version": "e1",
            "modelUri": "s3://models/encoder/e1",
            "dimension": 128,
            "coverage": 0.0,
            "items": 0,
            "backfill": {
                "completedShards": 0,
                "totalShards": 4,
                "progress": 0.0,
                "job": job,
                "attempts": 1,
                "state": "Running",
            },
        }
    ]


def test_the_child_kinds_the_operator_lists_are_the_kinds_its_builders_write() -> None:
    """`kube.CHILD_KINDS` is what the operator lists (and so deletes when no longer wanted): a kind a
    builder writes but the list lacks would be orphaned there, a kind listed but never built is dead."""
    built = set()
    for serving in ("KServe", "Kubernetes"):
        body = manifest()
        body["spec"]["encoder"]["replicas"] = 2  # more than one replica: a PodDisruptionBudget
        body["spec"]["ranker"].update(serving=serving, replicas=2)
        for coverage in (0.0, 1.0):  # backfilling (a Job), then serving (the ranker)
            want = core.desired(api.MultimodalRanker.model_validate(body), observed({"e1": coverage}, ready=("e1",)))
            built |= {(c["apiVersion"], c["kind"]) for c in want.children}
    assert built == set(CHILD_KINDS)
    assert len(CHILD_KINDS) == len(set(CHILD_KINDS))


def test_every_child_has_owner_reference_and_labels() -> None:
    want = core.desired(ranker(), observed({"e1": 1.0}, ready=("e1",)))
    assert any(c["kind"] == "InferenceService" for c in want.children)
    for child in want.children:
        meta = child["metadata"]
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "mmrank.io/v1alpha1",
                "kind": "MultimodalRanker",
                "name": "shop",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "mmrank"
        assert meta["labels"]["mmrank.io/ranker"] == "shop"
        standard = {k.removeprefix("app.kubernetes.io/") for k in meta["labels"] if k.startswith("app.kubernetes.io/")}
        assert standard == {"name", "instance", "version", "component", "part-of", "managed-by"}, child["kind"]
        assert meta["labels"]["app.kubernetes.io/instance"] == "shop"
        assert meta["labels"]["app.kubernetes.io/version"] in ("e1", "r1")
        assert meta["namespace"] == "ads"


def test_encoder_deployment_runs_triton_on_gpus_with_weights_from_model_uri() -> None:
    deployment = kinds(core.desired(ranker(), observed({"e1": 0.0})))[("Deployment", "shop-encoder-e1")]
    pod = deployment["spec"]["template"]["spec"]
    triton = pod["containers"][0]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8000}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "A10"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    fetch = pod["initContainers"][0]
    assert "s3://models/encoder/e1" in fetch["args"]
    assert {"name": "models", "emptyDir": {}} in pod["volumes"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8002"


def test_config_change_changes_the_pod_template_hash() -> None:
    def template_hash(body: dict) -> str:
        r = api.MultimodalRanker.model_validate(body)
        return build.build_encoder_deployment(r)["spec"]["template"]["metadata"]["annotations"][build.CONFIG_HASH]

    body = manifest()
    other = copy.deepcopy(body)
    other["spec"]["encoder"]["dynamicBatching"] = {"maxBatchSize": 32}
    assert template_hash(body) == template_hash(copy.deepcopy(body))
    assert template_hash(body) != template_hash(other)


def test_configmap_uses_kind_gpu_only_with_gpus() -> None:
    gpu = build.build_encoder_configmap(ranker())["data"]["config.pbtxt"]
    body = manifest()
    body["spec"]["encoder"]["gpus"] = 0
    cpu = build.build_encoder_configmap(api.MultimodalRanker.model_validate(body))["data"]["config.pbtxt"]
    assert "KIND_GPU" in gpu and "KIND_CPU" in cpu


def test_backfill_job_is_indexed_and_sharded() -> None:
    job = backfill_job(core.desired(ranker(), observed({"e1": 0.3})))
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["mmrank", "backfill", "run"]
    assert args[args.index("--space") + 1] == "e1" and args[args.index("--shard") + 1] == "$(JOB_COMPLETION_INDEX)/4"


def test_backfill_pods_fetch_the_catalogue_before_they_start() -> None:
    pod = backfill_job(core.desired(ranker(), observed({"e1": 0.3})))["spec"]["template"]["spec"]
    fetch = pod["initContainers"][0]
    assert fetch["args"] == ["mmrank", "fetch", "s3://catalogue/snapshots/today", "/mnt/catalogue"]
    assert fetch["image"] == api.DEFAULT_MMRANK_IMAGE  # the runtime image: KServe's storage code
    backfill = pod["containers"][0]
    assert backfill["args"][backfill["args"].index("--catalogue") + 1] == "/mnt/catalogue"
    assert {"name": "catalogue", "mountPath": "/mnt/catalogue", "readOnly": True} in backfill["volumeMounts"]
    assert {"name": "catalogue", "emptyDir": {}} in pod["volumes"]


def test_without_a_catalogue_no_backfill_starts_and_status_says_why() -> None:
    body = manifest()
    del body["spec"]["embeddings"]["backfill"]["catalogueUri"]
    want = core.desired(api.MultimodalRanker.model_validate(body), observed({"e1": 0.3}))
    assert not [c for c in want.children if c["kind"] == "Job"]
    synced = by_type(want.status)["EmbeddingsSynced"]
    assert synced["status"] == "False" and synced["reason"] == "NoCatalogue"
    assert "spec.embeddings.backfill.catalogueUri" in synced["message"]
    assert not [c for c in want.children if c["kind"] == "InferenceService"]


def test_inference_service_pins_the_space_and_keeps_the_password_in_its_secret() -> None:
    isvc = kinds(core.desired(ranker(), observed({"e1": 0.995}, ready=("e1",))))[("InferenceService", "shop-ranker")]
    predictor = isvc["spec"]["predictor"]
    env = {e["name"]: e for e in predictor["containers"][0]["env"]}
    assert env["MMRANK_SPACE"]["value"] == "e1"
    assert env["MMRANK_STORE_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "redis-auth", "key": "password"}}
    assert predictor["storageUris"] == [{"uri": "s3://models/ranker/r1", "mountPath": "/mnt/models"}]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"


# --- embedding sync -----------------------------------------------------------------------------


def test_no_traffic_until_the_encoder_is_ready_even_at_full_coverage() -> None:
    want = core.desired(ranker(), observed({"e1": 1.0}))
    assert ("InferenceService", "shop-ranker") not in kinds(want)
    assert by_type(want.status)["RankerReady"]["reason"] == "WaitingForEmbeddings"


def test_synced_space_and_ready_isvc_make_the_ranker_stable_and_ready() -> None:
    serving = core.ServedRanker(core.Version("r1", "e1"), ready=True)
    want = core.desired(ranker(), observed({"e1": 1.0}, ready=("e1",), serving=serving))
    stable = want.status["stable"]
    assert (stable["rankerVersion"], stable["encoderVersion"]) == ("r1", "e1")
    assert stable["ranker"]["modelUri"] == "s3://models/ranker/r1"  # what a later canary runs beside
    assert want.status["phase"] == "Ready"
    assert all(c["status"] == "True" for c in want.status["conditions"] if c["type"] != "CanaryHealthy")
    assert backfill_jobs(want) == []
    assert "RankerPromoted" in [d.reason for d in want.decisions]


STABLE_E1 = {
    "stable": {"rankerVersion": "r1", "encoderVersion": "e1"},
    "embeddings": {"spaces": [{"version": "e1", "coverage": 1.0}]},
}
OLD_CHILDREN = (
    core.ChildRef("ConfigMap", "shop-encoder-e1", "v1", "e1"),
    core.ChildRef("Deployment", "shop-encoder-e1", "apps/v1", "e1"),
    core.ChildRef("Service", "shop-encoder-e1", "v1", "e1"),
    core.ChildRef("InferenceService", "shop-ranker", "serving.kserve.io/v1beta1", "e1"),
)


def test_encoder_change_keeps_the_old_encoder_and_stable_ranker_while_backfilling() -> None:
    serving = core.ServedRanker(core.Version("r1", "e1"), ready=True)
    want = core.desired(
        ranker(encoder="e2", ranker="r2"),
        observed({"e1": 1.0, "e2": 0.42}, ready=("e1", "e2"), status=STABLE_E1, serving=serving, children=OLD_CHILDREN),
    )
    got = kinds(want)
    assert backfill_job(want, "e2") and ("Deployment", "shop-encoder-e2") in got
    assert ("InferenceService", "shop-ranker") not in got  # not rebuilt: r1 keeps serving as is
    kept = {(c.kind, c.name) for c in want.keep}
    assert kept == {
        ("ConfigMap", "shop-encoder-e1"),
        ("Deployment", "shop-encoder-e1"),
        ("Service", "shop-encoder-e1"),
        ("InferenceService", "shop-ranker"),
    }
    env = {
        e["name"]: e["value"]
        for e in got[("Deployment", "shop-embedder")]["spec"]["template"]["spec"]["containers"][0]["env"]
        if "value" in e
    }
    assert env["MMRANK_ENCODERS"] == "e2=shop-encoder-e2:8001,e1=shop-encoder-e1:8001"
    assert want.status["stable"] == {"rankerVersion": "r1", "encoderVersion": "e1"}
    assert want.status["phase"] == "Backfilling"
    synced = by_type(want.status)["EmbeddingsSynced"]
    assert synced["status"] == "False" and "space e2: coverage 0.4200" in synced["message"]
    assert [s["version"] for s in want.status["embeddings"]["spaces"]] == ["e1", "e2"]


def test_a_stable_ranker_recorded_before_canaries_switches_when_synced_then_retires_the_old_encoder() -> None:
    """A status written by the operator before canary rollouts has no stable spec to run beside a
    canary: the new ranker switches as it did then, and its spec is recorded from then on."""
    status = {**STABLE_E1, "embeddings": {"spaces": [{"version": "e1"}, {"version": "e2"}]}}
    old = core.ServedRanker(core.Version("r1", "e1"), ready=True)
    switching = core.desired(
        ranker(encoder="e2", ranker="r2"),
        observed({"e1": 1.0, "e2": 0.991}, ready=("e1", "e2"), status=status, serving=old, children=OLD_CHILDREN),
    )
    isvc = kinds(switching)[("InferenceService", "shop-ranker")]
    assert isvc["metadata"]["labels"]["mmrank.io/ranker-version"] == "r2"
    assert switching.status["stable"]["rankerVersion"] == "r1"  # until KServe reports r2 ready
    assert ("Deployment", "shop-encoder-e1") in {(c.kind, c.name) for c in switching.keep}
    assert switching.status["phase"] == "Progressing"

    new = core.ServedRanker(core.Version("r2", "e2"), ready=True)
    done = core.desired(
        ranker(encoder="e2", ranker="r2"),
        observed({"e1": 1.0, "e2": 0.991}, ready=("e2",), status=switching.status, serving=new, children=OLD_CHILDREN),
    )
    assert core.stable_of(done.status) == core.Version("r2", "e2")
    assert done.status["stable"]["ranker"]["version"] == "r2"
    assert done.keep == []  # e1's children are deleted
    assert done.status["phase"] == "Ready"
    assert [s["version"] for s in done.status["embeddings"]["spaces"]] == ["e1", "e2"]  # retained: 1
    assert done.delete_spaces == []


def test_retired_spaces_beyond_retention_are_deleted() -> None:
    assert core.spaces_to_delete(["e1", "e2", "e3", "e4"], ["e4"], 1) == ["e1", "e2"]
    assert core.spaces_to_delete(["e1", "e2"], ["e2", "e1"], 0) == []
    status = {
        "stable": {"rankerVersion": "r3", "encoderVersion": "e3"},
        "embeddings": {"spaces": [{"version": "e1"}, {"version": "e2"}, {"version": "e3"}]},
    }
    want = core.desired(
        ranker(encoder="e3", ranker="r3"),
        observed({"e3": 1.0}, ready=("e3",), status=status, serving=core.ServedRanker(core.Version("r3", "e3"), True)),
    )
    assert want.delete_spaces == ["e1"]
    assert [s["version"] for s in want.status["embeddings"]["spaces"]] == ["e2", "e3"]
    assert "SpaceDeleted" in [d.reason for d in want.decisions]


def test_unreachable_store_deletes_nothing_and_says_unknown() -> None:
    status = {
        "stable": {"rankerVersion": "r3", "encoderVersion": "e3"},
        "embeddings": {"spaces": [{"version": "e1"}, {"version": "e2"}, {"version": "e3"}]},
    }
    obs = core.Observed(
        now=NOW,
        status=status,
        spaces={"e3": core.SpaceState(None)},
        store_error="ConnectionError",
        encoders_ready={"e3": True},
    )
    want = core.desired(ranker(encoder="e3", ranker="r3"), obs)
    assert want.delete_spaces == []
    assert by_type(want.status)["EmbeddingsSynced"]["status"] == "Unknown"
    assert by_type(want.status)["EmbeddingsSynced"]["reason"] == "StoreUnreachable"


def test_running_backfill_is_not_cut_short_and_finished_one_goes() -> None:
    running = core.JobState(completions=4, succeeded=3)
    finished = core.JobState(completions=4, succeeded=4, finished=True)
    assert core.needs_backfill(core.SpaceState(0.995), running, 0.99)
    assert not core.needs_backfill(core.SpaceState(0.995), finished, 0.99)
    assert core.needs_backfill(core.SpaceState(0.5), finished, 0.99)
    assert not core.needs_backfill(core.SpaceState(None), None, 0.99)


def test_backfill_progress_and_failure_reach_status() -> None:
    first = core.desired(ranker(), observed({"e1": 0.2}))
    name = backfill_job(first)["metadata"]["name"]
    running = core.desired(ranker(), observed({"e1": 0.5}, status=first.status, jobs={name: core.JobState(4, 2)}))
    space = running.status["embeddings"]["spaces"][0]
    assert space["backfill"] == {
        "completedShards": 2,
        "totalShards": 4,
        "progress": 0.5,
        "job": name,
        "attempts": 1,
        "state": "Running",
    }
    failed = core.JobState(
        completions=4,
        succeeded=2,
        finished=True,
        failed=True,
        reason="BackoffLimitExceeded: Job has reached the specified backoff limit",
    )
    want = core.desired(ranker(), observed({"e1": 0.5}, status=running.status, jobs={name: failed}))
    space = want.status["embeddings"]["spaces"][0]
    assert space["backfill"]["state"] == "Retrying" and "BackoffLimitExceeded" in space["backfill"]["lastFailure"]
    assert by_type(want.status)["EmbeddingsSynced"]["reason"] == "BackfillRetrying"


def test_second_reconcile_keeps_transition_times_and_writes_nothing() -> None:
    first = core.desired(ranker(), observed({"e1": 0.2}))
    second = core.desired(ranker(), observed({"e1": 0.2}, status=first.status, now=LATER))
    assert second.status == first.status
    assert _merge_patch(first.status, second.status) == {}
    assert [d.reason for d in second.decisions] == []
    third = core.desired(ranker(), observed({"e1": 0.2}, ready=("e1",), status=first.status, now=LATER))
    assert by_type(third.status)["EncoderReady"]["lastTransitionTime"] == LATER
    assert by_type(third.status)["EmbeddingsSynced"]["lastTransitionTime"] == NOW


def test_invalid_spec_becomes_a_failed_condition() -> None:
    status = core.invalid_status({"phase": "Ready"}, ["spec.ranker.encoderVersion: must name e2"], NOW, 4)
    assert status["phase"] == "Failed"
    ready = by_type(status)["Ready"]
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec" and "encoderVersion" in ready["message"]


def test_status_the_core_writes_validates_against_the_api_models() -> None:
    first = core.desired(ranker(), observed({"e1": 0.2}))
    want = core.desired(
        ranker(),
        observed({"e1": 0.5}, status=first.status, jobs={backfill_job(first)["metadata"]["name"]: core.JobState(4, 1)}),
    )
    api.RankerStatus.model_validate(build.plain(want.status))


# --- apply skipping -----------------------------------------------------------------------------


def test_apply_is_skipped_only_when_hash_and_fields_match() -> None:
    child = stamped(build.build_encoder_service(ranker()))
    live = copy.deepcopy(child)
    live["metadata"]["resourceVersion"] = "12"
    live["spec"]["clusterIP"] = "10.96.0.7"
    assert up_to_date(live, child)
    drifted = copy.deepcopy(live)
    drifted["spec"]["ports"][0]["port"] = 9000
    assert not up_to_date(drifted, child)
    body = manifest()
    body["spec"]["encoder"]["version"] = "e1"
    changed = stamped(build.build_encoder_service(api.MultimodalRanker.model_validate(body)))
    changed["metadata"]["labels"] = {}
    assert not up_to_date(live, stamped(changed))
    assert contains({"a": 1, "b": [{"c": "1"}]}, {"b": [{"c": 1}]})


def test_old_apiservers_get_jobs_without_completion_mode_and_say_so() -> None:
    job = build.build_backfill_job(ranker(), "e1")
    same, note = lower(job, (1, 33))
    assert same == job and note is None
    old, note = lower(job, (1, 20))
    assert "completionMode" not in old["spec"] and old["spec"]["completions"] == old["spec"]["parallelism"] == 1
    assert "0/1" in old["spec"]["template"]["spec"]["containers"][0]["args"]  # no index to shard by
    assert note is not None and "1.22" in note
    assert lower(build.build_encoder_service(ranker()), (1, 20))[1] is None


def test_which_api_errors_are_retried() -> None:
    from kubernetes.client.exceptions import ApiException

    assert is_transient(ApiException(status=409)) and is_transient(ApiException(status=503))
    assert is_transient(ConnectionResetError())
    assert not is_transient(ApiException(status=422)) and not is_transient(ApiException(status=403))
    untyped = ApiException(status=500)
    untyped.body = '{"message":"failed to create typed patch object: .spec.x: field not declared in schema"}'
    assert not is_transient(untyped)
    assert not is_transient(ValueError("bad"))


# --- schemas ------------------------------------------------------------------------------------


def all_children() -> list[dict]:
    """Every kind of child, in the configurations that differ (GPU and CPU, with a Secret)."""
    r = ranker()
    body = manifest()
    body["spec"]["encoder"].update({"gpus": 0, "resources": {"requests": {"cpu": "2", "memory": "8Gi"}}})
    body["spec"]["rollout"] = {"kserveMode": "Knative"}
    cpu = api.MultimodalRanker.model_validate(body)
    out = []
    for one in (r, cpu):
        out += [
            build.build_encoder_configmap(one),
            build.build_encoder_service(one),
            build.build_encoder_deployment(one),
            build.build_embedder_deployment(one, ["e1", "e0"]),
            build.build_backfill_job(one, "e1"),
            build.build_inference_service(one, one.spec.ranker),
        ]
    return [stamped(c) for c in out]


@pytest.mark.parametrize(
    "child", [c for c in all_children() if c["kind"] != "InferenceService"], ids=lambda c: f"{c['kind']}"
)
def test_builtin_children_validate_against_kubernetes_schemas(child: dict) -> None:
    kubernetes_validate.validate(child, "1.33", strict=True)


def kserve_validator() -> jsonschema.Draft7Validator:
    path = servers.shared_dir() / "schemas" / "kserve" / "serving.kserve.io_inferenceservices.yaml"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = next(d for d in yaml.load_all(path.read_text(), Loader=loader) if d)
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(_closed(schema))


def test_inference_service_validates_against_kserve_crd_schema() -> None:
    validator = kserve_validator()
    isvcs = [c for c in all_children() if c["kind"] == "InferenceService"]
    assert len(isvcs) == 2
    for isvc in isvcs:
        validator.validate(isvc)
    broken = copy.deepcopy(isvcs[0])
    broken["spec"]["predictor"]["storageUris"] = [{"mountPath": "/mnt/models"}]
    typo = copy.deepcopy(isvcs[0])
    typo["spec"]["predictor"]["storageUri"] = "s3://x"
    for bad in (broken, typo):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(bad)


def _closed(schema: Any) -> Any:
    """The CRD schema with unknown fields forbidden where it declares properties (the apiserver
    would prune them silently: a typo in a builder must fail here)."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


# --- render -------------------------------------------------------------------------------------


def test_render_is_offline_and_follows_coverage(repo_root: Path) -> None:
    example = repo_root / "examples" / "minimal.yaml"
    fresh = render_documents(list(yaml.safe_load_all(example.read_text())), {})
    assert "Job" in [d["kind"] for d in fresh] and "InferenceService" not in [d["kind"] for d in fresh]
    synced = render_documents(list(yaml.safe_load_all(example.read_text())), {"e1": 1.0})
    assert "InferenceService" in [d["kind"] for d in synced] and "Job" not in [d["kind"] for d in synced]
    result = subprocess.run(
        [sys.executable, "-m", "mmrank", "render", "-f", str(example), "--coverage", "e1=0.5"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "KUBECONFIG": "/nonexistent"},
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Deployment", "Deployment", "Service", "Job"]


def test_store_url_gets_the_password_only_for_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Secret's password reaches the store's client (mmrank.store's rule), never the URL."""
    monkeypatch.delenv("MMRANK_STORE_PASSWORD", raising=False)
    coverage = observe.StoreCoverage()
    with_secret = coverage._store("redis://r:6379/0", "p@ss", "ns/shop")  # no connection until a command
    assert with_secret.client.connection_pool.connection_kwargs["password"] == "p@ss"
    assert (
        coverage._store("redis://r:6379/0", None, "ns/shop").client.connection_pool.connection_kwargs.get("password")
        is None
    )


def _timers(argv: list[str]) -> list[tuple[float | None, float | None]]:
    """(interval, initial delay) of each timer in the kopf registry `mmrank <argv>` would run."""
    from kopf._core.intents.handlers import TimerHandler  # kopf 1.45 lists a registry's handlers nowhere public

    from mmrank.cli import build_parser
    from mmrank.operator.cli import handler_registry

    registry = handler_registry(build_parser(argv).parse_args(argv))
    return [(h.interval, h.initial_delay) for h in registry._spawning.get_all_handlers() if isinstance(h, TimerHandler)]


def test_the_interval_given_on_the_command_line_is_the_timers(monkeypatch: pytest.MonkeyPatch) -> None:
    """`operator run --interval` reaches kopf's timer as configuration (nothing read at import):
    a flag, else MMRANK_OPERATOR_INTERVAL, else 30 s; each call builds its own registry."""
    monkeypatch.delenv("MMRANK_OPERATOR_INTERVAL", raising=False)
    assert _timers(["operator", "run", "--interval", "1m30s"]) == [(90.0, 90.0)]
    assert _timers(["operator", "run", "--interval", "2"]) == [(2.0, 2.0)]
    assert _timers(["operator", "run"]) == [(30.0, 30.0)]
    monkeypatch.setenv("MMRANK_OPERATOR_INTERVAL", "45s")
    assert _timers(["operator", "run"]) == [(45.0, 45.0)]
    assert _timers(["operator", "run", "--interval", "5"]) == [(5.0, 5.0)]


def test_operator_imports_no_torch_and_no_other_part() -> None:
    code = (
        "import sys, mmrank.operator.handlers, mmrank.operator.cli, mmrank.operator.reconcile; "
        "bad = [m for m in sys.modules if m == 'torch' or (m.startswith(('mmrank.encoders', 'mmrank.predictors')) "
        "and m not in ('mmrank.encoders', 'mmrank.encoders.triton_config'))]; print(bad)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_example_renders_children_that_validate(repo_root: Path) -> None:
    validator = kserve_validator()
    examples = sorted((repo_root / "examples").glob("*.yaml"))
    assert examples
    for example in examples:
        documents = [d for d in yaml.safe_load_all(example.read_text()) if d]
        rankers = [d for d in documents if d.get("kind") == "MultimodalRanker"]
        for body in rankers:
            encoder = body["spec"]["encoder"]["version"]
            for coverage in (0.0, 1.0):
                rendered = render_documents([body], {encoder: coverage})
                assert rendered, example
                for child in rendered:
                    if child["kind"] == "InferenceService":
                        validator.validate(child)
                    else:
                        kubernetes_validate.validate(child, "1.33", strict=True)


# --- fetching artifacts -------------------------------------------------------------------------


def test_pvc_uris_mount_the_claim_read_only_for_the_fetch_only() -> None:
    body = manifest()
    body["spec"]["encoder"]["modelUri"] = "pvc://models/encoder/e1"
    body["spec"]["storage"] = {"secretName": "model-creds", "serviceAccountName": "model-reader"}
    pod = build.build_encoder_deployment(api.MultimodalRanker.model_validate(body))["spec"]["template"]["spec"]
    fetch = pod["initContainers"][0]
    assert fetch["args"] == ["mmrank", "fetch", "/mnt/pvc/models/encoder/e1", "/models"]
    assert {"name": "pvc-models", "mountPath": "/mnt/pvc/models", "readOnly": True} in fetch["volumeMounts"]
    assert {"name": "pvc-models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    assert fetch["envFrom"] == [{"secretRef": {"name": "model-creds"}}]
    assert pod["serviceAccountName"] == "model-reader"
    assert all(m["name"] != "pvc-models" for m in pod["containers"][0]["volumeMounts"])  # copied, not linked


def test_remote_uris_are_fetched_by_kserve_storage_without_extra_volumes() -> None:
    assert build.fetch_source("s3://bucket/ranker/r1") == ("s3://bucket/ranker/r1", None)
    assert build.fetch_source("https://host/r1.tar.gz") == ("https://host/r1.tar.gz", None)
    path, volume = build.fetch_source("pvc://shared-models")
    assert path == "/mnt/pvc/shared-models" and volume is not None


def test_embedder_pods_are_scraped() -> None:
    pod = build.build_embedder_deployment(ranker(), ["e1"])["spec"]["template"]["metadata"]
    assert pod["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8080",
        "prometheus.io/path": "/metrics",
    }


def test_freshness_is_read_from_the_embedders_histogram_at_most_once_a_minute() -> None:
    promql = observe.freshness_query("ads", "shop", "e1")
    assert promql == (
        "histogram_quantile(0.99, sum by (le) (rate(mmrank_embedding_freshness_seconds_bucket"
        '{namespace="ads",mmrank_io_ranker="shop",space="e1"}[300s])))'
    )

    class Answers:
        def __init__(self) -> None:
            self.asked = 0

        def query(self, url: str, promql: str) -> float | None:
            self.asked += 1
            if self.asked == 2:
                raise OSError("down")
            return 0.123456

    answers = Answers()
    reader = observe.FreshnessObserver(answers, min_age_seconds=0.0)
    assert reader.p99("http://p", "ads", "shop", "e1", None) == 0.1235
    assert reader.p99("http://p", "ads", "shop", "e1", 0.1235) == 0.1235  # Prometheus down: keep
    cached = observe.FreshnessObserver(answers, min_age_seconds=60.0)
    cached.p99("http://p", "ads", "shop", "e1", None)
    asked = answers.asked
    cached.p99("http://p", "ads", "shop", "e1", None)
    assert answers.asked == asked
    want = core.desired(ranker(), dataclasses_replace(observed({"e1": 0.5}), freshness_p99=0.25))
    assert want.status["embeddings"]["freshnessP99Seconds"] == 0.25


def dataclasses_replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)


@pytest.mark.parametrize(
    ("resources", "threads"),
    [({}, 1), ({"requests": {"cpu": "500m"}}, 1), ({"requests": {"cpu": "2"}}, 2), ({"limits": {"cpu": "2500m"}}, 3)],
)
def test_a_cpu_encoder_runs_torch_with_as_many_threads_as_it_requests_cores(resources: dict, threads: int) -> None:
    body = manifest()
    body["spec"]["encoder"]["gpus"] = 0
    if resources:
        body["spec"]["encoder"]["resources"] = resources
    triton = build.build_encoder_deployment(api.MultimodalRanker.model_validate(body))["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert [e for e in triton["env"] if e["name"] == "OMP_NUM_THREADS"] == [
        {"name": "OMP_NUM_THREADS", "value": str(threads)}
    ]
    gpu = build.build_encoder_deployment(ranker())["spec"]["template"]["spec"]["containers"][0]
    assert "OMP_NUM_THREADS" not in {e["name"] for e in gpu["env"]}


def test_without_indexed_jobs_a_backfill_being_created_counts_one_shard() -> None:
    """Kubernetes < 1.22 runs the backfill as one pod (kube.lower), so status must not promise
    `parallelism` shards and then change its mind when the Job appears."""
    obs = dataclasses_replace(observed({"e1": 0.3}), indexed_jobs=False)
    space = core.desired(ranker(), obs).status["embeddings"]["spaces"][0]
    assert space["backfill"]["totalShards"] == 1


# --- a reconcile that never wedges: Job shapes, backfill attempts, immutable encoder fields -----


def _with(body: dict, path: str, value: Any) -> api.MultimodalRanker:
    node = body["spec"]
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return api.MultimodalRanker.model_validate(body)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("embeddings.backfill.batchSize", 64),
        ("embeddings.backfill.parallelism", 2),
        ("embeddings.embedder.image", "ghcr.io/mmrank/mmrank:0.2.0"),
    ],
)
def test_a_change_the_job_cannot_take_is_a_new_job_from_attempt_one(path: str, value: Any) -> None:
    """batchSize (the pod template), parallelism (completions: immutable) or the image change the
    Job's shape: a Job of another name replaces it (the old one is no longer desired, so it is
    deleted), instead of an update the apiserver refuses with 422."""
    first = core.desired(ranker(), observed({"e1": 0.2}))
    old = backfill_job(first)["metadata"]["name"]
    running = core.desired(ranker(), observed({"e1": 0.3}, status=first.status, jobs={old: core.JobState(4, 1)}))
    changed = core.desired(
        _with(manifest(), path, value), observed({"e1": 0.3}, status=running.status, jobs={old: core.JobState(4, 1)})
    )
    new = backfill_job(changed)["metadata"]["name"]
    assert new != old and new.endswith("-1") and build.shape_of_job_name(new) != build.shape_of_job_name(old)
    assert changed.status["embeddings"]["spaces"][0]["backfill"]["job"] == new
    again = core.desired(_with(manifest(), path, value), observed({"e1": 0.3}, status=changed.status))
    assert backfill_job(again)["metadata"]["name"] == new  # stable from then on


def test_a_job_name_stays_a_dns_label_with_long_names() -> None:
    name = build.backfill_job_name("n" * 44 + "-backfill-" + "e" * 9, "abc123", 100)
    assert len(name) <= 63 and name.endswith("-abc123-100") and build.shape_of_job_name(name) == "abc123"
    assert build.shape_of_job_name("shop-backfill-e1") == ""


def test_without_indexed_jobs_the_job_has_another_shape() -> None:
    """An apiserver upgrade to >= 1.22 changes how the Job runs (kube.lower): a new Job, not a 422."""
    indexed = backfill_job(core.desired(ranker(), observed({"e1": 0.3})))["metadata"]["name"]
    plain = backfill_job(core.desired(ranker(), dataclasses_replace(observed({"e1": 0.3}), indexed_jobs=False)))
    assert plain["metadata"]["name"] != indexed


def _failed(reason: str = "BackoffLimitExceeded: Job has reached the specified backoff limit") -> core.JobState:
    return core.JobState(completions=4, succeeded=1, finished=True, failed=True, reason=reason)


def at(seconds: int) -> str:
    import datetime

    base = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    return (base + datetime.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_failed_backfill_is_retried_with_exponential_backoff_then_the_space_fails() -> None:
    body = manifest()
    body["spec"]["embeddings"]["backfill"].update(maxAttempts=3, retryBackoff="10s")
    model = api.MultimodalRanker.model_validate(body)
    want = core.desired(model, observed({"e1": 0.2}, now=at(0)))
    names, waits = [], []
    t = 0
    for attempt in (1, 2, 3):
        name = backfill_job(want)["metadata"]["name"]
        names.append(name)
        assert name.endswith(f"-{attempt}")
        want = core.desired(model, observed({"e1": 0.2}, status=want.status, jobs={name: _failed()}, now=at(t)))
        assert backfill_jobs(want) == []  # the failed Job goes
        entry = want.status["embeddings"]["spaces"][0]["backfill"]
        assert entry["attempts"] == attempt and f"attempt {attempt} of 3 ({name})" in entry["lastFailure"]
        if attempt == 3:
            break
        assert entry["state"] == "Retrying" and "BackoffLimitExceeded" in entry["lastFailure"]
        assert [d.reason for d in want.decisions if d.type == "Warning"] == ["BackfillRetrying"]
        wait = int(core.roll.seconds_between(at(t), entry["retryAt"]))
        waits.append(wait)
        early = core.desired(model, observed({"e1": 0.2}, status=want.status, now=at(t + wait - 1)))
        assert backfill_jobs(early) == [] and by_type(early.status)["EmbeddingsSynced"]["reason"] == "BackfillRetrying"
        t += wait
        want = core.desired(model, observed({"e1": 0.2}, status=early.status, now=at(t)))
    assert waits == [10, 20] and len(set(names)) == 3
    entry = want.status["embeddings"]["spaces"][0]["backfill"]
    assert entry["state"] == "Failed" and want.status["phase"] == "Failed"
    synced = by_type(want.status)["EmbeddingsSynced"]
    assert synced["reason"] == "BackfillFailed" and "no more attempts" in synced["message"]
    assert [d.reason for d in want.decisions if d.type == "Warning"] == ["Failed", "BackfillFailed"]
    later = core.desired(model, observed({"e1": 0.2}, status=want.status, now=at(t + 3600)))
    assert backfill_jobs(later) == [] and later.status["phase"] == "Failed"  # no more Jobs until the spec changes
    body["spec"]["embeddings"]["backfill"]["batchSize"] = 128
    fixed = core.desired(
        api.MultimodalRanker.model_validate(body), observed({"e1": 0.2}, status=later.status, now=at(t + 3601))
    )
    assert backfill_job(fixed)["metadata"]["name"].endswith("-1") and fixed.status["phase"] == "Backfilling"


def test_raising_max_attempts_lets_a_failed_space_try_again_at_once() -> None:
    body = manifest()
    body["spec"]["embeddings"]["backfill"].update(maxAttempts=1)
    want = core.desired(api.MultimodalRanker.model_validate(body), observed({"e1": 0.2}))
    name = backfill_job(want)["metadata"]["name"]
    want = core.desired(
        api.MultimodalRanker.model_validate(body), observed({"e1": 0.2}, status=want.status, jobs={name: _failed()})
    )
    assert want.status["phase"] == "Failed" and backfill_jobs(want) == []
    body["spec"]["embeddings"]["backfill"].update(maxAttempts=2)
    again = core.desired(api.MultimodalRanker.model_validate(body), observed({"e1": 0.2}, status=want.status))
    assert backfill_job(again)["metadata"]["name"].endswith("-2") and again.status["phase"] == "Backfilling"


def test_backoff_doubles_and_is_capped() -> None:
    assert [core.backoff_seconds(30, a) for a in (1, 2, 3, 4, 5, 6)] == [30, 60, 120, 240, 480, 600]


def test_a_job_that_completed_below_min_coverage_is_a_failed_attempt() -> None:
    first = core.desired(ranker(), observed({"e1": 0.2}))
    name = backfill_job(first)["metadata"]["name"]
    done = core.JobState(completions=4, succeeded=4, finished=True)
    want = core.desired(ranker(), observed({"e1": 0.5}, status=first.status, jobs={name: done}))
    entry = want.status["embeddings"]["spaces"][0]["backfill"]
    assert entry["state"] == "Retrying" and "completed, but space e1: coverage 0.5000" in entry["lastFailure"]
    covered = core.desired(ranker(), observed({"e1": 1.0}, status=first.status, jobs={name: done}))
    assert backfill_jobs(covered) == [] and "retryAt" not in covered.status["embeddings"]["spaces"][0]["backfill"]


def test_a_version_keeps_the_model_uri_and_dimension_it_was_first_seen_with() -> None:
    first = core.desired(ranker(), observed({"e1": 1.0}, ready=("e1",)))
    space = first.status["embeddings"]["spaces"][0]
    assert (space["modelUri"], space["dimension"]) == ("s3://models/encoder/e1", 128)
    body = manifest()
    body["spec"]["encoder"].update(modelUri="s3://models/encoder/e1-retrained", dimension=256)
    want = core.desired(
        api.MultimodalRanker.model_validate(body), observed({"e1": 1.0}, ready=("e1",), status=first.status, now=LATER)
    )
    accepted = by_type(want.status)["SpecAccepted"]
    assert accepted["status"] == "False" and accepted["reason"] == "ImmutableFieldChanged"
    assert "spec.encoder.modelUri of version e1 is 's3://models/encoder/e1'" in accepted["message"]
    assert "spec.encoder.dimension of version e1 is 128" in accepted["message"]
    assert "set a new spec.encoder.version" in accepted["message"]
    assert by_type(want.status)["Ready"]["reason"] == "ImmutableFieldChanged" and want.status["phase"] == "Failed"
    # nothing of the change is applied: the encoder keeps pulling the recorded model at its width
    deployment = kinds(want)[("Deployment", "shop-encoder-e1")]
    assert kinds(first)[("Deployment", "shop-encoder-e1")] == deployment
    assert kinds(first)[("ConfigMap", "shop-encoder-e1")] == kinds(want)[("ConfigMap", "shop-encoder-e1")]
    assert want.status["embeddings"]["spaces"][0]["modelUri"] == "s3://models/encoder/e1"
    assert [d.reason for d in want.decisions if d.type == "Warning"] == ["Failed", "ImmutableFieldChanged"]
    again = core.desired(
        api.MultimodalRanker.model_validate(body), observed({"e1": 1.0}, ready=("e1",), status=want.status, now=LATER)
    )
    assert [d for d in again.decisions if d.reason == "ImmutableFieldChanged"] == []  # one Warning, not one per run
    # a new version is the way: accepted, and recorded with its own model
    new = manifest(encoder="e2", ranker="r2")
    new["spec"]["encoder"]["modelUri"] = "s3://models/encoder/e1-retrained"
    moved = core.desired(api.MultimodalRanker.model_validate(new), observed({"e1": 1.0}, status=want.status))
    assert by_type(moved.status)["SpecAccepted"]["status"] == "True"
    assert {s["version"]: s.get("modelUri") for s in moved.status["embeddings"]["spaces"]} == {
        "e1": "s3://models/encoder/e1",
        "e2": "s3://models/encoder/e1-retrained",
    }


# --- refusals and status conflicts (operator/faults.py) ----------------------------------------


def test_a_refused_child_is_named_in_status_and_ready_is_false() -> None:
    from mmrank.operator import faults

    want = core.desired(
        ranker(), observed({"e1": 1.0}, ready=("e1",), serving=core.ServedRanker(core.Version("r1", "e1"), ready=True))
    )
    assert want.status["phase"] == "Ready"
    refused = faults.Refusal("apply", "Deployment", "shop-embedder", 403, "deployments is forbidden", False)
    status, decisions = faults.with_refusals(want.status, {}, [refused], NOW, 3)
    applied = by_type(status)["ChildrenApplied"]
    assert applied["status"] == "False" and applied["reason"] == "ChildRefused" and applied["observedGeneration"] == 3
    assert "apply Deployment shop-embedder refused (403): deployments is forbidden" in applied["message"]
    assert by_type(status)["Ready"]["status"] == "False" and status["phase"] == "Failed"
    assert status["observedGeneration"] == 3
    assert [(d.reason, d.type) for d in decisions] == [("ChildRefused", "Warning")]
    _, again = faults.with_refusals(want.status, status, [refused], LATER, 3)
    assert again == []  # one Warning per new set of refusals
    busy = faults.Refusal("apply", "Deployment", "shop-embedder", 503, "etcd leader changed", True)
    status, _ = faults.with_refusals(want.status, {}, [busy], NOW, 3)
    assert status["phase"] == "Progressing" and by_type(status)["ChildrenApplied"]["reason"] == "ChildRetrying"
    healed, decisions = faults.with_refusals(want.status, status, [], LATER, 3)
    assert healed["phase"] == "Ready" and by_type(healed)["ChildrenApplied"]["status"] == "True"
    assert [d.reason for d in decisions] == ["ChildrenApplied"]


def test_after_a_conflict_only_observations_are_merged_and_history_means_redo() -> None:
    from mmrank.operator import faults

    base = {"phase": "Backfilling", "stable": {"rankerVersion": "r1", "encoderVersion": "e1"}, "history": []}
    ours = {**base, "phase": "Ready", "observedGeneration": 3}
    assert faults.reapply(base, ours, base) == ours  # only metadata moved
    theirs = {**base, "observedGeneration": 2, "phase": "Progressing"}
    assert faults.reapply(base, ours, theirs) == {**theirs, "phase": "Ready", "observedGeneration": 3}
    for key, value in (
        ("history", [{"reason": "Promoted"}]),
        ("canary", {"state": "Promoted"}),
        ("stable", {"rankerVersion": "r2", "encoderVersion": "e1"}),
        ("request", {"action": "Abort"}),
    ):
        assert faults.reapply(base, ours, {**base, key: value}) is None, key


# --- coverage counts catalogue items only ----------------------------------------------------------


def test_coverage_is_the_union_of_the_backfill_checkpoints_over_the_catalogue() -> None:
    assert observe.backfilled_rows({"0/2": (50, 50), "1/2": (20, 50)}, 100) == 70
    # resharded half way: 0/2 stored rows 0-39, then 0/4..3/4 started over; overlaps count once
    assert observe.backfilled_rows({"0/2": (40, 50), "1/2": (0, 50), "0/4": (25, 25), "1/4": (10, 25)}, 100) == 40
    assert observe.backfilled_rows({"0/1": (99, 99)}, 100) == 0  # another catalogue's checkpoint
    assert observe.backfilled_rows({"x": (1, 1), "3/2": (5, 5)}, 100) == 0
    assert observe.catalogue_coverage(70, 100) == 0.7 and observe.catalogue_coverage(5, 0) == 0.0
