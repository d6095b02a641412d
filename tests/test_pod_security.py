"""Every pod the operator creates passes the restricted Pod Security Standard (issue 16, item 2).

Every child of every example, on each serving backend, with one replica and with several, before
and after its space is synced and half way through a canary, rendered by the operator's pure core
and checked against each control of the standard (tests/restricted_profile.py); and what the
standard does not ask but the issue does: read-only root file systems with /tmp writable, no
service-account token, resources on every container, Triton's startup probe, PodDisruptionBudgets
exactly when replicas > 1. The budgets are applied to, listed from and deleted on the real
apiserver (1.20, where they are policy/v1beta1).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from mmrank import api, api_crd
from mmrank.operator import children as build
from mmrank.operator import core, observe, reconcile
from mmrank.operator.kube import Kube, lower
from tests.restricted_profile import object_violations, pod_specs
from tests.test_operator_core import kserve_validator

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
NOW = "2026-01-01T00:00:00Z"
WORKLOADS = ("Deployment", "Job", "InferenceService")


def example_rankers() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in EXAMPLES:
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") == api.KIND:
                document["metadata"].update(namespace="ads", uid="uid-1", generation=1)
                out.append((path.stem, document))
    return out


def variants() -> Iterator[tuple[str, dict[str, Any]]]:
    """Each example as written, on the other serving backend, and with 3 replicas of everything."""
    for name, document in example_rankers():
        yield name, document
        other = copy.deepcopy(document)
        ranker = other["spec"]["ranker"]
        ranker["serving"] = "KServe" if ranker.get("serving") == "Kubernetes" else "Kubernetes"
        ranker.setdefault("replicas", 2)
        yield f"{name}-{ranker['serving'].lower()}", other
        scaled = copy.deepcopy(document)
        for part in (
            scaled["spec"]["encoder"],
            scaled["spec"]["ranker"],
            scaled["spec"]["embeddings"].setdefault("embedder", {}),
        ):
            part["replicas"] = 3
        yield f"{name}-3-replicas", scaled


VARIANTS = list(variants())


def children_of(document: dict[str, Any]) -> list[dict[str, Any]]:
    """What the operator's core renders for the ranker: before its space is synced (encoder,
    embedder, backfill), once it is (the serving children), and half way through a canary of a
    new ranker version on it (stable and canary side by side)."""
    ranker = api.MultimodalRanker.model_validate(document)
    encoder = ranker.spec.encoder.version
    out = []
    for coverage in (0.0, 1.0):
        observed = core.Observed(
            now=NOW, spaces={encoder: core.SpaceState(coverage=coverage, items=10)}, encoders_ready={encoder: True}
        )
        out += core.desired(ranker, observed).children
    canary = ranker.spec.ranker.model_copy(update={"version": "rnext"})
    out += build.build_ranker_children(ranker, ranker.spec.ranker, canary, 50)
    return out


def pods_of(children: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(where, spec) for child in children for where, spec, _ in pod_specs(child)]


def containers_of(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


@pytest.mark.parametrize(("name", "document"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_every_child_pod_passes_the_restricted_profile(name: str, document: dict[str, Any]) -> None:
    children = children_of(document)
    components = {c["metadata"]["labels"][build.COMPONENT] for c in children if c["kind"] in WORKLOADS}
    assert components == {"encoder", "embedder", "backfill", "ranker"}
    for child in children:
        assert object_violations(child) == [], child["metadata"]["name"]


@pytest.mark.parametrize(("name", "document"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_every_container_writes_only_to_its_volumes_and_has_resources(name: str, document: dict[str, Any]) -> None:
    for where, pod in pods_of(children_of(document)):
        assert pod["automountServiceAccountToken"] is False, where
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}
        for container in containers_of(pod):
            label = f"{where} {container['name']}"
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, label
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], label
            assert {"name": "HOME", "value": "/tmp"} in container["env"], label
            requests = container["resources"]["requests"]
            assert {"cpu", "memory"} <= set(requests), label


def test_pods_run_as_the_user_their_image_is_built_for() -> None:
    """Ours: uid 10001 (the Dockerfile's `useradd --uid 10001`); NVIDIA's Triton: its
    triton-server (1000), which owns the backends. One uid per pod, so the init containers'
    files belong to the main container's user."""
    assert build.image_uid("ghcr.io/mmrank/mmrank-triton:0.1.0") == 10001
    assert build.image_uid("nvcr.io/nvidia/tritonserver:24.10-py3") == 1000
    assert build.image_uid("nvcr.io/nvidia/tritonserver@sha256:" + "a" * 64) == 1000
    assert build.image_uid("localhost:5000/nvcr.io/nvidia/tritonserver:24.10") == 10001
    production = dict(example_rankers())["production"]
    for child in children_of(production):
        for where, pod, _ in pod_specs(child):
            uid = 1000 if child["metadata"]["labels"][build.COMPONENT] == "encoder" else 10001
            context = pod["securityContext"]
            assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (uid, uid, uid), where
            assert context["runAsNonRoot"] is True and context["seccompProfile"] == {"type": "RuntimeDefault"}


def test_triton_has_a_startup_probe_and_shared_memory() -> None:
    """Liveness waits for the startup probe, which gives a model load 10 minutes; the Python
    backend's /dev/shm is a memory-backed emptyDir."""
    ranker = api.MultimodalRanker.model_validate(dict(example_rankers())["dev"])
    pod = build.build_encoder_deployment(ranker)["spec"]["template"]["spec"]
    triton = pod["containers"][0]
    startup = triton["startupProbe"]
    assert startup["httpGet"] == triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8000}
    assert startup["periodSeconds"] * startup["failureThreshold"] == 600
    assert "initialDelaySeconds" not in triton["livenessProbe"]
    assert {"name": "shm", "mountPath": "/dev/shm"} in triton["volumeMounts"]
    assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}} in pod["volumes"]


def test_triton_without_resources_gets_default_requests() -> None:
    document = dict(example_rankers())["minimal"]
    triton = build.build_encoder_deployment(api.MultimodalRanker.model_validate(document))
    resources = triton["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources == {
        "requests": {"cpu": "1", "memory": "2Gi", "nvidia.com/gpu": "1"},
        "limits": {"nvidia.com/gpu": "1"},
    }


def test_embedder_and_backfill_resources_come_from_the_spec_with_defaults() -> None:
    document = dict(example_rankers())["minimal"]
    ranker = api.MultimodalRanker.model_validate(document)
    embedder = build.build_embedder_deployment(ranker, ["e1"])["spec"]["template"]["spec"]["containers"][0]
    backfill = build.build_backfill_job(ranker, "e1")["spec"]["template"]["spec"]["containers"][0]
    assert embedder["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    assert backfill["resources"] == {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
    document = copy.deepcopy(document)
    document["spec"]["embeddings"]["embedder"] = {"resources": {"requests": {"cpu": "2", "memory": "1Gi"}}}
    document["spec"]["embeddings"]["backfill"]["resources"] = {"limits": {"memory": "8Gi"}}
    ranker = api.MultimodalRanker.model_validate(document)
    embedder = build.build_embedder_deployment(ranker, ["e1"])["spec"]["template"]["spec"]["containers"][0]
    backfill = build.build_backfill_job(ranker, "e1")["spec"]["template"]["spec"]["containers"][0]
    assert embedder["resources"] == {"requests": {"cpu": "2", "memory": "1Gi"}}
    assert backfill["resources"] == {"limits": {"memory": "8Gi"}}


@pytest.mark.parametrize(
    "bad",
    [{"requests": {"cpu": "lots"}}, {"limits": {"memory": "-1Gi"}}, {"request": {"cpu": "1"}}, {"requests": ["cpu"]}],
)
@pytest.mark.parametrize("where", ["embedder", "backfill"])
def test_bad_resources_are_refused_naming_the_field(where: str, bad: dict[str, Any]) -> None:
    document = copy.deepcopy(dict(example_rankers())["minimal"])
    document["spec"]["embeddings"].setdefault(where, {})["resources"] = bad
    problems = api.problems(document)
    assert any(f"spec.embeddings.{where}.resources" in p for p in problems), problems


def test_a_storage_service_account_keeps_its_token_only_where_it_fetches() -> None:
    """Pods that fetch under spec.storage.serviceAccountName leave the token to that
    ServiceAccount's own setting; the embedder, which fetches nothing, never gets one."""
    for _, document in VARIANTS:
        document = copy.deepcopy(document)
        document["spec"]["storage"] = {"serviceAccountName": "model-reader"}
        for where, pod in pods_of(children_of(document)):
            if "embedder" in where:
                assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod, where
            else:
                assert pod["serviceAccountName"] == "model-reader", where
                assert "automountServiceAccountToken" not in pod, where


# --- PodDisruptionBudgets -------------------------------------------------------------------------


def budgets(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["metadata"]["name"]: c for c in children if c["kind"] == "PodDisruptionBudget"}


@pytest.mark.parametrize(("name", "document"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_disruption_budgets_exactly_when_replicas_exceed_one(name: str, document: dict[str, Any]) -> None:
    ranker = api.MultimodalRanker.model_validate(document)
    children = children_of(document)
    found = budgets(children)
    expected = set()
    if ranker.spec.encoder.replicas > 1:
        expected.add(f"{ranker.metadata.name}-encoder-{ranker.spec.encoder.version}")
    if ranker.spec.ranker.replicas > 1:
        expected.add(f"{ranker.metadata.name}-ranker")
    assert set(found) == expected
    for budget in found.values():
        assert budget["spec"]["maxUnavailable"] == 1
        assert budget["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        kubernetes_validate.validate(budget, "1.33", strict=True)
        selector = budget["spec"]["selector"]["matchLabels"]
        if ranker.spec.ranker.serving == "KServe" and budget["metadata"]["name"].endswith("-ranker"):
            # KServe's own labels on every predictor pod of the InferenceService
            assert selector == {
                "serving.kserve.io/inferenceservice": budget["metadata"]["name"],
                "component": "predictor",
            }
            continue
        covered = [
            c
            for c in children
            if c["kind"] == "Deployment"
            and c["metadata"]["labels"][build.COMPONENT] == budget["metadata"]["labels"][build.COMPONENT]
        ]
        assert covered
        for deployment in covered:
            pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= pod_labels.items(), deployment["metadata"]["name"]


def test_a_budget_is_policy_v1beta1_before_kubernetes_1_21() -> None:
    document = copy.deepcopy(dict(example_rankers())["production"])
    budget = next(iter(budgets(build.build_encoder_children(api.MultimodalRanker.model_validate(document))).values()))
    assert lower(budget, (1, 20))[0]["apiVersion"] == "policy/v1beta1"
    assert lower(budget, (1, 21)) == (budget, None)  # the 1.20 apiserver takes it: the last test


# --- schemas --------------------------------------------------------------------------------------


def test_the_predictor_s_security_settings_validate_against_kserve_s_crd() -> None:
    validator = kserve_validator()
    isvcs = [c for _, document in VARIANTS for c in children_of(document) if c["kind"] == "InferenceService"]
    assert any("canary" in c["spec"] for c in isvcs) and any(
        "canaryTrafficPercent" in c["spec"]["predictor"] for c in isvcs
    )
    for isvc in isvcs:
        validator.validate(isvc)
        assert isvc["spec"]["predictor"]["securityContext"]["runAsNonRoot"] is True
        assert isvc["spec"]["predictor"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    broken = copy.deepcopy(isvcs[0])
    broken["spec"]["predictor"]["securityContext"]["runAsNonRoot"] = "yes"
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)


@pytest.mark.parametrize(("name", "document"), VARIANTS[:3], ids=[v[0] for v in VARIANTS[:3]])
def test_secured_workloads_validate_against_kubernetes_schemas(name: str, document: dict[str, Any]) -> None:
    for child in children_of(document):
        if child["kind"] != "InferenceService":
            kubernetes_validate.validate(child, "1.33", strict=True)


# --- on the real apiserver ------------------------------------------------------------------------


@pytest.mark.apiserver
def test_budgets_are_applied_listed_and_deleted_on_the_apiserver(kube: Any) -> None:
    """On 1.20 (policy/v1beta1): created with the encoder's second replica, left alone by the next
    reconcile, deleted when the spec goes back to one replica; the new resource fields are kept."""
    from kubernetes import client, dynamic

    from harness import servers

    servers.install_crds(kube.api_client, [api_crd.crd_manifest(cel=False)])
    namespace = f"pss-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(kube.api_client).create_namespace({"metadata": {"name": namespace}})
    rankers = dynamic.DynamicClient(kube.api_client).resources.get(api_version=api.API_VERSION, kind=api.KIND)
    document = copy.deepcopy(dict(example_rankers())["dev"])
    document["metadata"] = {"name": "shop", "namespace": namespace}
    document["spec"]["encoder"]["replicas"] = 2
    document["spec"]["embeddings"]["embedder"] = {"resources": {"requests": {"cpu": "300m", "memory": "300Mi"}}}
    body = rankers.create(body=document, namespace=namespace).to_dict()
    assert body["spec"]["embeddings"]["embedder"]["resources"] == {"requests": {"cpu": "300m", "memory": "300Mi"}}
    assert body["spec"]["embeddings"]["backfill"]["resources"] == {
        "requests": {"cpu": "250m", "memory": "512Mi"},
        "limits": {"memory": "2Gi"},
    }
    adapter, store = Kube(kube.api_client), observe.FixedCoverage({"e1": 0.0})
    first = reconcile.reconcile(adapter, store, body)
    assert ("PodDisruptionBudget", "shop-encoder-e1") in first.applied
    listed = {
        (c["apiVersion"], c["kind"], c["metadata"]["name"])
        for c in adapter.list_children(namespace, "shop", body["metadata"]["uid"])
    }
    assert ("policy/v1beta1", "PodDisruptionBudget", "shop-encoder-e1") in listed
    body = rankers.get(name="shop", namespace=namespace).to_dict()
    assert reconcile.reconcile(adapter, store, body).applied == []
    body = rankers.patch(
        name="shop",
        namespace=namespace,
        content_type="application/merge-patch+json",
        body={"spec": {"encoder": {"replicas": 1}}},
    ).to_dict()
    again = reconcile.reconcile(adapter, store, body)
    assert ("PodDisruptionBudget", "shop-encoder-e1") in again.deleted
    assert not [
        c
        for c in adapter.list_children(namespace, "shop", body["metadata"]["uid"])
        if c["kind"] == "PodDisruptionBudget"
    ]
