"""Builders of the child objects of a MultimodalRanker, as plain dicts.

Each `build_*` is a pure function of the parsed resource (and, for the ranker, of the ranker
version the core chose to serve): no I/O, so every child is tested by value and `mmrank render`
prints exactly what the operator applies. Names come from `mmrank.api.child_names`, the one
place that also bounds their length.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from mmrank import api
from mmrank.defaults import ENCODER_MODEL_NAME
from mmrank.encoders.triton_config import config_pbtxt

MANAGED_BY = "app.kubernetes.io/managed-by"
COMPONENT = "app.kubernetes.io/component"
RANKER_LABEL = "mmrank.io/ranker"
ENCODER_VERSION = "mmrank.io/encoder-version"
RANKER_VERSION = "mmrank.io/ranker-version"
CONFIG_HASH = "mmrank.io/config-hash"
APPLIED_HASH = "mmrank.io/applied-hash"

TRITON_HTTP, TRITON_GRPC, TRITON_METRICS = 8000, 8001, 8002
MODEL_DIR = "/models"
PVC_MOUNTS = "/mnt/pvc"
EMBEDDER_HTTP = 8080
CATALOGUE_DIR = "/mnt/catalogue"  # where a backfill pod expects the catalogue (see docs/operator.md)


def names(ranker: api.MultimodalRanker, encoder_version: str) -> dict[str, str]:
    """Child names for one encoder version: keys `encoder`, `embedder`, `backfill`, `ranker`."""
    return api.child_names(ranker.metadata.name, encoder_version)


def plain(value: Any) -> Any:
    """A pydantic model (or a dict/list of them) as the camelCase JSON Kubernetes expects, without
    None values: what the apiserver stores of what an apply or a merge patch wrote. The one
    None-stripping rule of the operator (children, status writes, conflict merges)."""
    if hasattr(value, "model_dump"):
        return value.model_dump(by_alias=True, exclude_none=True, mode="json")
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def digest(value: Any) -> str:
    """A short stable hash of JSON-able data: goes into pod templates so a change rolls pods."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def labels(ranker: api.MultimodalRanker, component: str, **extra: str) -> dict[str, str]:
    out = {MANAGED_BY: "mmrank", RANKER_LABEL: ranker.metadata.name, COMPONENT: component}
    out.update(extra)
    return out


def owner_reference(ranker: api.MultimodalRanker) -> dict[str, Any]:
    return {
        "apiVersion": f"{api.GROUP}/{api.VERSION}",
        "kind": api.KIND,
        "name": ranker.metadata.name,
        "uid": ranker.metadata.uid or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def standard_labels(ranker: api.MultimodalRanker, child_labels: Mapping[str, str]) -> dict[str, str]:
    """Kubernetes' recommended `app.kubernetes.io/*` labels, on the objects only: selectors keep
    the labels they were created with (a Deployment's selector is immutable), and pod templates
    stay as they are so an operator upgrade restarts no pod."""
    version = child_labels.get(RANKER_VERSION) or child_labels.get(ENCODER_VERSION) or ranker.spec.encoder.version
    return {
        "app.kubernetes.io/name": "mmrank",
        "app.kubernetes.io/instance": ranker.metadata.name,
        "app.kubernetes.io/version": version,
        "app.kubernetes.io/part-of": "mmrank",
    }


def _metadata(
    ranker: api.MultimodalRanker, name: str, child_labels: dict[str, str], annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": ranker.metadata.namespace or "default",
        "labels": {**standard_labels(ranker, child_labels), **child_labels},
        "ownerReferences": [owner_reference(ranker)],
    }
    if annotations:
        meta["annotations"] = annotations
    return meta


def store_scope(ranker: api.MultimodalRanker) -> str:
    """ "namespace/name": every store key, stream and consumer group of the ranker carries it
    (`mmrank.store.Scope`), so rankers sharing a store never touch each other's data."""
    return scope_of(ranker.metadata.namespace, ranker.metadata.name)


def scope_of(namespace: str | None, name: str) -> str:
    return f"{namespace or 'default'}/{name}"


def store_env(ranker: api.MultimodalRanker) -> list[dict[str, Any]]:
    """How every workload reaches the embedding store, as its ranker; the password never leaves
    its Secret."""
    store = ranker.spec.embeddings.store
    env: list[dict[str, Any]] = [
        {"name": "MMRANK_STORE_URL", "value": store.url},
        {"name": "MMRANK_SCOPE", "value": store_scope(ranker)},
    ]
    ref = store.password_secret_ref
    if ref is not None:
        env.append({"name": "MMRANK_STORE_PASSWORD", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env


# --- fetching artifacts ------------------------------------------------------------------------


def fetch_source(uri: str) -> tuple[str, dict[str, Any] | None]:
    """What `mmrank fetch` reads for `uri`, and the volume it needs: `pvc://CLAIM/PATH` is the
    claim mounted read-only under /mnt/pvc/CLAIM (as KServe mounts it); every other scheme is
    fetched by KServe's storage code from where it is."""
    if not uri.startswith("pvc://"):
        return uri, None
    claim, _, path = uri.removeprefix("pvc://").partition("/")
    volume = {"name": f"pvc-{claim}"[:63].rstrip("-."), "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    return f"{PVC_MOUNTS}/{claim}/{path}".rstrip("/"), volume


def fetch_init_container(
    ranker: api.MultimodalRanker, name: str, uri: str, volume: str, dest: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An init container copying `uri` into the emptyDir `volume` at `dest`, with the storage
    credentials of `spec.storage`; and the extra volumes it needs."""
    storage = ranker.spec.storage
    source, pvc = fetch_source(uri)
    mounts: list[dict[str, Any]] = [{"name": volume, "mountPath": dest}]
    volumes = []
    if pvc is not None:
        claim = pvc["persistentVolumeClaim"]["claimName"]
        mounts.append({"name": pvc["name"], "mountPath": f"{PVC_MOUNTS}/{claim}", "readOnly": True})
        volumes.append(pvc)
    container: dict[str, Any] = {
        "name": name,
        "image": storage.image,
        "args": ["mmrank", "fetch", source, dest],
        "volumeMounts": mounts,
        "resources": copy.deepcopy(FETCH_RESOURCES),
    }
    if storage.secret_name:
        container["envFrom"] = [{"secretRef": {"name": storage.secret_name}}]
    return container, volumes


def _with_service_account(ranker: api.MultimodalRanker, pod_spec: dict[str, Any]) -> dict[str, Any]:
    account = ranker.spec.storage.service_account_name
    return {**pod_spec, "serviceAccountName": account} if account else pod_spec


# --- pod security (the restricted Pod Security Standard; docs/operator.md, "Pod security") --------

RUNTIME_UID = 10001  # the mmrank images: `useradd --uid 10001`, `USER 10001` (Dockerfile)
NVIDIA_TRITON_UID = 1000  # nvcr.io/nvidia/tritonserver: user triton-server owns /opt/tritonserver
NVIDIA_TRITON = "nvcr.io/nvidia/tritonserver"
TMP_DIR = "/tmp"
SHM_DIR = "/dev/shm"
TMP_VOLUME = {"name": "tmp", "emptyDir": {}}
# Triton's Python backend passes tensors to its stub processes through /dev/shm; the runtime's own
# is 64 MiB, too small for a batch of images. Memory-backed: it counts against the pod's memory.
SHM_VOLUME = {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}
FETCH_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
INSTALL_CONFIG_RESOURCES = {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}}
TRITON_REQUESTS = {"cpu": "1", "memory": "2Gi"}  # without spec.encoder.resources (documented there)


def image_uid(image: str) -> int:
    """The non-root uid a pod runs `image` as: the uid its files belong to. NVIDIA's Triton image
    sets no USER (it would run as root) but ships triton-server (1000) as the owner of its backends,
    which the Python backend writes to; every other image is taken to be one of ours (10001)."""
    repository = image.split("@", 1)[0]
    if ":" in repository.rsplit("/", 1)[-1]:
        repository = repository.rsplit(":", 1)[0]
    return NVIDIA_TRITON_UID if repository == NVIDIA_TRITON else RUNTIME_UID


def container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def _restricted_container(container: dict[str, Any]) -> dict[str, Any]:
    """Read-only root, no privilege escalation, no capabilities; /tmp the one place it writes
    besides its volumes, and HOME there (KServe's storage code, Hugging Face and torch keep
    caches under ~)."""
    return {
        **container,
        "env": [*container.get("env", []), {"name": "HOME", "value": TMP_DIR}],
        "volumeMounts": [*container.get("volumeMounts", []), {"name": TMP_VOLUME["name"], "mountPath": TMP_DIR}],
        "securityContext": container_security(),
    }


def restricted(pod_spec: dict[str, Any], uid: int) -> dict[str, Any]:
    """A pod spec (or a KServe predictor, which inlines one) that passes the restricted Pod
    Security Standard: non-root `uid` for every container (one uid per pod, so what the init
    containers write the main one may change), seccomp RuntimeDefault, an emptyDir on /tmp. No
    service-account token unless the pod runs under `spec.storage.serviceAccountName`: then that
    ServiceAccount's own automountServiceAccountToken decides (cloud identities such as IRSA or
    Workload Identity inject their own token volume; no pod of ours calls the Kubernetes API)."""
    out = {
        **pod_spec,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": [*pod_spec.get("volumes", []), copy.deepcopy(TMP_VOLUME)],
    }
    for field in ("initContainers", "containers"):
        if field in pod_spec:
            out[field] = [_restricted_container(c) for c in pod_spec[field]]
    if "serviceAccountName" not in pod_spec:
        out["automountServiceAccountToken"] = False
    return out


def build_disruption_budget(
    ranker: api.MultimodalRanker, name: str, child_labels: dict[str, str], selector: dict[str, str]
) -> dict[str, Any]:
    """At most one of the selected pods down at a time for a voluntary disruption (a node drain):
    built only for more than one replica, where one pod down still leaves one serving."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(ranker, name, child_labels),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    }


# --- encoder (Triton) ------------------------------------------------------------------------


def encoder_config(ranker: api.MultimodalRanker) -> str:
    encoder = ranker.spec.encoder
    batching = encoder.dynamic_batching
    return config_pbtxt(
        model_name=encoder.model_name,
        backend=encoder.backend,
        max_batch_size=batching.max_batch_size,
        max_queue_delay_us=batching.max_queue_delay_microseconds,
        instance_kind="KIND_GPU" if encoder.gpus > 0 else "KIND_CPU",
        dim=encoder.dimension,
        dynamic_batching=True,
    )


def build_encoder_configmap(ranker: api.MultimodalRanker) -> dict[str, Any]:
    version = ranker.spec.encoder.version
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(
            ranker, names(ranker, version)["encoder"], labels(ranker, "encoder", **{ENCODER_VERSION: version})
        ),
        "data": {"config.pbtxt": encoder_config(ranker)},
    }


def _encoder_resources(ranker: api.MultimodalRanker) -> dict[str, Any]:
    encoder = ranker.spec.encoder
    resources = plain(encoder.resources) or {"requests": dict(TRITON_REQUESTS)}
    resources = {k: dict(v) for k, v in resources.items() if v}
    if encoder.gpus > 0:
        for part in ("limits", "requests"):
            resources.setdefault(part, {})["nvidia.com/gpu"] = str(encoder.gpus)
    return resources


def cpu_threads(resources: Mapping[str, Any]) -> int:
    """Intra-op threads for a CPU encoder: its CPU request rounded up (1 without one)."""
    request = str((resources.get("requests") or {}).get("cpu") or (resources.get("limits") or {}).get("cpu") or "1")
    cores = float(request[:-1]) / 1000 if request.endswith("m") else float(request)
    return max(1, math.ceil(cores))


def build_encoder_deployment(ranker: api.MultimodalRanker) -> dict[str, Any]:
    """Triton serving one encoder version: weights pulled by an init container into an emptyDir,
    the ConfigMap's config.pbtxt installed beside them, ready when Triton says so."""
    encoder = ranker.spec.encoder
    name = names(ranker, encoder.version)["encoder"]
    selector = labels(ranker, "encoder", **{ENCODER_VERSION: encoder.version})
    config_hash = digest({"config": encoder_config(ranker), "modelUri": encoder.model_uri})
    model_path = f"{MODEL_DIR}/{encoder.model_name}"
    triton = {
        "name": "triton",
        "image": encoder.image,
        "args": [
            "tritonserver",
            f"--model-repository={MODEL_DIR}",
            "--strict-readiness=true",
            f"--http-port={TRITON_HTTP}",
            f"--grpc-port={TRITON_GRPC}",
            "--allow-metrics=true",
            f"--metrics-port={TRITON_METRICS}",
        ],
        "ports": [
            {"name": "http", "containerPort": TRITON_HTTP, "protocol": "TCP"},
            {"name": "grpc", "containerPort": TRITON_GRPC, "protocol": "TCP"},
            {"name": "metrics", "containerPort": TRITON_METRICS, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": TRITON_HTTP},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        # Triton answers only once every model has loaded; liveness waits for the startup probe,
        # which allows 10 minutes (300 x 2 s) for a large model from a slow store.
        "startupProbe": {
            "httpGet": {"path": "/v2/health/live", "port": TRITON_HTTP},
            "periodSeconds": 2,
            "failureThreshold": 300,
        },
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": TRITON_HTTP}, "periodSeconds": 10},
        "volumeMounts": [
            {"name": "models", "mountPath": MODEL_DIR},
            {"name": SHM_VOLUME["name"], "mountPath": SHM_DIR},
        ],
    }
    resources = _encoder_resources(ranker)
    if resources:
        triton["resources"] = resources
    if encoder.gpus == 0:
        # torch in the Python backend starts a thread per core of the node otherwise; on CPU
        # those threads fight each other and everything else on the node (docs/streams.md).
        triton["env"] = [{"name": "OMP_NUM_THREADS", "value": str(cpu_threads(resources))}]
    fetch, fetch_volumes = fetch_init_container(ranker, "fetch-model", encoder.model_uri, "models", MODEL_DIR)
    pod_spec: dict[str, Any] = {
        "initContainers": [
            fetch,
            {
                "name": "install-config",
                "image": encoder.image,
                "command": ["sh", "-c", f"mkdir -p {model_path} && cp /config/config.pbtxt {model_path}/config.pbtxt"],
                "volumeMounts": [
                    {"name": "models", "mountPath": MODEL_DIR},
                    {"name": "config", "mountPath": "/config", "readOnly": True},
                ],
                "resources": copy.deepcopy(INSTALL_CONFIG_RESOURCES),
            },
        ],
        "containers": [triton],
        "volumes": [
            {"name": "models", "emptyDir": {}},
            copy.deepcopy(SHM_VOLUME),
            {"name": "config", "configMap": {"name": name}},
            *fetch_volumes,
        ],
    }
    pod_spec = restricted(_with_service_account(ranker, pod_spec), image_uid(encoder.image))
    if encoder.node_selector:
        pod_spec["nodeSelector"] = dict(encoder.node_selector)
    if encoder.tolerations:
        pod_spec["tolerations"] = plain(list(encoder.tolerations))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(ranker, name, selector),
        "spec": {
            "replicas": encoder.replicas,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {
                    "labels": selector,
                    "annotations": {
                        CONFIG_HASH: config_hash,
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(TRITON_METRICS),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def build_encoder_service(ranker: api.MultimodalRanker) -> dict[str, Any]:
    version = ranker.spec.encoder.version
    selector = labels(ranker, "encoder", **{ENCODER_VERSION: version})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ranker, names(ranker, version)["encoder"], selector),
        "spec": {
            "selector": selector,
            "ports": [
                {"name": "http", "port": TRITON_HTTP, "targetPort": TRITON_HTTP, "protocol": "TCP"},
                {"name": "grpc", "port": TRITON_GRPC, "targetPort": TRITON_GRPC, "protocol": "TCP"},
                {"name": "metrics", "port": TRITON_METRICS, "targetPort": TRITON_METRICS, "protocol": "TCP"},
            ],
        },
    }


def build_encoder_children(ranker: api.MultimodalRanker) -> list[dict[str, Any]]:
    """The spec's encoder version: its ConfigMap, Service and Deployment, and with more than one
    replica a PodDisruptionBudget."""
    encoder = ranker.spec.encoder
    out = [build_encoder_configmap(ranker), build_encoder_service(ranker), build_encoder_deployment(ranker)]
    if encoder.replicas > 1:
        selector = labels(ranker, "encoder", **{ENCODER_VERSION: encoder.version})
        out.append(build_disruption_budget(ranker, names(ranker, encoder.version)["encoder"], selector, selector))
    return out


# --- embedder and backfill ---------------------------------------------------------------------


def encoder_address(ranker: api.MultimodalRanker, version: str) -> str:
    """`<svc>:8001`, with `/<model>` when the spec's encoder uses a model name of its own."""
    address = f"{names(ranker, version)['encoder']}:{TRITON_GRPC}"
    model = ranker.spec.encoder.model_name
    if version == ranker.spec.encoder.version and model != ENCODER_MODEL_NAME:
        address += f"/{model}"
    return address


def encoders_env(ranker: api.MultimodalRanker, live_encoders: Sequence[str]) -> str:
    """`e1=<svc>:8001,e2=<svc>:8001`: the embedder writes every new item into every live space."""
    return ",".join(f"{v}={encoder_address(ranker, v)}" for v in live_encoders)


def build_embedder_service(ranker: api.MultimodalRanker) -> dict[str, Any]:
    """Producers' address for `POST /items`: the embedder pods that are ready, whichever replica
    (one name across encoder upgrades, which roll the embedder's pods)."""
    selector = labels(ranker, "embedder")
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ranker, names(ranker, ranker.spec.encoder.version)["embedder"], selector),
        "spec": {
            "selector": selector,
            "ports": [{"name": "http", "port": EMBEDDER_HTTP, "targetPort": EMBEDDER_HTTP, "protocol": "TCP"}],
        },
    }


def build_embedder_deployment(ranker: api.MultimodalRanker, live_encoders: Sequence[str]) -> dict[str, Any]:
    spec = ranker.spec
    embedder, events = spec.embeddings.embedder, spec.embeddings.item_events
    name = names(ranker, spec.encoder.version)["embedder"]
    selector = labels(ranker, "embedder")
    env = [
        {"name": "MMRANK_ENCODERS", "value": encoders_env(ranker, live_encoders)},
        *store_env(ranker),
        # unset: the ranker's own stream (MMRANK_SCOPE); a named one may be shared by rankers
        *([{"name": "MMRANK_ITEM_STREAM", "value": events.stream}] if events.stream else []),
        {"name": "MMRANK_CONSUMER_GROUP", "value": events.consumer_group},
    ]
    container = {
        "name": "embedder",
        "image": embedder.image,
        "args": ["mmrank", "embedder", "run"],
        "env": env,
        "ports": [{"name": "http", "containerPort": EMBEDDER_HTTP, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": EMBEDDER_HTTP}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": EMBEDDER_HTTP}, "periodSeconds": 10},
        "resources": plain(embedder.resources),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(ranker, name, selector),
        # Recreate: an embedder that knows fewer live spaces must not take (and acknowledge)
        # new items beside one that knows more, as a rolling update would let it.
        "spec": {
            "replicas": embedder.replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": {
                    "labels": selector,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(EMBEDDER_HTTP),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": restricted({"containers": [container]}, image_uid(embedder.image)),
            },
        },
    }


def build_backfill_job(ranker: api.MultimodalRanker, encoder_version: str) -> dict[str, Any]:
    """An Indexed Job: shard i of N re-embeds its slice of the catalogue; resumable, because the
    store records each shard's progress and a restarted pod skips what is done."""
    spec = ranker.spec
    backfill = spec.embeddings.backfill
    n = backfill.parallelism
    child = names(ranker, encoder_version)
    selector = labels(ranker, "backfill", **{ENCODER_VERSION: encoder_version})
    container = {
        "name": "backfill",
        "image": spec.embeddings.embedder.image,
        "args": [
            "mmrank",
            "backfill",
            "run",
            "--space",
            encoder_version,
            "--shard",
            f"$(JOB_COMPLETION_INDEX)/{n}",
            "--batch-size",
            str(backfill.batch_size),
            "--encoder",
            encoder_address(ranker, encoder_version),
            "--catalogue",
            CATALOGUE_DIR,
            "--no-progress",
        ],
        "env": store_env(ranker),
        "volumeMounts": [{"name": "catalogue", "mountPath": CATALOGUE_DIR, "readOnly": True}],
        "resources": plain(backfill.resources),
    }
    fetch, fetch_volumes = fetch_init_container(
        ranker, "fetch-catalogue", backfill.catalogue_uri or "", "catalogue", CATALOGUE_DIR
    )
    pod_spec = _with_service_account(
        ranker,
        {
            "restartPolicy": "OnFailure",
            "initContainers": [fetch],
            "containers": [container],
            "volumes": [{"name": "catalogue", "emptyDir": {}}, *fetch_volumes],
        },
    )
    pod_spec = restricted(pod_spec, image_uid(spec.embeddings.embedder.image))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(ranker, child["backfill"], selector),
        "spec": {
            "completionMode": "Indexed",
            "completions": n,
            "parallelism": n,
            "backoffLimit": 6 * n,
            "template": {"metadata": {"labels": selector}, "spec": pod_spec},
        },
    }


def backfill_shape(job: Mapping[str, Any], indexed: bool) -> str:
    """Hash of what a Job cannot change once created (its pod template, completions,
    parallelism, completion mode) and of how this apiserver runs it (`indexed`: see `kube.lower`)."""
    spec = job["spec"]
    return digest(
        {
            "template": spec["template"],
            "completions": spec.get("completions"),
            "parallelism": spec.get("parallelism"),
            "completionMode": spec.get("completionMode"),
            "indexed": indexed,
        }
    )[:6]


def backfill_job_name(base: str, shape: str, attempt: int) -> str:
    """`<name>-backfill-<version>-<shape>-<attempt>`: a Job's template, completions and parallelism
    are immutable, so a Job of another shape (batchSize, parallelism, image... changed) or a new
    attempt after a failure is a new Job beside the old one, never an update the apiserver refuses.
    The base is cut so the name stays a 63-character label (its pods carry it as `job-name`)."""
    suffix = f"-{shape}-{attempt}"
    return base[: api.DNS_LABEL_MAX - len(suffix)].rstrip("-") + suffix


def shape_of_job_name(name: str) -> str:
    """The shape part of a name `backfill_job_name` made ("" for any other name)."""
    parts = name.rsplit("-", 2)
    return parts[1] if len(parts) == 3 and parts[2].isdigit() and len(parts[1]) == 6 else ""


def named_backfill_job(job: dict[str, Any], shape: str, attempt: int) -> dict[str, Any]:
    return {**job, "metadata": {**job["metadata"], "name": backfill_job_name(job["metadata"]["name"], shape, attempt)}}


# --- the ranker: KServe (Standard or Knative) or plain Kubernetes -------------------------------

RANKER_HTTP = 8080
RANKER_GRPC = 8081  # KServe's gRPC port (`mmrank predictor serve --grpc-port`)
RANKER_MODEL_DIR = "/mnt/models"
CANARY_LABEL = "mmrank.io/canary-version"
ROLE = "mmrank.io/role"
# KServe puts prometheus.io/{scrape,port,path} on the predictor pods from these (its runtimes set
# the port; ours is a custom container, so the InferenceService names it).
KSERVE_SCRAPING = {
    "serving.kserve.io/enable-prometheus-scraping": "true",
    "prometheus.kserve.io/port": str(RANKER_HTTP),
    "prometheus.kserve.io/path": "/metrics",
}


def ranker_identity(served: api.RankerModelSpec) -> str:
    """What a canary is judged on: a change of any of these is a new rollout."""
    return digest(
        {
            "version": served.version,
            "encoderVersion": served.encoder_version,
            "modelUri": served.model_uri,
            "image": served.image,
        }
    )


def ranker_model_name(ranker: api.MultimodalRanker) -> str:
    return names(ranker, ranker.spec.encoder.version)["ranker"]


def ranker_container(ranker: api.MultimodalRanker, served: api.RankerModelSpec, name: str) -> dict[str, Any]:
    """The predictor, pinned to its space by `MMRANK_SPACE`; its metrics carry `variant` = its
    ranker version, which is how the canary analysis tells stable and canary apart."""
    env = [
        {"name": "MMRANK_SPACE", "value": served.encoder_version},
        {"name": "MMRANK_RANKER_VERSION", "value": served.version},
        *store_env(ranker),
    ]
    container: dict[str, Any] = {
        "name": name,
        "image": served.image,
        "args": [
            "mmrank",
            "predictor",
            "serve",
            "--model-dir",
            RANKER_MODEL_DIR,
            "--model-name",
            ranker_model_name(ranker),
            "--min-coverage",
            str(ranker.spec.embeddings.min_coverage),
            "--max-candidates",
            str(served.max_candidates),
            "--history-length",
            str(served.history_length),
        ],
        "env": env,
        "ports": [
            {"name": "http", "containerPort": RANKER_HTTP, "protocol": "TCP"},
            {"name": "grpc", "containerPort": RANKER_GRPC, "protocol": "TCP"},
        ],
        # Not ready while the space is below minCoverage or the store is unreachable (the
        # predictor answers 503 with the reason), so such a pod never takes traffic.
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": RANKER_HTTP}, "periodSeconds": 5},
    }
    resources = plain(served.resources)
    if resources:
        container["resources"] = resources
    return container


def _predictor(ranker: api.MultimodalRanker, served: api.RankerModelSpec) -> dict[str, Any]:
    """KServe fetches `storageUris` itself, with the credentials of the predictor's ServiceAccount."""
    return restricted(
        _with_service_account(
            ranker,
            {
                "minReplicas": served.replicas,
                "containers": [ranker_container(ranker, served, "kserve-container")],
                "storageUris": [{"uri": served.model_uri, "mountPath": RANKER_MODEL_DIR}],
                "labels": {
                    RANKER_LABEL: ranker.metadata.name,
                    RANKER_VERSION: served.version,
                    ENCODER_VERSION: served.encoder_version,
                },
            },
        ),
        image_uid(served.image),
    )


def build_inference_service(
    ranker: api.MultimodalRanker,
    stable: api.RankerModelSpec,
    canary: api.RankerModelSpec | None = None,
    traffic: int = 0,
) -> dict[str, Any]:
    """The KServe InferenceService. Standard mode (KServe >= 0.20): `spec.predictor` is the stable
    ranker and `spec.canary[0]` the canary with its `trafficPercent`; promotion makes the canary
    the predictor, rollback drops the entry. Knative mode: `spec.predictor` is the newest ranker
    and `canaryTrafficPercent` its share (KServe sends the rest to the previous revision);
    rollback puts the stable ranker back as the predictor."""
    mode = ranker.spec.rollout.kserve_mode
    in_canary = canary is not None and 0 < traffic < 100
    first = canary if canary is not None and (traffic >= 100 or (in_canary and mode == "Knative")) else stable
    name = ranker_model_name(ranker)
    child_labels = labels(ranker, "ranker", **{RANKER_VERSION: first.version, ENCODER_VERSION: first.encoder_version})
    spec: dict[str, Any] = {"predictor": _predictor(ranker, first)}
    if in_canary and canary is not None:
        child_labels[CANARY_LABEL] = canary.version
        if mode == "Knative":
            spec["predictor"]["canaryTrafficPercent"] = traffic
        else:
            spec["canary"] = [{"trafficPercent": traffic, "predictor": _predictor(ranker, canary)}]
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": _metadata(
            ranker, name, child_labels, {"serving.kserve.io/deploymentMode": mode, **KSERVE_SCRAPING}
        ),
        "spec": spec,
    }


def ranker_deployment_name(ranker: api.MultimodalRanker, version: str) -> str:
    return f"{ranker_model_name(ranker)}-{version}"


def build_ranker_deployment(
    ranker: api.MultimodalRanker, served: api.RankerModelSpec, replicas: int, role: str
) -> dict[str, Any]:
    """One ranker version behind the `x-ranker` Service (the shape KServe's raw mode produces):
    the artifact fetched by KServe's storage initializer into an emptyDir, the predictor ready
    only on a covered space. `role` (stable or canary) is informational: the Service selects
    both, so traffic follows the replica ratio."""
    name = ranker_deployment_name(ranker, served.version)
    selector = labels(ranker, "ranker", **{RANKER_VERSION: served.version})
    pod_labels = {**selector, ENCODER_VERSION: served.encoder_version}
    fetch, fetch_volumes = fetch_init_container(ranker, "fetch-model", served.model_uri, "model", RANKER_MODEL_DIR)
    pod_spec = _with_service_account(
        ranker,
        {
            "initContainers": [fetch],
            "containers": [
                {
                    **ranker_container(ranker, served, "predictor"),
                    "volumeMounts": [{"name": "model", "mountPath": RANKER_MODEL_DIR, "readOnly": True}],
                }
            ],
            "volumes": [{"name": "model", "emptyDir": {}}, *fetch_volumes],
        },
    )
    pod_spec = restricted(pod_spec, image_uid(served.image))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(ranker, name, {**pod_labels, ROLE: role}),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(RANKER_HTTP),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def build_ranker_service(ranker: api.MultimodalRanker) -> dict[str, Any]:
    """`x-ranker`: every ready predictor pod of every version, stable and canary alike."""
    selector = labels(ranker, "ranker")
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ranker, ranker_model_name(ranker), selector),
        "spec": {
            "selector": selector,
            "ports": [
                {"name": "http", "port": RANKER_HTTP, "targetPort": RANKER_HTTP, "protocol": "TCP"},
                {"name": "grpc", "port": RANKER_GRPC, "targetPort": RANKER_GRPC, "protocol": "TCP"},
            ],
        },
    }


def build_ranker_children(
    ranker: api.MultimodalRanker,
    stable: api.RankerModelSpec,
    canary: api.RankerModelSpec | None = None,
    traffic: int = 0,
) -> list[dict[str, Any]]:
    """The serving children for a split of `traffic` percent to `canary` (0: all on stable,
    100: all on the canary) on the backend the spec names."""
    served = [stable] if canary is None or traffic <= 0 else [canary] if traffic >= 100 else [stable, canary]
    budget = [build_ranker_disruption_budget(ranker)] if any(s.replicas > 1 for s in served) else []
    if ranker.spec.ranker.serving != "Kubernetes":
        return [build_inference_service(ranker, stable, canary, traffic), *budget]
    from mmrank.operator.rollout import replica_split

    out = [build_ranker_service(ranker), *budget]
    if canary is None or traffic <= 0 or canary.version == stable.version:
        return [*out, build_ranker_deployment(ranker, stable, stable.replicas, "stable")]
    if traffic >= 100:
        return [*out, build_ranker_deployment(ranker, canary, canary.replicas, "stable")]
    canary_pods, stable_pods = replica_split(traffic, canary.replicas)
    return [
        *out,
        build_ranker_deployment(ranker, stable, stable_pods, "stable"),
        build_ranker_deployment(ranker, canary, canary_pods, "canary"),
    ]


# KServe's labels on every predictor pod of an InferenceService, stable and canary alike.
KSERVE_ISVC_LABEL, KSERVE_COMPONENT_LABEL = "serving.kserve.io/inferenceservice", "component"


def build_ranker_disruption_budget(ranker: api.MultimodalRanker) -> dict[str, Any]:
    """One budget over every predictor pod, stable and canary: a drain takes one at a time."""
    name = ranker_model_name(ranker)
    if ranker.spec.ranker.serving == "Kubernetes":
        selector = labels(ranker, "ranker")
    else:
        selector = {KSERVE_ISVC_LABEL: name, KSERVE_COMPONENT_LABEL: "predictor"}
    return build_disruption_budget(ranker, name, labels(ranker, "ranker"), selector)
