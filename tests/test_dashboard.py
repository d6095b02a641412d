"""The Grafana dashboard and the alert rules against a running system, in the real Prometheus.

One module-wide system: the real kube-apiserver with the operator (`mmrank operator run
--metrics-port`, a subprocess) reconciling the ranker `shop` through a canary from r1 to r2 (a
thread plays the Deployment and KServe controllers); two real predictors (r1, r2) under the load
generator with click feedback, routed by the traffic the operator writes (`harness.loadgen`:
`CanaryRig`, `Router`); the real embedder (a subprocess) embedding posted items with the real
Triton into the ranker's store, which a real backfill filled first. Prometheus finds them as pods (the `file_sd` stand-in for Kubernetes discovery of
e2e/pod_sd.py, with the production relabelling of e2e/services.py and the scrape annotations the
operator's child builders put on the pod templates) and evaluates rules/mmrank.rules.yaml.

Every query of every dashboard panel must return series over the run, and every alert must
load and evaluate. With MMRANK_DASHBOARD_PNG=1 the panels are drawn from those series into
docs/img/dashboard.png (tools/plot_dashboard.py), beside the series (dashboard-data.json);
otherwise into the test's folder.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from e2e import pod_sd
from e2e import services as e2e_services
from harness import servers
from harness.loadgen import CanaryRig, Controllers, Router
from mmrank import api, api_crd

pytestmark = [pytest.mark.apiserver, pytest.mark.prometheus, pytest.mark.redis, pytest.mark.triton, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "mmrank-operator"
DASHBOARD = CHART / "dashboards" / "mmrank.json"
RULES = CHART / "rules" / "mmrank.rules.yaml"
RANKER = "shop"
RATE_WINDOW = "5s"
CATALOGUE = 64


# --- the files alone ----------------------------------------------------------------------------


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, legend, PromQL) of every target of every panel."""
    return [(p["title"], t.get("legendFormat", ""), t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def concrete(expr: str, namespace: str) -> str:
    """A panel query as Grafana sends it for one namespace and ranker."""
    return expr.replace("$__rate_interval", RATE_WINDOW).replace("$namespace", namespace).replace("$ranker", RANKER)


def test_promtool_checks_the_rules_file() -> None:
    promtool = servers.find_binary("promtool", "install Debian's prometheus (./dev.sh setup does)")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout


def test_the_prometheus_rule_and_the_dashboard_configmap_carry_the_files(helm_binary: str) -> None:
    rendered = subprocess.run(
        [
            helm_binary,
            "template",
            "m",
            str(CHART),
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "dashboards.enabled=true",
            "--set",
            "prometheusRule.labels.release=kps",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rendered.returncode == 0, rendered.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(rendered.stdout) if d}
    rule = docs["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    configmap = next(
        d
        for d in yaml.safe_load_all(rendered.stdout)
        if d and d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboards")
    )
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["mmrank.json"]) == json.loads(DASHBOARD.read_text())
    off = subprocess.run([helm_binary, "template", "m", str(CHART)], capture_output=True, text=True, timeout=120)
    assert "PrometheusRule" not in off.stdout and "grafana_dashboard" not in off.stdout


def test_every_panel_names_only_metrics_the_code_exports() -> None:
    import ast

    exported = set()
    for source in ("operator/metrics.py", "predictors/ranking_metrics.py", "encoders/embedder_metrics.py"):
        tree = ast.parse((ROOT / source).read_text())
        exported |= {
            node.args[0].value
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) in ("Counter", "Gauge", "Histogram")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        }
    assert len(exported) > 10, exported
    import re

    expressions = [q for _, _, q in panel_queries(json.loads(DASHBOARD.read_text()))]
    expressions += [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    for expr in expressions:
        for name in set(re.findall(r"\b(mmrank_[a-z0-9_]+)", expr)) - {"mmrank_io_ranker"}:  # a pod label
            base = re.sub(r"_(total|bucket|sum|count)$", "", name)
            assert base in exported, f"{name} in {expr!r} is exported by none of the parts"


# --- the running system -------------------------------------------------------------------------


def png(seed: int) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def write_catalogue(directory: Path, n: int) -> Path:
    """The two shop files a backfill reads (items.parquet, images.npy)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    pq.write_table(
        pa.table({"item_id": np.arange(n, dtype=np.int64), "title": [f"blue shirt {i}" for i in range(n)]}),
        directory / "items.parquet",
    )
    np.save(directory / "images.npy", rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8))
    return directory


def start_triton(workdir: Path) -> servers.Server:
    import torch

    from mmrank.encoders.export import export_repository
    from mmrank.encoders.model import EncoderConfig, ItemEncoder

    torch.manual_seed(0)
    encoder = ItemEncoder(
        EncoderConfig(dim=16, image_channels=(8, 16), text_width=32, text_layers=1, text_heads=2, vocab_size=512)
    ).eval()
    export_repository(encoder, workdir / "repo", model_name="enc", max_batch_size=32, max_queue_delay_us=1000)
    return servers.start_triton(workdir / "repo", workdir / "triton")


def start_process(
    name: str, argv: list[str], workdir: Path, ready_url: str, env: dict[str, str] | None = None, timeout: float = 120.0
) -> servers.Server:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    server = servers.Server(name, process, log_path, ready_url.rsplit("/", 1)[0], 0, workdir)
    servers.wait_until(server, lambda: servers.http_ok(ready_url), timeout, "answering")
    return server


def pod(namespace: str, template: dict[str, Any], port: int) -> dict[str, Any]:
    """A running pod of a child's pod template, at 127.0.0.1 with its metrics port moved to `port`
    (the processes of this test share one address)."""
    annotations = {**template["metadata"].get("annotations", {}), "prometheus.io/port": str(port)}
    component = template["metadata"]["labels"].get("app.kubernetes.io/component", "operator")
    return {
        "metadata": {
            "namespace": namespace,
            "name": f"{component}-{uuid.uuid4().hex[:5]}",
            "labels": template["metadata"]["labels"],
            "annotations": annotations,
        },
        "status": {"podIP": "127.0.0.1", "phase": "Running"},
    }


def manifest(namespace: str, store_url: str, prometheus_url: str, ranker: str) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": RANKER, "namespace": namespace},
        "spec": {
            "encoder": {"version": "e1", "modelUri": "s3://models/encoder/e1"},
            "ranker": {"version": ranker, "modelUri": f"s3://models/ranker/{ranker}", "encoderVersion": "e1"},
            "embeddings": {"store": {"url": store_url}, "minCoverage": 0.99},
            "rollout": {
                "steps": [50],
                "interval": "3s",
                "prometheusUrl": prometheus_url,
                "analysis": {"maxErrorRate": 0.5, "maxLatencyP99Ms": 5000, "minClickRateRatio": 0.3, "minRequests": 5},
            },
        },
    }


def wait_for(what: str, check: Callable[[], Any], timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = check()
            if last:
                return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


class System:
    """Everything the dashboard reads, running; `stop()` ends it."""

    def __init__(self, workdir: Path, kube: Any, kubeconfig: str) -> None:
        self.workdir, self.started = workdir, []
        self.namespace = f"d-{uuid.uuid4().hex[:6]}"
        self.blocked = f"q-{uuid.uuid4().hex[:6]}"
        results: dict[str, Any] = {}

        def run(key: str, start: Callable[[], Any]) -> None:
            try:
                results[key] = start()
            except BaseException as exc:  # noqa: BLE001 - reported below, with the others
                results[key] = exc

        threads = [
            threading.Thread(target=run, args=("rig", lambda: CanaryRig(workdir / "rig", "r1", "r2"))),
            threading.Thread(target=run, args=("triton", lambda: start_triton(workdir))),
            threading.Thread(target=run, args=("redis", lambda: servers.start_redis(workdir / "redis"))),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for value in results.values():
            if isinstance(value, CanaryRig):
                self.started.extend(value.servers())
            elif isinstance(value, servers.Server):
                self.started.append(value)
        failed = [f"{k}: {v}" for k, v in results.items() if isinstance(v, BaseException)]
        if failed:
            self.stop()
            raise servers.ServerUnavailable("; ".join(failed))
        self.rig, self.triton, self.redis = results["rig"], results["triton"], results["redis"]
        self.prometheus = self.rig.prometheus
        self.kube, self.kubeconfig = kube, kubeconfig
        self.scope = f"{self.namespace}/{RANKER}"  # the store keys of the ranker (MMRANK_SCOPE, as in its pods)

    def backfill(self) -> None:
        """The space e1 of the ranker, filled by the real backfill (its progress is in the store)."""
        catalogue = write_catalogue(self.workdir / "catalogue", CATALOGUE)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "mmrank",
                "backfill",
                "run",
                "--space",
                "e1",
                "--shard",
                "0/1",
                "--encoder",
                f"{self.triton.extra['grpc_url']}/enc",
                "--store",
                self.redis.url,
                "--catalogue",
                str(catalogue),
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.workdir,
            env={**os.environ, "MMRANK_SCOPE": self.scope},
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def start_embedder(self) -> None:
        port = servers.free_port()
        self.embedder = start_process(
            "embedder",
            [
                sys.executable,
                "-m",
                "mmrank",
                "embedder",
                "run",
                "--encoder",
                f"e1={self.triton.extra['grpc_url']}/enc",
                "--store",
                self.redis.url,
                "--http-host",
                "127.0.0.1",
                "--http-port",
                str(port),
                "--max-wait",
                "0.02",
            ],
            self.workdir / "embedder",
            f"http://127.0.0.1:{port}/readyz",
            env={"MMRANK_SCOPE": self.scope},
        )
        self.embedder.port = port
        self.started.append(self.embedder)

    def start_operator(self) -> None:
        port = servers.free_port()
        self.operator = start_process(
            "operator",
            [
                sys.executable,
                "-m",
                "mmrank",
                "operator",
                "run",
                "--standalone",
                "--namespace",
                self.namespace,
                "--namespace",
                self.blocked,
                "--interval",
                "1",
                "--metrics-port",
                str(port),
            ],
            self.workdir / "operator",
            f"http://127.0.0.1:{port}/metrics",
            env={"KUBECONFIG": self.kubeconfig},
        )
        self.operator.port = port
        self.started.append(self.operator)

    def scrape_everything(self) -> None:
        """Prometheus as in a cluster: pods found with their labels and scrape annotations, the
        production relabelling, the alert rules loaded; reloaded in place."""
        from mmrank.operator import children, reconcile

        body = manifest(self.namespace, self.redis.url, self.prometheus.url, "r1")
        ranker = reconcile.parse({**body, "metadata": {**body["metadata"], "uid": "u"}})
        pods = [
            pod(
                self.namespace,
                children.build_embedder_deployment(ranker, ["e1"])["spec"]["template"],
                self.embedder.port,
            )
        ]
        triton_port = int(self.triton.extra["metrics_url"].split(":")[-1].split("/")[0])
        pods.append(pod(self.namespace, children.build_encoder_deployment(ranker)["spec"]["template"], triton_port))
        for variant, predictor in self.rig.predictors.items():
            served = ranker.spec.ranker.model_copy(update={"version": variant})
            template = children.build_ranker_deployment(ranker, served, 1, "stable")["spec"]["template"]
            pods.append(pod(self.namespace, template, predictor.port))
        operator_pod = {
            "metadata": {
                "labels": {"app.kubernetes.io/name": "mmrank-operator"},
                "annotations": {"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics"},
            }
        }
        pods.append(pod("mmrank-system", operator_pod, self.operator.port))
        sd_file = self.prometheus.workdir / "pods.json"
        sd_file.write_text(json.dumps(pod_sd.target_groups(pods)))
        config = e2e_services.prometheus_config("1s")
        config["scrape_configs"][0]["file_sd_configs"] = [{"files": [str(sd_file)], "refresh_interval": "1s"}]
        config["rule_files"] = [str(RULES)]
        (self.prometheus.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        reloaded = httpx.post(f"{self.prometheus.url}/-/reload", timeout=10)
        assert reloaded.status_code == 200, reloaded.text
        wait_for(
            "every pod scraped",
            lambda: self.instant('count(up{job="kubernetes-pods"} == 1)') == [len(pods)],
            timeout=30,
        )

    def instant(self, promql: str) -> list[float]:
        answer = httpx.get(f"{self.prometheus.url}/api/v1/query", params={"query": promql}, timeout=10).json()
        assert answer["status"] == "success", answer
        return [float(s["value"][1]) for s in answer["data"]["result"]]

    def post_items(self, first: int, stop: threading.Event, every: float = 0.25) -> None:
        """New items, one every `every` seconds, until `stop`."""
        item = first
        while not stop.wait(every):
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(
                    f"http://127.0.0.1:{self.embedder.port}/items",
                    timeout=10,
                    json={"item_id": item, "title": f"red dress {item}", "image": png(item)},
                )
            item += 1

    def stop(self) -> None:
        for server in reversed(self.started):
            with contextlib.suppress(Exception):
                server.stop()


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, _kube_session: Any, kserve_crds: list) -> Iterator[System]:
    if isinstance(_kube_session, str):
        pytest.fail(f"real server unavailable: {_kube_session}", pytrace=False)
    from kubernetes import config, dynamic

    kubeconfig = str(_kube_session.extra["kubeconfig"])
    api_client = config.new_client_from_config(config_file=kubeconfig)
    servers.install_crds(api_client, [*kserve_crds, api_crd.crd_manifest(cel=False)])
    try:
        running = System(tmp_path_factory.mktemp("dashboard"), api_client, kubeconfig)
    except servers.ServerUnavailable as exc:
        pytest.fail(f"real server unavailable: {exc}", pytrace=False)
    client = dynamic.DynamicClient(api_client)
    namespaces = client.resources.get(api_version="v1", kind="Namespace")
    controllers = None
    try:
        for name in (running.namespace, running.blocked):
            namespaces.create(body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        controllers = Controllers(api_client, running.namespace).__enter__()
        running.backfill()
        running.start_embedder()
        running.start_operator()
        running.scrape_everything()
        yield running
    finally:
        if controllers is not None:
            controllers.__exit__()
        running.stop()


def drive(system: System) -> tuple[float, float]:
    """A ranker made stable on r1 and moved to r2 through a canary, under load with clicks; items
    embedded (and two refused); a second ranker whose children a ResourceQuota refuses. Returns
    the run's (start, end) in Prometheus time."""
    from kubernetes import dynamic

    client = dynamic.DynamicClient(system.kube)
    rankers = client.resources.get(api_version=api.API_VERSION, kind=api.KIND)
    started = time.time()

    def status() -> dict[str, Any]:
        return rankers.get(name=RANKER, namespace=system.namespace).to_dict().get("status") or {}

    rankers.create(
        body=manifest(system.namespace, system.redis.url, system.prometheus.url, "r1"), namespace=system.namespace
    )
    generator = system.rig.generator(rate=30, canary_click=0.1, stable_click=0.1, concurrency=4, timeout=5.0)
    stop_posting = threading.Event()
    poster = threading.Thread(target=system.post_items, args=(1000, stop_posting), daemon=True)
    with generator, Router(status, generator, "r2"):  # r2 gets the share the operator gives it
        generator.start(seconds=120)
        poster.start()
        for bad in ({"item_id": 1, "title": " ", "image": png(0)}, {"item_id": "x", "title": "t", "image": png(0)}):
            httpx.post(f"http://127.0.0.1:{system.embedder.port}/items", json=bad, timeout=10)
        httpx.post(f"{system.rig.stable.url}/v2/models/ranker/infer", content=b"{not json", timeout=10)
        wait_for("r1 stable", lambda: (status().get("stable") or {}).get("rankerVersion") == "r1")
        quotas = client.resources.get(api_version="v1", kind="ResourceQuota")
        nothing = {"count/configmaps": "0", "count/deployments.apps": "0"}
        quotas.create(
            namespace=system.blocked,
            body={
                "apiVersion": "v1",
                "kind": "ResourceQuota",
                "metadata": {"name": "nothing"},
                "spec": {"hard": nothing},
            },
        )
        # The quota controller's part (none runs here): admission enforces only a quota with usage.
        quotas.status.patch(
            name="nothing",
            namespace=system.blocked,
            content_type="application/merge-patch+json",
            body={"status": {"hard": nothing, "used": nothing}},
        )
        rankers.create(
            body=manifest(system.blocked, system.redis.url, system.prometheus.url, "r1"), namespace=system.blocked
        )
        rankers.patch(
            name=RANKER,
            namespace=system.namespace,
            content_type="application/merge-patch+json",
            body={"spec": manifest(system.namespace, system.redis.url, system.prometheus.url, "r2")["spec"]},
        )
        wait_for("r2 promoted", lambda: (status().get("stable") or {}).get("rankerVersion") == "r2", timeout=90)
        time.sleep(6)  # r2 stable for a few scrapes
        generator.stop()
        stop_posting.set()
        poster.join(30)
    try:
        wait_for("the refused child counted", lambda: system.instant("sum(mmrank_operator_errors_total)"), timeout=30)
    except AssertionError as exc:
        lines = [
            line
            for line in system.operator.log_path.read_text(errors="replace").splitlines()
            if system.blocked in line and "Timer 'on_timer' succeeded" not in line
        ]
        blocked = rankers.get(name=RANKER, namespace=system.blocked).to_dict().get("status")
        raise AssertionError(f"{exc}\nstatus: {blocked}\noperator log:\n" + "\n".join(lines[-30:])) from None
    return started, time.time()


def test_every_panel_query_returns_series_and_every_alert_evaluates(system: System, tmp_path: Path) -> None:
    start, end = drive(system)
    dashboard = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    empty = []
    for panel in dashboard["panels"]:
        drawn = {"title": panel["title"], "unit": panel["fieldConfig"]["defaults"].get("unit", ""), "series": []}
        for target in panel["targets"]:
            expr = concrete(target["expr"], system.namespace)
            answer = httpx.get(
                f"{system.prometheus.url}/api/v1/query_range",
                timeout=30,
                params={"query": expr, "start": start, "end": end, "step": "1s"},
            ).json()
            assert answer["status"] == "success", (panel["title"], expr, answer)
            if not answer["data"]["result"]:
                empty.append(f"{panel['title']}: {expr}")
            for series in answer["data"]["result"]:
                legend = target.get("legendFormat", "")
                for key, value in series["metric"].items():
                    legend = legend.replace("{{" + key + "}}", value)
                drawn["series"].append(
                    {"legend": legend, "points": [[float(t) - start, float(v)] for t, v in series["values"]]}
                )
        panels.append(drawn)
    assert not empty, "panel queries without series:\n" + "\n".join(empty)

    rules = httpx.get(f"{system.prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {r["name"]: r for g in rules for r in g["rules"]}
    expected = [r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert sorted(loaded) == sorted(expected)
    for name, rule in loaded.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
        system.instant(rule["query"])  # evaluates now, answers success
    # Alerts that this run must leave quiet, and the one it provokes.
    assert loaded["MmrankCoverageBelowMinCoverage"]["state"] == "inactive"
    assert loaded["MmrankCanaryFailing"]["state"] == "inactive"
    assert system.instant('mmrank_operator_space_coverage{serving="true", ranker="shop"}') == [1.0]
    assert system.instant(f'mmrank_operator_backfill_progress{{ranker_namespace="{system.namespace}"}}') == [1.0]
    for decision in ("start", "promote", "complete"):
        assert system.instant(f'mmrank_operator_canary_decisions_total{{decision="{decision}"}}')[0] >= 1, decision
    assert system.instant('sum(mmrank_operator_errors_total{reason="Forbidden"})')[0] >= 1

    folder = ROOT / "docs" / "img" if os.environ.get("MMRANK_DASHBOARD_PNG") else tmp_path
    data, out = folder / "dashboard-data.json", folder / "dashboard.png"  # the picture and what it shows
    data.write_text(
        json.dumps(
            {"title": dashboard["title"], "seconds": round(end - start, 1), "panels": panels}, separators=(",", ":")
        )
    )
    drawn = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plot_dashboard.py"), str(data), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert drawn.returncode == 0, drawn.stdout + drawn.stderr
    assert out.stat().st_size > 10_000
