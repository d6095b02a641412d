"""Canary rollouts on real parts: how fast a failing canary loses its traffic, and what 300 rankers
in a canary cost the operator and Prometheus.

1. **Breach to rollback.** One ranker, the operator (`mmrank operator run`, a process), the real
   kube-apiserver, a real Prometheus scraping two real predictors (`harness.loadgen.CanaryRig`) and
   the load generator routed by the traffic the operator writes. Each rollout: the canary r2
   passes its first windows, then, at a random moment of a step, its store stops (every request
   answers 503: the breach); the time until the operator has put all traffic back on stable
   (status.canary RolledBack, trafficPercent 0, seen by the router) is recorded. Then the store
   comes back and `retry` starts the canary again. p50/p99 over `--rollouts`, beside the floor
   `interval × failureLimit + scrape interval` (and that plus one operator timer period per
   analysis, the bound the scenario tests assert). A breach late in a window is judged by that
   window already, so single rollouts can take less than the floor (down to about
   `interval × (failureLimit - 1)`); the floor is what the slowest breach, at a window's start, costs.
2. **300 rankers in a canary.** `--rankers` MultimodalRankers rolled from r1 to r2, all in canary
   steps while the operator's CPU time and the queries Prometheus answered
   (`prometheus_http_requests_total{handler="/api/v1/query"}`, read from its /metrics) are counted
   over `--window` seconds; the analyser's own count is in the operator, so Prometheus' is the one
   reported. The two predictors' series are labelled as the breach ranker's pods, so each of these
   rankers' analyses (scoped by namespace and ranker) finds no requests of its own: one query,
   answered Inconclusive, where a ranker with traffic sends five (requests, errors, latency,
   clicks, stable's requests).

Run alone on the machine (figures are only worth what the machine was doing):

    .venv/bin/python bench/rollout.py                           # 20 rollouts, 300 rankers
    .venv/bin/python bench/rollout.py --rollouts 2 --rankers 5 --window 10   # a quick smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import servers
from harness.loadgen import CanaryRig, Controllers, Router, prepare_space
from mmrank import api, api_crd

STABLE, CANARY = "r1", "r2"


def manifest(
    name: str,
    namespace: str,
    store_url: str,
    prometheus_url: str,
    ranker: str,
    steps: list[int],
    interval_s: int,
    failure_limit: int,
    min_requests: int,
) -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "encoder": {"version": "e1", "modelUri": "s3://models/encoder/e1"},
            "ranker": {"version": ranker, "modelUri": f"s3://models/ranker/{ranker}", "encoderVersion": "e1"},
            "embeddings": {"store": {"url": store_url}, "minCoverage": 0.99},
            "rollout": {
                "steps": steps,
                "interval": f"{interval_s}s",
                "prometheusUrl": prometheus_url,
                "analysis": {
                    "maxErrorRate": 0.05,
                    "maxLatencyP99Ms": 250,
                    "minClickRateRatio": 0.9,
                    "minRequests": min_requests,
                    "failureLimit": failure_limit,
                },
            },
        },
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def prometheus_queries(url: str) -> float:
    """Instant queries Prometheus has answered (its own counter, read with prometheus_client's parser)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "prometheus_http_requests_total" and sample.labels.get("handler") == "/api/v1/query":
                total += sample.value
    return total


def wait_for(what: str, check: Any, timeout: float, poll: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except Exception:  # noqa: BLE001 - the apiserver may be busy: ask again
            result = None
        if result:
            return result
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class Bench:
    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        from kubernetes import config, dynamic

        self.workdir, self.args = workdir, args
        self.apiserver = servers.start_kube_apiserver(workdir / "apiserver")
        self.api_client = config.new_client_from_config(config_file=str(self.apiserver.extra["kubeconfig"]))
        servers.install_crds(
            self.api_client,
            [
                *servers.kserve_crds_for_k8s_1_20(servers.shared_dir() / "schemas" / "kserve"),
                servers._drop_empty_string_defaults(api_crd.crd_manifest(cel=False)),
            ],
        )
        self.client = dynamic.DynamicClient(self.api_client)
        self.rankers = self.client.resources.get(api_version=api.API_VERSION, kind=api.KIND)
        self.operators: list[subprocess.Popen] = []

    def namespace(self, name: str) -> str:
        self.client.resources.get(api_version="v1", kind="Namespace").create(
            body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        )
        return name

    def operator(self, namespace: str, timer: float) -> subprocess.Popen:
        env = {**os.environ, "KUBECONFIG": str(self.apiserver.extra["kubeconfig"])}
        log = open(self.workdir / f"operator-{namespace}.log", "wb")  # noqa: SIM115 - the child owns it
        process = subprocess.Popen(
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
                str(timer),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()
        self.operators.append(process)
        return process

    def status(self, name: str, namespace: str) -> dict:
        return self.rankers.get(name=name, namespace=namespace).to_dict().get("status") or {}

    def request(self, name: str, namespace: str, action: str) -> None:
        """What `kubectl mmrank retry` writes: a request on the status subresource."""
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self.rankers.status.patch(
            name=name,
            namespace=namespace,
            content_type="application/merge-patch+json",
            body={"status": {"request": {"action": action, "requestedAt": now, "requestedBy": "bench"}}},
        )

    def close(self) -> None:
        for process in self.operators:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
        self.apiserver.stop()


def breach_to_rollback(bench: Bench, rig: CanaryRig, args: argparse.Namespace) -> dict[str, Any]:
    namespace = bench.namespace("breach")
    operator = bench.operator(namespace, args.timer)
    store = rig.stores[STABLE].url
    body = lambda ranker: manifest(  # noqa: E731
        "shop",
        namespace,
        store,
        rig.prometheus.url,
        ranker,
        [10, 30, 60],
        args.interval,
        args.failure_limit,
        5,
    )
    rng = random.Random(args.seed)
    times: list[float] = []
    prepare_space(store, scope=f"{namespace}/shop")  # the ranker's own space, where the operator reads
    rig.serve_ranker(namespace, "shop")  # the predictors' series as this ranker's pods: its analysis reads them
    with Controllers(bench.api_client, namespace):
        bench.rankers.create(body=body(STABLE), namespace=namespace)
        wait_for(
            "r1 stable",
            lambda: (bench.status("shop", namespace).get("stable") or {}).get("rankerVersion") == STABLE,
            120,
        )
        generator = rig.generator(rate=args.rate, concurrency=6, timeout=5.0)
        with generator, Router(lambda: bench.status("shop", namespace), generator, CANARY) as router:
            generator.start(seconds=24 * 3600)
            seen = len(router.timeline)
            bench.rankers.patch(
                name="shop",
                namespace=namespace,
                body={"spec": body(CANARY)["spec"]},
                content_type="application/merge-patch+json",
            )
            for index in range(args.rollouts):
                wait_for(
                    "the canary taking traffic",
                    lambda: any(s.share > 0 and s.state == "Progressing" for s in router.timeline[seen:]),
                    120,
                )
                time.sleep(rng.uniform(0, args.interval))  # breach at any moment of a window
                breach = time.monotonic()
                rig.stop_canary_store()
                try:
                    back = wait_for(
                        "RolledBack",
                        lambda: next(
                            (s for s in router.timeline[seen:] if s.state == "RolledBack" and s.at > breach), None
                        ),
                        10 * args.interval * args.failure_limit + 60,
                    )
                finally:
                    rig.restart_canary_store()
                times.append(back.at - breach)
                print(
                    f"rollout {index + 1}: all traffic back on stable {times[-1]:.2f} s after the breach",
                    file=sys.stderr,
                )
                rig.wait_canary_ready()
                # the next canary's first window must not see this one's errors
                time.sleep(args.interval + args.scrape)
                if index + 1 < args.rollouts:
                    seen = len(router.timeline)
                    bench.request("shop", namespace, "Retry")
            generator.stop()
        tallies, epochs = generator.snapshot()
    operator.send_signal(signal.SIGTERM)
    above = [e for e in epochs if e.canary_sent > e.share * e.sent + 1e-9]
    floor = args.interval * args.failure_limit + args.scrape
    return {
        "rollouts": len(times),
        "interval_s": args.interval,
        "failure_limit": args.failure_limit,
        "scrape_interval_s": args.scrape,
        "operator_timer_s": args.timer,
        "breach_to_stable_p50_s": round(statistics.median(times), 2),
        "breach_to_stable_p99_s": round(percentile(times, 0.99), 2),
        "breach_to_stable_max_s": round(max(times), 2),
        "floor_s": floor,
        "floor_plus_timer_ticks_s": floor + args.failure_limit * args.timer,
        "epochs_with_canary_above_its_step": len(above),
        "requests_sent": {v: t.sent for v, t in tallies.items()},
    }


def rankers_in_canary(bench: Bench, rig: CanaryRig, args: argparse.Namespace) -> dict[str, Any]:
    namespace = bench.namespace("scale")
    operator = bench.operator(namespace, args.scale_timer)
    store = rig.stores[STABLE].url
    steps = list(range(5, 100, 5))  # long enough to stay in canary while measured
    names = [f"shop-{i:04d}" for i in range(args.rankers)]
    for name in names:
        prepare_space(store, scope=f"{namespace}/{name}")  # each ranker's own space
    body = lambda name, ranker: manifest(  # noqa: E731
        name,
        namespace,
        store,
        rig.prometheus.url,
        ranker,
        steps,
        args.scale_interval,
        2,
        5,
    )
    generator = rig.generator(rate=args.rate, share=0.5, concurrency=6, timeout=5.0)
    with Controllers(bench.api_client, namespace, period=1.0), generator:
        generator.start(seconds=24 * 3600)
        for name in names:
            bench.rankers.create(body=body(name, STABLE), namespace=namespace)

        def stable_count() -> int:
            items = bench.rankers.get(namespace=namespace).to_dict()["items"]
            return sum(1 for r in items if ((r.get("status") or {}).get("stable") or {}).get("rankerVersion") == STABLE)

        started = time.monotonic()
        wait_for(f"{args.rankers} rankers stable on r1", lambda: stable_count() == args.rankers, args.timeout, 2.0)
        for name in names:
            bench.rankers.patch(
                name=name,
                namespace=namespace,
                body={"spec": body(name, CANARY)["spec"]},
                content_type="application/merge-patch+json",
            )

        def in_canary() -> int:
            items = bench.rankers.get(namespace=namespace).to_dict()["items"]
            return sum(1 for r in items if ((r.get("status") or {}).get("canary") or {}).get("state") == "Progressing")

        wait_for(f"{args.rankers} canaries progressing", lambda: in_canary() == args.rankers, args.timeout, 2.0)
        settled_s = time.monotonic() - started
        time.sleep(args.scale_interval)  # every ranker into its analysis rhythm
        cpu_before, queries_before = cpu_seconds(operator.pid), prometheus_queries(rig.prometheus.url)
        time.sleep(args.window)
        cpu = cpu_seconds(operator.pid) - cpu_before
        queries = prometheus_queries(rig.prometheus.url) - queries_before
        still = in_canary()
        generator.stop()
    operator.send_signal(signal.SIGTERM)
    return {
        "rankers": args.rankers,
        "analysis_interval_s": args.scale_interval,
        "operator_timer_s": args.scale_timer,
        "window_s": args.window,
        "rankers_in_canary_at_end": still,
        "setup_to_all_in_canary_s": round(settled_s, 1),
        "operator_cpu_s": round(cpu, 2),
        "operator_cpu_share_of_one_core": round(cpu / args.window, 3),
        "prometheus_queries": int(queries),
        "prometheus_queries_per_s": round(queries / args.window, 2),
        "queries_per_ranker_per_interval": round(queries / args.rankers / (args.window / args.scale_interval), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=20, help="breach-to-rollback rollouts (0: skip)")
    parser.add_argument("--interval", type=int, default=3, help="spec.rollout.interval of the breach runs (s)")
    parser.add_argument("--failure-limit", type=int, default=2)
    parser.add_argument("--scrape", type=int, default=1, help="Prometheus scrape interval (s)")
    parser.add_argument("--timer", type=float, default=1, help="the operator's timer period (s)")
    parser.add_argument("--rate", type=float, default=40, help="ranking requests per second, both variants")
    parser.add_argument("--rankers", type=int, default=300, help="rankers in a canary at once (0: skip)")
    parser.add_argument("--scale-interval", type=int, default=30, help="spec.rollout.interval of those rankers (s)")
    parser.add_argument(
        "--scale-timer",
        type=float,
        default=30,
        help="the operator's timer period with those rankers (s; 30 is its default)",
    )
    parser.add_argument("--window", type=float, default=60, help="seconds the CPU and query load are counted")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import urllib3

    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below on SIGTERM
    workdir = Path(tempfile.mkdtemp(prefix="mmrank-bench-rollout-"))
    rig = bench = None
    try:
        rig = CanaryRig(workdir / "rig", STABLE, CANARY, scrape_interval=f"{args.scrape}s")
        bench = Bench(workdir, args)
        figures: dict[str, Any] = {"cpu_count": os.cpu_count()}
        if args.rollouts:
            figures["breach_to_rollback"] = breach_to_rollback(bench, rig, args)
        if args.rankers:
            figures["rankers_in_canary"] = rankers_in_canary(bench, rig, args)
        print(json.dumps(figures, indent=1))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1))
        return 0
    finally:
        if bench is not None:
            bench.close()
        if rig is not None:
            rig.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
