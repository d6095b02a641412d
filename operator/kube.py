"""The Kubernetes adapter: server-side apply under one field manager, list and delete children,
patch status, read a Secret. Thin: no decisions here.

Apply is skipped when the live object already carries the hash of the desired child and every
desired field already holds its value, so a level-triggered reconcile of an unchanged resource
writes nothing (not even managedFields time stamps).
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Mapping
from typing import Any

from kubernetes import client, config, dynamic
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from mmrank import api
from mmrank.operator import children as build
from mmrank.operator.faults import Refusal

FIELD_MANAGER = "mmrank-operator"
CHILD_KINDS: tuple[tuple[str, str], ...] = (
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("batch/v1", "Job"),
    ("serving.kserve.io/v1beta1", "InferenceService"),
    ("policy/v1", "PodDisruptionBudget"),
)
# Where a cluster does not serve a child kind's version yet, the version it does serve
# (PodDisruptionBudget is policy/v1 from Kubernetes 1.21; `lower` writes the older one).
OLDER_VERSIONS = {("policy/v1", "PodDisruptionBudget"): "policy/v1beta1"}
TRANSIENT_STATUS = {0, 409, 429, 500, 502, 503, 504}


ALLOWED_RANKERS = "mmrank.io/allowed-rankers"


class NoSuchKind(RuntimeError):
    """A child's kind is not served by this cluster (its CRD is not installed)."""


def is_transient(exc: BaseException) -> bool:
    """Worth a retry with backoff: conflicts, throttling, server errors, connection trouble.
    A body the server cannot type (a field its version does not know) is not."""
    if isinstance(exc, ApiException):
        return exc.status in TRANSIENT_STATUS and "field not declared in schema" not in str(exc.body or "")
    return isinstance(exc, OSError | TimeoutError) or type(exc).__module__.startswith("urllib3")


def refusal(action: str, kind: str, name: str, exc: BaseException) -> Refusal:
    """What a refused write says, for status: the HTTP code and the apiserver's own message
    (its Status object's `message`), shortened; no answer at all is code 0, transient."""
    if isinstance(exc, ApiException):
        code = int(exc.status or 0)
        try:
            reason = str(json.loads(exc.body or "{}").get("message") or exc.reason or "")
        except (ValueError, AttributeError):
            reason = str(exc.body or exc.reason or "")
        return Refusal(action, kind, name, code, reason[:500], is_transient(exc))
    if isinstance(exc, NoSuchKind):
        return Refusal(action, kind, name, 404, str(exc)[:500], False)
    transient = is_transient(exc)
    return Refusal(action, kind, name, 0 if transient else 500, f"{type(exc).__name__}: {exc}"[:500], transient)


def stamped(child: dict[str, Any]) -> dict[str, Any]:
    """The child with the hash of its own content in an annotation (the apply-skip key)."""
    meta = dict(child["metadata"])
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != build.APPLIED_HASH}
    bare = {
        **child,
        "metadata": {**meta, "annotations": annotations}
        if annotations
        else {k: v for k, v in meta.items() if k != "annotations"},
    }
    annotations = {**annotations, build.APPLIED_HASH: build.digest(bare)}
    return {**child, "metadata": {**meta, "annotations": annotations}}


def contains(live: Any, want: Any) -> bool:
    """Every field of `want` holds the same value in `live` (extra live fields are defaults)."""
    if isinstance(want, Mapping):
        return isinstance(live, Mapping) and all(k in live and contains(live[k], v) for k, v in want.items())
    if isinstance(want, list):
        return (
            isinstance(live, list)
            and len(live) == len(want)
            and all(contains(a, b) for a, b in zip(live, want, strict=False))
        )
    return live == want or str(live) == str(want)


def up_to_date(live: Mapping[str, Any] | None, want: Mapping[str, Any]) -> bool:
    if live is None:
        return False
    hash_live = ((live.get("metadata") or {}).get("annotations") or {}).get(build.APPLIED_HASH)
    return hash_live == want["metadata"]["annotations"][build.APPLIED_HASH] and contains(
        {k: v for k, v in live.items() if k != "status"}, want
    )


def lower(child: dict[str, Any], server: tuple[int, int]) -> tuple[dict[str, Any], str | None]:
    """The child as a server of this (major, minor) version accepts it, and why it differs.

    Indexed Jobs exist from Kubernetes 1.22 (beta, on by default); an older apiserver refuses
    `completionMode` in a server-side apply, and its pods get no JOB_COMPLETION_INDEX to pick a
    shard by. There the backfill runs as one pod over the whole catalogue (shard 0/1), which the
    Event says."""
    if child["kind"] == "Job" and server < (1, 22) and "completionMode" in child["spec"]:
        spec = {k: v for k, v in child["spec"].items() if k != "completionMode"}
        shards = int(spec.get("completions") or 1)
        pod = spec["template"]["spec"]
        containers = [
            {**c, "args": [a.replace("$(JOB_COMPLETION_INDEX)/" + str(shards), "0/1") for a in c.get("args", [])]}
            for c in pod["containers"]
        ]
        spec = {
            **spec,
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": 6,
            "template": {**spec["template"], "spec": {**pod, "containers": containers}},
        }
        return {**child, "spec": spec}, (
            f"Kubernetes {server[0]}.{server[1]} has no Indexed Jobs: the backfill "
            f"runs as one pod (shard 0/1) instead of {shards} shards; sharding needs "
            "Kubernetes >= 1.22"
        )
    if (child["apiVersion"], child["kind"]) in OLDER_VERSIONS and server < (1, 21):
        return {**child, "apiVersion": OLDER_VERSIONS[(child["apiVersion"], child["kind"])]}, None
    return child, None


def key(obj: Mapping[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


class Kube:
    """One dynamic client for the whole operator (thread-safe; resources discovered once)."""

    def __init__(self, api_client: Any = None) -> None:
        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.api_client = api_client
        self.dynamic = dynamic.DynamicClient(api_client)
        self._resources: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._server: tuple[int, int] | None = None

    def server_version(self) -> tuple[int, int]:
        if self._server is None:
            info = client.VersionApi(self.api_client).get_code()
            self._server = (int(info.major), int("".join(ch for ch in info.minor if ch.isdigit()) or 0))
        return self._server

    def resource(self, api_version: str, kind: str) -> Any:
        with self._lock:
            if (api_version, kind) not in self._resources:
                self._resources[(api_version, kind)] = self.dynamic.resources.get(api_version=api_version, kind=kind)
            return self._resources[(api_version, kind)]

    def rankers(self) -> Any:
        return self.resource(api.API_VERSION, api.KIND)

    def list_children(self, namespace: str, name: str, uid: str) -> list[dict[str, Any]]:
        """Every child this ranker owns, by label and owner reference."""
        selector = f"{build.MANAGED_BY}=mmrank,{build.RANKER_LABEL}={name}"
        found = []
        for api_version, kind in CHILD_KINDS:
            try:
                resource = self.resource(api_version, kind)
            except ResourceNotFoundError:
                if (api_version, kind) not in OLDER_VERSIONS:
                    continue  # a cluster without KServe has no InferenceServices, and so none of ours
                api_version = OLDER_VERSIONS[(api_version, kind)]
                resource = self.resource(api_version, kind)
            items = resource.get(namespace=namespace, label_selector=selector).to_dict()
            for item in items.get("items") or []:
                owners = item["metadata"].get("ownerReferences") or []
                if any(o.get("uid") == uid for o in owners):
                    item.setdefault("apiVersion", api_version)
                    item.setdefault("kind", kind)
                    found.append(item)
        return found

    def autoscaled_deployments(self, namespace: str) -> set[str]:
        """Names of the Deployments a HorizontalPodAutoscaler of the namespace scales."""
        try:
            hpas = self.resource("autoscaling/v1", "HorizontalPodAutoscaler").get(namespace=namespace).to_dict()
        except ResourceNotFoundError:
            return set()
        except ApiException as exc:
            if exc.status in (403, 404):  # not allowed to look (an older chart): apply the spec's replicas
                return set()
            raise
        return {
            (h.get("spec") or {}).get("scaleTargetRef", {}).get("name", "")
            for h in hpas.get("items") or []
            if (h.get("spec") or {}).get("scaleTargetRef", {}).get("kind") == "Deployment"
        }

    def apply(self, child: dict[str, Any]) -> dict[str, Any]:
        meta = child["metadata"]
        try:
            resource = self.resource(child["apiVersion"], child["kind"])
        except ResourceNotFoundError as exc:
            hint = (
                ": install KServe, or set spec.ranker.serving: Kubernetes"
                if child["kind"] == "InferenceService"
                else ""
            )
            raise NoSuchKind(f"this cluster serves no {child['apiVersion']} {child['kind']}{hint}") from exc
        applied: dict[str, Any] = resource.server_side_apply(
            body=child,
            name=meta["name"],
            namespace=meta["namespace"],
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
        ).to_dict()
        return applied

    def delete(self, api_version: str, kind: str, namespace: str, name: str, propagation: str = "Background") -> None:
        """`Foreground`: the object stays (with a deletionTimestamp) until its dependents are gone."""
        try:
            self.resource(api_version, kind).delete(
                name=name, namespace=namespace, body={"propagationPolicy": propagation}
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def patch_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None = None
    ) -> None:
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        self.rankers().status.patch(
            body=body, name=name, namespace=namespace, content_type="application/merge-patch+json"
        )

    def get_ranker(self, namespace: str, name: str) -> dict[str, Any]:
        """The resource as the apiserver holds it now (a fresh read after a 409)."""
        found: dict[str, Any] = self.rankers().get(name=name, namespace=namespace).to_dict()
        return found

    def secret_value(self, namespace: str, name: str, key: str, ranker: str) -> str | None:
        """The key of a Secret that consents to `ranker` (see `observe.secret_allows`); a Secret
        that does not is never read further, and the ranker is told why."""
        from mmrank.operator.observe import SecretRefused, secret_allows

        try:
            secret = self.resource("v1", "Secret").get(name=name, namespace=namespace).to_dict()
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        if not secret_allows((secret.get("metadata") or {}).get("annotations"), ranker):
            raise SecretRefused(
                f"Secret {namespace}/{name} does not allow ranker {ranker} to use it: annotate it "
                f"{ALLOWED_RANKERS}={ranker} (or a comma-separated list, or *)"
            )
        value = (secret.get("data") or {}).get(key)
        return base64.b64decode(value).decode() if value else None
