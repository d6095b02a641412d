"""Canary rollouts end to end on real parts: the real kube-apiserver, the operator (`mmrank operator
run`, a subprocess, so it can be SIGKILLed), a real Prometheus scraping two real predictors (stable
`r1`, canary `r2`: `harness.loadgen.CanaryRig`), and the load generator routed by the traffic the
operator writes to `status.canary` (`harness.loadgen.Router`), posting click feedback per variant.

No Deployment, Job or KServe controller runs on this apiserver: a thread plays them, reporting
every child ready for its current generation. Each scenario takes a fresh namespace, makes `r1`
stable, then changes `spec.ranker` to `r2` and watches the rollout.

The rollback bound: a breach is visible one scrape after it starts, and `failureLimit` failed
windows of `interval` roll the canary back; each analysis runs on the operator's timer, so each
can start up to one timer period after its window ends. Hence
`interval × failureLimit + scrape interval + failureLimit × timer period`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import dynamic
from kubernetes.client.exceptions import ApiException

from harness import servers
from harness.loadgen import CanaryRig, Controllers, LoadGenerator, Router, Sample, Throttle, answered, prepare_space
from mmrank import api, api_crd

pytestmark = [pytest.mark.apiserver, pytest.mark.prometheus, pytest.mark.redis, pytest.mark.slow]

STABLE, CANARY = "r1", "r2"
STEPS = [10, 30, 60]
INTERVAL_S, FAILURE_LIMIT, SCRAPE_S, TIMER_S = 3, 2, 1, 1
ROLLBACK_BOUND_S = INTERVAL_S * FAILURE_LIMIT + SCRAPE_S + FAILURE_LIMIT * TIMER_S
ANALYSIS = {
    "maxErrorRate": 0.05,
    "maxLatencyP99Ms": 250,
    "minClickRateRatio": 0.9,
    "minRequests": 5,
    "failureLimit": FAILURE_LIMIT,
}


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(ApiException):
            last = check()
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


class Cluster:
    """One namespace with the ranker `shop`, and the controllers the apiserver lacks played."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self.client = dynamic.DynamicClient(api_client)
        self.namespace = namespace
        self.rankers = self.client.resources.get(api_version=api.API_VERSION, kind=api.KIND)
        self.client.resources.get(api_version="v1", kind="Namespace").create(
            body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
        )
        self.controllers = Controllers(api_client, namespace).__enter__()

    def status(self) -> dict:
        return self.rankers.get(name="shop", namespace=self.namespace).to_dict().get("status") or {}

    def patch_spec(self, spec: dict) -> None:
        self.rankers.patch(
            name="shop", namespace=self.namespace, body={"spec": spec}, content_type="application/merge-patch+json"
        )

    def close(self) -> None:
        self.controllers.__exit__()


def manifest(
    namespace: str, store_url: str, prometheus_url: str, ranker: str = STABLE, promotion: str = "Automatic"
) -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "shop", "namespace": namespace},
        "spec": {
            "encoder": {"version": "e1", "modelUri": "s3://models/encoder/e1"},
            "ranker": {"version": ranker, "modelUri": f"s3://models/ranker/{ranker}", "encoderVersion": "e1"},
            "embeddings": {"store": {"url": store_url}, "minCoverage": 0.99},
            "rollout": {
                "steps": STEPS,
                "interval": f"{INTERVAL_S}s",
                "promotion": promotion,
                "prometheusUrl": prometheus_url,
                "analysis": ANALYSIS,
            },
        },
    }


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CanaryRig]:
    try:
        rig = CanaryRig(tmp_path_factory.mktemp("rig"), STABLE, CANARY, scrape_interval=f"{SCRAPE_S}s")
    except servers.ServerUnavailable as exc:
        pytest.fail(f"real server unavailable: {exc}", pytrace=False)
    yield rig
    rig.stop()


@pytest.fixture(scope="module")
def crds_installed(_kube_session: Any, kserve_crds: list) -> None:
    if isinstance(_kube_session, str):
        pytest.fail(f"real server unavailable: {_kube_session}", pytrace=False)
    from kubernetes import config

    api_client = config.new_client_from_config(config_file=str(_kube_session.extra["kubeconfig"]))
    servers.install_crds(api_client, [*kserve_crds, api_crd.crd_manifest(cel=False)])


_CANARY_QUIET_SINCE = [0.0]  # when the last scenario stopped sending the canary traffic


@pytest.fixture
def cluster(crds_installed: None, kube: Any, rig: CanaryRig, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    conftest = next(p for p in request.config.pluginmanager.get_plugins() if hasattr(p, "_attach"))
    for server in rig.servers():
        conftest._attach(request, server)
    # The analysis window of this scenario's first step must not reach back to the last one's canary.
    time.sleep(max(0.0, _CANARY_QUIET_SINCE[0] + INTERVAL_S + SCRAPE_S - time.monotonic()))
    cluster = Cluster(kube.api_client, f"t-{uuid.uuid4().hex[:8]}")
    rig.serve_ranker(cluster.namespace, "shop")  # the analysis reads this ranker's series only
    yield cluster
    cluster.close()
    _CANARY_QUIET_SINCE[0] = time.monotonic()


class Operator:
    """`mmrank operator run` for one namespace, as a process of its own (SIGKILL-able)."""

    def __init__(self, kube: Any, namespace: str, workdir: Path) -> None:
        self.kube, self.namespace, self.workdir = kube, namespace, workdir
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": self.kube.kubeconfig}
        self.starts += 1
        log = open(self.workdir / f"operator-{self.starts}.log", "wb")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mmrank",
                "operator",
                "run",
                "--standalone",
                "--namespace",
                self.namespace,
                "--interval",
                str(TIMER_S),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()

    def kill(self) -> None:
        """SIGKILL, as a crashed pod: no handler runs, nothing is flushed."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(self.workdir.glob("operator-*.log")))


@pytest.fixture
def operator(kube: Any, cluster: Cluster, tmp_path: Path) -> Iterator[Operator]:
    running = Operator(kube, cluster.namespace, tmp_path)
    running.start()
    yield running
    running.kill()
    print(f"--- operator logs (shown when the test failed) ---\n{running.logs()}")


@contextlib.contextmanager
def rollout(
    cluster: Cluster,
    rig: CanaryRig,
    promotion: str = "Automatic",
    canary_click: float = 0.1,
) -> Iterator[tuple[Router, LoadGenerator]]:
    """r1 stable with traffic flowing, then spec.ranker changed to r2: yields while the operator
    rolls r2 out, the generator routed by what the operator writes."""
    store = rig.stores[STABLE].url
    prepare_space(store, scope=f"{cluster.namespace}/shop")  # the ranker's own space, where the operator reads
    cluster.rankers.create(
        body=manifest(cluster.namespace, store, rig.prometheus.url, promotion=promotion), namespace=cluster.namespace
    )
    wait_for("r1 stable", lambda: (cluster.status().get("stable") or {}).get("rankerVersion") == STABLE)
    generator = rig.generator(rate=40, canary_click=canary_click, concurrency=6, timeout=5.0)
    served_before = answered(rig.canary.url, CANARY)
    with generator, Router(cluster.status, generator, CANARY) as router:
        generator.start(seconds=600)
        cluster.patch_spec(manifest(cluster.namespace, store, rig.prometheus.url, CANARY, promotion)["spec"])
        wait_for("the canary's first step", lambda: router.first(lambda s: (s.share or 0) > 0), timeout=30)
        yield router, generator
        generator.stop()
    check_served_shares(router, generator, rig, served_before)
    if os.environ.get("MMRANK_ROLLOUT_TIMELINE_DIR"):
        write_timeline(Path(os.environ["MMRANK_ROLLOUT_TIMELINE_DIR"]), router, cluster)


def write_timeline(folder: Path, router: Router, cluster: Cluster) -> Path:
    """The run as data for the rollout timeline picture in docs/rollouts.md: the canary's share
    as the router applied it, and each decision with its analysis (click-rate ratio and all),
    both in seconds since the first sample. Written when MMRANK_ROLLOUT_TIMELINE_DIR is set."""
    import datetime
    import json

    wall = time.time() - time.monotonic()
    start = router.timeline[0].at + wall if router.timeline else time.time()
    decisions = [
        {**h, "t": round(datetime.datetime.fromisoformat(h["time"].replace("Z", "+00:00")).timestamp() - start, 3)}
        for h in cluster.status().get("history") or []
    ]
    samples = [
        {
            "t": round(s.at + wall - start, 3),
            "share": s.share,
            "state": s.state,
            "step": s.step,
            "trafficPercent": s.traffic_percent,
            "stable": s.stable,
        }
        for s in router.timeline
    ]
    name = os.environ.get("PYTEST_CURRENT_TEST", "rollout").split("::")[-1].split(" ")[0]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(
        json.dumps({"steps": STEPS, "interval_s": INTERVAL_S, "samples": samples, "decisions": decisions}, indent=1)
    )
    return path


def check_served_shares(router: Router, generator: LoadGenerator, rig: CanaryRig, served_before: int) -> None:
    """The canary never got more than the operator's current step, and what the client counts is
    what the canary predictor says it answered."""
    tallies, epochs = generator.snapshot()
    allowed = {0.0, 1.0, *(s / 100 for s in STEPS)}
    for epoch in epochs:
        assert epoch.share in allowed, f"a share no step gives: {epoch}"
        assert epoch.canary_sent <= epoch.share * epoch.sent + 1e-9, f"canary above its step: {epoch}"
    for sample in router.timeline:
        if sample.state == "Progressing":
            assert sample.traffic_percent == STEPS[sample.step], f"traffic is not the current step's: {sample}"
    canary = tallies[CANARY]
    time.sleep(0.2)  # a predictor counts an answer just after sending it
    counted = answered(rig.canary.url, CANARY) - served_before
    assert counted == canary.ok + canary.client_errors + canary.server_errors, (counted, canary)


def history(cluster: Cluster) -> list[str]:
    return [h["reason"] for h in cluster.status().get("history") or []]


def rolled_back(router: Router, timeout: float = 60.0) -> Sample:
    return wait_for("RolledBack", lambda: router.first(lambda s: s.state == "RolledBack"), timeout=timeout)


# --- scenarios ----------------------------------------------------------------------------------


def test_a_healthy_canary_is_promoted_through_every_step(cluster: Cluster, operator: Operator, rig: CanaryRig) -> None:
    with rollout(cluster, rig) as (router, _):
        wait_for("r2 stable", lambda: (cluster.status().get("stable") or {}).get("rankerVersion") == CANARY)
        shares = [s.share for s in router.timeline if s.share > 0]
        assert [s for i, s in enumerate(shares) if i == 0 or s != shares[i - 1]] == [0.1, 0.3, 0.6, 1.0]
    assert history(cluster) == ["CanaryStarted", "StepPassed", "StepPassed", "Promoted", "PromotionComplete"]
    analyses = [h["analysis"] for h in cluster.status()["history"] if h.get("analysis")]
    assert [a["verdict"] for a in analyses] == ["Passed"] * 3
    assert all(a["requests"] >= ANALYSIS["minRequests"] and a["clickRateRatio"] > 0.9 for a in analyses)


def test_manual_promotion_waits_for_kubectl_mmrank_promote(
    cluster: Cluster, operator: Operator, rig: CanaryRig, kube: Any, kubectl_binary: str
) -> None:
    with rollout(cluster, rig, promotion="Manual") as (router, _):
        waiting = wait_for("AwaitingPromotion", lambda: router.first(lambda s: s.state == "AwaitingPromotion"))
        assert waiting.traffic_percent == STEPS[-1]
        time.sleep(2 * INTERVAL_S + TIMER_S)  # passed windows keep it waiting: only a person promotes
        assert cluster.status()["canary"]["state"] == "AwaitingPromotion"
        assert router.timeline[-1].share == STEPS[-1] / 100
        env = {
            **os.environ,
            "KUBECONFIG": kube.kubeconfig,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        }
        promoted = subprocess.run(
            [
                kubectl_binary,
                "mmrank",
                "promote",
                "shop",
                "-n",
                cluster.namespace,
                "--wait",
                "--timeout",
                "30",
                "--requested-by",
                "alice",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr
        wait_for("r2 stable", lambda: (cluster.status().get("stable") or {}).get("rankerVersion") == CANARY)
    reasons = history(cluster)
    assert reasons[:4] == ["CanaryStarted", "StepPassed", "StepPassed", "AwaitingPromotion"]
    assert reasons[-2:] == ["Promoted", "PromotionComplete"]
    promoted_entry = next(h for h in cluster.status()["history"] if h["reason"] == "Promoted")
    assert "alice" in promoted_entry["message"]


def test_a_canary_answering_5xx_is_rolled_back_in_time(cluster: Cluster, operator: Operator, rig: CanaryRig) -> None:
    """Its store stops in the middle of the second step: every ranking request needs a vector read."""
    try:
        with rollout(cluster, rig) as (router, generator):
            wait_for("step 2", lambda: router.first(lambda s: s.step == 1))
            time.sleep(1.0)
            breach = time.monotonic()
            rig.stop_canary_store()
            back = rolled_back(router)
            print(f"5xx: rolled back {back.at - breach:.1f} s after the breach (bound {ROLLBACK_BOUND_S} s)")
            assert back.at - breach <= ROLLBACK_BOUND_S, f"rolled back {back.at - breach:.1f} s after the breach"
            assert back.share == 0.0
            time.sleep(1.0)
    finally:
        rig.restart_canary_store()
    status = cluster.status()
    assert status["canary"]["state"] == "RolledBack" and status["canary"]["trafficPercent"] == 0
    assert "errorRate" in status["canary"]["lastAnalysis"]["failedChecks"]
    assert history(cluster)[-1] == "RolledBack"
    assert generator.snapshot()[0][CANARY].server_errors > 0
    rig.wait_canary_ready()


def test_a_slow_canary_is_rolled_back_in_time(cluster: Cluster, operator: Operator, rig: CanaryRig) -> None:
    """Its store answers slowly from the start (the canary's Redis runs 20 ms of every 600 ms)."""
    with Throttle(rig.stores[CANARY].process.pid, running=0.02, period=0.6), rollout(cluster, rig) as (router, _):
        started = router.first(lambda s: s.share > 0)
        back = rolled_back(router)
        print(f"slow: rolled back {back.at - started.at:.1f} s after the start (bound {ROLLBACK_BOUND_S} s)")
        assert back.at - started.at <= ROLLBACK_BOUND_S, f"rolled back {back.at - started.at:.1f} s after the start"
    last = cluster.status()["canary"]["lastAnalysis"]
    assert last["failedChecks"] == ["latencyP99Ms"] and last["latencyP99Ms"] > ANALYSIS["maxLatencyP99Ms"]


def test_a_canary_with_a_20_percent_lower_click_rate_is_rolled_back_in_time(
    cluster: Cluster, operator: Operator, rig: CanaryRig
) -> None:
    with rollout(cluster, rig, canary_click=0.08) as (router, generator):
        started = router.first(lambda s: s.share > 0)
        back = rolled_back(router)
        print(f"click rate: rolled back {back.at - started.at:.1f} s after the start (bound {ROLLBACK_BOUND_S} s)")
        assert back.at - started.at <= ROLLBACK_BOUND_S, f"rolled back {back.at - started.at:.1f} s after the start"
        time.sleep(0.5)
    last = cluster.status()["canary"]["lastAnalysis"]
    assert last["failedChecks"] == ["clickRateRatio"] and last["clickRateRatio"] < 0.9
    tallies = generator.snapshot()[0]
    assert tallies[CANARY].click_rate == pytest.approx(0.08, abs=0.01)
    assert tallies[STABLE].click_rate == pytest.approx(0.1, abs=0.01)


def test_abort_in_the_middle_of_a_step(
    cluster: Cluster, operator: Operator, rig: CanaryRig, kube: Any, kubectl_binary: str
) -> None:
    with rollout(cluster, rig) as (router, _):
        second = wait_for("step 2", lambda: router.first(lambda s: s.step == 1))
        time.sleep(INTERVAL_S / 2)
        assert cluster.status()["canary"]["step"] == 1  # mid-step
        env = {
            **os.environ,
            "KUBECONFIG": kube.kubeconfig,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        }
        asked = time.monotonic()
        aborted = subprocess.run(
            [kubectl_binary, "mmrank", "abort", "shop", "-n", cluster.namespace],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert aborted.returncode == 0, aborted.stdout + aborted.stderr
        back = rolled_back(router)
        print(f"abort: rolled back {back.at - asked:.1f} s after the request")
        assert back.at - asked <= 2 * TIMER_S + 1, f"aborted after {back.at - asked:.1f} s"
        assert second.traffic_percent == STEPS[1]
        time.sleep(0.5)
    assert history(cluster)[-1] == "Aborted"
    assert cluster.status()["canary"]["trafficPercent"] == 0


def test_the_operator_killed_at_each_step_resumes_and_never_advances_twice(
    cluster: Cluster, operator: Operator, rig: CanaryRig
) -> None:
    with rollout(cluster, rig) as (router, _):
        for step in range(len(STEPS)):
            wait_for(f"step {step + 1}", lambda: router.first(lambda s, step=step: s.step == step and s.share > 0))
            operator.kill()
            time.sleep(TIMER_S)
            operator.start()
        wait_for("r2 stable", lambda: (cluster.status().get("stable") or {}).get("rankerVersion") == CANARY)
        assert operator.starts == 1 + len(STEPS)
    shares = [s.share for s in router.timeline if s.state is not None or s.stable == CANARY]
    assert shares == sorted(shares), f"traffic went back: {shares}"
    steps = [s.step for s in router.timeline if s.state == "Progressing"]
    assert all(b - a in (0, 1) for a, b in zip(steps, steps[1:], strict=False)), f"a step skipped: {steps}"
    assert history(cluster) == ["CanaryStarted", "StepPassed", "StepPassed", "Promoted", "PromotionComplete"]
    passed = [h["step"] for h in cluster.status()["history"] if h["reason"] == "StepPassed"]
    assert passed == [1, 2]  # each step advanced once
