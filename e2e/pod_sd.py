"""Pod discovery for the local node's Prometheus: the stand-in for `kubernetes_sd_configs`.

Debian's prometheus (2.42) is built without Kubernetes service discovery, so a sidecar lists the
namespace's pods every second and writes them as a `file_sd_configs` file carrying the very
`__meta_kubernetes_*` labels Kubernetes discovery (role pod) gives each target. Prometheus then
applies the production relabelling unchanged (e2e/services.py). The sidecar runs this file with
the operator image's Python and Kubernetes client; it is shipped in a ConfigMap.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any


def sanitize(name: str) -> str:
    """Prometheus' label-name sanitising of a Kubernetes label or annotation key."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def target_groups(pods: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One target group per pod with an IP, labelled as `kubernetes_sd` role pod labels it."""
    groups = []
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status") or {}
        ip = status.get("podIP")
        if not ip:
            continue
        annotations = meta.get("annotations") or {}
        port = annotations.get("prometheus.io/port")
        labels = {
            "__meta_kubernetes_namespace": meta["namespace"],
            "__meta_kubernetes_pod_name": meta["name"],
            "__meta_kubernetes_pod_ip": ip,
            "__meta_kubernetes_pod_phase": status.get("phase") or "",
        }
        for key, value in (meta.get("labels") or {}).items():
            labels[f"__meta_kubernetes_pod_label_{sanitize(key)}"] = value
            labels[f"__meta_kubernetes_pod_labelpresent_{sanitize(key)}"] = "true"
        for key, value in annotations.items():
            labels[f"__meta_kubernetes_pod_annotation_{sanitize(key)}"] = value
        groups.append({"targets": [f"{ip}:{port}" if port else ip], "labels": labels})
    return groups


def main(namespace: str, out: str, interval: float = 1.0) -> None:
    from kubernetes import client, config

    config.load_incluster_config()
    core = client.CoreV1Api()
    last = None
    while True:
        try:
            raw = core.list_namespaced_pod(namespace, _request_timeout=10, _preload_content=False)
            text = json.dumps(target_groups(json.loads(raw.data)["items"]), sort_keys=True)
        except Exception as exc:  # noqa: BLE001 - keep the last file; say why
            print(f"pod discovery: {exc}", file=sys.stderr, flush=True)
        else:
            if text != last:
                with open(out + ".tmp", "w") as file:
                    file.write(text)
                os.replace(out + ".tmp", out)
                last = text
        time.sleep(interval)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
