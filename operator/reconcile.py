"""One reconcile of one MultimodalRanker: gather -> core -> apply. The kopf handlers call this.

Order matters for what a crash half way leaves behind: children are applied first (idempotent),
then children no longer desired are deleted, then retired spaces are deleted from the store, and
status (the history a restarted operator resumes from) is written last.

Each write stands alone: a child the apiserver refuses is recorded and the others, the deletions
and the status still happen (`faults.with_refusals` says what status shows). The status write is
guarded by the resourceVersion read, and a conflict is resolved by `faults.reapply`. Nothing the
cluster or the store answers raises out of `reconcile`; `Outcome.retry` says a transient failure
wants the next reconcile soon.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any, Protocol

from pydantic import ValidationError

from mmrank import api
from mmrank.operator import children as build
from mmrank.operator import core, faults, observe
from mmrank.operator import rollout as roll
from mmrank.operator.analysis import Analysis, ranker_series
from mmrank.operator.kube import Kube, key, lower, refusal, stamped, up_to_date


@dataclasses.dataclass
class Outcome:
    decisions: list[core.Decision]
    applied: list[tuple[str, str]]
    deleted: list[tuple[str, str]]
    phase: str
    refusals: list[faults.Refusal] = dataclasses.field(default_factory=list)
    retry: bool = False  # something transient failed: the next reconcile should come soon


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(body: Mapping[str, Any]) -> api.MultimodalRanker:
    """The resource as our models see it; status is history, read separately, never a reason
    to reject a spec."""
    return api.MultimodalRanker.model_validate({k: v for k, v in dict(body).items() if k != "status"})


def problems_of(exc: ValidationError) -> list[str]:
    return [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]


@dataclasses.dataclass(frozen=True)
class StorePassword:
    """The store password from the spec's Secret, read once per reconcile: the coverage read and
    the deletion of retired spaces both use it. `problem` is why it could not be read (the Secret
    did not consent, the apiserver refused), raised where the password is needed."""

    value: str | None = None
    problem: Exception | None = None

    def get(self) -> str | None:
        if self.problem is not None:
            raise self.problem
        return self.value


def store_password(kube: Kube, ranker: api.MultimodalRanker) -> StorePassword:
    ref = ranker.spec.embeddings.store.password_secret_ref
    if ref is None:
        return StorePassword()
    meta = ranker.metadata
    try:
        return StorePassword(kube.secret_value(meta.namespace or "default", ref.name, ref.key, meta.name))
    except Exception as exc:  # noqa: BLE001 - reported where the password is needed (status, refusals)
        return StorePassword(problem=exc)


def gather(
    kube: Kube,
    store: observe.CoverageObserver,
    ranker: api.MultimodalRanker,
    status: Mapping[str, Any],
    password: StorePassword,
) -> tuple[core.Observed, list[dict[str, Any]]]:
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
        spaces = store.spaces(store_spec.url, password.get(), versions, scope=build.store_scope(ranker))
    except observe.SecretRefused as exc:
        error, reason = str(exc)[:300], "SecretNotAllowed"
        spaces = {v: core.SpaceState(coverage=None) for v in versions}
    except Exception as exc:  # noqa: BLE001 - an unreachable store is an observation, not a crash
        error = f"{type(exc).__name__}: {exc}"[:300]
        spaces = {v: core.SpaceState(coverage=None) for v in versions}
    observed = core.Observed(
        now=now(),
        status=status,
        spaces=spaces,
        store_error=error,
        store_error_reason=reason,
        indexed_jobs=kube.server_version() >= (1, 22),
        **observe.from_children(objects),
    )
    return observed, objects


def analyse_if_due(analyser: Analyser | None, ranker: api.MultimodalRanker, observed: core.Observed) -> core.Observed:
    """Query Prometheus only when the canary's current window is over (one analysis per step
    window, not one per reconcile)."""
    rollout = roll.Rollout.from_status(observed.status.get("canary"))
    stable = core.stable_of(observed.status)
    spec = ranker.spec
    if (
        analyser is None
        or rollout is None
        or stable is None
        or rollout.identity != build.ranker_identity(spec.ranker)
        or not roll.analysis_due(core.plan_of(spec), rollout, observed.now)
    ):
        return observed
    window = api.duration_seconds(spec.rollout.interval)
    analysis = analyser.analyse(
        spec.rollout.prometheus_url,
        rollout.ranker_version,
        stable.ranker,
        window,
        spec.rollout.analysis,
        scope=ranker_series(ranker.metadata.namespace or "default", ranker.metadata.name),
    )
    return dataclasses.replace(observed, analysis=analysis)


class Analyser(Protocol):
    def analyse(
        self,
        prometheus_url: str,
        canary_variant: str,
        stable_variant: str,
        window_seconds: int,
        spec: api.AnalysisSpec,
        scope: Mapping[str, str] | None = None,
    ) -> Analysis: ...


def with_freshness(
    freshness: observe.FreshnessObserver | None, ranker: api.MultimodalRanker, observed: core.Observed
) -> core.Observed:
    previous = (observed.status.get("embeddings") or {}).get("freshnessP99Seconds")
    if freshness is None:
        return dataclasses.replace(observed, freshness_p99=previous)
    meta = ranker.metadata
    value = freshness.p99(
        ranker.spec.rollout.prometheus_url,
        meta.namespace or "default",
        meta.name,
        ranker.spec.encoder.version,
        previous,
    )
    return dataclasses.replace(observed, freshness_p99=value)


STATUS_TRIES = 3  # reconciles of one call when other writers keep changing the status under it


def reconcile(
    kube: Kube,
    store: observe.CoverageObserver,
    body: Mapping[str, Any],
    analyser: Analyser | None = None,
    freshness: observe.FreshnessObserver | None = None,
) -> Outcome:
    """One reconcile; never raises on what the cluster or the store answers (see `faults`).

    When another writer changed the status history after this reconcile read it (a second
    operator, `kubectl mmrank`), the status write gets 409 and the reconcile runs again from the
    fresh resource, up to STATUS_TRIES times; then `retry` asks for another run."""
    applied: list[tuple[str, str]] = []
    deleted: list[tuple[str, str]] = []
    done: list[core.Decision] = []
    for _ in range(STATUS_TRIES):
        outcome, fresh = _reconcile_once(kube, store, body, analyser, freshness)
        applied += outcome.applied
        deleted += outcome.deleted
        done += [d for d in outcome.decisions if d.reason in ("Created", "Deleted")]
        if fresh is None:
            return dataclasses.replace(
                outcome,
                decisions=[*done, *[d for d in outcome.decisions if d.reason not in ("Created", "Deleted")]],
                applied=applied,
                deleted=deleted,
            )
        body = fresh
    message = f"the status kept changing under {STATUS_TRIES} reconciles (another writer); retried on the next"
    return Outcome(
        [*done, core.Decision("StatusConflict", message, "Warning")],
        applied,
        deleted,
        str((body.get("status") or {}).get("phase") or ""),
        retry=True,
    )


def _reconcile_once(
    kube: Kube,
    store: observe.CoverageObserver,
    body: Mapping[str, Any],
    analyser: Analyser | None,
    freshness: observe.FreshnessObserver | None,
) -> tuple[Outcome, Mapping[str, Any] | None]:
    """One pass; the fresh resource instead of None when its status write lost a race that
    needs the reconcile redone (see `faults.reapply`)."""
    status = dict(body.get("status") or {})
    try:
        ranker = parse(body)
    except ValidationError as exc:
        return _invalid(kube, body, status, problems_of(exc))
    try:
        password = store_password(kube, ranker)
        observed, objects = gather(kube, store, ranker, status, password)
        server = kube.server_version()
        autoscaled = kube.autoscaled_deployments(ranker.metadata.namespace or "default")
    except Exception as exc:  # noqa: BLE001 - nothing observed, nothing decided: say so, try again later
        message = f"could not read the cluster: {type(exc).__name__}: {str(exc)[:300]}"
        return Outcome(
            [core.Decision("ObservationFailed", message, "Warning")], [], [], str(status.get("phase") or ""), retry=True
        ), None
    observed = analyse_if_due(analyser, ranker, observed)
    observed = with_freshness(freshness, ranker, observed)
    want = core.desired(ranker, observed)
    live = {key(o): o for o in objects}
    applied, notes, refusals = [], {}, []
    for child in want.children:
        child = keep_autoscaled_replicas(child, live.get(key(child)), autoscaled)
        child, note = lower(child, server)
        child = stamped(child)
        if up_to_date(live.get(key(child)), child):
            continue
        try:
            kube.apply(child)
        except Exception as exc:  # noqa: BLE001 - one refused child must not stop the others
            refusals.append(refusal("apply", child["kind"], child["metadata"]["name"], exc))
            continue
        applied.append(key(child))
        if note:
            notes[key(child)] = note
    keep = {(c.kind, c.name) for c in want.keep} | {key(c) for c in want.children}
    deleted = []
    for obj in objects:
        if key(obj) not in keep:
            try:
                kube.delete(obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
            except Exception as exc:  # noqa: BLE001 - as above
                refusals.append(refusal("delete", obj["kind"], obj["metadata"]["name"], exc))
                continue
            deleted.append(key(obj))
    store_spec = ranker.spec.embeddings.store
    kept_spaces = []
    for version in want.delete_spaces:
        try:
            store.delete_space(store_spec.url, password.get(), version, scope=build.store_scope(ranker))
        except Exception as exc:  # noqa: BLE001 - the space stays listed, and is deleted on a later run
            refusals.append(refusal("delete", "Space", version, exc))
            kept_spaces.append(version)
    generation = int(ranker.metadata.generation or 0)
    final, refused = faults.with_refusals(
        _with_spaces(want.status, status, kept_spaces), status, refusals, observed.now, generation
    )
    decisions = [_created(k, notes.get(k)) for k in applied if k not in live]
    decisions += [core.Decision("Deleted", f"{kind} {name}") for kind, name in deleted]
    decisions += _phase_decisions(want, final, status) + refused
    outcome = Outcome(
        decisions, applied, deleted, final["phase"], refusals=refusals, retry=any(r.transient for r in refusals)
    )
    fresh = _write_status(kube, ranker.metadata, status, final)
    if isinstance(fresh, str):
        return dataclasses.replace(
            outcome, retry=True, decisions=[*decisions, core.Decision("StatusNotWritten", fresh, "Warning")]
        ), None
    return outcome, fresh


def _with_spaces(new: dict[str, Any], before: Mapping[str, Any], versions: list[str]) -> dict[str, Any]:
    """The status still listing the spaces whose deletion failed (so a later run deletes them)."""
    if not versions:
        return new
    old = {s.get("version"): s for s in (before.get("embeddings") or {}).get("spaces") or []}
    spaces = [old.get(v) or {"version": v} for v in versions] + list(new["embeddings"]["spaces"])
    return {**new, "embeddings": {**new["embeddings"], "spaces": spaces}}


def _phase_decisions(want: core.Desired, final: Mapping[str, Any], before: Mapping[str, Any]) -> list[core.Decision]:
    """The core's decisions, with its phase-change Event told the phase refusals made it."""
    phase = want.status["phase"]
    if final["phase"] == phase:
        return list(want.decisions)
    out = [d for d in want.decisions if not (d.reason == phase and d.message.startswith("phase "))]
    if before.get("phase") != final["phase"]:
        ready: Mapping[str, Any] = next((c for c in final["conditions"] if c["type"] == "Ready"), {})
        kind = "Warning" if final["phase"] == "Failed" else "Normal"
        out.append(
            core.Decision(
                final["phase"],
                f"phase {before.get('phase') or '-'} -> {final['phase']}: {ready.get('message', '')}"[:1000],
                kind,
            )
        )
    return out


def _write_status(
    kube: Kube, meta: api.ObjectMeta, before: Mapping[str, Any], after: Mapping[str, Any]
) -> Mapping[str, Any] | str | None:
    """Write the status, guarded by the resourceVersion the reconcile read, so no other writer's
    change is lost. On 409: read again; `faults.reapply` says whether our change goes on top of
    theirs (written, guarded again) or the reconcile must be redone (the fresh resource is
    returned). A refused write returns why, as text."""
    namespace, version = meta.namespace or "default", meta.resource_version
    base = dict(before)
    target: Mapping[str, Any] = after
    for _ in range(STATUS_TRIES):
        patch = _merge_patch(base, target)
        if not patch:
            return None
        try:
            kube.patch_status(namespace, meta.name, patch, resource_version=version)
            return None
        except Exception as exc:  # noqa: BLE001 - reported, retried by the next reconcile
            if getattr(exc, "status", None) != 409:
                return f"status not written: {refusal('patch', api.KIND, meta.name, exc).text()}"[:1000]
        try:
            fresh = kube.get_ranker(namespace, meta.name)
        except Exception as exc:  # noqa: BLE001
            return f"status not written: {refusal('get', api.KIND, meta.name, exc).text()}"[:1000]
        fresh_status = dict(fresh.get("status") or {})
        merged = faults.reapply(before, after, fresh_status)
        if merged is None:
            return fresh
        base, target, version = fresh_status, merged, (fresh.get("metadata") or {}).get("resourceVersion")
    return f"status not written: it changed under {STATUS_TRIES} writes"


AUTOSCALABLE = ("encoder", "embedder")


def keep_autoscaled_replicas(
    child: dict[str, Any], live: Mapping[str, Any] | None, autoscaled: set[str]
) -> dict[str, Any]:
    """An encoder or embedder Deployment a HorizontalPodAutoscaler targets keeps the replicas it
    has: the operator applies the live value instead of the spec's, so it never undoes a scaling.
    (Leaving the field out would not do: Kubernetes < 1.22 then resets it to 1, because a /scale
    write takes no ownership of it.) Ranker Deployments are not: their replica ratio is the
    canary split."""
    labels = child["metadata"].get("labels") or {}
    if (
        child["kind"] != "Deployment"
        or child["metadata"]["name"] not in autoscaled
        or labels.get(build.COMPONENT) not in AUTOSCALABLE
        or live is None
    ):
        return child
    replicas = (live.get("spec") or {}).get("replicas")
    if replicas is None:
        return child
    return {**child, "spec": {**child["spec"], "replicas": int(replicas)}}


def _created(child: tuple[str, str], note: str | None) -> core.Decision:
    """A Warning when the child had to be changed for this apiserver (see `kube.lower`)."""
    text = f"{child[0]} {child[1]}"
    return core.Decision("Created", f"{text} ({note})", "Warning") if note else core.Decision("Created", text)


def _invalid(
    kube: Kube, body: Mapping[str, Any], status: dict[str, Any], problems: list[str]
) -> tuple[Outcome, Mapping[str, Any] | None]:
    meta = body.get("metadata") or {}
    new = core.invalid_status(status, problems, now(), int(meta.get("generation") or 0))
    decisions = []
    if _changed(status, new):
        decisions.append(core.Decision("InvalidSpec", "; ".join(problems)[:1000], "Warning"))
    fresh = _write_status(
        kube,
        api.ObjectMeta(
            name=meta["name"], namespace=meta.get("namespace"), resource_version=meta.get("resourceVersion")
        ),
        status,
        new,
    )
    if isinstance(fresh, str):
        return Outcome(
            [*decisions, core.Decision("StatusNotWritten", fresh, "Warning")], [], [], "Failed", retry=True
        ), None
    return Outcome(decisions, [], [], "Failed"), fresh


def _changed(before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    return bool(_merge_patch(before, after))


def _merge_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning `before` into `after`, top-level key by key (None removes)."""
    patch: dict[str, Any] = {}
    for k, v in after.items():
        if v is None:
            if before.get(k) is not None:
                patch[k] = None
        elif build.plain(v) != before.get(k):
            patch[k] = v
    return patch
