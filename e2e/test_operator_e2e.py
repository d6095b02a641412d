"""The operator against a real cluster named by KUBECONFIG (see e2e/README.md). Skipped, with the
reason, when there is none: these are not part of CI, which runs tests/ on a bare apiserver."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

TIMER_S = 2.0  # the operator's level-triggered reconcile interval here


def _api_client() -> Any:
    config_file = os.environ.get("KUBECONFIG")
    if not config_file or not Path(config_file).expanduser().exists():
        pytest.skip("e2e skipped: no KUBECONFIG names a cluster (see e2e/README.md)")
    from kubernetes import client, config

    try:
        api_client = config.new_client_from_config(config_file=str(Path(config_file).expanduser()))
        client.VersionApi(api_client).get_code(_request_timeout=5)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the cluster means: skipped
        pytest.skip(f"e2e skipped: the cluster in KUBECONFIG does not answer: {exc}")
    return api_client


def _wait(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_create_apply_idempotent_delete() -> None:
    api_client = _api_client()
    import kopf
    from kopf.testing import KopfRunner
    from kubernetes import dynamic

    from harness import servers
    from mmrank import api, api_crd
    from mmrank.operator import handlers, observe
    from mmrank.operator.kube import CHILD_KINDS, Kube

    version = dynamic.DynamicClient(api_client).version["kubernetes"]
    cel = (int(version["major"]), int(str(version["minor"]).rstrip("+"))) >= (1, 25)
    # Old apiservers know no CEL and refuse `default: ""` (KServe's CRDs and ours alike).
    crds = [
        api_crd.crd_manifest(cel=True) if cel else servers._drop_empty_string_defaults(api_crd.crd_manifest(cel=False))
    ]
    crds += servers.kserve_crds_for_k8s_1_20(servers.shared_dir() / "schemas" / "kserve")
    servers.install_crds(api_client, crds, field_manager="mmrank-e2e")
    client = dynamic.DynamicClient(api_client)
    namespace = f"mmrank-e2e-{uuid.uuid4().hex[:6]}"
    namespaces = client.resources.get(api_version="v1", kind="Namespace")
    namespaces.create(body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    rankers = client.resources.get(api_version=api.API_VERSION, kind=api.KIND)

    def children() -> dict:
        out = {}
        for api_version, kind in CHILD_KINDS:
            for item in (
                client.resources.get(api_version=api_version, kind=kind)
                .get(namespace=namespace, label_selector="mmrank.io/ranker=shop")
                .to_dict()["items"]
            ):
                out[(kind, item["metadata"]["name"])] = item
        return out

    handlers.Context.kube = Kube(api_client)
    handlers.Context.store = observe.FixedCoverage({"e1": 0.25})
    try:
        with KopfRunner(
            ["run", "--standalone", "--namespace", namespace],
            timeout=60,
            registry=handlers.register(kopf.OperatorRegistry(), interval=TIMER_S),
        ):
            rankers.create(
                namespace=namespace,
                body={
                    "apiVersion": api.API_VERSION,
                    "kind": api.KIND,
                    "metadata": {"name": "shop"},
                    "spec": {
                        "encoder": {"version": "e1", "modelUri": "s3://models/encoder/e1", "gpus": 0},
                        "ranker": {"version": "r1", "modelUri": "s3://models/ranker/r1", "encoderVersion": "e1"},
                        "embeddings": {
                            "store": {"url": "redis://redis.invalid:6379/0"},
                            "backfill": {"catalogueUri": "s3://catalogue/snapshots/today"},
                        },
                    },
                },
            )
            found = _wait("children", lambda: len(c := children()) == 5 and c)
            uid = rankers.get(name="shop", namespace=namespace).metadata.uid
            assert all(c["metadata"]["ownerReferences"][0]["uid"] == uid for c in found.values())
            _wait(
                "Backfilling",
                lambda: (
                    (rankers.get(name="shop", namespace=namespace).to_dict().get("status") or {}).get("phase")
                    == "Backfilling"
                ),
            )
            before = {k: v["metadata"].get("generation") for k, v in children().items()}
            time.sleep(5)
            assert {k: v["metadata"].get("generation") for k, v in children().items()} == before
            rankers.delete(name="shop", namespace=namespace)
            _wait("children gone", lambda: not children())
    finally:
        handlers.Context.kube = None
        handlers.Context.store = None
        namespaces.delete(name=namespace)
