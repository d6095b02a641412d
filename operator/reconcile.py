"""One reconcile of one MultimodalRanker: gather -> core -> apply. The kopf handlers call this.

Order matters for what a crash half way leaves behind: children are applied first (idempotent),
then children no longer desired are deleted, then retired spaces are deleted from the store, and
status (the history a restarted operator resumes from) is written last.
"""
from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any, Protocol

from pydantic import ValidationError

from mmrank import api
from mmrank.operator import children as build
from mmrank.operator import core, observe
from mmrank.operator import rollout as roll
from mmrank.operator.analysis import Analysis
from mmrank.operator.kube import Kube, key, lower, stamped, up_to_date


@dataclasses.dataclass
class Outcome:
    decisions: list[core.Decision]
    applied: list[tuple[str, str]]
    deleted: list[tuple[str, str]]
    phase: str


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(body: Mapping[str, Any]) -> api.MultimodalRanker:
    """The resource as our models see it; status is history, read separately, never a reason
    to reject a spec."""
    return api.MultimodalRanker.model_validate({k: v for k, v in dict(body).items() if k != "status"})


def problems_of(exc: ValidationError) -> list[str]:
    return [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]


def gather(kube: Kube, store: observe.CoverageObserver, ranker: api.MultimodalRanker,
           status: Mapping[str, Any]) -> tuple[core.Observed, list[dict[str, Any]]]:
    meta = ranker.metadata
    namespace = meta.namespace or "default"
    objects = kube.list_children(namespace, meta.name, meta.uid or "")
    versions = [ranker.spec.encoder.version]
    stable = core.stable_of(status)
    for version in ([stable.encoder] if stable else []) + core.known_spaces(status):
        if version not in versions:
            versions.append(version)
    store_spec = ranker.spec.embeddings.store
    spaces: dict[str, core.SpaceState] = {}
    error, reason = None, "StoreUnreachable"
    try:
        ref = store_spec.password_secret_ref
        password = kube.secret_value(namespace, ref.name, ref.key, meta.name) if ref else None
        spaces = store.spaces(store_spec.url, password, versions, scope=build.store_scope(ranker))
    except observe.SecretRefused as exc:
        error, reason = str(exc)[:300], "SecretNotAllowed"
        spaces = {v: core.SpaceState(coverage=None) for v in versions}
    except Exception as exc:  # noqa: BLE001 - an unreachable store is an observation, not a crash
        error = f"{type(exc).__name__}: {exc}"[:300]
        spaces = {v: core.SpaceState(coverage=None) for v in versions}
    observed = core.Observed(now=now(), status=status, spaces=spaces, store_error=error, store_error_reason=reason,
                             indexed_jobs=kube.server_version() >= (1, 22), **observe.from_children(objects))
    return observed, objects


def analyse_if_due(analyser: Analyser | None, ranker: api.MultimodalRanker, observed: core.Observed) -> core.Observed:
    """Query Prometheus only when the canary's current window is over (one analysis per step
    window, not one per reconcile)."""
    rollout = roll.Rollout.from_status(observed.status.get("canary"))
    stable = core.stable_of(observed.status)
    spec = ranker.spec
    if (analyser is None or rollout is None or stable is None or rollout.identity != build.ranker_identity(spec.ranker)
            or not roll.analysis_due(core.plan_of(spec), rollout, observed.now)):
        return observed
    window = api.duration_seconds(spec.rollout.interval)
    analysis = analyser.analyse(spec.rollout.prometheus_url, rollout.ranker_version, stable.ranker, window,
                                spec.rollout.analysis)
    return dataclasses.replace(observed, analysis=analysis)


class Analyser(Protocol):
    def analyse(self, prometheus_url: str, canary_variant: str, stable_variant: str, window_seconds: int,
                spec: api.AnalysisSpec) -> Analysis: ...


def with_freshness(freshness: observe.FreshnessObserver | None, ranker: api.MultimodalRanker,
                   observed: core.Observed) -> core.Observed:
    previous = ((observed.status.get("embeddings") or {}).get("freshnessP99Seconds"))
    if freshness is None:
        return dataclasses.replace(observed, freshness_p99=previous)
    meta = ranker.metadata
    value = freshness.p99(ranker.spec.rollout.prometheus_url, meta.namespace or "default", meta.name,
                          ranker.spec.encoder.version, previous)
    return dataclasses.replace(observed, freshness_p99=value)


def reconcile(kube: Kube, store: observe.CoverageObserver, body: Mapping[str, Any],
              analyser: Analyser | None = None, freshness: observe.FreshnessObserver | None = None) -> Outcome:
    status = dict(body.get("status") or {})
    try:
        ranker = parse(body)
    except ValidationError as exc:
        return _invalid(kube, body, status, problems_of(exc))
    observed, objects = gather(kube, store, ranker, status)
    observed = analyse_if_due(analyser, ranker, observed)
    observed = with_freshness(freshness, ranker, observed)
    want = core.desired(ranker, observed)
    live = {key(o): o for o in objects}
    applied, notes = [], {}
    server = kube.server_version()
    autoscaled = kube.autoscaled_deployments(ranker.metadata.namespace or "default")
    for child in want.children:
        child = keep_autoscaled_replicas(child, live.get(key(child)), autoscaled)
        child, note = lower(child, server)
        child = stamped(child)
        if not up_to_date(live.get(key(child)), child):
            kube.apply(child)
            applied.append(key(child))
            if note:
                notes[key(child)] = note
    keep = {(c.kind, c.name) for c in want.keep} | {key(c) for c in want.children}
    deleted = []
    for obj in objects:
        if key(obj) not in keep:
            kube.delete(obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
            deleted.append(key(obj))
    store_spec = ranker.spec.embeddings.store
    for version in want.delete_spaces:
        ref = store_spec.password_secret_ref
        password = kube.secret_value(ranker.metadata.namespace or "default", ref.name, ref.key,
                                     ranker.metadata.name) if ref else None
        store.delete_space(store_spec.url, password, version, scope=build.store_scope(ranker))
    if _changed(status, want.status):
        # Clearing a handled request is guarded by resourceVersion: a request a person wrote after
        # this reconcile read the resource makes the patch fail (409, retried), never vanish.
        guard = ranker.metadata.resource_version if "request" in want.status else None
        kube.patch_status(ranker.metadata.namespace or "default", ranker.metadata.name,
                          _merge_patch(status, want.status), resource_version=guard)
    decisions = [_created(k, notes.get(k)) for k in applied if k not in live]
    decisions += [core.Decision("Deleted", f"{kind} {name}") for kind, name in deleted]
    return Outcome([*decisions, *want.decisions], applied, deleted, want.status["phase"])


AUTOSCALABLE = ("encoder", "embedder")


def keep_autoscaled_replicas(child: dict[str, Any], live: Mapping[str, Any] | None,
                             autoscaled: set[str]) -> dict[str, Any]:
    """An encoder or embedder Deployment a HorizontalPodAutoscaler targets keeps the replicas it
    has: the operator applies the live value instead of the spec's, so it never undoes a scaling.
    (Leaving the field out would not do: Kubernetes < 1.22 then resets it to 1, because a /scale
    write takes no ownership of it.) Ranker Deployments are not: their replica ratio is the
    canary split."""
    labels = child["metadata"].get("labels") or {}
    if (child["kind"] != "Deployment" or child["metadata"]["name"] not in autoscaled
            or labels.get(build.COMPONENT) not in AUTOSCALABLE or live is None):
        return child
    replicas = (live.get("spec") or {}).get("replicas")
    if replicas is None:
        return child
    return {**child, "spec": {**child["spec"], "replicas": int(replicas)}}


def _created(child: tuple[str, str], note: str | None) -> core.Decision:
    """A Warning when the child had to be changed for this apiserver (see `kube.lower`)."""
    text = f"{child[0]} {child[1]}"
    return core.Decision("Created", f"{text} ({note})", "Warning") if note else core.Decision("Created", text)


def _invalid(kube: Kube, body: Mapping[str, Any], status: dict[str, Any], problems: list[str]) -> Outcome:
    meta = body.get("metadata") or {}
    new = core.invalid_status(status, problems, now(), int(meta.get("generation") or 0))
    decisions = []
    if _changed(status, new):
        kube.patch_status(meta.get("namespace") or "default", meta["name"], _merge_patch(status, new))
        decisions.append(core.Decision("InvalidSpec", "; ".join(problems)[:1000], "Warning"))
    return Outcome(decisions, [], [], "Failed")


def clean(value: Any) -> Any:
    """Without None values: how the apiserver stores what a merge patch wrote."""
    if isinstance(value, Mapping):
        return {k: clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def _changed(before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    return bool(_merge_patch(before, after))


def _merge_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning `before` into `after`, top-level key by key (None removes)."""
    patch: dict[str, Any] = {}
    for k, v in after.items():
        if v is None:
            if before.get(k) is not None:
                patch[k] = None
        elif clean(v) != before.get(k):
            patch[k] = v
    return patch
