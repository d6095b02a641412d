"""The operator's Helm chart: lint, schema-checked values, valid manifests, RBAC for every child."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "mmrank-operator"
ENVIRONMENTS = sorted(p.name for p in CHART.glob("values-*.yaml"))


def helm(helm_binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary, *args], capture_output=True, text=True, timeout=120)


def render(helm_binary: str, *args: str) -> list[dict]:
    result = helm(helm_binary, "template", "mmrank", str(CHART), "--namespace", "mmrank-system", *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_there_are_values_per_environment():
    assert {"values-dev.yaml", "values-staging.yaml", "values-prod.yaml"} <= set(ENVIRONMENTS)


@pytest.mark.parametrize("values", ["values.yaml", *ENVIRONMENTS])
def test_chart_lints_and_renders_valid_manifests(helm_binary, values):
    import kubernetes_validate

    lint = helm(helm_binary, "lint", str(CHART), "--strict", "-f", str(CHART / values))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render(helm_binary, "-f", str(CHART / values))
    watched = (yaml.safe_load((CHART / values).read_text()) or {}).get("watchNamespaces") or []
    per_namespace = {"Role", "RoleBinding"} if watched else set()
    assert {d["kind"] for d in docs} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment",
                                         *per_namespace}
    for doc in docs:
        kubernetes_validate.validate(doc, "1.33", strict=True)


def test_watch_namespaces_become_operator_arguments(helm_binary):
    deployment = next(d for d in render(helm_binary, "-f", str(CHART / "values-dev.yaml")) if d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["operator", "run"]
    assert "--namespace=mmrank-dev" in args and "--standalone" in args and "--verbose" in args
    everywhere = next(d for d in render(helm_binary) if d["kind"] == "Deployment")
    args = everywhere["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in args if a.startswith("--namespace")] and "--interval=30" in args


@pytest.mark.parametrize(("setting", "field"), [
    ("operator.reconcileIntervalSeconds=0", "reconcileIntervalSeconds"),
    ("operator.verbose=loud", "verbose"),
    ("image.pullPolicy=Sometimes", "pullPolicy"),
    ("watchNamespaces[0]=Not_A_Namespace", "watchNamespaces"),
    ("replicaCount=3", "replicaCount"),
])
def test_values_schema_rejects_bad_values_at_install(helm_binary, setting, field):
    result = helm(helm_binary, "template", "mmrank", str(CHART), "--set", setting)
    assert result.returncode != 0
    assert field in result.stderr, result.stderr


def test_chart_crd_is_the_generated_crd():
    generated = ROOT / "crds" / "mmrank.io_multimodalrankers.yaml"
    in_chart = CHART / "crds" / "mmrank.io_multimodalrankers.yaml"
    assert generated.exists(), "crds/mmrank.io_multimodalrankers.yaml is missing: run `mmrank crd`"
    assert in_chart.read_text() == generated.read_text(), (
        "the chart's CRD is stale: cp crds/mmrank.io_multimodalrankers.yaml charts/mmrank-operator/crds/")


@pytest.mark.apiserver
def test_rendered_chart_applies_to_the_real_apiserver(helm_binary, kube):
    kube.kubectl("create", "namespace", "mmrank-system", check=False)
    manifests = helm(helm_binary, "template", "mmrank", str(CHART), "--namespace", "mmrank-system",
                     "-f", str(CHART / "values-prod.yaml")).stdout
    applied = kube.kubectl("apply", "--server-side", "--field-manager=helm-test", "-f", "-", input=manifests,
                           check=False)
    assert applied.returncode == 0, applied.stderr
    again = kube.kubectl("apply", "--server-side", "--field-manager=helm-test", "-f", "-", input=manifests)
    assert "serverside-applied" in again.stdout
    got = kube.kubectl("get", "deployment", "-n", "mmrank-system", "-o", "jsonpath={.items[*].metadata.generation}")
    assert got.stdout.split() == ["1"]


def test_cluster_role_covers_every_child_the_operator_applies(helm_binary, tmp_path):
    import sys

    rendered = subprocess.run([sys.executable, "-m", "mmrank", "render", "-f", str(ROOT / "examples" / "production.yaml"),
                               "--coverage", "e1=1.0"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert rendered.returncode == 0, rendered.stderr
    children = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    assert children
    role = next(d for d in render(helm_binary) if d["kind"] == "ClusterRole")
    granted = {(group, resource): set(rule["verbs"]) for rule in role["rules"]
               for group in rule["apiGroups"] for resource in rule["resources"]}
    for child in children:
        group = child["apiVersion"].rpartition("/")[0]
        resource = child["kind"].lower() + "s"
        verbs = granted.get((group, resource), set())
        assert {"get", "list", "watch", "create", "patch", "delete"} <= verbs, (
            f"the operator applies {child['kind']} ({group or 'core'}/{resource}) but the ClusterRole grants {verbs}")
    assert "update" in granted[("mmrank.io", "multimodalrankers/finalizers")]
    assert {"patch"} <= granted[("mmrank.io", "multimodalrankers/status")]


def test_watched_namespaces_get_roles_and_the_cluster_role_keeps_only_cluster_reads(helm_binary):
    docs = render(helm_binary, "--set", "watchNamespaces={team-a,team-b}")
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    assert set(roles) == {"team-a", "team-b"}
    bindings = {d["metadata"]["namespace"] for d in docs if d["kind"] == "RoleBinding"}
    assert bindings == {"team-a", "team-b"}
    cluster_role = next(d for d in docs if d["kind"] == "ClusterRole")
    cluster_resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert cluster_resources == {"customresourcedefinitions", "namespaces"}
    assert all(set(rule["verbs"]) <= {"get", "list", "watch"} for rule in cluster_role["rules"])
    granted = {r for rule in roles["team-a"]["rules"] for r in rule["resources"]}
    assert {"secrets", "deployments", "jobs", "multimodalrankers/status"} <= granted


@pytest.mark.apiserver
def test_with_watched_namespaces_the_operator_may_touch_nothing_elsewhere(helm_binary, kube):
    """RBAC enforced by the real apiserver: the operator's ServiceAccount reads Secrets and writes
    Deployments in the namespaces it watches, and nowhere else."""
    for namespace in ("rbac-system", "rbac-watched", "rbac-other"):
        kube.kubectl("create", "namespace", namespace, check=False)
    manifests = helm(helm_binary, "template", "mmrank", str(CHART), "--namespace", "rbac-system",
                     "--set", "watchNamespaces={rbac-watched}").stdout
    applied = kube.kubectl("apply", "--server-side", "--field-manager=helm-test", "-f", "-", input=manifests,
                           check=False)
    assert applied.returncode == 0, applied.stderr
    names = {d["metadata"]["name"] for d in yaml.safe_load_all(manifests) if d and d["kind"] == "ServiceAccount"}
    account = f"system:serviceaccount:rbac-system:{names.pop()}"

    def can(verb: str, resource: str, namespace: str, *extra: str) -> bool:
        result = kube.kubectl("auth", "can-i", verb, resource, "-n", namespace, f"--as={account}", *extra,
                              check=False)
        return result.stdout.strip() == "yes"

    assert can("get", "secrets", "rbac-watched") and can("create", "deployments", "rbac-watched")
    assert can("create", "events", "rbac-watched") and not can("create", "events", "rbac-other")
    assert not can("get", "secrets", "rbac-other") and not can("create", "deployments", "rbac-other")
    assert not can("get", "secrets", "rbac-system")
    assert can("list", "customresourcedefinitions.apiextensions.k8s.io", "rbac-other")
