"""Rankers sharing one store never disturb each other (issue 16, item 3).

Two rankers with the same encoder version `e1` on one real Redis (and on one LMDB file): writing,
retiring and deleting one leaves the other's vectors, catalogue size, backfill progress,
histories, stream entries and pending consumer group as they were, byte for byte. Then the
operator's delete step against the real apiserver and the real Redis: a deleted ranker's keys
go only after its children are gone, the others' stay, a shared item stream keeps the other
rankers' groups, and an unreachable store is a Warning and a condition until it comes back.
(The embedders of two rankers, each receiving every item of its own stream: test_embedder.py,
which has the Triton they need.)
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from harness import servers
from mmrank.operator import observe
from mmrank.store import DEFAULT_SCOPE, EmbeddingStore, FileStore, RedisStore, Scope, open_store
from tests.test_operator_apiserver import Cluster, crds_installed, manifest, wait_for  # noqa: F401 - a fixture

ITEMS = 20
PAIRS = {
    "same namespace, other name": (Scope("ads", "shop"), Scope("ads", "shop-eu")),
    "same name, other namespace": (Scope("ads", "shop"), Scope("ads-eu", "shop")),
}


def seed(store: EmbeddingStore, space: str = "e1", offset: float = 0.0) -> None:
    """A ranker's data: a covered space, its backfill progress and a user history."""
    store.create_space(space, 8)
    vectors = np.eye(8, dtype=np.float32)[np.arange(ITEMS) % 8] + offset
    store.put(space, np.arange(ITEMS), vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    store.set_catalogue_size(space, ITEMS)
    store.report_backfill(space, "0/1", ITEMS, ITEMS)
    store.put_history(1, [3, 4, 5])


def seed_streams(client: redis.Redis, scope: Scope, stream: str | None = None) -> None:
    """Three item events (one delivered, not acknowledged), a dead letter and a feedback entry."""
    stream = stream or scope.item_stream
    for i in range(3):
        client.xadd(stream, {"item_id": str(i), "title": f"shirt {i}"})
    client.xgroup_create(stream, scope.consumer_group(), id="0")
    client.xreadgroup(scope.consumer_group(), "pod-a", {stream: ">"}, count=1)
    client.xadd(scope.dead_letter_stream, {"item_id": "9", "reason": "empty_title"})
    client.xadd(scope.feedback_stream, {"request_id": "r", "impressions": 1, "clicks": 0})


def keys(client: redis.Redis, scope: Scope) -> list[bytes]:
    return sorted(client.scan_iter(match=scope.keys_pattern, count=1000))


def snapshot(client: redis.Redis, scope: Scope) -> dict[bytes, bytes]:
    """Every key of the ranker and its serialized value (DUMP: vectors, entries, groups, pending)."""
    return {key: client.dump(key) for key in keys(client, scope)}


def view(store: EmbeddingStore) -> dict[str, Any]:
    """What a ranker reads back (both back ends)."""
    info = store.space_info("e1")
    vectors, found = store.get("e1", np.arange(ITEMS))
    return {
        "spaces": store.spaces(),
        "items": info.items,
        "catalogue": store.catalogue_size("e1"),
        "coverage": info.coverage,
        "backfill": {k: (v.done, v.total) for k, v in info.backfill.items()},
        "found": found.tolist(),
        "vectors": vectors.round(3).tolist(),
        "history": store.get_history(1, 10).tolist(),
    }


@pytest.fixture(params=["redis", "file"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[EmbeddingStore, str]]:
    """One store two rankers share: the real Redis or one LMDB environment."""
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else f"file://{tmp_path / 'store'}"
    store = open_store(url)
    yield store, url
    store.close()


@pytest.mark.parametrize("pair", PAIRS.values(), ids=list(PAIRS))
def test_writing_retiring_and_deleting_one_ranker_leaves_the_other_intact(
    shared_store: tuple[EmbeddingStore, str], pair: tuple[Scope, Scope]
) -> None:
    base, url = shared_store
    a, b = base.for_scope(pair[0]), base.for_scope(pair[1])
    seed(a)
    seed(b, offset=0.5)
    client = base.client if isinstance(base, RedisStore) else None
    if client is not None:
        seed_streams(client, pair[0])
        seed_streams(client, pair[1])
        before = snapshot(client, pair[1])
    other = view(b)
    assert other["coverage"] == 1.0 and other["catalogue"] == ITEMS

    # writing: the same space name and item ids, other vectors and catalogue size
    a.put("e1", np.arange(ITEMS), np.full((ITEMS, 8), -0.3, np.float32))
    a.set_catalogue_size("e1", 2 * ITEMS)
    a.put_history(1, [7])
    assert a.space_info("e1").coverage == 0.5 and view(b) == other

    # retiring e1 as the operator does it (its observer, with the ranker's scope)
    if isinstance(base, RedisStore):
        observe.StoreCoverage().delete_space(url, None, "e1", scope=str(pair[0]))
    else:
        a.delete_space("e1")
    assert a.spaces() == [] and a.catalogue_size("e1") == 0
    assert view(b) == other

    # deleting the ranker: everything of it, nothing of the other
    seed(a)
    if client is not None:
        held = len(keys(client, pair[0]))
    deleted = a.delete_scope()
    assert deleted.spaces == ["e1"]
    assert a.spaces() == [] and a.get_history(1, 10).size == 0 and a.catalogue_size("e1") == 0
    assert view(b) == other
    if client is not None:
        assert deleted.keys == held and keys(client, pair[0]) == []
        assert snapshot(client, pair[1]) == before, "the other ranker's keys changed"
        assert client.xlen(pair[1].item_stream) == 3
        assert client.xpending(pair[1].item_stream, pair[1].consumer_group())["pending"] == 1


def test_the_operator_deletes_a_ranker_whose_named_stream_never_existed(redis_server: servers.Server) -> None:
    """A stream named in the spec that nobody ever wrote: nothing to leave, no error; the ranker's
    own keys go, another ranker's stay."""
    client = redis.Redis.from_url(redis_server.url)
    seed(RedisStore(client, Scope("ads", "shop")))
    seed(RedisStore(client, Scope("ads", "shop-eu")))
    before = snapshot(client, Scope("ads", "shop-eu"))
    deleted = observe.StoreCoverage().delete_ranker(
        redis_server.url, None, scope="ads/shop", stream="never:items", group="embedder"
    )
    assert (deleted.keys, deleted.spaces) == (9, ["e1"])
    assert keys(client, Scope("ads", "shop")) == [] and client.exists("never:items") == 0
    assert snapshot(client, Scope("ads", "shop-eu")) == before


def test_every_key_of_a_ranker_is_in_one_cluster_slot_under_its_prefix(redis_server: servers.Server) -> None:
    """The Lua script of `put` and the MULTI of `delete_space` touch several keys: in a Redis
    Cluster they must share a slot, which the `{namespace/name}` hash tag gives them."""
    from redis.crc import key_slot

    client = redis.Redis.from_url(redis_server.url)
    scope = Scope("ads", "shop")
    store = RedisStore(client, scope)
    seed(store)
    seed_streams(client, scope)
    held = sorted(k.decode() for k in client.keys("*"))
    layout = [
        "backfill:e1",
        "catalogue:e1",
        "emb-time:e1",
        "emb:e1",
        "embchanges:e1",
        "embver:e1",
        "feedback",
        "history:1",
        "items",
        "items:dead",
        "space:e1",
        "spaces",
    ]
    assert held == [f"mmrank:{{ads/shop}}:{k}" for k in layout]
    assert {key_slot(k.encode()) for k in held} == {key_slot(b"{ads/shop}")}


def test_scopes_are_checked_and_the_local_default_is_one(tmp_path: Path) -> None:
    assert Scope.parse("mmrank-dev/shop") == Scope("mmrank-dev", "shop")
    assert str(Scope("ads", "shop.v2")) == "ads/shop.v2"
    assert Scope("ads", "shop").item_stream == "mmrank:{ads/shop}:items"
    assert Scope("ads", "shop").consumer_group("embedder") == "mmrank:{ads/shop}:embedder"
    for bad in ("shop", "ads/", "/shop", "Ads/shop", "ads/shop*", "ads/sh{op}", "a:b/shop", "ads/shop/x"):
        with pytest.raises(ValueError):
            Scope.parse(bad)
    assert Scope("default", "local") == DEFAULT_SCOPE
    assert not Scope("ads", "shop").owns(Scope("ads", "shop2").item_stream)
    assert isinstance(open_store(f"file://{tmp_path}").for_scope(Scope("a", "b")), FileStore)


# --- the operator's delete step against the real apiserver and the real Redis -----------------------


@contextlib.contextmanager
def operator_watching(kube: Any, namespaces: list[str], store: observe.CoverageObserver) -> Iterator[None]:
    """The operator in this process over several namespaces (as test_operator_apiserver's
    `operator_in_process` does for one)."""
    import kopf
    from kopf.testing import KopfRunner

    from mmrank.operator import handlers
    from mmrank.operator.kube import Kube

    handlers.Context.kube = Kube(kube.api_client)
    handlers.Context.store = store
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = kube.kubeconfig
    args = ["run", "--standalone", *[a for ns in namespaces for a in ("--namespace", ns)]]
    try:
        with KopfRunner(args, timeout=30, registry=handlers.register(kopf.OperatorRegistry())) as runner:
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


def ranker(cluster: Cluster, name: str, store_url: str, stream: str | None = None) -> dict:
    body = manifest(cluster.namespace, store_url)
    body["metadata"]["name"] = name
    if stream:
        body["spec"]["embeddings"]["itemEvents"] = {"stream": stream}
    cluster.create(body)
    return body


def gone(cluster: Cluster, name: str) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        cluster.ranker(name)
    except ApiException as exc:
        return exc.status == 404
    return False


def reasons(cluster: Cluster, name: str) -> dict[str, str]:
    return {e["reason"]: e["message"] for e in cluster.events(name)}


def test_deleting_a_ranker_removes_its_keys_after_its_children_and_nothing_else(
    crds_installed: None,  # noqa: F811 - the fixture
    kube: Any,
    redis_server: servers.Server,
) -> None:
    import uuid

    ads, eu = (Cluster(kube.api_client, f"t-{uuid.uuid4().hex[:8]}") for _ in range(2))
    client = redis.Redis.from_url(redis_server.url)
    doomed, neighbour, namesake = (
        Scope(ads.namespace, "shop"),
        Scope(ads.namespace, "shop-eu"),
        Scope(eu.namespace, "shop"),
    )
    shared = "shop:items"  # named in two rankers' specs: shared
    for scope in (doomed, neighbour, namesake):
        seed(RedisStore(client, scope))
    seed_streams(client, doomed, shared)
    seed_streams(client, neighbour)
    seed_streams(client, namesake, shared)
    others = {s: snapshot(client, s) for s in (neighbour, namesake)}

    with operator_watching(kube, [ads.namespace, eu.namespace], observe.StoreCoverage()):
        ranker(ads, "shop", redis_server.url, shared)
        ranker(ads, "shop-eu", redis_server.url)
        ranker(eu, "shop", redis_server.url, shared)
        for cluster, name in ((ads, "shop"), (ads, "shop-eu"), (eu, "shop")):
            wait_for(
                f"{cluster.namespace}/{name}: encoder and embedder",
                lambda c=cluster, n=name: (
                    {("Deployment", f"{n}-encoder-e1"), ("Deployment", f"{n}-embedder")} <= set(c.children(n))
                ),
                timeout=60,
            )
            embedder = cluster.children(name)[("Deployment", f"{name}-embedder")]
            env = {e["name"]: e.get("value") for e in embedder["spec"]["template"]["spec"]["containers"][0]["env"]}
            assert env["MMRANK_SCOPE"] == f"{cluster.namespace}/{name}"
        survivors = {name: set(ads.children(name)) for name in ("shop-eu",)} | {"eu": set(eu.children("shop"))}

        ads.rankers.delete(name="shop", namespace=ads.namespace)
        # the children are being deleted in the foreground (their pods first): the keys wait for them
        wait_for(
            "every child of ads/shop being deleted",
            lambda: (c := ads.children("shop")) and all(o["metadata"].get("deletionTimestamp") for o in c.values()),
        )
        held = len(keys(client, doomed))
        time.sleep(3)  # a few retries of the finalizer step
        assert not gone(ads, "shop") and len(keys(client, doomed)) == held, "keys removed before the children went"

        ads.collect_garbage("shop")  # the garbage collector: pods gone, children gone
        wait_for("ads/shop gone", lambda: gone(ads, "shop"))
        cleaned = wait_for("the StoreCleaned Event", lambda: reasons(ads, "shop").get("StoreCleaned"))
        assert cleaned.startswith(f"removed {held} keys of ranker {doomed} from the store: 1 spaces (e1)"), cleaned
        assert f"left the shared stream {shared}, which stays" in cleaned
        assert keys(client, doomed) == []
        assert {s: snapshot(client, s) for s in (neighbour, namesake)} == others
        assert [g["name"] for g in client.xinfo_groups(shared)] == [namesake.consumer_group().encode()]
        assert client.xlen(shared) == 6 and client.xpending(shared, namesake.consumer_group())["pending"] == 1
        assert {name: set(ads.children(name)) for name in ("shop-eu",)} | {"eu": set(eu.children("shop"))} == survivors


def test_an_unreachable_store_holds_the_delete_with_a_warning_until_it_is_back(
    crds_installed: None,  # noqa: F811 - the fixture
    kube: Any,
    tmp_path: Path,
) -> None:
    import uuid

    cluster = Cluster(kube.api_client, f"t-{uuid.uuid4().hex[:8]}")
    port = servers.free_port()
    store = servers.start_redis(tmp_path / "redis", port=port)
    scope = Scope(cluster.namespace, "shop")
    try:
        client = redis.Redis.from_url(store.url)
        seed(RedisStore(client, scope))
        with operator_watching(kube, [cluster.namespace], observe.StoreCoverage()):
            ranker(cluster, "shop", store.url)
            wait_for("the embedder", lambda: ("Deployment", "shop-embedder") in cluster.children(), timeout=60)
            store.stop()  # the store goes away (its data stays on disk)
            cluster.rankers.delete(name="shop", namespace=cluster.namespace)
            wait_for("children gone", lambda: cluster.collect_garbage() >= 0 and not cluster.children())
            warning = wait_for(
                "the StoreCleanupFailed Event", lambda: reasons(cluster, "shop").get("StoreCleanupFailed")
            )
            assert "remove the finalizer mmrank.io/finalizer" in warning
            condition = wait_for("the StoreCleanup condition", lambda: cluster.condition("StoreCleanup"))
            assert (condition["status"], condition["reason"]) == ("False", "StoreUnreachable")
            assert not gone(cluster, "shop"), "the delete went on without cleaning the store"

            store = servers.start_redis(tmp_path / "redis", port=port)  # back, with the ranker's keys
            client = redis.Redis.from_url(store.url)
            assert keys(client, scope)
            wait_for("the ranker gone once the store is back", lambda: gone(cluster, "shop"), timeout=60)
            assert keys(client, scope) == []
            assert "StoreCleaned" in reasons(cluster, "shop")
    finally:
        store.stop()


def test_a_predictor_reads_the_space_of_its_own_ranker(redis_server: servers.Server, tmp_path: Path) -> None:
    """Two rankers' predictors (`mmrank predictor serve --scope`, as processes: kserve cannot share
    this process with tritonclient), both trained on e1, one Redis: each is ready on its own e1's
    coverage (one covered, one at 10 %), never on the other's."""
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from harness.loadgen import write_ranker

    model_dir = write_ranker(tmp_path / "ranker", "e1", dim=16, catalogue=100)
    covered, sparse = Scope("ads", "shop"), Scope("ads-eu", "shop")
    rng = np.random.default_rng(0)
    for scope, n in ((covered, 100), (sparse, 10)):
        store = open_store(redis_server.url, scope)
        store.create_space("e1", 16)
        store.put("e1", np.arange(n), rng.normal(size=(n, 16)).astype(np.float32))
        store.set_catalogue_size("e1", 100)

    def ready(url: str) -> tuple[int, str] | None:
        try:
            with urllib.request.urlopen(f"{url}/v2/models/ranker/ready", timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return None  # not listening yet

    started = []
    try:
        urls = {}
        for scope in (covered, sparse):
            port = servers.free_port()
            log = open(tmp_path / f"predictor-{scope.namespace}.log", "wb")  # noqa: SIM115 - the child owns it
            started.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "mmrank",
                        "predictor",
                        "serve",
                        "--model-dir",
                        str(model_dir),
                        "--model-name",
                        "ranker",
                        "--store",
                        redis_server.url,
                        "--scope",
                        str(scope),
                        "--host",
                        "127.0.0.1",
                        "--http-port",
                        str(port),
                        "--grpc-port",
                        "0",
                        "--torch-threads",
                        "1",
                        "--no-feedback-stream",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=Path(__file__).resolve().parent.parent,
                )
            )
            urls[scope] = f"http://127.0.0.1:{port}"
        wait_for(f"the predictor of {covered} ready", lambda: (ready(urls[covered]) or (0,))[0] == 200, timeout=120)
        answers = {sparse: wait_for(f"the predictor of {sparse} answering", lambda: ready(urls[sparse]), timeout=120)}
        assert answers[sparse][0] == 503 and "space e1 coverage 0.1000 is below" in answers[sparse][1], answers[sparse]
    finally:
        for process in started:
            process.terminate()
            process.wait(30)
