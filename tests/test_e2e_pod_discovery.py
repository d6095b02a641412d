"""The local node's Prometheus setup (e2e/services.py, e2e/pod_sd.py) on a real Prometheus: the
discovery file and the relabelling give the labels the freshness query and the canary analysis
select on, and keep only annotated, running pods."""

from __future__ import annotations

import json
import time

import httpx
import prometheus_client
import pytest
import yaml

from e2e import pod_sd, services
from harness import servers

pytestmark = [pytest.mark.prometheus]


def pod(name: str, port: int, scrape: str = "true", phase: str = "Running") -> dict:
    return {
        "metadata": {
            "name": name,
            "namespace": "mmrank-dev",
            "labels": {"mmrank.io/ranker": "shop", "app.kubernetes.io/component": "embedder"},
            "annotations": {
                "prometheus.io/scrape": scrape,
                "prometheus.io/port": str(port),
                "prometheus.io/path": "/metrics",
            },
        },
        "status": {"podIP": "127.0.0.1", "phase": phase},
    }


def test_target_groups_carry_kubernetes_sd_meta_labels() -> None:
    [group] = pod_sd.target_groups(
        [pod("embedder-0", 8080), {"metadata": {"name": "pending", "namespace": "x"}, "status": {}}]
    )
    assert group["targets"] == ["127.0.0.1:8080"]
    assert group["labels"]["__meta_kubernetes_pod_label_mmrank_io_ranker"] == "shop"
    assert group["labels"]["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] == "true"


def test_prometheus_scrapes_annotated_running_pods_with_their_labels(tmp_path) -> None:
    server, thread = prometheus_client.start_http_server(0, addr="127.0.0.1")
    port = server.server_address[1]
    try:
        sd_file = tmp_path / "pods.json"
        sd_file.write_text(
            json.dumps(
                pod_sd.target_groups(
                    [pod("embedder-0", port), pod("quiet", port, scrape="false"), pod("done", port, phase="Succeeded")]
                )
            )
        )
        config = services.prometheus_config("1s")
        config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(sd_file)]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        web = servers.free_port()
        binary = servers.find_binary("prometheus", "install Debian's prometheus (./dev.sh setup does)")
        process, log = servers._launch(
            "prometheus",
            [  # noqa: SLF001 - the same launcher the fixtures use
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{web}",
            ],
            tmp_path,
        )
        try:
            deadline, result = time.monotonic() + 30, []
            while time.monotonic() < deadline and not result:
                time.sleep(0.5)
                try:
                    result = httpx.get(
                        f"http://127.0.0.1:{web}/api/v1/query",
                        params={"query": 'up{namespace="mmrank-dev",mmrank_io_ranker="shop"}'},
                        timeout=2,
                    ).json()["data"]["result"]
                except (httpx.HTTPError, KeyError, ValueError):
                    result = []
            assert process.poll() is None, log.read_text()
            assert [r["metric"]["pod"] for r in result] == ["embedder-0"], result
            assert result[0]["metric"]["app_kubernetes_io_component"] == "embedder"
            assert result[0]["value"][1] == "1"
        finally:
            process.terminate()
            process.wait(timeout=15)
    finally:
        server.shutdown()
        thread.join(timeout=5)
