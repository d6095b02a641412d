"""One operator at a time (issue 17, item 4): two `mmrank operator run --peering` processes on the
real kube-apiserver, as the chart's two replicas run. The older one leads and reconciles; the younger
is ready but paused and touches no ranker; killed with SIGKILL, the leader is replaced within the
peering lifetime; stopped with SIGTERM, at once. Plus the pure parts of operator/peering.py."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import servers
from mmrank import api, api_crd
from mmrank.operator import peering
from tests.test_chart import peering_crds

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)


# --- the pure parts -----------------------------------------------------------------------------


def test_older_replicas_rank_higher_and_any_explicit_priority_outranks_them() -> None:
    older, younger = peering.seniority(1_764_000_000_000_000_000), peering.seniority(1_764_000_000_000_000_001)
    assert older > younger and older < 0
    assert younger > -(2**63)  # fits the int64 the apiserver stores


def test_a_keep_alive_is_live_until_its_lifetime_ends() -> None:
    status = {
        "a": {"priority": -5, "lifetime": 15, "lastseen": "2026-12-01T11:59:50+00:00"},
        "b": {"priority": -6, "lifetime": 15, "lastseen": "2026-12-01T11:59:40+00:00"},
        "c": {"priority": -7, "lifetime": 15, "lastseen": "2026-12-01T11:59:55"},
    }
    assert peering.record_alive(status, "a", NOW)
    assert not peering.record_alive(status, "b", NOW)  # 20 s old, 15 s lifetime
    assert peering.record_alive(status, "c", NOW)  # no zone: UTC, as kopf writes
    assert not peering.record_alive(status, "d", NOW) and not peering.record_alive(None, "a", NOW)
    assert not peering.record_alive({"a": None}, "a", NOW)  # a clean exit deletes the record


def test_a_cluster_wide_operator_peers_in_one_object_a_namespaced_one_in_each_namespace() -> None:
    assert peering.peering_objects("p", []) == [("clusterkopfpeerings", None)]
    assert peering.peering_objects("p", ["a", "b"]) == [("kopfpeerings", "a"), ("kopfpeerings", "b")]


# --- two operator processes on the real apiserver ------------------------------------------------


@pytest.fixture
def namespace(kube: Any, helm_binary: str) -> str:
    from kubernetes import client

    servers.install_crds(kube.api_client, [api_crd.crd_manifest(cel=False), *peering_crds(helm_binary)])
    name = f"peer-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(kube.api_client).create_namespace({"metadata": {"name": name}})
    return name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Operator:
    """One `mmrank operator run --peering` process, its log and its readiness endpoint."""

    def __init__(self, kube: Any, namespace: str, workdir: Path, name: str, lifetime: int, *extra: str) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        self.ready_url = f"http://127.0.0.1:{free_port()}/readyz"
        # PYTHONPATH: this checkout's mmrank, whatever another checkout's editable install points to.
        env = {**os.environ, "KUBECONFIG": kube.kubeconfig, "POD_ID": name, "PYTHONPATH": str(ROOT)}
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mmrank",
                    "operator",
                    "run",
                    "--namespace",
                    namespace,
                    "--interval",
                    "1",
                    *(["--standalone"] if "--standalone" in extra else ["--peering", f"mmrank-{namespace}"]),
                    "--peering-lifetime",
                    str(lifetime),
                    "--readiness",
                    self.ready_url,
                    *(e for e in extra if e != "--standalone"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> bool:
        try:
            return httpx.get(self.ready_url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def touched(self, ranker: str) -> int:
        """Log lines of this process about the ranker (kopf prefixes each with namespace/name)."""
        return sum(f"/{ranker}]" in line for line in self.text().splitlines())

    def stop(self, sig: signal.Signals) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)


@pytest.fixture
def operators(kube: Any, namespace: str, tmp_path: Path) -> Iterator[Callable[..., Operator]]:
    started: list[Operator] = []

    def start(name: str, lifetime: int, *extra: str) -> Operator:
        started.append(Operator(kube, namespace, tmp_path, name, lifetime, *extra))
        return started[-1]

    yield start
    for operator in started:
        operator.stop(signal.SIGKILL)
    for operator in started:
        print(f"--- {operator.name}\n{operator.text()[-3000:]}")


def wait_for(what: str, check: Callable[[], Any], timeout: float) -> float:
    """Seconds until `check()` held."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.1)
    return time.monotonic() - start


def ranker(namespace: str) -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "shop", "namespace": namespace},
        "spec": {
            "encoder": {"version": "e1", "modelUri": "s3://models/encoder/e1"},
            "ranker": {"version": "r1", "modelUri": "s3://models/ranker/r1", "encoderVersion": "e1"},
            # nobody listens there: the store is an observation (StoreUnreachable), not an error
            "embeddings": {"store": {"url": "redis://127.0.0.1:9/0"}},
        },
    }


def create_ranker(kube: Any, namespace: str) -> None:
    from kubernetes import dynamic

    dynamic.DynamicClient(kube.api_client).resources.get(api_version=api.API_VERSION, kind=api.KIND).create(
        body=ranker(namespace), namespace=namespace
    )


def keep_alives(kube: Any, namespace: str) -> dict[str, Any]:
    from kubernetes import client

    body = client.CustomObjectsApi(kube.api_client).get_namespaced_custom_object(
        "kopf.dev", "v1", namespace, "kopfpeerings", f"mmrank-{namespace}"
    )
    return dict(body.get("status") or {})


def start_leader_and_standby(
    kube: Any, namespace: str, start: Callable[..., Operator], lifetime: int
) -> tuple[Operator, Operator]:
    """A mandatory peering starts paused and resumes only when no peer outranks it: the leader logs
    the resumption, the standby (younger, so a lower priority) never does."""
    leader = start("replica-a", lifetime)
    wait_for("replica-a ready", leader.ready, 60)
    wait_for("replica-a resumes", lambda: "Resuming operations after the pause" in leader.text(), 20)
    standby = start("replica-b", lifetime)
    wait_for("replica-b ready (a standby is ready too)", standby.ready, 60)
    alive = keep_alives(kube, namespace)
    assert set(alive) == {"replica-a", "replica-b"}
    assert alive["replica-a"]["priority"] > alive["replica-b"]["priority"]
    assert alive["replica-a"]["lifetime"] == lifetime
    return leader, standby


@pytest.mark.apiserver
def test_one_replica_reconciles_and_the_next_takes_over_when_it_is_killed_or_stops(
    kube: Any, namespace: str, operators: Callable[..., Operator]
) -> None:
    """One scenario, to start few processes: A leads and B stands by; A killed, B takes over within
    the lifetime; C joins; B stopped cleanly, C takes over at once; a developer's `--priority 0`
    outranks C (replicas' priorities are minus their start times)."""
    lifetime = 6
    a, b = start_leader_and_standby(kube, namespace, operators, lifetime)
    create_ranker(kube, namespace)
    wait_for("the leader reconciles the ranker", lambda: a.touched("shop") >= 3, 30)  # create + timer ticks
    time.sleep(3)  # three more timer ticks of the leader
    assert b.touched("shop") == 0, b.text()[-2000:]
    assert "Resuming operations" not in b.text()

    killed = time.monotonic()
    a.process.send_signal(signal.SIGKILL)  # no clean exit: its keep-alive stays behind
    wait_for("b takes over", lambda: b.touched("shop") > 0, lifetime + 20)
    takeover = time.monotonic() - killed
    print(f"takeover after SIGKILL: {takeover:.1f} s (lifetime {lifetime} s)")
    assert takeover <= lifetime + 5
    assert "Resuming operations after the pause" in b.text()
    wait_for("the new leader keeps reconciling", lambda: b.touched("shop") >= 3, 10)

    c = operators("replica-c", lifetime)
    wait_for("replica-c ready", c.ready, 60)
    time.sleep(2)
    assert c.touched("shop") == 0
    stopped = time.monotonic()
    b.process.send_signal(signal.SIGTERM)  # kopf deletes its keep-alive on the way out
    wait_for("c takes over", lambda: c.touched("shop") > 0, 20)
    takeover = time.monotonic() - stopped
    print(f"takeover after SIGTERM: {takeover:.1f} s (lifetime {lifetime} s)")
    assert takeover < lifetime
    assert b.process.wait(timeout=30) == 0

    developer = operators("developer", lifetime, "--priority", "0")
    wait_for("the replica pauses for the developer", lambda: "Pausing operations in favour of" in c.text(), 30)
    time.sleep(2)  # a handler already running finishes first
    paused_at = c.touched("shop")
    wait_for("the developer's operator reconciles", lambda: developer.touched("shop") >= 2, 30)
    time.sleep(2)
    assert c.touched("shop") == paused_at


@pytest.mark.apiserver
def test_a_standalone_operator_is_ready_once_the_apiserver_answers_it(
    kube: Any, namespace: str, operators: Callable[..., Operator]
) -> None:
    """The chart's one-replica mode (leaderElection.enabled=false): no peering object, readiness is
    an answered list of rankers."""
    alone = operators("alone", 6, "--standalone")
    wait_for("the standalone operator ready", alone.ready, 60)
    assert "the apiserver answers (standalone)" in httpx.get(alone.ready_url, timeout=5).text
    create_ranker(kube, namespace)
    wait_for("it reconciles", lambda: alone.touched("shop") >= 1, 30)
