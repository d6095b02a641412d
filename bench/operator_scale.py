"""The operator at scale on the real kube-apiserver: N MultimodalRankers created at once.

Measures the time until every child of every ranker is applied, the latency from each ranker's
creation (the event) to each of its children being applied (p50, p99), and the operator's
memory (RSS now and peak). Children are seen through watches, so the time is when the
apiserver announced them. Coverage comes from a real Redis store (empty: every ranker gets a
backfill Job). Quick run: `--rankers 30`.

    .venv/bin/python bench/operator_scale.py --rankers 300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import servers
from mmrank import api, api_crd

KINDS = (("v1", "ConfigMap"), ("v1", "Service"), ("apps/v1", "Deployment"), ("batch/v1", "Job"))
PER_RANKER = 5  # ConfigMap, Service, encoder Deployment, embedder Deployment, backfill Job


def manifest(name: str, namespace: str, store_url: str) -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "encoder": {"version": "e1", "modelUri": "s3://models/encoder/e1"},
            "ranker": {"version": "r1", "modelUri": "s3://models/ranker/r1", "encoderVersion": "e1"},
            "embeddings": {"store": {"url": store_url}, "backfill": {"catalogueUri": "s3://catalogue/snapshots/today"}},
        },
    }


def watch_children(
    api_client: object, namespace: str, seen: dict, modified: list, stop: threading.Event
) -> list[threading.Thread]:
    from kubernetes import dynamic

    client = dynamic.DynamicClient(api_client)
    threads = []
    for api_version, kind in KINDS:
        resource = client.resources.get(api_version=api_version, kind=kind)

        def run(resource: object = resource, kind: str = kind) -> None:
            while not stop.is_set():
                try:
                    for event in resource.watch(
                        namespace=namespace, label_selector="app.kubernetes.io/managed-by=mmrank", timeout=5
                    ):
                        obj = event["raw_object"]["metadata"]
                        if event["type"] == "ADDED":
                            seen.setdefault((kind, obj["name"]), (time.monotonic(), obj["labels"]["mmrank.io/ranker"]))
                        elif event["type"] == "MODIFIED":
                            modified.append((time.monotonic(), kind, obj["name"]))
                        if stop.is_set():
                            return
                except Exception:  # noqa: BLE001 - a dropped watch is restarted
                    time.sleep(0.2)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
    return threads


def rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            name, value = line.split(":")
            fields[name] = int(value.split()[0])
    return fields


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def widen_service_range() -> None:
    """`servers.start_kube_apiserver` gives Services a /24 (254 addresses), fewer than the 300
    encoder Services of 300 rankers; this run asks for a /16. (Asked of the harness owner.)"""
    launch = servers._launch

    def wide(name: str, argv: list[str], workdir: Path, env: dict | None = None):  # type: ignore[no-untyped-def]
        argv = [
            a.replace("10.96.0.0/24", "10.96.0.0/16") if a.startswith("--service-cluster-ip-range") else a for a in argv
        ]
        return launch(name, argv, workdir, env)

    servers._launch = wide  # type: ignore[assignment]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rankers", type=int, default=300)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument(
        "--interval",
        type=float,
        default=30,
        help="operator timer interval (s); the steady-state window after convergence is this plus 10 s",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import urllib3
    from kubernetes import config, dynamic

    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below on SIGTERM
    widen_service_range()
    workdir = Path(tempfile.mkdtemp(prefix="mmrank-bench-operator-"))
    apiserver = servers.start_kube_apiserver(workdir / "apiserver")
    redis = servers.start_redis(workdir / "redis")
    operator = None
    try:
        api_client = config.new_client_from_config(config_file=str(apiserver.extra["kubeconfig"]))
        servers.install_crds(
            api_client,
            [
                *servers.kserve_crds_for_k8s_1_20(servers.shared_dir() / "schemas" / "kserve"),
                servers._drop_empty_string_defaults(api_crd.crd_manifest(cel=False)),
            ],
        )
        client = dynamic.DynamicClient(api_client)
        namespace = "bench"
        client.resources.get(api_version="v1", kind="Namespace").create(
            body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
        )
        env = {**os.environ, "KUBECONFIG": str(apiserver.extra["kubeconfig"])}
        log = open(workdir / "operator.log", "wb")  # noqa: SIM115
        operator = subprocess.Popen(
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
                str(args.interval),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
        time.sleep(3)
        seen: dict = {}
        stop = threading.Event()
        modified: list = []
        watch_children(api_client, namespace, seen, modified, stop)
        rankers = client.resources.get(api_version=api.API_VERSION, kind=api.KIND)
        created: dict[str, float] = {}
        start = time.monotonic()
        for i in range(args.rankers):
            name = f"shop-{i:04d}"
            created[name] = time.monotonic()
            rankers.create(body=manifest(name, namespace, redis.url), namespace=namespace)
        create_s = time.monotonic() - start
        want = args.rankers * PER_RANKER
        peak = {"VmRSS": 0, "VmHWM": 0}
        while len(seen) < want and time.monotonic() - start < args.timeout:
            if operator.poll() is not None:
                raise RuntimeError(f"operator exited: {(workdir / 'operator.log').read_text()[-3000:]}")
            peak = rss_kib(operator.pid)
            time.sleep(0.5)
        total_s = max(t for t, _ in seen.values()) - start if seen else float("nan")
        latencies = [t - created[ranker] for t, ranker in seen.values()]
        per_ranker: dict[str, float] = {}
        for t, ranker in seen.values():
            per_ranker[ranker] = max(per_ranker.get(ranker, 0.0), t - created[ranker])
        # steady state: once kopf has recorded the finished handlers, one full timer interval
        # (every ranker reconciled again) in which nothing should change
        time.sleep(5)
        quiet_from = time.monotonic()
        cpu_before = cpu_seconds(operator.pid)
        status_before = {
            r["metadata"]["name"]: r["metadata"]["resourceVersion"]
            for r in rankers.get(namespace=namespace).to_dict()["items"]
        }
        time.sleep(args.interval + 10)
        cpu_quiet = cpu_seconds(operator.pid) - cpu_before
        status_after = {
            r["metadata"]["name"]: r["metadata"]["resourceVersion"]
            for r in rankers.get(namespace=namespace).to_dict()["items"]
        }
        rss = rss_kib(operator.pid)
        stop.set()
        figures = {
            "rankers": args.rankers,
            "children_applied": len(seen),
            "children_expected": want,
            "create_seconds": round(create_s, 2),
            "all_children_applied_seconds": round(total_s, 2),
            "child_latency_p50_s": round(statistics.median(latencies), 3),
            "child_latency_p99_s": round(percentile(latencies, 0.99), 3),
            "ranker_complete_p50_s": round(statistics.median(per_ranker.values()), 3),
            "ranker_complete_p99_s": round(percentile(list(per_ranker.values()), 0.99), 3),
            "steady_window_s": args.interval + 10,
            "steady_child_writes": sum(1 for t, _, _ in modified if t >= quiet_from),
            "steady_ranker_writes": sum(1 for n, v in status_after.items() if status_before.get(n) != v),
            "steady_operator_cpu_s": round(cpu_quiet, 2),
            "operator_rss_mib": round(rss.get("VmRSS", 0) / 1024, 1),
            "operator_peak_rss_mib": round(max(rss.get("VmHWM", 0), peak.get("VmHWM", 0)) / 1024, 1),
            "cpu_count": os.cpu_count(),
        }
        print(json.dumps(figures, indent=1))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1))
        return 0 if len(seen) == want else 1
    finally:
        if operator is not None:
            operator.terminate()
            try:
                operator.wait(timeout=20)
            except subprocess.TimeoutExpired:
                operator.kill()
        redis.stop()
        apiserver.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
