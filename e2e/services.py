"""Redis and Prometheus for the local node: images built here from Debian's packages (the same
`redis-server` and `prometheus` the tests run on this machine), and their manifests.

The images are built in `harness.images`' way (buildah on the debootstrap base, an OCI archive
named by a hash of what the build reads) but outside the Dockerfile: they hold no mmrank code,
and a Dockerfile change must not rebuild them. Prometheus finds its targets with the usual
relabelling of Kubernetes pod discovery: it keeps pods annotated `prometheus.io/scrape: "true"`,
takes port and path from `prometheus.io/port` / `path`, maps every pod label to a label
(`mmrank.io/ranker` becomes `mmrank_io_ranker`) and adds `namespace` / `pod`, which is what
`operator/observe.py`'s freshness query and the canary analysis read. Debian's prometheus is built
without `kubernetes_sd_configs`, so the discovery itself is a sidecar (e2e/pod_sd.py, with RBAC to
list pods) writing the same `__meta_kubernetes_pod_*` labels into a `file_sd_configs` file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from harness import images


@dataclasses.dataclass(frozen=True)
class ServiceImage:
    name: str
    packages: tuple[str, ...]
    user: str
    command: tuple[str, ...]


REDIS = ServiceImage(
    "localhost/mmrank/redis:bookworm",
    ("redis-server",),
    "redis",
    ("redis-server", "--protected-mode", "no", "--save", "", "--appendonly", "no"),
)
PROMETHEUS = ServiceImage(
    "localhost/mmrank/prometheus:bookworm",
    ("prometheus",),
    "prometheus",
    ("prometheus", "--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"),
)
SERVICE_IMAGES = {"redis": REDIS, "prometheus": PROMETHEUS}
SCRAPE_INTERVAL = "2s"


def build(image: ServiceImage) -> Path:
    """The image as an OCI archive under the image cache (built once per base and package list)."""
    base = images.base_image()
    base_id = images.buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", base).strip()
    key = hashlib.sha256(json.dumps([base_id, dataclasses.asdict(image)]).encode()).hexdigest()[:16]
    short = image.name.rsplit("/", 1)[-1].split(":")[0]
    archive = images.IMAGE_DIR / f"svc-{short}-{key}.tar"
    if archive.exists():
        return archive
    images.IMAGE_DIR.mkdir(parents=True, exist_ok=True)
    container = images.buildah("from", base, what="buildah from").strip()
    try:
        images.buildah(
            "run",
            "--isolation",
            "chroot",
            "--network",
            "host",
            container,
            "--",
            "sh",
            "-c",
            "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
            f"--no-install-recommends {' '.join(image.packages)} && rm -rf /var/lib/apt/lists/*",
            what=f"apt-get install {' '.join(image.packages)}",
        )
        images.buildah(
            "config", "--user", image.user, "--entrypoint", "[]", "--cmd", json.dumps(list(image.command)), container
        )
        images.buildah("commit", "--rm", container, image.name, what=f"buildah commit {image.name}")
    except BaseException:
        subprocess.run(
            [
                "buildah",
                "--storage-driver",
                images.BUILDAH_DRIVER,
                "--root",
                str(images.BUILDAH_ROOT / "storage"),
                "--runroot",
                str(images.BUILDAH_ROOT / "run"),
                "rm",
                container,
            ],
            capture_output=True,
        )
        raise
    images._push(image.name, archive)  # noqa: SLF001 - the same archive format the node imports
    return archive


SD_FILE = "/sd/pods.json"
SD_SOURCE = Path(__file__).with_name("pod_sd.py")


def prometheus_config(scrape_interval: str = SCRAPE_INTERVAL) -> dict[str, Any]:
    """Annotated pods, relabelled as with `kubernetes_sd_configs` role pod (found by the sidecar)."""
    meta = "__meta_kubernetes_pod_"
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {
                "job_name": "kubernetes-pods",
                "file_sd_configs": [{"files": [SD_FILE], "refresh_interval": "5s"}],
                "relabel_configs": [
                    {"source_labels": [f"{meta}annotation_prometheus_io_scrape"], "action": "keep", "regex": "true"},
                    {"source_labels": [f"{meta}phase"], "action": "keep", "regex": "Running"},
                    {
                        "source_labels": [f"{meta}annotation_prometheus_io_path"],
                        "action": "replace",
                        "target_label": "__metrics_path__",
                        "regex": "(.+)",
                    },
                    {
                        "source_labels": ["__address__", f"{meta}annotation_prometheus_io_port"],
                        "action": "replace",
                        "regex": r"([^:]+)(?::\d+)?;(\d+)",
                        "replacement": "$1:$2",
                        "target_label": "__address__",
                    },
                    {"action": "labelmap", "regex": f"{meta}label_(.+)"},
                    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                    {"source_labels": [f"{meta}name"], "target_label": "pod"},
                ],
            }
        ],
    }


REDIS_DATA = "/var/lib/mmrank-e2e/redis"


REDIS_ON_NODE = {"hostPath": {"path": REDIS_DATA, "type": "Directory"}}
REDIS_CLAIM = "redis-data"


def manifests(namespace: str, redis_volume: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Redis and Prometheus (Deployment + Service each) and Prometheus' RBAC to list pods.

    Redis keeps an append-only file on `redis_volume` (default: a hostPath on the local node that
    the caller creates writable; on another cluster a claim of its default StorageClass, see
    `redis_claim`), so stopping it (scaled to 0) and starting it again loses no vector."""

    def deployment(name: str, image: ServiceImage, port: int, extra: dict[str, Any]) -> dict[str, Any]:
        container = {
            "name": name,
            "image": image.name,
            "imagePullPolicy": "Never",
            "args": list(image.command),
            "ports": [{"containerPort": port}],
            "readinessProbe": extra.pop("probe"),
            **extra.pop("container", {}),
        }
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"terminationGracePeriodSeconds": 2, "containers": [container], **extra},
                },
            },
        }

    def service(name: str, port: int) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"app": name}, "ports": [{"port": port, "targetPort": port}]},
        }

    redis = deployment(
        "redis",
        REDIS,
        6379,
        {
            "probe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 1},
            "container": {
                "args": [
                    "redis-server",
                    "--protected-mode",
                    "no",
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "everysec",
                    "--dir",
                    "/data",
                ],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            },
            "securityContext": {"fsGroup": 2000},  # a fresh claim's root is made writable for the redis user
            "volumes": [{"name": "data", **(redis_volume or REDIS_ON_NODE)}],
        },
    )
    discovery = {
        "name": "pod-discovery",
        "image": images.TARGETS["operator"].name,
        "imagePullPolicy": "Never",
        "command": ["python", "/etc/prometheus/pod_sd.py", namespace, SD_FILE],
        "volumeMounts": [{"name": "config", "mountPath": "/etc/prometheus"}, {"name": "sd", "mountPath": "/sd"}],
    }
    prometheus = deployment(
        "prometheus",
        PROMETHEUS,
        9090,
        {
            "probe": {"httpGet": {"path": "/-/ready", "port": 9090}, "periodSeconds": 1},
            "container": {
                "volumeMounts": [
                    {"name": "config", "mountPath": "/etc/prometheus"},
                    {"name": "data", "mountPath": "/prometheus"},
                    {"name": "sd", "mountPath": "/sd"},
                ]
            },
            "serviceAccountName": "prometheus",
            "volumes": [
                {"name": "config", "configMap": {"name": "prometheus"}},
                {"name": "data", "emptyDir": {}},
                {"name": "sd", "emptyDir": {}},
            ],
        },
    )
    prometheus["spec"]["template"]["spec"]["containers"].append(discovery)
    rbac = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "prometheus", "namespace": namespace}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "prometheus", "namespace": namespace},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "prometheus", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "prometheus"},
            "subjects": [{"kind": "ServiceAccount", "name": "prometheus", "namespace": namespace}],
        },
    ]
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "prometheus", "namespace": namespace},
        "data": {
            "prometheus.yml": yaml.safe_dump(prometheus_config(), sort_keys=False),
            "pod_sd.py": SD_SOURCE.read_text(),
        },
    }
    return [redis, service("redis", 6379), *rbac, config, prometheus, service("prometheus", 9090)]


def artifacts_volume(host_path: Path, namespace: str, claim: str = "mmrank-artifacts") -> list[dict[str, Any]]:
    """A hostPath PersistentVolume holding `host_path` (read-only) and the claim bound to it."""
    volume = f"{namespace}-{claim}"
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume, "labels": {"mmrank.io/claim": claim}},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": str(host_path), "type": "Directory"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": volume,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    ]


if __name__ == "__main__":
    for image in SERVICE_IMAGES.values():
        print(build(image))


def claim(namespace: str, name: str, size: str) -> dict[str, Any]:
    """A claim of the cluster's default StorageClass (any cluster but the local node, which has
    no provisioner). ReadWriteOnce: every pod that mounts it must run on one node."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
    }


def artifacts_loader(namespace: str, claim_name: str = "mmrank-artifacts") -> dict[str, Any]:
    """A pod of the runtime image with the artifacts' claim mounted writable, to untar the tree into."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "artifacts-loader", "namespace": namespace},
        "spec": {
            "securityContext": {"fsGroup": 2000},
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "loader",
                    "image": images.TARGETS["runtime"].name,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["sleep", "3600"],
                    "volumeMounts": [{"name": "artifacts", "mountPath": "/artifacts"}],
                }
            ],
            "volumes": [{"name": "artifacts", "persistentVolumeClaim": {"claimName": claim_name}}],
        },
    }
