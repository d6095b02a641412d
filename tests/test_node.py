"""The local node (harness.cluster): real kubelet, containerd, controllers, kube-proxy and DNS,
running the images built from our Dockerfile.

One cluster for the test session; the last test takes it down, checks nothing is left, and
times a warm `up`. A node that cannot start fails every test here with the reason.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import cluster, images, servers

pytestmark = [pytest.mark.node, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
NS = "node-test"
RUNTIME = images.TARGETS["runtime"].name


IMAGES = ("operator", "runtime", "triton")


@pytest.mark.timeout(1800)  # cold: debootstrap, every dependency from PyPI, three targets
def test_images_build_from_a_clean_clone_and_a_second_build_is_a_lookup(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True, timeout=120)
    for target in IMAGES:
        try:
            first = images.build(target, root=clone, log=tmp_path / f"build-{target}.log")
        except images.ImageBuildError as exc:
            pytest.fail(str(exc), pytrace=False)
        started = time.monotonic()
        assert images.build(target, root=clone) == first
        assert time.monotonic() - started < 10
        assert first.stat().st_size > 0


@pytest.fixture(scope="session")
def node() -> Iterator[cluster.Paths]:
    paths = cluster.Paths()
    try:
        cluster.up(images=IMAGES, log=lambda message: print(f"[cluster] {message}"))
    except (cluster.ClusterError, images.ImageBuildError, servers.ServerUnavailable) as exc:
        left = cluster.down(paths=paths)
        pytest.fail(f"the local node cannot start: {exc}" + (f"\nleft behind: {left}" if left else ""), pytrace=False)
    kubectl(paths, "create", "namespace", NS)
    yield paths
    cluster.down(paths=paths)


def kubectl(paths: cluster.Paths, *args: str, check: bool = True, input: str | None = None) -> str:
    result = cluster.kubectl(paths, *args, check=False, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr}")
    return result.stdout


def wait_for(what: str, check, timeout: float = 120.0, paths: cluster.Paths | None = None):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    events = kubectl(paths, "get", "events", "-A", "--sort-by=.lastTimestamp", check=False)[-3000:] if paths else ""
    raise AssertionError(f"{what} not within {timeout:.0f} s (last: {last!r})\n{events}")


def get(paths: cluster.Paths, *args: str) -> dict:
    return json.loads(kubectl(paths, "get", "-o", "json", *args))


@pytest.mark.timeout(1800)  # the session's node starts here (image builds and imports included)
def test_the_node_is_ready_with_kubernetes_1_20(node):
    info = get(node, "node", cluster.NODE_NAME)
    ready = {c["type"]: c["status"] for c in info["status"]["conditions"]}["Ready"]
    assert ready == "True"
    assert info["status"]["nodeInfo"]["kubeletVersion"].startswith("v1.20")
    assert info["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://1.6")
    assert {"type": "InternalIP", "address": cluster.NETWORK.gateway} in info["status"]["addresses"]


WEB = f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: {NS}, labels: {{app: web}}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 1     # http.server as PID 1 ignores SIGTERM
      containers:
        - name: web
          image: {RUNTIME}
          imagePullPolicy: Never
          # The runtime image's own CLI, served over HTTP: `mmrank --help` as help.txt.
          command: [sh, -c, "cd /tmp && mmrank --help > help.txt && exec python -m http.server 8080"]
          ports: [{{containerPort: 8080}}]
          readinessProbe: {{httpGet: {{path: /help.txt, port: 8080}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {NS}}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080}}]
"""

# Retries (bounded: 20 tries in 10 s per URL) cover kube-proxy writing the Service's rules a moment
# after the endpoints controller lists the pod.
CLIENT = """
import sys, time, urllib.request
ok = True
for url in sys.argv[1:]:
    for attempt in range(20):
        try:
            body = urllib.request.urlopen(url, timeout=5).read().decode()
            print(url, "predictor" in body and "operator" in body)
            ok = ok and "predictor" in body
            break
        except Exception as exc:
            error = exc
            time.sleep(0.5)
    else:
        print(url, "error", error)
        ok = False
sys.exit(0 if ok else 1)
"""


def client_pod(name: str, urls: list[str]) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "client",
                        "image": RUNTIME,
                        "imagePullPolicy": "Never",
                        "command": ["python", "-c", textwrap.dedent(CLIENT), *urls],
                    }
                ],
            },
        }
    )


def test_a_deployment_of_the_runtime_image_answers_on_its_cluster_ip_and_dns_names(node):
    kubectl(node, "apply", "-f", "-", input=WEB)
    wait_for(
        "web Deployment available",
        lambda: get(node, "-n", NS, "deployment", "web")["status"].get("availableReplicas") == 1,
        paths=node,
    )
    wait_for(
        "the Service's endpoints",
        lambda: any(subset.get("addresses") for subset in get(node, "-n", NS, "endpoints", "web").get("subsets") or []),
        paths=node,
    )
    ip = get(node, "-n", NS, "service", "web")["spec"]["clusterIP"]
    urls = [f"http://{ip}/help.txt", f"http://web.{NS}.svc.cluster.local/help.txt", "http://web/help.txt"]
    kubectl(node, "apply", "-f", "-", input=client_pod("client", urls))
    phase = wait_for(
        "client pod finished",
        lambda: (
            get(node, "-n", NS, "pod", "client")["status"].get("phase") in ("Succeeded", "Failed")
            and get(node, "-n", NS, "pod", "client")["status"]["phase"]
        ),
        paths=node,
    )
    logs = kubectl(node, "-n", NS, "logs", "client")
    assert phase == "Succeeded", logs
    # `kubectl logs` went apiserver -> kubelet -> the container's log file.
    assert logs.splitlines() == [f"{url} True" for url in urls]


def test_the_triton_image_serves_on_the_cpu_as_a_non_root_user(node):
    triton = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "triton", "namespace": NS},
        "spec": {
            "containers": [
                {
                    "name": "triton",
                    "image": images.TARGETS["triton"].name,
                    "imagePullPolicy": "Never",
                    "args": ["tritonserver", "--model-repository=/models", "--strict-readiness=true"],
                    "volumeMounts": [{"name": "models", "mountPath": "/models"}],
                    "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": 8000}, "periodSeconds": 1},
                }
            ],
            "volumes": [{"name": "models", "emptyDir": {}}],
        },
    }
    kubectl(node, "apply", "-f", "-", input=json.dumps(triton))
    wait_for(
        "Triton ready",
        lambda: all(
            c.get("ready") for c in get(node, "-n", NS, "pod", "triton")["status"].get("containerStatuses", [{}])
        ),
        paths=node,
    )
    probe = kubectl(
        node,
        "-n",
        NS,
        "exec",
        "triton",
        "--",
        "python3",
        "-c",
        "import os, numpy, torch; print(os.getuid(), numpy.__version__.split('.')[0], torch.__version__)",
    )
    uid, numpy_major, torch_version = probe.split()
    assert uid == "10001" and numpy_major == "1" and torch_version.startswith("2.13.0")
    assert "Started HTTPService" in kubectl(node, "-n", NS, "logs", "triton")


def test_a_job_of_the_runtime_image_completes(node):
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "crd", "namespace": NS},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "crd",
                            "image": RUNTIME,
                            "imagePullPolicy": "Never",
                            "command": ["mmrank", "crd", "--no-cel"],
                        }
                    ],
                }
            },
        },
    }
    kubectl(node, "apply", "-f", "-", input=json.dumps(job))
    wait_for("Job succeeded", lambda: get(node, "-n", NS, "job", "crd")["status"].get("succeeded") == 1, paths=node)
    assert "kind: CustomResourceDefinition" in kubectl(node, "-n", NS, "logs", "job/crd")


def test_deleting_an_owner_collects_its_children(node):
    kubectl(node, "apply", "-f", "-", input=WEB)
    wait_for("web pods", lambda: get(node, "-n", NS, "pods", "-l", "app=web")["items"], paths=node)
    replicasets = get(node, "-n", NS, "replicasets", "-l", "app=web")["items"]
    assert replicasets and replicasets[0]["metadata"]["ownerReferences"][0]["kind"] == "Deployment"
    kubectl(node, "-n", NS, "delete", "deployment", "web", "--wait=false")
    wait_for(
        "ReplicaSets and pods collected",
        lambda: (
            not get(node, "-n", NS, "replicasets", "-l", "app=web")["items"]
            and not get(node, "-n", NS, "pods", "-l", "app=web")["items"]
        ),
        timeout=90,
        paths=node,
    )


def test_the_operator_chart_runs_under_its_own_service_account(node, helm_binary):
    env_kubeconfig = f"--kubeconfig={node.kubeconfig}"
    result = subprocess.run(
        [
            helm_binary,
            env_kubeconfig,
            "install",
            "mmrank",
            str(ROOT / "charts" / "mmrank-operator"),
            "-f",
            str(ROOT / "charts" / "mmrank-operator" / "values-dev.yaml"),
            "--namespace",
            "mmrank-dev",
            "--create-namespace",
            "--wait",
            "--timeout",
            "180s",
            # Helm 4 applies server-side by default; 1.20 refuses the CRD's CEL rules
            # that way ("field not declared in schema") and drops them on a create.
            "--server-side=false",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    pods = get(node, "-n", "mmrank-dev", "pods")["items"]
    assert result.returncode == 0, f"{result.stderr}\n{json.dumps([p['status'] for p in pods])[:3000]}"
    assert len(pods) == 1
    pod = pods[0]
    account = pod["spec"]["serviceAccountName"]
    assert account != "default" and account in kubectl(node, "-n", "mmrank-dev", "get", "serviceaccounts")
    assert pod["spec"]["containers"][0]["args"][:2] == ["operator", "run"]
    as_operator = f"--as=system:serviceaccount:mmrank-dev:{account}"
    # RBAC is enforced: what the chart grants and nothing more.
    assert (
        kubectl(
            node, "auth", "can-i", "patch", "multimodalrankers/status", "-n", "mmrank-dev", as_operator, check=False
        ).strip()
        == "yes"
    )
    assert kubectl(node, "auth", "can-i", "delete", "nodes", as_operator, check=False).strip() == "no"

    # KServe's CRDs without its controller: the operator lists InferenceServices among a ranker's
    # children even with `serving: Kubernetes`, and fails every reconcile where the kind is unknown.
    from kubernetes import config as kube_config

    servers.install_crds(
        kube_config.new_client_from_config(config_file=str(node.kubeconfig)),
        servers.kserve_crds_for_k8s_1_20(servers.shared_dir() / "schemas" / "kserve"),
    )
    ranker = {
        "apiVersion": "mmrank.io/v1alpha1",
        "kind": "MultimodalRanker",
        "metadata": {"name": "shop", "namespace": "mmrank-dev"},
        "spec": {
            "encoder": {"version": "e1", "modelUri": "pvc://models/encoder/e1", "gpus": 0},
            "ranker": {
                "version": "r1",
                "modelUri": "pvc://models/ranker/r1",
                "encoderVersion": "e1",
                "serving": "Kubernetes",
            },
            "embeddings": {"store": {"url": "redis://redis.mmrank-dev.svc:6379/0"}},
        },
    }
    kubectl(node, "apply", "-f", "-", input=json.dumps(ranker))

    def children_and_status():  # type: ignore[no-untyped-def]
        body = get(node, "-n", "mmrank-dev", "multimodalrankers", "shop")
        owned = [
            d
            for d in get(node, "-n", "mmrank-dev", "deployments,configmaps")["items"]
            if any(r.get("name") == "shop" for r in d["metadata"].get("ownerReferences", []))
        ]
        return (body.get("status") or {}).get("phase") and owned and (body["status"], owned)

    operator_logs = lambda: kubectl(node, "-n", "mmrank-dev", "logs", pod["metadata"]["name"], check=False)[-4000:]  # noqa: E731
    try:
        status, owned = wait_for("the operator's children and status", children_and_status, timeout=120)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\noperator log:\n{operator_logs()}") from None
    assert status["phase"] in ("Provisioning", "Backfilling", "Progressing", "Ready", "Failed"), status
    assert {"Deployment", "ConfigMap"} <= {o["kind"] for o in owned}


def test_down_leaves_nothing_and_a_warm_up_is_quick(node):
    assert cluster.down(paths=node) == []
    assert cluster.leftovers(node) == []
    # Warm: binaries built and images cached (no image argument, so a concurrent edit of the
    # sources, which changes the images' content keys, cannot turn this into a build).
    started = time.monotonic()
    cluster.up(images=(), paths=node)
    warm = time.monotonic() - started
    try:
        assert cluster.healthy(node)
        assert warm < 60, f"warm up took {warm:.0f} s"
    finally:
        assert cluster.down(paths=node) == []
