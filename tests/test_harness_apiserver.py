"""Smoke tests of the real kube-apiserver (Debian's kubernetes source, built by ./dev.sh)."""

from __future__ import annotations

import textwrap
import threading
import time

import pytest

from harness import servers

pytestmark = pytest.mark.apiserver

SMOKE_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "smokes.harness.mmrank.io"},
    "spec": {
        "group": "harness.mmrank.io",
        "scope": "Namespaced",
        "names": {"plural": "smokes", "singular": "smoke", "kind": "Smoke"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "properties": {"size": {"type": "integer", "minimum": 1}}},
                            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                        },
                    }
                },
            }
        ],
    },
}


def _smoke_api(kube):
    from kubernetes import dynamic

    servers.install_crds(kube.api_client, [SMOKE_CRD])
    return dynamic.DynamicClient(kube.api_client).resources.get(api_version="harness.mmrank.io/v1", kind="Smoke")


def test_crd_server_side_apply_status_and_watch(kube):
    api = _smoke_api(kube)
    body = {
        "apiVersion": "harness.mmrank.io/v1",
        "kind": "Smoke",
        "metadata": {"name": "one", "namespace": "default"},
        "spec": {"size": 3},
    }
    events: list[tuple[str, dict]] = []

    def watch() -> None:
        for event in api.watch(namespace="default", timeout=10):
            events.append((event["type"], event["raw_object"]))
            if event["raw_object"].get("status", {}).get("seen"):
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(0.5)
    created = api.server_side_apply(body=body, name="one", namespace="default", field_manager="smoke")
    again = api.server_side_apply(body=body, name="one", namespace="default", field_manager="smoke")
    assert created.metadata.generation == again.metadata.generation == 1
    api.status.patch(
        body={"status": {"seen": True}}, name="one", namespace="default", content_type="application/merge-patch+json"
    )
    watcher.join(timeout=15)
    assert any(kind == "ADDED" for kind, _ in events)
    assert any(obj.get("status", {}).get("seen") is True for kind, obj in events if kind == "MODIFIED")
    with pytest.raises(Exception, match="minimum|Invalid"):
        api.server_side_apply(
            body={**body, "metadata": {"name": "bad", "namespace": "default"}, "spec": {"size": 0}},
            name="bad",
            namespace="default",
            field_manager="smoke",
        )


def test_kopf_handler_writes_status(kube, tmp_path, monkeypatch):
    from kopf.testing import KopfRunner

    api = _smoke_api(kube)
    handlers = tmp_path / "handlers.py"
    handlers.write_text(
        textwrap.dedent("""
        import kopf

        @kopf.on.startup()
        def configure(settings: kopf.OperatorSettings, **_):
            settings.persistence.finalizer = "harness.mmrank.io/finalizer"
            settings.watching.server_timeout = 10

        @kopf.on.create("harness.mmrank.io", "v1", "smokes")
        def created(spec, patch, **_):
            patch.status["doubled"] = spec["size"] * 2
    """)
    )
    import kubernetes.config.kube_config

    # kopf logs in through the kubernetes client, whose default kubeconfig path is read at import.
    monkeypatch.setenv("KUBECONFIG", kube.kubeconfig)
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", kube.kubeconfig)
    with KopfRunner(["run", "--standalone", "--namespace=default", "--verbose", str(handlers)], timeout=60) as runner:
        time.sleep(2)
        api.create(
            body={
                "apiVersion": "harness.mmrank.io/v1",
                "kind": "Smoke",
                "metadata": {"name": "kopfed", "namespace": "default"},
                "spec": {"size": 21},
            },
            namespace="default",
        )
        deadline = time.monotonic() + 30
        status: dict = {}
        while time.monotonic() < deadline and "doubled" not in status:
            status = api.get(name="kopfed", namespace="default").to_dict().get("status") or {}
            time.sleep(0.3)
        api.delete(name="kopfed", namespace="default")
        time.sleep(1)
    assert runner.exception is None, runner.output
    assert status.get("doubled") == 42, runner.output[-3000:]


def test_kserve_inferenceservice_server_side_apply_is_idempotent(kserve_installed):
    from kubernetes import dynamic

    api = dynamic.DynamicClient(kserve_installed.api_client).resources.get(
        api_version="serving.kserve.io/v1beta1", kind="InferenceService"
    )
    body = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "smoke-ranker", "namespace": "default"},
        "spec": {
            "predictor": {"containers": [{"name": "kserve-container", "image": "example/ranker:1", "args": ["serve"]}]}
        },
    }
    first = api.server_side_apply(body=body, name="smoke-ranker", namespace="default", field_manager="smoke")
    second = api.server_side_apply(body=body, name="smoke-ranker", namespace="default", field_manager="smoke")
    assert first.metadata.generation == 1
    assert second.metadata.generation == 1
    assert second.metadata.resourceVersion == first.metadata.resourceVersion


def test_only_empty_string_defaults_are_stripped_from_kserve_crds(kserve_crds):
    import yaml

    raw = (servers.shared_dir() / "schemas" / "kserve" / "serving.kserve.io_inferenceservices.yaml").read_text()
    assert 'default: ""' in raw
    isvc = next(c for c in kserve_crds if c["metadata"]["name"] == "inferenceservices.serving.kserve.io")
    dumped = yaml.safe_dump(isvc)
    assert "default: ''" not in dumped
    assert "default: /mnt/models" in dumped
