"""Turn what the cluster and the store report into the core's `Observed` values.

The `from_*` functions are pure (raw child objects in, small values out). The store is behind
`CoverageObserver`, so tests can feed coverage values and the operator reads the real store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from mmrank.operator import children as build
from mmrank.operator.analysis import ranker_series
from mmrank.operator.core import ChildRef, JobState, ServedRanker, SpaceState, Version

if TYPE_CHECKING:
    from mmrank.store import ScopeDeleted


def _conditions(obj: Mapping[str, Any]) -> dict[str, str]:
    return {c.get("type"): c.get("status") for c in (obj.get("status") or {}).get("conditions") or []}


def _generation_seen(obj: Mapping[str, Any]) -> bool:
    """The controller's status describes the current spec (no status generation: assume so)."""
    seen = (obj.get("status") or {}).get("observedGeneration")
    return seen is None or int(seen) >= int(obj["metadata"].get("generation") or 0)


def deployment_ready(obj: Mapping[str, Any]) -> bool:
    status = obj.get("status") or {}
    want = int((obj.get("spec") or {}).get("replicas", 1))
    return (
        _generation_seen(obj)
        and int(status.get("readyReplicas") or 0) >= want
        and int(status.get("updatedReplicas", want) or 0) >= want
    )


def job_state(obj: Mapping[str, Any]) -> JobState:
    status = obj.get("status") or {}
    conditions = _conditions(obj)
    failed = conditions.get("Failed") == "True"
    completions = int((obj.get("spec") or {}).get("completions") or 1)
    succeeded = int(status.get("succeeded") or 0)
    finished = failed or conditions.get("Complete") == "True" or succeeded >= completions
    why = next(
        (
            f"{c.get('reason') or 'Failed'}: {c.get('message') or ''}".rstrip(": ")
            for c in status.get("conditions") or []
            if c.get("type") == "Failed" and c.get("status") == "True"
        ),
        "",
    )
    return JobState(completions=completions, succeeded=succeeded, finished=finished, failed=failed, reason=why)


def _version(obj: Mapping[str, Any]) -> Version | None:
    labels = obj["metadata"].get("labels") or {}
    ranker, encoder = labels.get(build.RANKER_VERSION), labels.get(build.ENCODER_VERSION)
    return Version(ranker, encoder) if ranker and encoder else None


def served_ranker(obj: Mapping[str, Any]) -> ServedRanker | None:
    """The InferenceService: its predictor's version, the canary's (a label the operator sets),
    and KServe's Ready condition for the current spec."""
    version = _version(obj)
    if version is None:
        return None
    labels = obj["metadata"].get("labels") or {}
    canary = labels.get(build.CANARY_LABEL)
    canary_version = None
    if canary:
        predictor = (
            ((obj.get("spec") or {}).get("canary") or [{}])[0].get("predictor")
            or (obj.get("spec") or {}).get("predictor")
            or {}
        )
        encoder = (predictor.get("labels") or {}).get(build.ENCODER_VERSION, version.encoder)
        canary_version = Version(canary, encoder)
    ready = _generation_seen(obj) and _conditions(obj).get("Ready") == "True"
    return ServedRanker(version, ready, canary_version)


def served_by_deployments(objects: Sequence[Mapping[str, Any]]) -> ServedRanker | None:
    """The Kubernetes backend: the `stable` Deployment takes the stable share, a `canary` one the
    rest; ready when every one of them is."""
    roles = {(o["metadata"].get("labels") or {}).get(build.ROLE): o for o in objects}
    stable = roles.get("stable")
    version = _version(stable) if stable is not None else None
    if version is None:
        return None
    canary = roles.get("canary")
    ready = all(deployment_ready(o) for o in objects)
    return ServedRanker(version, ready, _version(canary) if canary is not None else None)


def child_ref(obj: Mapping[str, Any]) -> ChildRef:
    labels = obj["metadata"].get("labels") or {}
    return ChildRef(
        obj["kind"],
        obj["metadata"]["name"],
        obj.get("apiVersion", ""),
        labels.get(build.ENCODER_VERSION),
        labels.get(build.COMPONENT, ""),
    )


def from_children(objects: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Keyword arguments of `Observed` that the children provide."""
    encoders_ready: dict[str, bool] = {}
    jobs: dict[str, JobState] = {}
    ranker = None
    refs = []
    ranker_deployments = []
    for obj in objects:
        refs.append(child_ref(obj))
        labels = obj["metadata"].get("labels") or {}
        component, version = labels.get(build.COMPONENT), labels.get(build.ENCODER_VERSION)
        if obj["kind"] == "Deployment" and component == "encoder" and version:
            encoders_ready[version] = deployment_ready(obj)
        elif obj["kind"] == "Deployment" and component == "ranker":
            ranker_deployments.append(obj)
        elif obj["kind"] == "Job" and version:
            jobs[obj["metadata"]["name"]] = job_state(obj)
        elif obj["kind"] == "InferenceService":
            ranker = served_ranker(obj)
    if ranker is None and ranker_deployments:
        ranker = served_by_deployments(ranker_deployments)
    return {"encoders_ready": encoders_ready, "jobs": jobs, "ranker": ranker, "children": tuple(refs)}


# --- the store ----------------------------------------------------------------------------------


class SecretRefused(PermissionError):
    """The Secret a ranker names has not consented to be used by it."""


def secret_allows(annotations: Mapping[str, str] | None, ranker: str) -> bool:
    """Secrets by consent: the operator reads a store password only from a Secret whose
    `mmrank.io/allowed-rankers` annotation names the ranker (comma-separated) or is `*`. Whoever
    may create rankers may not thereby make the operator send any Secret of the namespace to a
    store URL of their choosing."""
    allowed = (annotations or {}).get("mmrank.io/allowed-rankers", "")
    names = {n.strip() for n in allowed.split(",") if n.strip()}
    return "*" in names or ranker in names


def backfilled_rows(checkpoints: Mapping[str, tuple[int, int]], catalogue_size: int) -> int:
    """How many catalogue rows the backfill has stored: the union of every checkpoint's rows.

    Checkpoint "I/N" = (done, total) says rows [start, start + done) of shard I of N are stored
    (encoders/backfill.py). Checkpoints of every sharding count (a backfill resharded half way
    leaves some of each, overlapping); one whose shard size does not match the catalogue size is
    from another catalogue and counts for nothing."""
    runs = []
    for name, (done, total) in checkpoints.items():
        index, _, count = name.partition("/")
        if not (index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(count):
            continue
        start, stop = int(index) * catalogue_size // int(count), (int(index) + 1) * catalogue_size // int(count)
        if stop - start == total and done > 0:
            runs.append((start, start + min(done, total)))
    covered, reach = 0, 0
    for start, stop in sorted(runs):
        covered += max(0, stop - max(start, reach))
        reach = max(reach, stop)
    return covered


def catalogue_coverage(rows: int, catalogue_size: int) -> float:
    """Coverage counts catalogue items only: the rows the backfill stored, over the catalogue.

    Not the space's item count: the embedder also writes items from events that are not (yet) in
    the catalogue, and those must never lift a space over minCoverage. A catalogue item the
    embedder wrote before the backfill reached it counts once the backfill passes it (its newer
    vector is kept, see `store.put`). Unknown catalogue: 0, never covered."""
    return min(1.0, rows / catalogue_size) if catalogue_size > 0 else 0.0


class CoverageObserver(Protocol):
    """The store as the operator sees it, always as one ranker (`scope`: "namespace/name")."""

    def spaces(self, url: str, password: str | None, versions: Sequence[str], *, scope: str) -> dict[str, SpaceState]:
        """Coverage per space; raises on an unreachable store."""

    def delete_space(self, url: str, password: str | None, version: str, *, scope: str) -> None: ...

    def delete_ranker(
        self, url: str, password: str | None, *, scope: str, stream: str | None, group: str
    ) -> ScopeDeleted:
        """Every key of the ranker; its consumer group leaves `stream` when that is a stream
        named in the spec (shared with other rankers, so not deleted)."""


class StoreCoverage:
    """Reads `space_info` through `mmrank.store`; one client per store, shared by all rankers."""

    def __init__(self) -> None:
        self._stores: dict[tuple[str, str | None], Any] = {}
        self._lock = threading.Lock()

    def _store(self, url: str, password: str | None, scope: str) -> Any:
        """The ranker's view of the store; one connection per store URL and password, whatever the
        ranker (the password: the Secret's, as `mmrank.store.store_password` rules)."""
        from mmrank.store import Scope, open_store

        key = (url, password)
        with self._lock:
            if key not in self._stores:
                self._stores[key] = open_store(url, password=password)
            return self._stores[key].for_scope(Scope.parse(scope))

    def spaces(self, url: str, password: str | None, versions: Sequence[str], *, scope: str) -> dict[str, SpaceState]:
        from mmrank.store import SpaceNotFound

        store = self._store(url, password, scope)
        out = {}
        for version in versions:
            try:
                info = store.space_info(version)
            except SpaceNotFound:
                out[version] = SpaceState(coverage=0.0)
                continue
            rows = backfilled_rows({k: (v.done, v.total) for k, v in info.backfill.items()}, int(info.catalogue_size))
            out[version] = SpaceState(
                coverage=catalogue_coverage(rows, int(info.catalogue_size)),
                items=int(info.items),
                backfill_done=rows,
                backfill_total=int(info.catalogue_size),
            )
        return out

    def delete_space(self, url: str, password: str | None, version: str, *, scope: str) -> None:
        self._store(url, password, scope).delete_space(version)

    def delete_ranker(
        self, url: str, password: str | None, *, scope: str, stream: str | None, group: str
    ) -> ScopeDeleted:
        store = self._store(url, password, scope)
        if stream and not store.scope.owns(stream) and hasattr(store, "leave_stream"):
            store.leave_stream(stream, store.scope.consumer_group(group))
        deleted: ScopeDeleted = store.delete_scope()
        return deleted


class FixedCoverage:
    """Coverage given by value (for `mmrank render --coverage E=0.5` and tests)."""

    def __init__(self, coverage: Mapping[str, float] | None = None) -> None:
        self.coverage = dict(coverage or {})
        self.deleted: list[str] = []
        self.deleted_rankers: list[str] = []

    def spaces(
        self, url: str, password: str | None, versions: Sequence[str], *, scope: str = ""
    ) -> dict[str, SpaceState]:
        return {v: SpaceState(coverage=self.coverage.get(v, 0.0)) for v in versions if v not in self.deleted}

    def delete_space(self, url: str, password: str | None, version: str, *, scope: str = "") -> None:
        self.deleted.append(version)

    def delete_ranker(
        self, url: str, password: str | None, *, scope: str, stream: str | None, group: str
    ) -> ScopeDeleted:
        from mmrank.store import ScopeDeleted

        self.deleted_rankers.append(scope)
        spaces = sorted(v for v in self.coverage if v not in self.deleted)
        self.deleted += spaces
        return ScopeDeleted(keys=0, spaces=spaces)


# --- freshness from Prometheus ------------------------------------------------------------------


def freshness_query(namespace: str, name: str, space: str, window_seconds: int = 300) -> str:
    """p99 seconds from an item event to its vector in `space`, over the ranker's embedder pods.
    Needs the pod labels as target labels, as the usual `kubernetes_sd` scrape config makes them
    (labelmap of `__meta_kubernetes_pod_label_(.+)`, and `namespace`), which the in-cluster
    Prometheus of `mmrank cluster` and docs/operator.md use."""

    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    labels = {**ranker_series(namespace, name), "space": space}
    selector = ",".join(f"{label}={quoted(value)}" for label, value in labels.items())
    return (
        "histogram_quantile(0.99, sum by (le) (rate("
        f"mmrank_embedding_freshness_seconds_bucket{{{selector}}}[{window_seconds}s])))"
    )


class FreshnessObserver:
    """Reads freshness p99 at most once per `min_age_seconds` per (ranker, space): it changes
    slowly, and 300 rankers must not turn the reconcile timer into a Prometheus load."""

    def __init__(self, querier: Any, min_age_seconds: float = 60.0) -> None:
        self.querier = querier
        self.min_age_seconds = min_age_seconds
        self._seen: dict[tuple[str, str, str], tuple[float, float | None]] = {}

    def p99(self, prometheus_url: str, namespace: str, name: str, space: str, previous: float | None) -> float | None:
        key = (namespace, name, space)
        now = time.monotonic()
        cached = self._seen.get(key)
        if cached is not None and now - cached[0] < self.min_age_seconds:
            return cached[1]
        try:
            value = self.querier.query(prometheus_url, freshness_query(namespace, name, space))
        except Exception:  # noqa: BLE001 - no Prometheus: keep what status had, try again later
            value = previous
        value = round(value, 4) if value is not None else previous
        self._seen[key] = (now, value)
        return value
