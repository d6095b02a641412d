"""The whole system on the local node, the way a user deploys it (issue 14).

`helm install` the operator chart with values-dev.yaml → `kubectl apply -f examples/dev.yaml` →
Triton encoder Ready → backfill Job complete → coverage ≥ minCoverage → predictor pods Ready →
rankings through the ranker's Service, scored from vectors read in Redis → a new item posted to
the embedder, in every live space within seconds and used by the next ranking → the embedder's
freshness p99 in status (from the in-cluster Prometheus) → faults: the encoder pod deleted while
items arrive (none lost), Redis stopped (predictors not ready) and started (ready, same vectors)
→ encoder upgrade e2 with ranker r2, e2 backfilled while r1 serves → canary judged by the
in-cluster Prometheus from this traffic and its click feedback, the operator's pod deleted
mid-canary (resumed) → promoted, e1 retired → a ranker r3 its users click less → rolled back →
`kubectl delete` → every child gone.

`./dev.sh test` runs it last, alone (it brings the node up and takes it down; 6-9 minutes on 2
cores with the images cached); by itself:

    ./dev.sh test e2e/test_local_node.py -s

With MMRANK_E2E_KUBECONFIG it runs on that cluster instead (docs/development.md says what the
cluster must provide). The timeline is printed as it happens and saved to
runs/e2e/local-node.png (or cluster.png) and .txt; docs/img/e2e-local-node.png is the run that
docs/benchmarks.md records.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from e2e import artifacts, services
from e2e.node import NAMESPACE, NODE_IMAGES, ApiserverProxy, Node, NodeNetwork, Timeline, Traffic, helm, png, rank
from harness import cluster, images, servers

pytestmark = [pytest.mark.node, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent
# Each run draws its timeline here (not in docs/, which holds the run docs/benchmarks.md records).
RUNS = ROOT / "runs" / "e2e"
RANKER = "shop"
MODEL = "shop-ranker"  # the predictor's model name (children.ranker_model_name)
CLICKS = {"r1": 0.10, "r2": 0.10, "r3": 0.05}  # r3's users click half as often: its canary fails


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    """The local node (brought up and taken down here), or the cluster MMRANK_E2E_KUBECONFIG names."""
    kubeconfig = os.environ.get("MMRANK_E2E_KUBECONFIG")
    if kubeconfig:
        yield from any_cluster(Path(kubeconfig))
        return
    paths = cluster.Paths()
    try:
        cluster.up(images=NODE_IMAGES, log=lambda message: print(f"[cluster] {message}", flush=True))
        cluster.load_images(paths, [services.build(image) for image in services.SERVICE_IMAGES.values()])
    except (cluster.ClusterError, images.ImageBuildError, servers.ServerUnavailable) as exc:
        left = cluster.down(paths=paths)
        pytest.fail(f"the local node cannot start: {exc}" + (f"\nleft behind: {left}" if left else ""), pytrace=False)
    redis_data = Path(services.REDIS_DATA)
    shutil.rmtree(redis_data, ignore_errors=True)
    redis_data.mkdir(parents=True)
    redis_data.chmod(0o777)  # the Redis image's own user writes its append-only file here
    try:
        yield Node(paths.kubeconfig, NodeNetwork())
    finally:
        cluster.down(paths=paths)
        shutil.rmtree(redis_data, ignore_errors=True)


def any_cluster(kubeconfig: Path) -> Iterator[Node]:
    """Another cluster: it must already hold the images (printed here), give claims of its default
    StorageClass, and run every pod of the namespace on one node (the claims are ReadWriteOnce)."""
    wanted = [*(images.TARGETS[t].name for t in NODE_IMAGES), *(i.name for i in services.SERVICE_IMAGES.values())]
    print(
        f"[cluster] {kubeconfig}: the scenario needs these images on the cluster's nodes: {', '.join(wanted)}",
        flush=True,
    )
    reach = ApiserverProxy(kubeconfig)
    node = Node(kubeconfig, reach)
    try:
        yield node
    finally:
        helm(kubeconfig, "uninstall", "mmrank", "--namespace", NAMESPACE)
        node.kubectl("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=180s", check=False)
        reach.close()


def provide_artifacts(node: Node, tree: Path) -> None:
    """The artifacts' claim `mmrank-artifacts`: on the local node a hostPath volume over `tree`; on
    another cluster a new claim, filled by untarring `tree` into a loader pod."""
    if isinstance(node.reach, NodeNetwork):
        node.apply(services.artifacts_volume(tree, NAMESPACE))
        return
    node.apply(
        [
            services.claim(NAMESPACE, "mmrank-artifacts", "2Gi"),
            services.claim(NAMESPACE, services.REDIS_CLAIM, "1Gi"),
            services.artifacts_loader(NAMESPACE),
        ]
    )
    node.kubectl("wait", "-n", NAMESPACE, "pod/artifacts-loader", "--for=condition=Ready", "--timeout=300s")
    # The entries, not ".": a non-root loader may not change the claim's root directory.
    entries = sorted(entry.name for entry in tree.iterdir())
    packed = subprocess.run(["tar", "-C", str(tree), "-cf", "-", *entries], capture_output=True, check=True).stdout
    loaded = subprocess.run(
        [
            servers.find_binary("kubectl", "./dev.sh setup"),
            f"--kubeconfig={node.kubeconfig}",
            "exec",
            "-i",
            "-n",
            NAMESPACE,
            "artifacts-loader",
            "--",
            "tar",
            "-C",
            "/artifacts",
            "--no-same-owner",
            "-m",
            "-xf",
            "-",
        ],
        input=packed,
        capture_output=True,
        timeout=600,
    )
    assert loaded.returncode == 0, loaded.stderr.decode()
    node.kubectl("delete", "-n", NAMESPACE, "pod/artifacts-loader", "--wait=true")


def space_backfilled(node: Node, space: str) -> bool:
    """The Job completed, or it already did and the operator removed it: the Job is gone and
    status shows the space covered (a poll can miss the few seconds between the two)."""
    spaces = {s["version"]: s for s in (node.status().get("embeddings") or {}).get("spaces") or []}
    job = ((spaces.get(space) or {}).get("backfill") or {}).get("job")  # the Job's name carries its shape
    if not job:
        return False
    if node.job_complete(job):
        return True
    return not node.exists("-n", NAMESPACE, "job", job) and (spaces.get(space) or {}).get("coverage", 0) >= 0.99


def post_item(
    embedder: str, item_id: int, title: str, image: np.ndarray, event_time: float | None = None, within: float = 30.0
) -> None:
    """POST /items as a producer does: through the embedder's Service, retried while no embedder
    pod takes it (an encoder upgrade rolls the embedder's pods; the Service follows them)."""
    body = {
        "item_id": item_id,
        "title": title,
        "image": png(np.asarray(image)),
        "event_time": event_time or time.time(),
    }
    deadline, last = time.monotonic() + within, ""
    while time.monotonic() < deadline:
        try:
            response = httpx.post(f"{embedder}/items", json=body, timeout=10)
        except httpx.HTTPError as exc:
            last = repr(exc)
        else:
            if response.status_code in (200, 202):
                return
            last = f"{response.status_code} {response.text[:200]}"
            if response.status_code != 503:
                break
        time.sleep(0.5)
    raise AssertionError(f"POST /items of item {item_id} not taken within {within:.0f} s: {last}")


def encoder_pod_deleted_mid_stream(
    node: Node,
    store,
    embedder: str,
    catalogue: np.ndarray,  # type: ignore[no-untyped-def]
    timeline: Timeline,
    items: range,
) -> None:
    """Items keep arriving while the only encoder pod is deleted: the embedder retries until the
    Deployment's new pod serves, and every item ends up in the space (none dropped or
    dead-lettered)."""
    pods = node.kubectl(
        "get",
        "-n",
        NAMESPACE,
        "pods",
        "-l",
        "app.kubernetes.io/component=encoder,mmrank.io/encoder-version=e1",
        "-o",
        "name",
    ).split()
    assert pods, "no encoder pod to delete"
    deleted = threading.Event()

    def delete_soon() -> None:
        time.sleep(1.0)
        node.kubectl("delete", "-n", NAMESPACE, *pods, "--wait=false")
        timeline.mark(f"encoder pod deleted while items {items.start}-{items.stop - 1} arrive")
        deleted.set()

    threading.Thread(target=delete_soon, daemon=True).start()
    for item in items:
        post_item(embedder, item, f"striped tote {item}", catalogue[item % len(catalogue)])
        time.sleep(0.1)
    assert deleted.wait(30)
    timeline.mark(f"items {items.start}-{items.stop - 1} posted")
    node.wait(f"all {len(items)} items in space e1", lambda: bool(store.get("e1", list(items))[1].all()), 240, poll=0.5)
    timeline.mark(f"all {len(items)} items in e1 (none lost)")
    node.wait("encoder e1 Ready again", lambda: node.deployment_ready("shop-encoder-e1"), 240)


def redis_stopped_and_started(node: Node, url: str, items: list[int], timeline: Timeline) -> None:
    """Redis goes away: the predictors report not ready (their readiness re-checks the store), and
    serve again, from the same vectors, once it is back."""
    node.kubectl("scale", "-n", NAMESPACE, "deployment/redis", "--replicas=0")
    timeline.mark("Redis stopped (scaled to 0)")
    node.wait("predictors r1 not ready", lambda: node.ready_replicas("shop-ranker-r1") == 0, 120)
    timeline.mark("predictor pods r1 not ready")
    node.kubectl("scale", "-n", NAMESPACE, "deployment/redis", "--replicas=1")
    node.wait("Redis Ready again", lambda: node.deployment_ready("redis"), 120)
    node.redis_url()  # through the apiserver: the port-forward follows the new pod
    timeline.mark("Redis started again (same append-only file)")
    node.wait("predictors r1 Ready again", lambda: node.deployment_ready("shop-ranker-r1"), 120)
    answer = node.wait("a ranking after Redis came back", lambda: rank(url, MODEL, 1, items[:20]), 60)
    assert answer["embedding_misses"]["candidates"] == 0, answer  # the vectors survived the restart
    timeline.mark("predictor pods r1 Ready, rankings answered again")


def embedder_writes(node: Node, spaces: set[str]) -> bool:
    """The embedder Deployment rolled out with exactly these live spaces, its old pods gone."""
    body = node.get("-n", NAMESPACE, "deployment", "shop-embedder")
    env = {e["name"]: e.get("value", "") for e in body["spec"]["template"]["spec"]["containers"][0].get("env", [])}
    written = {pair.split("=", 1)[0] for pair in env.get("MMRANK_ENCODERS", "").split(",") if pair}
    rolled = (body.get("status") or {}).get("observedGeneration", 0) >= body["metadata"]["generation"]
    return written == spaces and rolled and node.deployment_ready("shop-embedder")


def in_spaces(store, item: int, spaces: tuple[str, ...]) -> bool:  # type: ignore[no-untyped-def]
    """True once the item is in every space; else an AssertionError saying where it is."""
    found = {space: bool(store.get(space, [item])[1][0]) for space in spaces}
    if not all(found.values()):
        raise AssertionError(f"item {item} by space: {found}")
    return True


def dev_ranker() -> dict:
    return yaml.safe_load((ROOT / "examples" / "dev.yaml").read_text())


def test_helm_install_apply_rank_fresh_item_upgrade_canary_rollback_delete(node: Node) -> None:
    timeline = Timeline()
    tree = artifacts.build(log=lambda line: print(f"[artifacts] {line}", flush=True))
    catalogue = np.load(tree / "catalogue" / "images.npy", mmap_mode="r")
    items = list(range(600))

    # --- the cluster's own services, the artifacts' claim, the operator -----------------------
    node.kubectl("create", "namespace", NAMESPACE)
    provide_artifacts(node, tree)
    node.apply(
        services.manifests(
            NAMESPACE,
            None
            if isinstance(node.reach, NodeNetwork)
            else {"persistentVolumeClaim": {"claimName": services.REDIS_CLAIM}},
        )
    )
    node.wait(
        "Redis and Prometheus Ready",
        lambda: node.deployment_ready("redis") and node.deployment_ready("prometheus"),
        120,
    )
    timeline.mark("Redis and Prometheus Ready")
    from kubernetes import config as kube_config

    if not node.exists("crd", "inferenceservices.serving.kserve.io"):  # the operator lists them when present
        servers.install_crds(
            kube_config.new_client_from_config(config_file=str(node.kubeconfig)),
            servers.kserve_crds_for_k8s_1_20(servers.shared_dir() / "schemas" / "kserve"),
        )
    chart = ROOT / "charts" / "mmrank-operator"
    installed = helm(
        node.kubeconfig,
        "install",
        "mmrank",
        str(chart),
        "-f",
        str(chart / "values-dev.yaml"),
        "--namespace",
        NAMESPACE,
        "--wait",
        "--timeout",
        "180s",
        "--server-side=false",
    )
    assert installed.returncode == 0, installed.stderr + node.events()
    timeline.mark("helm install: operator Ready")
    tested = helm(node.kubeconfig, "test", "mmrank", "--namespace", NAMESPACE, "--timeout", "120s")
    assert tested.returncode == 0, tested.stdout + tested.stderr + node.events()
    timeline.mark("helm test: the operator answers through its Service")

    # --- apply the ranker: encoder, backfill, coverage, predictors, first ranking -------------
    node.kubectl("apply", "-n", NAMESPACE, "-f", str(ROOT / "examples" / "dev.yaml"))
    applied = timeline.mark("kubectl apply -n mmrank-dev -f examples/dev.yaml")
    node.wait("Triton encoder e1 Ready", lambda: node.deployment_ready("shop-encoder-e1"), 300)
    timeline.mark("Triton encoder e1 Ready")
    node.wait("backfill Job e1 complete", lambda: space_backfilled(node, "e1"), 300)
    timeline.mark("backfill Job e1 complete")
    node.wait(
        "coverage >= minCoverage", lambda: ((node.status().get("embeddings") or {}).get("coverage") or 0) >= 0.99, 120
    )
    timeline.mark("coverage of e1 >= 0.99 in status")
    node.wait("predictors r1 Ready", lambda: node.deployment_ready("shop-ranker-r1"), 300)
    timeline.mark("predictor pods r1 Ready (2 of 2)")
    url = node.service_url("shop-ranker", 8080)
    answer = node.wait("a ranking through the Service", lambda: rank(url, MODEL, 1, items[:20]), 60)
    first = timeline.mark("first ranking answered through Service shop-ranker")
    assert answer["ranker_version"] == "r1" and answer["space"] == "e1"
    assert len(answer["predictions"]) == 20 and answer["embedding_misses"]["candidates"] == 0
    assert all(0.0 < p < 1.0 for p in answer["predictions"])
    print(f"apply -> first answered ranking: {first - applied:.1f} s", flush=True)

    traffic = Traffic(url, MODEL, items, click_probability=CLICKS, clock=timeline.now).start()
    try:
        # --- a new item, embedded within seconds, used by the next ranking ----------------------
        from mmrank.store import Scope, open_store

        store = open_store(node.redis_url(), Scope(NAMESPACE, RANKER))
        embedder = node.service_url("shop-embedder", 8080)
        node.wait("embedder Ready", lambda: httpx.get(f"{embedder}/readyz", timeout=5).status_code == 200, 120)
        new_item = 600
        posted = time.time()
        post_item(embedder, new_item, "linen shirt new arrival", catalogue[0], event_time=posted)
        timeline.mark("new item 600 posted to the embedder")
        node.wait("item 600 in space e1", lambda: bool(store.get("e1", [new_item])[1][0]), 30, poll=0.05)
        fresh = time.time() - posted
        timeline.mark(f"item 600 in space e1 ({fresh:.2f} s after posting)")
        assert fresh < 10
        again = rank(url, MODEL, 1, [new_item, *items[:9]])
        assert again["embedding_misses"]["candidates"] == 0
        # A rate needs two scrapes of the embedder's histogram: a few more items, seconds apart.
        for more in range(601, 606):
            time.sleep(1.5)
            post_item(embedder, more, "cotton scarf", catalogue[more % 600])
        node.wait(
            "freshnessP99Seconds in status",
            lambda: (node.status().get("embeddings") or {}).get("freshnessP99Seconds") is not None,
            150,
            poll=2,
        )
        freshness = node.status()["embeddings"]["freshnessP99Seconds"]
        timeline.mark(f"status.embeddings.freshnessP99Seconds = {freshness:.2f}")

        # --- faults: the encoder pod deleted mid-stream, Redis stopped ------------------------------
        encoder_pod_deleted_mid_stream(node, store, embedder, catalogue, timeline, range(700, 740))
        redis_stopped_and_started(node, url, items, timeline)
        node.wait("every ranking answered again for 5 s", lambda: traffic.clean_for(5.0), 60)
        timeline.mark("every ranking answered again for 5 s")

        # --- encoder upgrade e2 + ranker r2, judged as a canary, promoted --------------------------
        upgrade = dev_ranker()
        upgrade["spec"]["encoder"].update(version="e2", modelUri="pvc://mmrank-artifacts/encoders/e2")
        upgrade["spec"]["ranker"].update(
            version="r2", modelUri="pvc://mmrank-artifacts/rankers/r2", encoderVersion="e2"
        )
        node.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(upgrade))
        upgraded = timeline.mark("kubectl apply: encoder e2 + ranker r2")
        node.wait("Triton encoder e2 Ready", lambda: node.deployment_ready("shop-encoder-e2"), 300)
        timeline.mark("Triton encoder e2 Ready")
        node.wait("backfill Job e2 complete", lambda: space_backfilled(node, "e2"), 300)
        backfilled = timeline.mark("backfill Job e2 complete")
        during = traffic.served_since(upgraded)
        assert during.get("r1", 0) > 0 and set(during) == {"r1"}, (during, traffic.error_messages)  # r1 alone, no error
        # An item posted once the embedder's pods know both live spaces goes into both. (One the
        # old embedder took between the upgrade and its restart went into e1 only: docs/streams.md.)
        node.wait("the embedder writes e1 and e2", lambda: embedder_writes(node, {"e1", "e2"}), 180)
        timeline.mark("embedder restarted with e1 and e2")
        second = 610
        post_item(embedder, second, "wool coat", catalogue[1])
        node.wait("item 610 in both live spaces", lambda: in_spaces(store, second, ("e1", "e2")), 60, poll=0.1)
        timeline.mark("item 610 in both live spaces e1 and e2")
        node.wait(
            "canary r2 Progressing",
            lambda: (node.status().get("canary") or {}).get("rankerVersion") == "r2",
            300,
            poll=1,
        )
        timeline.mark("canary r2 Progressing (50 %)")
        # The operator's pod goes away mid-canary: a new one resumes from status, not from scratch.
        operators = node.kubectl(
            "get", "-n", NAMESPACE, "pods", "-l", "app.kubernetes.io/name=mmrank-operator", "-o", "name"
        ).split()
        node.kubectl("delete", "-n", NAMESPACE, *operators, "--wait=false")
        timeline.mark(f"operator pod deleted mid-canary ({len(operators)} pod(s))")
        node.wait(
            "a new operator pod Ready",
            lambda: (
                node.deployment_ready("mmrank-mmrank-operator")
                and not set(operators)
                & set(
                    node.kubectl(
                        "get", "-n", NAMESPACE, "pods", "-l", "app.kubernetes.io/name=mmrank-operator", "-o", "name"
                    ).split()
                )
            ),
            180,
        )
        timeline.mark("operator Ready again")
        node.wait("canary r2 answers", lambda: traffic.served_since(backfilled).get("r2", 0) > 0, 300)
        timeline.mark("canary r2 answers through the Service")
        node.wait(
            "r2 promoted",
            lambda: (
                (node.status().get("stable") or {}).get("rankerVersion") == "r2" and not node.status().get("canary")
            ),
            400,
            poll=1,
        )
        promoted = timeline.mark("r2 promoted (stable r2 on e2)")
        history = [(h["rankerVersion"], h["reason"]) for h in node.status().get("history", [])]
        print("history:", history, flush=True)
        assert history.count(("r2", "CanaryStarted")) == 1, history  # resumed, not restarted
        assert ("r2", "Promoted") in history, history
        node.wait(
            "encoder e1 retired",
            lambda: (
                not node.exists("-n", NAMESPACE, "deployment", "shop-encoder-e1")
                and not node.exists("-n", NAMESPACE, "deployment", "shop-ranker-r1")
            ),
            120,
        )
        timeline.mark("encoder e1 and ranker r1 retired")

        # --- a ranker its users like less: rolled back ------------------------------------------
        bad = dev_ranker()
        bad["spec"]["encoder"].update(version="e2", modelUri="pvc://mmrank-artifacts/encoders/e2")
        bad["spec"]["ranker"].update(version="r3", modelUri="pvc://mmrank-artifacts/rankers/r3", encoderVersion="e2")
        node.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(bad))
        bad_applied = timeline.mark("kubectl apply: ranker r3")
        node.wait(
            "canary r3 Progressing",
            lambda: (
                (node.status().get("canary") or {}).get("rankerVersion") == "r3"
                and node.status()["canary"].get("state") == "Progressing"
            ),
            400,
        )
        timeline.mark("canary r3 Progressing (50 %)")
        node.wait(
            "r3 rolled back", lambda: (node.status().get("canary") or {}).get("state") == "RolledBack", 400, poll=1
        )
        timeline.mark("r3 rolled back")
        status = node.status()
        assert status["phase"] == "RolledBack" and status["stable"]["rankerVersion"] == "r2", status
        print("last analysis:", json.dumps(status["canary"].get("lastAnalysis")), flush=True)
        # Until its pod is gone a terminating r3 still answers what kube-proxy had sent it.
        node.wait(
            "r3 pods gone",
            lambda: (
                not node.exists("-n", NAMESPACE, "deployment", "shop-ranker-r3")
                and not node.exists("-n", NAMESPACE, "pods", "-l", "mmrank.io/ranker-version=r3")
            ),
            120,
        )
        rolled_back = timeline.mark("ranker r3's pods gone, r2 serves alone")
        time.sleep(1)
        settled = timeline.now()
        time.sleep(5)
        assert set(traffic.served_since(settled)) == {"r2"}
    finally:
        traffic.stop()
    tallies = {v: vars(t) for v, t in traffic.tallies.items()}
    print("traffic:", json.dumps(tallies), "unanswered:", traffic.unanswered, flush=True)
    assert tallies["r3"]["clicks"] < tallies["r2"]["clicks"]

    # --- delete: every child gone -------------------------------------------------------------
    node.kubectl("delete", "-n", NAMESPACE, "multimodalranker", RANKER, "--wait=true", "--timeout=120s")
    selector = f"mmrank.io/ranker={RANKER}"
    node.wait(
        "every child gone",
        lambda: (
            not node.kubectl(
                "get",
                "-n",
                NAMESPACE,
                "deployments,replicasets,jobs,services,configmaps,pods",
                "-l",
                selector,
                "-o",
                "name",
                check=False,
            ).strip()
        ),
        180,
    )
    timeline.mark("kubectl delete: every child gone")
    if isinstance(node.reach, NodeNetwork):
        timeline.save(RUNS / "local-node.png", "mmrank on the local node (examples/dev.yaml, 2 cores)")
    else:
        timeline.save(RUNS / "cluster.png", f"mmrank on {os.environ['MMRANK_E2E_KUBECONFIG']} (examples/dev.yaml)")
    print(
        json.dumps(
            {
                "apply_to_first_ranking_s": round(first - applied, 1),
                "fresh_item_s": round(fresh, 2),
                "freshness_p99_s": freshness,
                "upgrade_to_promotion_s": round(promoted - upgraded, 1),
                "r3_apply_to_rollback_s": round(rolled_back - bad_applied, 1),
            }
        ),
        flush=True,
    )
