"""Smoke tests of the real Redis and Prometheus, and of the fixtures' failure messages."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request

import pytest

from harness import servers


@pytest.mark.redis
def test_redis_round_trip(redis_client):
    redis_client.set("mmrank:smoke", b"\x00\x01")
    assert redis_client.get("mmrank:smoke") == b"\x00\x01"
    assert redis_client.xadd("mmrank:stream", {"k": "v"})
    assert redis_client.xlen("mmrank:stream") == 1


@pytest.mark.redis
def test_redis_keeps_acknowledged_writes_across_a_crash(tmp_path):
    first = servers.start_redis(tmp_path / "r")
    try:
        import redis

        redis.Redis.from_url(first.url).set("kept", "yes")
        first.kill()
        second = servers.start_redis(tmp_path / "r", port=first.port)
        try:
            assert redis.Redis.from_url(second.url).get("kept") == b"yes"
        finally:
            second.stop()
    finally:
        first.stop()


@pytest.mark.prometheus
def test_prometheus_scrapes_an_exporter_and_answers_promql(start_prometheus):
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    registry = CollectorRegistry()
    gauge = Gauge("mmrank_smoke_value", "a value the test exports", registry=registry)
    gauge.set(42.5)
    port = servers.free_port()
    http_server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        prometheus = start_prometheus([f"127.0.0.1:{port}"])
        query = urllib.parse.urlencode({"query": "mmrank_smoke_value"})
        deadline = time.monotonic() + 30
        result: list = []
        while time.monotonic() < deadline and not result:
            with urllib.request.urlopen(f"{prometheus.url}/api/v1/query?{query}", timeout=5) as response:
                result = json.load(response)["data"]["result"]
            time.sleep(0.5)
        assert result, "Prometheus never returned the exported series"
        assert float(result[0]["value"][1]) == 42.5
    finally:
        http_server.shutdown()
        thread.join(timeout=5)


def test_a_missing_binary_is_named_not_skipped(monkeypatch, tmp_path):
    monkeypatch.setattr(servers, "BIN_DIR", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(servers.ServerUnavailable, match="redis-server.*redis-server"):
        servers.start_redis(tmp_path / "r")
    with pytest.raises(servers.ServerUnavailable, match="kube-apiserver"):
        servers.start_kube_apiserver(tmp_path / "k")


def test_helm_and_kubectl_run(helm_binary, kubectl_binary):
    import subprocess

    helm = subprocess.run([helm_binary, "version"], capture_output=True, text=True, timeout=60)
    assert helm.returncode == 0 and "v4." in helm.stdout, helm.stdout + helm.stderr
    kubectl = subprocess.run([kubectl_binary, "version", "--client"], capture_output=True, text=True, timeout=60)
    assert kubectl.returncode == 0 and "Client Version: v1.33" in kubectl.stdout, kubectl.stdout + kubectl.stderr
