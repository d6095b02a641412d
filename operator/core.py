"""The pure reconcile core: `desired(ranker, observed) -> Desired(children, status, ...)`.

No I/O here. The handlers gather what is observed (children, store coverage, the history kept
in the resource's status), call `desired`, and carry out what it returns. Everything the operator
must remember between runs (the stable ranker, which spaces it has seen) is read from and
written to status, so a restarted operator resumes from the cluster, not from memory.

Embedding sync, the invariant this core enforces: a ranker gets traffic only when the space
of the encoder version it was trained on is (a) served by a ready encoder that keeps it fresh and
(b) backfilled to `minCoverage`. Until then the previous stable ranker keeps serving, and its
encoder keeps running.

Canary rollouts: once a new ranker's space is synced, `rollout.next_step` moves it through
`spec.rollout.steps`; the core renders the serving children for the share it decides (stable and
canary side by side) and makes the canary stable once it serves all traffic and is ready.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from mmrank import api
from mmrank.operator import children as build
from mmrank.operator import rollout as roll
from mmrank.operator.analysis import Analysis


@dataclasses.dataclass(frozen=True)
class Version:
    """A ranker version and the encoder version (space) it was trained on."""

    ranker: str
    encoder: str

    def as_status(self) -> dict[str, str]:
        return {"rankerVersion": self.ranker, "encoderVersion": self.encoder}


@dataclasses.dataclass(frozen=True)
class SpaceState:
    """What the store says about one space; `coverage` None means it could not be read."""

    coverage: float | None
    items: int = 0
    backfill_done: int = 0
    backfill_total: int = 0


@dataclasses.dataclass(frozen=True)
class JobState:
    completions: int
    succeeded: int = 0
    finished: bool = False
    failed: bool = False
    reason: str = ""  # the Job's Failed condition, "<reason>: <message>"


@dataclasses.dataclass(frozen=True)
class ServedRanker:
    """The serving children as observed (the InferenceService, or the ranker Deployments of the
    Kubernetes backend): which ranker takes the stable share, which one the canary share, and
    whether all of them report ready for the spec they were given."""

    version: Version
    ready: bool
    canary: Version | None = None


@dataclasses.dataclass(frozen=True)
class ChildRef:
    kind: str
    name: str
    api_version: str = ""
    encoder_version: str | None = None
    component: str = ""


@dataclasses.dataclass(frozen=True)
class Observed:
    """Everything `desired` needs besides the spec. `status` is the resource's current status
    (the history); `now` the RFC 3339 time stamped on changed conditions."""

    now: str
    status: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    spaces: Mapping[str, SpaceState] = dataclasses.field(default_factory=dict)
    store_error: str | None = None
    store_error_reason: str = "StoreUnreachable"  # or SecretNotAllowed
    indexed_jobs: bool = True  # Kubernetes >= 1.22: the backfill runs sharded
    encoders_ready: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    jobs: Mapping[str, JobState] = dataclasses.field(default_factory=dict)  # backfill Jobs by name
    ranker: ServedRanker | None = None
    children: Sequence[ChildRef] = ()
    analysis: Analysis | None = None  # run by the I/O layer when `rollout.analysis_due`
    freshness_p99: float | None = None  # seconds, from the embedder's histogram in Prometheus


@dataclasses.dataclass(frozen=True)
class Decision:
    """A Kubernetes Event to post: one per thing the operator decided."""

    reason: str
    message: str
    type: str = "Normal"


@dataclasses.dataclass(frozen=True)
class Desired:
    children: list[dict[str, Any]]
    keep: list[ChildRef]  # observed children left untouched (a retiring encoder)
    status: dict[str, Any]
    delete_spaces: list[str]  # retired spaces beyond the retention count
    decisions: list[Decision]


# --- history kept in status ---------------------------------------------------------------------


def stable_of(status: Mapping[str, Any]) -> Version | None:
    stable = status.get("stable") or {}
    if stable.get("rankerVersion") and stable.get("encoderVersion"):
        return Version(stable["rankerVersion"], stable["encoderVersion"])
    return None


def stable_spec_of(status: Mapping[str, Any]) -> api.RankerModelSpec | None:
    """The stable ranker's spec as recorded when it was promoted (None in a status written by an
    operator before canary rollouts: then a new ranker switches without a canary)."""
    recorded = (status.get("stable") or {}).get("ranker")
    if not recorded:
        return None
    try:
        return api.RankerModelSpec.model_validate(dict(recorded))
    except ValueError:
        return None


def plan_of(spec: api.RankerSpec) -> roll.Plan:
    rollout = spec.rollout
    return roll.Plan(
        steps=roll.effective_steps(rollout.steps, spec.ranker.serving, spec.ranker.replicas),
        interval_seconds=api.duration_seconds(rollout.interval),
        failure_limit=rollout.analysis.failure_limit,
        promotion=rollout.promotion,
    )


def known_spaces(status: Mapping[str, Any]) -> list[str]:
    """Spaces in the order the operator first saw them (oldest first)."""
    spaces = (status.get("embeddings") or {}).get("spaces") or []
    return [s["version"] for s in spaces if s.get("version")]


# --- decisions ----------------------------------------------------------------------------------


def live_encoders(spec_encoder: str, stable: Version | None, rolled_back: bool = False) -> list[str]:
    """The encoder versions that must run: the spec's (unless its canary was rolled back: then its
    space retires and is kept under `retainedSpaces`), and the stable ranker's while it serves."""
    live = [] if rolled_back and stable is not None else [spec_encoder]
    if stable is not None and stable.encoder not in live:
        live.append(stable.encoder)
    return live


def is_synced(space: SpaceState | None, min_coverage: float) -> bool:
    return space is not None and space.coverage is not None and space.coverage >= min_coverage


def promote(stable: Version | None, candidate: Version, served: ServedRanker | None) -> Version | None:
    """The candidate becomes stable once KServe reports it Ready; before that the old one is
    still the stable ranker, and its encoder keeps running."""
    if served is not None and served.ready and served.version == candidate:
        return candidate
    return stable


def serve(
    stable: Version | None, candidate: Version, candidate_synced: bool, served: ServedRanker | None
) -> Version | None:
    """Which ranker the InferenceService runs. The seam of the canary state machine: today a
    synced candidate (its encoder ready, its space at minCoverage) takes all traffic; once
    switched it is not switched back on a coverage dip."""
    if candidate == stable or candidate_synced:
        return candidate
    if served is not None and served.version == candidate:
        return candidate
    return stable


def needs_backfill(space: SpaceState | None, job: JobState | None, min_coverage: float) -> bool:
    """Backfill while below minCoverage; a running Job is never cut short by coverage alone."""
    if job is not None and not job.finished:
        return True
    if space is None or space.coverage is None:
        return job is not None
    return space.coverage < min_coverage


def spaces_to_delete(known: Sequence[str], live: Sequence[str], retained: int) -> list[str]:
    """Retired spaces (known, not live) beyond the `retained` most recent ones."""
    retired = [s for s in known if s not in live]
    return retired[: max(0, len(retired) - retained)]


# --- backfill attempts --------------------------------------------------------------------------

BACKOFF_CAP_SECONDS = 600


@dataclasses.dataclass(frozen=True)
class Attempts:
    """What status remembers of one space's backfill: the Job of the current (or last) attempt
    (its name carries the Job's shape, see `children.backfill_job_name`), how many attempts of
    that shape were started, and after a failure when the next may start, or that none will."""

    job: str = ""
    attempts: int = 0
    retry_at: str | None = None
    last_failure: str = ""
    failed: bool = False

    @classmethod
    def from_status(cls, entry: Mapping[str, Any] | None) -> Attempts:
        backfill = (entry or {}).get("backfill") or {}
        return cls(
            job=str(backfill.get("job") or ""),
            attempts=int(backfill.get("attempts") or 0),
            retry_at=backfill.get("retryAt"),
            last_failure=str(backfill.get("lastFailure") or ""),
            failed=backfill.get("state") == "Failed",
        )

    def as_status(self, running: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"job": self.job, "attempts": self.attempts}
        if self.retry_at:
            out["retryAt"] = self.retry_at
        if self.last_failure:
            out["lastFailure"] = self.last_failure
        out["state"] = (
            "Failed" if self.failed else "Retrying" if self.retry_at else "Running" if running else "Complete"
        )
        return out if self.job else {}


@dataclasses.dataclass(frozen=True)
class BackfillStep:
    job: str | None  # the Job to run now (None: none runs)
    attempts: Attempts
    decisions: tuple[Decision, ...] = ()


def backoff_seconds(first: int, attempt: int) -> int:
    """Delay after failed attempt `attempt` (1-based): `first`, doubled each time, capped."""
    return int(min(BACKOFF_CAP_SECONDS, first * 2 ** max(0, attempt - 1)))


def _at(now: str, seconds: int) -> str:
    when = roll.parse_time(now) + datetime.timedelta(seconds=seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def next_backfill(
    record: Attempts,
    base: str,
    shape: str,
    jobs: Mapping[str, JobState],
    needed: bool,
    now: str,
    limit: int,
    first_backoff: int,
    coverage: str = "",
) -> BackfillStep:
    """Which backfill Job runs now. A failed Job (or one that completed without reaching
    minCoverage) is an attempt that failed: it is removed, and after `backoff_seconds` the next
    attempt (a new Job) starts, up to `limit` attempts; then the space is Failed with the reason,
    until the backfill's shape changes (spec.embeddings.backfill, the encoder's address, the
    image: a new shape starts from attempt 1) or `limit` is raised."""
    if build.shape_of_job_name(record.job) != shape:
        record = Attempts()
    if not needed:
        return BackfillStep(None, dataclasses.replace(record, retry_at=None, failed=False))
    if record.failed:
        if record.attempts >= limit:
            return BackfillStep(None, record)
        record = dataclasses.replace(record, failed=False, retry_at=now)  # maxAttempts was raised: go on now
    if record.retry_at and roll.seconds_between(record.retry_at, now) < 0:
        return BackfillStep(None, record)
    attempt = record.attempts if record.attempts and not record.retry_at else record.attempts + 1
    name = build.backfill_job_name(base, shape, attempt)
    job = jobs.get(name)
    if job is None or not job.finished:
        return BackfillStep(name, Attempts(name, attempt, last_failure=record.last_failure))
    why = (job.reason or "the Job failed") if job.failed else f"the Job completed, but {coverage}"
    failure = f"attempt {attempt} of {limit} ({name}): {why}"[:1000]
    if attempt >= limit:
        message = (
            f"backfill failed {attempt} times, the last: {failure}; no more attempts (change "
            "spec.embeddings.backfill or the encoder version to try again)"
        )
        return BackfillStep(
            None,
            Attempts(name, attempt, None, failure, failed=True),
            (Decision("BackfillFailed", message[:1000], "Warning"),),
        )
    delay = backoff_seconds(first_backoff, attempt)
    message = f"backfill {failure}; attempt {attempt + 1} of {limit} starts in {delay} s"
    return BackfillStep(
        None,
        Attempts(name, attempt, _at(now, delay), failure),
        (Decision("BackfillRetrying", message[:1000], "Warning"),),
    )


# --- immutable encoder fields ---------------------------------------------------------------------

IMMUTABLE_ENCODER_FIELDS = (("modelUri", "model_uri"), ("dimension", "dimension"))


def recorded_encoder(status: Mapping[str, Any], version: str) -> dict[str, Any]:
    """modelUri and dimension of an encoder version as first seen (kept in its space's entry)."""
    entry: Mapping[str, Any] = next(
        (s for s in (status.get("embeddings") or {}).get("spaces") or [] if s.get("version") == version), {}
    )
    return {wire: entry[wire] for wire, _ in IMMUTABLE_ENCODER_FIELDS if entry.get(wire) is not None}


def immutable_changes(spec: api.EncoderSpec, recorded: Mapping[str, Any]) -> list[str]:
    """Why the spec's encoder changes what its version already embedded with: one vector space per
    version, so a new model (or width) must come with a new version, never mix into this one."""
    problems = []
    for wire, field in IMMUTABLE_ENCODER_FIELDS:
        if wire in recorded and recorded[wire] != getattr(spec, field):
            problems.append(
                f"spec.encoder.{wire} of version {spec.version} is {recorded[wire]!r} (its space was "
                f"embedded with it) and cannot change to {getattr(spec, field)!r}: set a new "
                "spec.encoder.version (and a ranker trained on it) to change the model"
            )
    return problems


def as_recorded(ranker: api.MultimodalRanker, recorded: Mapping[str, Any]) -> api.MultimodalRanker:
    """The resource with its encoder's immutable fields as recorded: what is applied while a
    change of them is refused (every other change of the spec still applies)."""
    update = {field: recorded[wire] for wire, field in IMMUTABLE_ENCODER_FIELDS if wire in recorded}
    if not update:
        return ranker
    encoder = ranker.spec.encoder.model_copy(update=update)
    return ranker.model_copy(update={"spec": ranker.spec.model_copy(update={"encoder": encoder})})


# --- status -------------------------------------------------------------------------------------


def condition(ctype: str, ok: bool | None, reason: str, message: str) -> dict[str, str]:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    return {"type": ctype, "status": status, "reason": reason, "message": message}


def stamp_conditions(
    new: Sequence[dict[str, Any]], previous: Sequence[Mapping[str, Any]], now: str, generation: int
) -> list[dict[str, Any]]:
    """Keep lastTransitionTime while a condition's status is unchanged, so a second reconcile
    writes nothing."""
    before = {c.get("type"): c for c in previous}
    out = []
    for cond in new:
        old = before.get(cond["type"])
        since = old.get("lastTransitionTime") if old and old.get("status") == cond["status"] else None
        out.append({**cond, "lastTransitionTime": since or now, "observedGeneration": generation})
    return out


def _coverage_text(spaces: Mapping[str, SpaceState], version: str) -> str:
    space = spaces.get(version)
    if space is None or space.coverage is None:
        return f"space {version}: coverage unknown"
    return f"space {version}: coverage {space.coverage:.4f} ({space.items} items)"


def space_status(
    version: str,
    space: SpaceState | None,
    job: JobState | None,
    previous: Mapping[str, Any] | None = None,
    attempts: Attempts | None = None,
    encoder: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One space's entry: what the store says, the backfill's progress and attempts, and the
    encoder's immutable fields as first recorded (`encoder`, else kept from `previous`)."""
    previous = previous or {}
    entry: dict[str, Any] = {"version": version}
    for wire, _ in IMMUTABLE_ENCODER_FIELDS:
        value = (encoder or {}).get(wire, previous.get(wire))
        if value is not None:
            entry[wire] = value
    if space is not None and space.coverage is not None:
        entry["coverage"] = round(space.coverage, 6)
        entry["items"] = space.items
    record = attempts if attempts is not None else Attempts.from_status(previous)
    if job is not None or (space is not None and space.backfill_total) or record.job:
        total = job.completions if job else 0
        done = job.succeeded if job else 0
        progress = (
            space.backfill_done / space.backfill_total
            if space and space.backfill_total
            else done / total
            if total
            else 0.0
        )
        entry["backfill"] = {
            "completedShards": done,
            "totalShards": total,
            "progress": round(min(1.0, progress), 6),
            **record.as_status(running=job is not None and not job.finished),
        }
    return entry


# --- serving and rollout -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Serving:
    """What the ranker's traffic should look like after this reconcile."""

    stable: Version | None
    stable_spec: api.RankerModelSpec | None
    canary: roll.Rollout | None  # the rollout of the spec's ranker (active, promoted or rolled back)
    traffic: int  # the canary's share
    render: bool  # whether the core renders the serving children
    records: tuple[roll.Record, ...] = ()
    request_handled: bool = False


def _first_ranker(spec: api.RankerSpec, observed: Observed, candidate: Version, synced: bool) -> Serving:
    """No stable ranker yet: the candidate takes all traffic once synced (nothing to compare it
    with), and becomes stable once it is ready."""
    served = observed.ranker
    if served is not None and served.ready and served.version == candidate and served.canary is None:
        return Serving(candidate, spec.ranker, None, 0, True)
    render = synced or (served is not None and served.version == candidate)
    return Serving(None, None, None, 0, render) if render else Serving(None, None, None, 0, False)


def _legacy_switch(
    spec: api.RankerSpec, observed: Observed, stable: Version, candidate: Version, synced: bool
) -> Serving:
    """A stable ranker recorded before canary rollouts (no spec in status): switch when synced,
    as that operator did, and record the spec from then on."""
    promoted = promote(stable, candidate, observed.ranker)
    served = serve(promoted, candidate, synced, observed.ranker)
    if promoted == candidate:
        return Serving(candidate, spec.ranker, None, 0, True)
    return Serving(promoted, None, None, 0, served == candidate)


def _request_of(status: Mapping[str, Any]) -> roll.Request | None:
    return roll.Request.from_status(status.get("request"))


def serving(spec: api.RankerSpec, observed: Observed, candidate_synced: bool) -> Serving:
    """Stable, canary and the split between them; the rollout state machine decides the split."""
    status = observed.status
    candidate = Version(spec.ranker.version, spec.ranker.encoder_version)
    stable, stable_spec = stable_of(status), stable_spec_of(status)
    request = _request_of(status)
    if stable is None:
        first = _first_ranker(spec, observed, candidate, candidate_synced)
        return _refuse(first, request, observed.now, spec.ranker.version)
    if stable_spec is None:
        return _refuse(
            _legacy_switch(spec, observed, stable, candidate, candidate_synced), request, observed.now, stable.ranker
        )
    if stable.ranker == candidate.ranker:
        # Same version: other fields (replicas, resources) apply in place, no canary.
        return _refuse(Serving(stable, spec.ranker, None, 0, True), request, observed.now, stable.ranker)
    plan = plan_of(spec)
    identity = build.ranker_identity(spec.ranker)
    current = roll.Rollout.from_status(status.get("canary"))
    records: list[roll.Record] = []
    if current is not None and current.identity != identity:
        if current.active:
            records.append(
                roll.Record(
                    observed.now,
                    "Superseded",
                    f"canary {current.ranker_version} replaced by {candidate.ranker} before it finished",
                    current.ranker_version,
                    current.step,
                    0,
                    "Warning",
                )
            )
        current = None
    if current is None:
        if not candidate_synced or not plan.steps:
            out = Serving(stable, stable_spec, None, 0, True, tuple(records))
            return _refuse(out, request, observed.now, stable.ranker)
        started = roll.start(plan, candidate.ranker, candidate.encoder, identity, observed.now)
        current = started.rollout
        records += started.records
        step = roll.next_step(plan, current, roll.Observation(observed.now, None, request))
    else:
        step = roll.next_step(plan, current, roll.Observation(observed.now, observed.analysis, request))
    records += step.records
    rollout = step.rollout
    traffic = roll.traffic_of(plan, rollout)
    served = observed.ranker
    if (
        rollout.state == "Promoted"
        and served is not None
        and served.ready
        and served.version == candidate
        and served.canary is None
    ):
        records.append(
            roll.Record(
                observed.now,
                "PromotionComplete",
                f"ranker {candidate.ranker} on space {candidate.encoder} serves all traffic and is stable",
                candidate.ranker,
                rollout.step,
                100,
            )
        )
        return Serving(candidate, spec.ranker, None, 0, True, tuple(records), request is not None)
    return Serving(stable, stable_spec, rollout, traffic, True, tuple(records), request is not None)


def _refuse(out: Serving, request: roll.Request | None, now: str, ranker_version: str) -> Serving:
    """A request while no rollout runs is answered (an Event, the history) and changes nothing."""
    if request is None:
        return out
    return dataclasses.replace(
        out, records=(*out.records, roll.answer_without_rollout(request, now, ranker_version)), request_handled=True
    )


def serving_children(ranker: api.MultimodalRanker, flow: Serving) -> list[dict[str, Any]]:
    spec = ranker.spec
    if not flow.render:
        return []
    if flow.stable_spec is None:  # first ranker, or the legacy switch to the candidate
        return build.build_ranker_children(ranker, spec.ranker)
    stable_spec = spec.ranker if flow.stable_spec.version == spec.ranker.version else flow.stable_spec
    if flow.canary is None or flow.traffic <= 0:
        return build.build_ranker_children(ranker, stable_spec)
    return build.build_ranker_children(ranker, stable_spec, spec.ranker, flow.traffic)


# --- the core -----------------------------------------------------------------------------------


def desired(ranker: api.MultimodalRanker, observed: Observed) -> Desired:
    status = observed.status
    recorded = recorded_encoder(status, ranker.spec.encoder.version)
    refused = immutable_changes(ranker.spec.encoder, recorded)
    ranker = as_recorded(ranker, recorded)
    spec = ranker.spec
    generation = int(ranker.metadata.generation or 0)
    min_coverage = spec.embeddings.min_coverage
    candidate = Version(spec.ranker.version, spec.ranker.encoder_version)
    candidate_synced = is_synced(observed.spaces.get(candidate.encoder), min_coverage) and observed.encoders_ready.get(
        candidate.encoder, False
    )

    flow = serving(spec, observed, candidate_synced)
    stable = flow.stable
    rolled_back = flow.canary is not None and flow.canary.state == "RolledBack"
    live = live_encoders(spec.encoder.version, stable, rolled_back)
    encoder = spec.encoder.version

    children: list[dict[str, Any]] = []
    if encoder in live:
        children += build.build_encoder_children(ranker)
    children.append(build.build_embedder_deployment(ranker, live))
    children.append(build.build_embedder_service(ranker))
    jobs: dict[str, JobState] = {}
    step = _backfill(ranker, observed, live)
    if step.job is not None:
        job = build.build_backfill_job(ranker, encoder)
        children.append({**job, "metadata": {**job["metadata"], "name": step.job}})
        shards = spec.embeddings.backfill.parallelism if observed.indexed_jobs else 1  # see kube.lower
        jobs[encoder] = observed.jobs.get(step.job) or JobState(completions=shards)  # or being created
    rendered = serving_children(ranker, flow)
    children += rendered
    keep = [c for c in observed.children if _kept(c, encoder, live, bool(rendered))]

    known = known_spaces(status)
    for version in (*live, candidate.encoder):
        if version not in known:
            known.append(version)
    doomed = [] if observed.store_error else spaces_to_delete(known, live, spec.embeddings.retained_spaces)
    listed = [v for v in known if v not in doomed]

    served = _served_version(flow, candidate)
    conditions = _conditions(spec, observed, live, candidate, flow, served, step.attempts)
    conditions = (
        _refused(conditions, refused)
        if refused
        else [
            *conditions[:-1],
            condition("SpecAccepted", True, "Accepted", "the spec is applied as written"),
            conditions[-1],
        ]
    )
    target = observed.spaces.get(candidate.encoder)
    previous = {s.get("version"): s for s in (status.get("embeddings") or {}).get("spaces") or []}
    spaces = [
        space_status(
            v,
            observed.spaces.get(v),
            jobs.get(v),
            previous.get(v),
            step.attempts if v == encoder else None,
            _encoder_fields(spec.encoder) if v == encoder and not recorded else None,
        )
        for v in listed
    ]
    new_status: dict[str, Any] = {
        "phase": "Failed" if refused or step.attempts.failed else _phase(conditions, candidate, flow, served),
        "observedGeneration": generation,
        "conditions": stamp_conditions(conditions, status.get("conditions") or [], observed.now, generation),
        "stable": _stable_status(stable, flow.stable_spec),
        "canary": _canary_status(spec, flow),
        "embeddings": {
            "spaces": spaces,
            "coverage": round(target.coverage, 6) if target and target.coverage is not None else None,
        },
    }
    if observed.freshness_p99 is not None:
        new_status["embeddings"]["freshnessP99Seconds"] = observed.freshness_p99
    if flow.records:
        new_status["history"] = roll.add_history(status.get("history") or [], flow.records)
    if flow.request_handled:
        new_status["request"] = None
    decisions = _decisions(status, new_status, served, observed.ranker, doomed, known, flow.records)
    decisions += step.decisions
    if refused and _message(status, "SpecAccepted") != _message(new_status, "SpecAccepted"):
        decisions.append(Decision("ImmutableFieldChanged", "; ".join(refused)[:1000], "Warning"))
    return Desired(children, keep, new_status, doomed, decisions)


def _backfill(ranker: api.MultimodalRanker, observed: Observed, live: Sequence[str]) -> BackfillStep:
    """The backfill of the spec's encoder version: which Job (attempt) runs, if any."""
    spec = ranker.spec
    encoder, backfill = spec.encoder.version, spec.embeddings.backfill
    previous = next(
        (s for s in (observed.status.get("embeddings") or {}).get("spaces") or [] if s.get("version") == encoder), None
    )
    record = Attempts.from_status(previous)
    if encoder not in live or backfill.catalogue_uri is None:
        return BackfillStep(None, record)
    base = build.build_backfill_job(ranker, encoder)
    shape = build.backfill_shape(base, observed.indexed_jobs)
    current = observed.jobs.get(build.backfill_job_name(base["metadata"]["name"], shape, max(1, record.attempts)))
    space = observed.spaces.get(encoder)
    needed = needs_backfill(space, current, spec.embeddings.min_coverage)
    return next_backfill(
        record,
        base["metadata"]["name"],
        shape,
        observed.jobs,
        needed,
        observed.now,
        backfill.max_attempts,
        api.duration_seconds(backfill.retry_backoff),
        f"{_coverage_text(observed.spaces, encoder)} < minCoverage {spec.embeddings.min_coverage}",
    )


def _encoder_fields(encoder: api.EncoderSpec) -> dict[str, Any]:
    return {wire: getattr(encoder, field) for wire, field in IMMUTABLE_ENCODER_FIELDS}


def _refused(conditions: list[dict[str, str]], problems: Sequence[str]) -> list[dict[str, str]]:
    """A refused change of an immutable field: SpecAccepted False and Ready False with the why."""
    message = "; ".join(problems)
    accepted = condition("SpecAccepted", False, "ImmutableFieldChanged", message)
    return [*conditions[:-1], accepted, condition("Ready", False, "ImmutableFieldChanged", message)]


def _message(status: Mapping[str, Any], ctype: str) -> str | None:
    return next((c.get("message") for c in status.get("conditions") or [] if c.get("type") == ctype), None)


def _served_version(flow: Serving, candidate: Version) -> Version | None:
    """The ranker taking the stable share (or all traffic) once the children are applied."""
    if flow.canary is not None and flow.canary.state == "Promoted":
        return candidate
    if flow.stable_spec is None:
        return candidate if flow.render else flow.stable
    return flow.stable


def _stable_status(stable: Version | None, stable_spec: api.RankerModelSpec | None) -> dict[str, Any] | None:
    if stable is None:
        return None
    out: dict[str, Any] = stable.as_status()
    if stable_spec is not None:
        out["ranker"] = build.plain(stable_spec)
    return out


def _canary_status(spec: api.RankerSpec, flow: Serving) -> dict[str, Any] | None:
    if flow.canary is None:
        return None
    plan = plan_of(spec)
    return {
        **flow.canary.as_status(),
        "steps": list(plan.steps),
        "granularityPercent": roll.granularity(spec.ranker.serving, spec.ranker.replicas),
    }


def _kept(child: ChildRef, encoder: str, live: Sequence[str], serving_rendered: bool) -> bool:
    """Children whose spec is no longer in the resource but which must keep running: the encoder
    of the stable ranker while the spec already names a new one, and the serving children of a
    stable ranker the core cannot render (recorded before canary rollouts). They are left exactly
    as they are."""
    if child.kind == "InferenceService" or child.component == "ranker":
        return not serving_rendered
    return child.encoder_version in live and child.encoder_version != encoder


def _conditions(
    spec: api.RankerSpec,
    observed: Observed,
    live: Sequence[str],
    candidate: Version,
    flow: Serving,
    served: Version | None,
    attempts: Attempts | None = None,
) -> list[dict[str, str]]:
    min_coverage = spec.embeddings.min_coverage
    not_ready = [v for v in live if not observed.encoders_ready.get(v, False)]
    encoder_ready = condition(
        "EncoderReady",
        not not_ready,
        "EncodersReady" if not not_ready else "EncoderNotReady",
        "encoders ready: " + ", ".join(live) if not not_ready else "waiting for encoder " + ", ".join(not_ready),
    )
    space = observed.spaces.get(candidate.encoder)
    coverage = _coverage_text(observed.spaces, candidate.encoder)
    if observed.store_error and (space is None or space.coverage is None):
        synced = condition("EmbeddingsSynced", None, observed.store_error_reason, f"{coverage}: {observed.store_error}")
    elif is_synced(space, min_coverage):
        synced = condition("EmbeddingsSynced", True, "CoverageReached", f"{coverage} >= minCoverage {min_coverage}")
    else:
        record = attempts or Attempts()
        if not record.job and spec.embeddings.backfill.catalogue_uri is None:
            synced = condition(
                "EmbeddingsSynced",
                False,
                "NoCatalogue",
                f"{coverage} < minCoverage {min_coverage}, and no backfill can start: "
                "set spec.embeddings.backfill.catalogueUri",
            )
        elif record.failed:
            synced = condition(
                "EmbeddingsSynced",
                False,
                "BackfillFailed",
                f"{coverage} < minCoverage "
                f"{min_coverage}; space {candidate.encoder} Failed: backfill {record.last_failure}; "
                "no more attempts (change spec.embeddings.backfill or the encoder version, or "
                "raise maxAttempts, to try again)",
            )
        elif record.retry_at:
            synced = condition(
                "EmbeddingsSynced",
                False,
                "BackfillRetrying",
                f"{coverage} < minCoverage "
                f"{min_coverage}; backfill {record.last_failure}; attempt {record.attempts + 1} "
                f"of {spec.embeddings.backfill.max_attempts} at {record.retry_at}",
            )
        else:
            attempt = (
                f" (attempt {record.attempts} of {spec.embeddings.backfill.max_attempts})"
                if record.attempts > 1
                else ""
            )
            synced = condition(
                "EmbeddingsSynced", False, "Backfilling", f"{coverage} < minCoverage {min_coverage}{attempt}"
            )
    ranker_ready = _ranker_ready(observed.ranker, served, candidate)
    canary = _canary_condition(spec, flow, candidate_synced=synced["status"] == "True")
    all_ok = (
        all(c["status"] == "True" for c in (encoder_ready, synced, ranker_ready))
        and served == candidate
        and flow.stable == candidate
        and flow.canary is None
    )
    ready = condition(
        "Ready",
        all_ok,
        "Ready" if all_ok else "Reconciling",
        f"ranker {candidate.ranker} on space {candidate.encoder} serves all traffic"
        if all_ok
        else _waiting_for(encoder_ready, synced, ranker_ready, canary),
    )
    if flow.canary is not None and flow.canary.state == "RolledBack":
        ready = condition(
            "Ready",
            False,
            "RolledBack",
            f"ranker {candidate.ranker} was rolled back; "
            f"{flow.stable.ranker if flow.stable else '-'} serves all traffic (retry or change "
            "spec.ranker to roll out again)",
        )
    return [encoder_ready, synced, ranker_ready, canary, ready]


def _ranker_ready(observed: ServedRanker | None, served: Version | None, candidate: Version) -> dict[str, str]:
    if observed is not None and observed.ready and served == observed.version:
        extra = f", canary {observed.canary.ranker}" if observed.canary else ""
        return condition(
            "RankerReady",
            True,
            "RankerServing",
            f"ranker {observed.version.ranker} on space {observed.version.encoder} is serving{extra}",
        )
    if served is None:
        return condition(
            "RankerReady",
            False,
            "WaitingForEmbeddings",
            f"ranker {candidate.ranker} gets no traffic until space {candidate.encoder} is synced",
        )
    return condition("RankerReady", False, "RankerNotReady", f"waiting for the serving pods of ranker {served.ranker}")


def _canary_condition(spec: api.RankerSpec, flow: Serving, candidate_synced: bool) -> dict[str, str]:
    rollout = flow.canary
    if rollout is None:
        if flow.stable is not None and flow.stable_spec is not None and flow.stable.ranker != spec.ranker.version:
            if candidate_synced and not plan_of(spec).steps:
                g = roll.granularity(spec.ranker.serving, spec.ranker.replicas)
                return condition(
                    "CanaryHealthy",
                    False,
                    "NoUsableStep",
                    f"with {spec.ranker.replicas} replicas the Kubernetes backend splits traffic in "
                    f"steps of {g:g} %, and every step of {list(spec.rollout.steps)} rounds to 0 %: "
                    "raise spec.ranker.replicas or use KServe",
                )
            return condition(
                "CanaryHealthy",
                None,
                "WaitingForEmbeddings",
                f"canary {spec.ranker.version} starts once space {spec.ranker.encoder_version} is synced",
            )
        return condition("CanaryHealthy", None, "NoCanary", "no canary analysis in progress")
    steps = plan_of(spec).steps
    where = f"canary {rollout.ranker_version} at step {rollout.step + 1} of {len(steps)} ({rollout.traffic_percent} %)"
    last = rollout.last_analysis or {}
    if rollout.state == "RolledBack":
        return condition(
            "CanaryHealthy",
            False,
            "RolledBack",
            f"canary {rollout.ranker_version} rolled back"
            + (f": {last.get('message')}" if last.get("message") else ""),
        )
    if rollout.state == "Promoted":
        return condition("CanaryHealthy", True, "Promoted", f"canary {rollout.ranker_version} promoted")
    if rollout.state == "AwaitingPromotion":
        return condition(
            "CanaryHealthy",
            True,
            "AwaitingPromotion",
            f"{where}: every step passed; waiting for `kubectl mmrank promote`",
        )
    verdict = last.get("verdict")
    if verdict == "Failed" or (verdict is None and last and last.get("passed") is False and rollout.failed_checks):
        return condition(
            "CanaryHealthy",
            False,
            "ChecksFailed",
            f"{where}: {last.get('message', '')}; "
            f"{rollout.failed_checks} of {spec.rollout.analysis.failure_limit} allowed failures",
        )
    if verdict == "Inconclusive":
        return condition("CanaryHealthy", None, "Inconclusive", f"{where}: {last.get('message', '')}")
    if last and last.get("passed"):
        return condition("CanaryHealthy", True, "ChecksPassed", f"{where}: {last.get('message', '')}")
    return condition(
        "CanaryHealthy",
        None,
        "Analysing",
        f"{where}: first analysis {spec.rollout.interval} after {rollout.step_started_at}",
    )


def _waiting_for(*conditions: dict[str, str]) -> str:
    waiting = [f"{c['type']}: {c['message']}" for c in conditions if c["status"] != "True"]
    return "; ".join(waiting) or "switching traffic to the new ranker"


def _phase(conditions: Sequence[dict[str, str]], candidate: Version, flow: Serving, served: Version | None) -> str:
    by_type = {c["type"]: c for c in conditions}
    if by_type["Ready"]["status"] == "True":
        return "Ready"
    rollout = flow.canary
    if rollout is not None and rollout.state in ("RolledBack", "AwaitingPromotion"):
        return rollout.state
    if rollout is not None:
        return "Progressing"
    if served != candidate:
        return "Backfilling" if by_type["EmbeddingsSynced"]["status"] != "True" else "Provisioning"
    return "Progressing" if flow.stable is not None and flow.stable != candidate else "Provisioning"


def _decisions(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    served: Version | None,
    observed_served: ServedRanker | None,
    doomed: Sequence[str],
    known: Sequence[str],
    records: Sequence[roll.Record] = (),
) -> list[Decision]:
    out = [Decision(r.reason, r.message, r.type) for r in records]
    old_known = set(known_spaces(before))
    for version in known:
        if version not in old_known and version not in doomed:
            out.append(Decision("SpaceAdded", f"embedding space {version} is live"))
    if served is not None and (observed_served is None or observed_served.version != served):
        out.append(
            Decision(
                "TrafficSwitched", f"the serving children now route to ranker {served.ranker} on space {served.encoder}"
            )
        )
    if _versions(before.get("stable")) != _versions(after.get("stable")) and after.get("stable"):
        s = after["stable"]
        out.append(Decision("RankerPromoted", f"ranker {s['rankerVersion']} on space {s['encoderVersion']} is stable"))
    for version in doomed:
        out.append(Decision("SpaceDeleted", f"retired space {version} deleted from the store"))
    refused = _reason(after, "EmbeddingsSynced") == "SecretNotAllowed"
    if refused and _reason(before, "EmbeddingsSynced") != "SecretNotAllowed":
        message = next(c["message"] for c in after["conditions"] if c["type"] == "EmbeddingsSynced")
        out.append(Decision("SecretNotAllowed", message, "Warning"))
    if before.get("phase") != after["phase"]:
        ready = next(c for c in after["conditions"] if c["type"] == "Ready")
        kind = "Warning" if after["phase"] == "Failed" else "Normal"
        out.append(
            Decision(
                after["phase"], f"phase {before.get('phase') or '-'} -> {after['phase']}: {ready['message']}", kind
            )
        )
    return out


def _reason(status: Mapping[str, Any], ctype: str) -> str | None:
    return next((c.get("reason") for c in status.get("conditions") or [] if c.get("type") == ctype), None)


def _versions(stable: Mapping[str, Any] | None) -> tuple[str | None, str | None] | None:
    return (stable.get("rankerVersion"), stable.get("encoderVersion")) if stable else None


def invalid_status(status: Mapping[str, Any], problems: Sequence[str], now: str, generation: int) -> dict[str, Any]:
    """The status of a spec that does not validate: phase Failed and Ready=False/InvalidSpec with
    every problem. Children are left as they are, and nothing is retried until the spec changes."""
    message = "; ".join(problems)[:4000]
    previous = [c for c in status.get("conditions") or [] if c.get("type") != "Ready"]
    ready = condition("Ready", False, "InvalidSpec", message)
    stamped = stamp_conditions([ready], status.get("conditions") or [], now, generation)
    return {**status, "phase": "Failed", "observedGeneration": generation, "conditions": [*previous, *stamped]}
