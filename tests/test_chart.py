"""The operator's Helm chart with the real helm: lint, templates per environment and per toggle, the
values schema against a corpus of bad values, the restricted Pod Security Standard on every pod it
renders, RBAC for every child, and install / upgrade (a changed CRD schema reaches the cluster) /
uninstall (the CRD and the rankers stay unless asked) against the real kube-apiserver."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import servers
from mmrank import api, api_crd
from tests.restricted_profile import object_violations

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "mmrank-operator"
ENVIRONMENTS = sorted(p.name for p in CHART.glob("values-*.yaml"))
CRD_KINDS = {"multimodalrankers.mmrank.io", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}


def helm(helm_binary: str, *args: str, kubeconfig: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HELM_CACHE_HOME": "/tmp/mmrank-helm/cache",
        "HELM_CONFIG_HOME": "/tmp/mmrank-helm/config",
        "HELM_DATA_HOME": "/tmp/mmrank-helm/data",
    }
    extra = [f"--kubeconfig={kubeconfig}"] if kubeconfig else []
    return subprocess.run([helm_binary, *args, *extra], capture_output=True, text=True, timeout=120, env=env)


def render(helm_binary: str, *args: str, chart: Path = CHART) -> list[dict]:
    result = helm(helm_binary, "template", "mmrank", str(chart), "--namespace", "mmrank-system", *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def peering_crds(helm_binary: str) -> list[dict]:
    """kopf's peering CRDs as the chart ships them."""
    docs = render(helm_binary, "--show-only", "templates/crds/kopf-peering.yaml")
    assert {d["metadata"]["name"] for d in docs} == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    return docs


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}s rendered"
    return found[0]


def operator_args(docs: list[dict]) -> list[str]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]


def test_there_are_values_per_environment():
    assert {"values-dev.yaml", "values-staging.yaml", "values-prod.yaml"} <= set(ENVIRONMENTS)


@pytest.mark.parametrize("values", ["values.yaml", *ENVIRONMENTS])
def test_chart_lints_and_renders_valid_manifests(helm_binary, values):
    import kubernetes_validate

    lint = helm(helm_binary, "lint", str(CHART), "--strict", "-f", str(CHART / values))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render(helm_binary, "-f", str(CHART / values))
    settings = yaml.safe_load((CHART / values).read_text()) or {}
    per_namespace = {"Role", "RoleBinding"} if settings.get("watchNamespaces") else set()
    policy = {"NetworkPolicy"} if (settings.get("networkPolicy") or {}).get("enabled") else set()
    assert {d["kind"] for d in docs} == {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "Pod",
        "CustomResourceDefinition",
        *per_namespace,
        *policy,
    }
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "CustomResourceDefinition"} == CRD_KINDS
    for doc in docs:
        kubernetes_validate.validate(doc, "1.33", strict=True)


@pytest.mark.parametrize("values", ["values.yaml", *ENVIRONMENTS])
def test_every_pod_the_chart_renders_meets_the_restricted_profile(helm_binary, values):
    docs = render(helm_binary, "-f", str(CHART / values))
    pods = [d for d in docs if d["kind"] in ("Deployment", "Pod")]
    assert {d["kind"] for d in pods} == {"Deployment", "Pod"}  # the operator and the `helm test` pod
    for doc in pods:
        assert object_violations(doc) == [], doc["metadata"]["name"]
        spec = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else doc["spec"]
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_operator_peers_with_probes_and_a_writable_tmp(helm_binary):
    docs = render(helm_binary)
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert args[:2] == ["operator", "run"] and "--standalone" not in args
    assert "--peering=mmrank-mmrank-operator" in args and "--peering-lifetime=15" in args
    assert {"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "ready": 8081, "metrics": 9090}
    assert "--liveness=http://0.0.0.0:8080/healthz" in args and "--readiness=http://0.0.0.0:8081/readyz" in args
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ready"}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"


def test_without_leader_election_one_standalone_replica_is_recreated(helm_binary):
    docs = render(helm_binary, "--set", "leaderElection.enabled=false", "--set", "replicaCount=1")
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    args = operator_args(docs)
    assert "--standalone" in args and not [a for a in args if a.startswith("--peering")]
    refused = helm(helm_binary, "template", "mmrank", str(CHART), "--set", "leaderElection.enabled=false")
    assert refused.returncode != 0 and "/replicaCount" in refused.stderr, refused.stderr


def test_watch_namespaces_become_operator_arguments(helm_binary):
    args = operator_args(render(helm_binary, "-f", str(CHART / "values-dev.yaml")))
    assert args[:2] == ["operator", "run"]
    assert "--namespace=mmrank-dev" in args and "--peering=mmrank-mmrank-operator" in args and "--verbose" in args
    args = operator_args(render(helm_binary))
    assert not [a for a in args if a.startswith("--namespace")] and "--interval=30" in args


def test_the_crd_is_a_template_with_cel_from_kubernetes_1_25(helm_binary):
    """`helm template` and `helm upgrade` carry the generated CRD; below 1.25 the copy without CEL."""
    copies = CHART / "files" / "crds"  # tests/test_api_crd.py keeps them equal to `mmrank crd [--no-cel]`
    with_cel = yaml.safe_load((copies / "mmrank.io_multimodalrankers.yaml").read_text())
    without = yaml.safe_load((copies / "mmrank.io_multimodalrankers.no-cel.yaml").read_text())
    assert "x-kubernetes-validations" in yaml.safe_dump(with_cel) and "x-kubernetes-validations" not in yaml.safe_dump(
        without
    )
    for version, cel in (("1.33.0", True), ("1.25.0", True), ("1.24.9", False), ("1.20.0", False)):
        crds = [d for d in render(helm_binary, "--kube-version", version) if d["kind"] == "CustomResourceDefinition"]
        crd = next(d for d in crds if d["metadata"]["name"] == api.CRD_NAME)
        assert crd["spec"] == (with_cel if cel else without)["spec"], version  # 1.0 == 1: YAML numbers alike
        assert crd["metadata"]["annotations"]["mmrank.io/cel"] == str(cel).lower()
        for each in crds:
            assert each["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    crd = next(d for d in render(helm_binary, "--set", "crds.keep=false") if d["kind"] == "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in crd["metadata"].get("annotations", {})
    kinds = {d["kind"] for d in render(helm_binary, "--set", "crds.install=false")}
    assert "CustomResourceDefinition" not in kinds
    names = {
        d["metadata"]["name"]
        for d in render(helm_binary, "--set", "crds.peering=false")
        if d["kind"] == "CustomResourceDefinition"
    }
    assert names == {api.CRD_NAME}


def test_kube_version_admits_1_20_and_refuses_older(helm_binary):
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"] == ">=1.20.0-0"
    refused = helm(helm_binary, "template", "mmrank", str(CHART), "--kube-version", "1.19.16")
    assert refused.returncode != 0 and "kubeVersion" in refused.stderr + refused.stdout


@pytest.mark.parametrize(
    ("toggle", "kind"),
    [
        ("metrics.serviceMonitor.enabled=true", "ServiceMonitor"),
        ("metrics.podMonitor.enabled=true", "PodMonitor"),
        ("networkPolicy.enabled=true", "NetworkPolicy"),
    ],
)
def test_optional_objects_render_only_when_enabled(helm_binary, toggle, kind):
    import kubernetes_validate

    assert kind not in {d["kind"] for d in render(helm_binary)}
    docs = render(helm_binary, "--set", toggle)
    obj = one(docs, kind)
    selector = {"app.kubernetes.io/name": "mmrank-operator", "app.kubernetes.io/instance": "mmrank"}
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    if kind == "NetworkPolicy":
        kubernetes_validate.validate(obj, "1.33", strict=True)
        assert obj["spec"]["podSelector"]["matchLabels"] == selector
        assert {p["port"] for p in obj["spec"]["ingress"][0]["ports"]} == {"health", "ready", "metrics"}
        assert obj["spec"]["policyTypes"] == ["Ingress"]
        return
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["spec"]["selector"]["matchLabels"] == selector
    assert set(selector.items()) <= set(pod_labels.items())
    endpoint = (obj["spec"].get("endpoints") or obj["spec"].get("podMetricsEndpoints"))[0]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics" and endpoint["interval"] == "30s"
    service_ports = {p["name"] for p in one(docs, "Service")["spec"]["ports"]}
    assert "metrics" in service_ports
    off = helm(helm_binary, "template", "mmrank", str(CHART), "--set", toggle, "--set", "metrics.port=0")
    assert off.returncode != 0 and "metrics.port" in off.stderr, off.stderr


def test_network_policy_admits_the_given_peers_egress_rules_and_the_helm_test(helm_binary, tmp_path):
    import kubernetes_validate

    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "networkPolicy": {
                    "enabled": True,
                    "ingressFrom": [
                        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
                    ],
                    "egress": [
                        {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 6379, "protocol": "TCP"}]}
                    ],
                }
            }
        )
    )
    docs = render(helm_binary, "-f", str(values))
    policy = one(docs, "NetworkPolicy")
    kubernetes_validate.validate(policy, "1.33", strict=True)
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["egress"][0]["ports"] == [{"port": 6379, "protocol": "TCP"}]
    peers = policy["spec"]["ingress"][0]["from"]
    test_pod_labels = one(docs, "Pod")["metadata"]["labels"]
    assert peers[0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert set(peers[1]["podSelector"]["matchLabels"].items()) <= set(test_pod_labels.items())


def test_helm_test_pod_asks_the_health_endpoint_through_the_service(helm_binary):
    docs = render(helm_binary)
    pod = one(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    service = one(docs, "Service")
    assert {"name": "health", "port": 8080, "targetPort": "health", "protocol": "TCP"} in service["spec"]["ports"]
    script = pod["spec"]["containers"][0]["command"][-1]
    assert f"http://{service['metadata']['name']}.mmrank-system.svc:8080/healthz" in script
    assert pod["spec"]["automountServiceAccountToken"] is False
    selector = service["spec"]["selector"]
    assert not set(selector.items()) <= set(pod["metadata"]["labels"].items())  # the test pod is no endpoint


def test_notes_point_at_what_exists(helm_binary):
    result = helm(helm_binary, "install", "mmrank", str(CHART), "--dry-run=client", "-n", "mmrank-system")
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "helm test mmrank -n mmrank-system" in notes and "kubectl explain multimodalranker.spec" in notes
    home = yaml.safe_load((CHART / "Chart.yaml").read_text())["home"]
    for path in [
        line.split(f"{home}/raw/main/", 1)[1].split()[0] for line in notes.splitlines() if f"{home}/raw/main/" in line
    ]:
        assert (ROOT / path).is_file(), path
    assert "clusterkopfpeering mmrank-mmrank-operator" in notes and "evaluates no CEL" not in notes


BAD_VALUES = [
    ("resources.limits.memory=lots", "/resources/limits/memory"),
    ("resources.requests.cpu=fast", "/resources/requests/cpu"),
    ("resources.limits.gpu=1", "/resources/limits"),
    ("podSecurityContext.runAsNonRoot=maybe", "/podSecurityContext/runAsNonRoot"),
    ("podSecurityContext.runAsUser=-1", "/podSecurityContext/runAsUser"),
    ("podSecurityContext.seccompProfile.type=Permissive", "/podSecurityContext/seccompProfile/type"),
    ("securityContext.allowPrivilegeEscalation=sometimes", "/securityContext/allowPrivilegeEscalation"),
    ("securityContext.capabilities.drop[0]=all", "/securityContext/capabilities/drop/0"),
    ("replicaCount=-1", "/replicaCount"),
    ("replicaCount=0", "/replicaCount"),
    ("replicaCount=two", "/replicaCount"),
    ("leaderElection.lifetimeSeconds=1", "/leaderElection/lifetimeSeconds"),
    ("leaderElection.enabled=yes-please", "/leaderElection/enabled"),
    ("crds.keep=forever", "/crds/keep"),
    ("operator.reconcileIntervalSeconds=0", "/operator/reconcileIntervalSeconds"),
    ("operator.verbose=loud", "/operator/verbose"),
    ("operator.extraArgs[0]=rm", "/operator/extraArgs/0"),
    ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
    ("image.tag=has space", "/image/tag"),
    ("watchNamespaces[0]=Not_A_Namespace", "/watchNamespaces/0"),
    ("metrics.port=70000", "/metrics/port"),
    ("metrics.serviceMonitor.interval=often", "/metrics/serviceMonitor/interval"),
    ("metrics.podMonitor.enabled=1", "/metrics/podMonitor/enabled"),
    ("networkPolicy.enabled=on", "/networkPolicy/enabled"),
    ("tolerations[0].effect=Sometimes", "/tolerations/0/effect"),
    ("nodeSelector.disk=1", "/nodeSelector/disk"),
    ("serviceAccount.name=Bad_Name", "/serviceAccount/name"),
    ("priorityClassName=Not Valid", "/priorityClassName"),
    ("replicaCount=6", "/replicaCount"),
    ("unknownKey=1", "additional properties 'unknownKey'"),
    ("operator.unknown=1", "additional properties 'unknown'"),
    ("metrics.serviceMonitor.selector=x", "additional properties 'selector'"),
]


@pytest.mark.parametrize(("setting", "where"), BAD_VALUES)
def test_values_schema_rejects_bad_values_at_install(helm_binary, setting, where):
    result = helm(helm_binary, "template", "mmrank", str(CHART), "--set", setting)
    assert result.returncode != 0, f"{setting} was accepted"
    assert where in result.stderr, result.stderr


def test_values_schema_rejects_a_bad_values_file(helm_binary, tmp_path):
    """What `--set` cannot say: a quantity as a map, a toleration with an unknown field, a list for a map."""
    for values, where in (
        ({"resources": {"limits": {"memory": {"size": "1Gi"}}}}, "/resources/limits/memory"),
        ({"tolerations": [{"key": "a", "operatr": "Exists"}]}, "additional properties 'operatr'"),
        ({"podAnnotations": ["a"]}, "/podAnnotations"),
        ({"networkPolicy": {"ingressFrom": [{"podSelectr": {}}]}}, "additional properties 'podSelectr'"),
    ):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(values))
        result = helm(helm_binary, "template", "mmrank", str(CHART), "-f", str(path))
        assert result.returncode != 0 and where in result.stderr, (values, result.stderr)


def test_cluster_role_covers_every_child_the_operator_applies(helm_binary, tmp_path):
    import sys

    rendered = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmrank",
            "render",
            "-f",
            str(ROOT / "examples" / "production.yaml"),
            "--coverage",
            "e1=1.0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert rendered.returncode == 0, rendered.stderr
    children = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    assert children
    role = one(render(helm_binary), "ClusterRole")
    granted = {
        (group, resource): set(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    for child in children:
        group = child["apiVersion"].rpartition("/")[0]
        resource = child["kind"].lower() + "s"
        verbs = granted.get((group, resource), set())
        assert {"get", "list", "watch", "create", "patch", "delete"} <= verbs, (
            f"the operator applies {child['kind']} ({group or 'core'}/{resource}) but the ClusterRole grants {verbs}"
        )
    from mmrank.operator.kube import CHILD_KINDS  # what the operator lists and deletes when a ranker goes

    for api_version, kind in CHILD_KINDS:
        group, resource = api_version.rpartition("/")[0], kind.lower() + "s"
        verbs = granted.get((group, resource), set())
        assert {"get", "list", "watch", "create", "patch", "delete"} <= verbs, (
            f"CHILD_KINDS holds {kind} ({group or 'core'}/{resource}) but the ClusterRole grants {verbs}"
        )
    assert "update" in granted[("mmrank.io", "multimodalrankers/finalizers")]
    assert {"patch"} <= granted[("mmrank.io", "multimodalrankers/status")]
    assert {"get", "list", "watch", "create", "patch"} <= granted[("kopf.dev", "clusterkopfpeerings")]


def test_watched_namespaces_get_roles_and_the_cluster_role_keeps_only_cluster_reads(helm_binary):
    docs = render(helm_binary, "--set", "watchNamespaces={team-a,team-b}")
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    assert set(roles) == {"team-a", "team-b"}
    bindings = {d["metadata"]["namespace"] for d in docs if d["kind"] == "RoleBinding"}
    assert bindings == {"team-a", "team-b"}
    cluster_role = one(docs, "ClusterRole")
    cluster_resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert cluster_resources == {"customresourcedefinitions", "namespaces"}
    assert all(set(rule["verbs"]) <= {"get", "list", "watch"} for rule in cluster_role["rules"])
    granted = {r for rule in roles["team-a"]["rules"] for r in rule["resources"]}
    assert {"secrets", "deployments", "jobs", "multimodalrankers/status", "kopfpeerings"} <= granted


# --- against the real kube-apiserver (1.20) --------------------------------------------------------


@pytest.mark.apiserver
def test_rendered_chart_applies_to_the_real_apiserver(helm_binary, kube):
    kube.kubectl("create", "namespace", "mmrank-system", check=False)
    manifests = helm(
        helm_binary,
        "template",
        "mmrank",
        str(CHART),
        "--namespace",
        "mmrank-system",
        "--skip-tests",
        "--set",
        "crds.install=false",
        "-f",
        str(CHART / "values-prod.yaml"),
    ).stdout
    applied = kube.kubectl(
        "apply", "--server-side", "--field-manager=helm-test", "-f", "-", input=manifests, check=False
    )
    assert applied.returncode == 0, applied.stderr
    again = kube.kubectl("apply", "--server-side", "--field-manager=helm-test", "-f", "-", input=manifests)
    assert "serverside-applied" in again.stdout
    got = kube.kubectl("get", "deployment", "-n", "mmrank-system", "-o", "jsonpath={.items[*].metadata.generation}")
    assert got.stdout.split() == ["1"]
    kube.kubectl("delete", "-f", "-", "--wait=false", input=manifests, check=False)


@pytest.mark.apiserver
def test_with_watched_namespaces_the_operator_may_touch_nothing_elsewhere(helm_binary, kube):
    """RBAC enforced by the real apiserver: the operator's ServiceAccount reads Secrets and writes
    Deployments in the namespaces it watches, and nowhere else."""
    for namespace in ("rbac-system", "rbac-watched", "rbac-other"):
        kube.kubectl("create", "namespace", namespace, check=False)
    servers.install_crds(kube.api_client, peering_crds(helm_binary))
    manifests = helm(
        helm_binary,
        "template",
        "mmrank",
        str(CHART),
        "--namespace",
        "rbac-system",
        "--skip-tests",
        "--set",
        "crds.install=false",
        "--set",
        "watchNamespaces={rbac-watched}",
    ).stdout
    applied = kube.kubectl(
        "apply", "--server-side", "--field-manager=helm-test", "-f", "-", input=manifests, check=False
    )
    assert applied.returncode == 0, applied.stderr
    names = {d["metadata"]["name"] for d in yaml.safe_load_all(manifests) if d and d["kind"] == "ServiceAccount"}
    account = f"system:serviceaccount:rbac-system:{names.pop()}"

    def can(verb: str, resource: str, namespace: str, *extra: str) -> bool:
        result = kube.kubectl("auth", "can-i", verb, resource, "-n", namespace, f"--as={account}", *extra, check=False)
        return result.stdout.strip() == "yes"

    assert can("get", "secrets", "rbac-watched") and can("create", "deployments", "rbac-watched")
    assert can("create", "events", "rbac-watched") and not can("create", "events", "rbac-other")
    assert can("patch", "kopfpeerings.kopf.dev", "rbac-watched") and not can(
        "patch", "kopfpeerings.kopf.dev", "rbac-other"
    )
    assert not can("get", "secrets", "rbac-other") and not can("create", "deployments", "rbac-other")
    assert not can("get", "secrets", "rbac-system")
    assert can("list", "customresourcedefinitions.apiextensions.k8s.io", "rbac-other")


def live_crd(kube: Any, name: str = api.CRD_NAME) -> dict | None:
    got = kube.kubectl("get", "crd", name, "-o", "yaml", check=False)
    return yaml.safe_load(got.stdout) if got.returncode == 0 else None


def install(helm_binary: str, kube: Any, verb: str, chart: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`helm install|upgrade` as the docs say on this 1.20 apiserver (client-side apply). The CRD may
    exist already, created by another test or by chart 0.1.x from its crds/ folder:
    --take-ownership adopts it (the documented upgrade from 0.1.x)."""
    result = helm(
        helm_binary,
        verb,
        "mmrank",
        str(chart),
        "--namespace",
        "mmrank-system",
        "--create-namespace",
        "--server-side=false",
        "--take-ownership",
        *args,
        kubeconfig=kube.kubeconfig,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def uninstall(helm_binary: str, kube: Any) -> None:
    result = helm(helm_binary, "uninstall", "mmrank", "--namespace", "mmrank-system", kubeconfig=kube.kubeconfig)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def chart_release(helm_binary, kube):
    """Whatever a test leaves, the release goes and the CRD is back as the other tests install it."""
    yield
    helm(helm_binary, "uninstall", "mmrank", "--namespace", "mmrank-system", kubeconfig=kube.kubeconfig)
    servers.install_crds(kube.api_client, [api_crd.crd_manifest(cel=False)])


@pytest.mark.apiserver
@pytest.mark.parametrize("values", ["values.yaml", *ENVIRONMENTS])
def test_each_environment_installs_on_the_real_apiserver(helm_binary, kube, chart_release, values):
    settings = yaml.safe_load((CHART / values).read_text()) or {}
    for namespace in settings.get("watchNamespaces") or []:  # the Roles go there: they must exist
        kube.kubectl("create", "namespace", namespace, check=False)
    installed = install(helm_binary, kube, "install", CHART, "-f", str(CHART / values))
    assert "evaluates no CEL" in installed.stdout  # NOTES on 1.20
    deployment = yaml.safe_load(
        kube.kubectl("get", "deployment", "-n", "mmrank-system", "mmrank-mmrank-operator", "-o", "yaml").stdout
    )
    assert deployment["spec"]["replicas"] == settings.get("replicaCount", 2)
    crd = live_crd(kube)
    assert crd is not None and crd["metadata"]["annotations"]["mmrank.io/cel"] == "false"  # 1.20: no CEL
    assert "x-kubernetes-validations" not in yaml.safe_dump(crd["spec"])
    for name in CRD_KINDS:
        assert live_crd(kube, name) is not None, name
    kube.kubectl("get", "service", "-n", "mmrank-system", "mmrank-mmrank-operator")
    uninstall(helm_binary, kube)
    gone = kube.kubectl("get", "deployment", "-n", "mmrank-system", "mmrank-mmrank-operator", check=False)
    assert gone.returncode != 0
    assert live_crd(kube) is not None  # crds.keep


def changed_chart(tmp_path: Path) -> Path:
    """The chart with one more optional field in the CRD's spec, as the next release would ship it."""
    chart = tmp_path / "mmrank-operator"
    shutil.copytree(CHART, chart)
    path = chart / "files" / "crds" / "mmrank.io_multimodalrankers.no-cel.yaml"
    crd = yaml.safe_load(path.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["owner"] = {"type": "string", "maxLength": 63, "description": "The team that owns it."}
    path.write_text(yaml.safe_dump(crd, sort_keys=False))
    return chart


@pytest.mark.apiserver
def test_upgrade_applies_a_changed_crd_and_uninstall_keeps_crd_and_rankers_unless_asked(
    helm_binary, kube, chart_release, tmp_path
):
    from kubernetes import client, dynamic

    install(helm_binary, kube, "install", CHART)
    kube.kubectl("create", "namespace", "chart-rankers", check=False)
    rankers = dynamic.DynamicClient(kube.api_client).resources.get(api_version=api.API_VERSION, kind=api.KIND)
    ranker = yaml.safe_load((ROOT / "examples" / "minimal.yaml").read_text())
    ranker["metadata"] = {"name": "kept", "namespace": "chart-rankers"}
    with_owner = copy.deepcopy(ranker)
    with_owner["metadata"]["name"] = "owned"
    with_owner["spec"]["owner"] = "ads-ranking"
    rankers.create(body=ranker, namespace="chart-rankers")
    pruned = rankers.create(body=with_owner, namespace="chart-rankers").to_dict()
    assert "owner" not in pruned["spec"]  # today's schema does not know the field

    install(helm_binary, kube, "upgrade", changed_chart(tmp_path))
    live = live_crd(kube)
    assert live is not None
    assert "owner" in live["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    with_owner["metadata"]["name"] = "owned-after-upgrade"
    stored = rankers.create(body=with_owner, namespace="chart-rankers").to_dict()
    assert stored["spec"]["owner"] == "ads-ranking"  # the new schema is the one the apiserver enforces

    install(helm_binary, kube, "upgrade", CHART)  # and back: the field leaves the schema again
    live = live_crd(kube)
    assert "owner" not in live["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]

    uninstall(helm_binary, kube)
    assert live_crd(kube) is not None
    assert {r["metadata"]["name"] for r in rankers.get(namespace="chart-rankers").to_dict()["items"]} == {
        "kept",
        "owned",
        "owned-after-upgrade",
    }

    # Asked: crds.keep=false, then uninstall deletes the CRDs (and with them every ranker). Rankers
    # other tests left behind with the operator's finalizer and no operator to remove it would hold
    # the CRD in Terminating: the docs say to delete rankers while the operator runs; here nobody runs.
    install(helm_binary, kube, "install", CHART)
    install(helm_binary, kube, "upgrade", CHART, "--set", "crds.keep=false")
    for item in rankers.get().to_dict()["items"]:
        if item["metadata"].get("finalizers"):
            rankers.patch(
                name=item["metadata"]["name"],
                namespace=item["metadata"]["namespace"],
                body={"metadata": {"finalizers": None}},
                content_type="application/merge-patch+json",
            )
    uninstall(helm_binary, kube)
    extensions = client.ApiextensionsV1Api(kube.api_client)
    deadline = time.monotonic() + 60
    while {c.metadata.name for c in extensions.list_custom_resource_definition().items} & CRD_KINDS:
        assert time.monotonic() < deadline, "the CRDs were not deleted within 60 s"
        time.sleep(0.2)
