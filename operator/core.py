"""The pure reconcile core: `desired(ranker, observed) -> Desired(children, status, ...)`.

No I/O here. The handlers gather what is observed (children, store coverage, the history kept
in the resource's status), call `desired`, and carry out what it returns. Everything the operator
must remember between runs (the stable ranker, which spaces it has seen) is read from and
written to status, so a restarted operator resumes from the cluster, not from memory.

Embedding sync, the invariant this core enforces: a ranker gets traffic only when the space
of the encoder version it was trained on is (a) served by a ready encoder that keeps it fresh and
(b) backfilled to `minCoverage`. Until then the previous stable ranker keeps serving, and its
encoder keeps running. The canary state machine (`next_step`) will sit at the seam where
`_serve` chooses between the stable and the candidate ranker.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from mmrank import api
from mmrank.operator import children as build

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


@dataclasses.dataclass(frozen=True)
class ServedRanker:
    """The InferenceService as observed: which ranker its spec serves and whether KServe reports
    it Ready for that spec (its status' observedGeneration matches)."""

    version: Version
    ready: bool


@dataclasses.dataclass(frozen=True)
class ChildRef:
    kind: str
    name: str
    api_version: str = ""
    encoder_version: str | None = None


@dataclasses.dataclass(frozen=True)
class Observed:
    """Everything `desired` needs besides the spec. `status` is the resource's current status
    (the history); `now` the RFC 3339 time stamped on changed conditions."""

    now: str
    status: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    spaces: Mapping[str, SpaceState] = dataclasses.field(default_factory=dict)
    store_error: str | None = None
    encoders_ready: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    jobs: Mapping[str, JobState] = dataclasses.field(default_factory=dict)
    ranker: ServedRanker | None = None
    children: Sequence[ChildRef] = ()


@dataclasses.dataclass(frozen=True)
class Decision:
    """A Kubernetes Event to post: one per thing the operator decided."""

    reason: str
    message: str
    type: str = "Normal"


@dataclasses.dataclass(frozen=True)
class Desired:
    children: list[dict[str, Any]]
    keep: list[ChildRef]             # observed children left untouched (a retiring encoder)
    status: dict[str, Any]
    delete_spaces: list[str]         # retired spaces beyond the retention count
    decisions: list[Decision]


# --- history kept in status ---------------------------------------------------------------------

def stable_of(status: Mapping[str, Any]) -> Version | None:
    stable = status.get("stable") or {}
    if stable.get("rankerVersion") and stable.get("encoderVersion"):
        return Version(stable["rankerVersion"], stable["encoderVersion"])
    return None


def known_spaces(status: Mapping[str, Any]) -> list[str]:
    """Spaces in the order the operator first saw them (oldest first)."""
    spaces = (status.get("embeddings") or {}).get("spaces") or []
    return [s["version"] for s in spaces if s.get("version")]


# --- decisions ----------------------------------------------------------------------------------

def live_encoders(spec_encoder: str, stable: Version | None) -> list[str]:
    """The encoder versions that must run: the spec's, and the stable ranker's while it serves."""
    live = [spec_encoder]
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


def serve(stable: Version | None, candidate: Version, candidate_synced: bool,
          served: ServedRanker | None) -> Version | None:
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


# --- status -------------------------------------------------------------------------------------

def condition(ctype: str, ok: bool | None, reason: str, message: str) -> dict[str, str]:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    return {"type": ctype, "status": status, "reason": reason, "message": message}


def stamp_conditions(new: Sequence[dict[str, Any]], previous: Sequence[Mapping[str, Any]], now: str,
                     generation: int) -> list[dict[str, Any]]:
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


def space_status(version: str, space: SpaceState | None, job: JobState | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"version": version}
    if space is not None and space.coverage is not None:
        entry["coverage"] = round(space.coverage, 6)
        entry["items"] = space.items
    if job is not None or (space is not None and space.backfill_total):
        total = job.completions if job else 0
        done = job.succeeded if job else 0
        progress = (done / total if total else
                    space.backfill_done / space.backfill_total if space and space.backfill_total else 0.0)
        entry["backfill"] = {"completedShards": done, "totalShards": total, "progress": round(min(1.0, progress), 6)}
    return entry


# --- the core -----------------------------------------------------------------------------------

def desired(ranker: api.MultimodalRanker, observed: Observed) -> Desired:
    spec = ranker.spec
    status = observed.status
    generation = int(ranker.metadata.generation or 0)
    min_coverage = spec.embeddings.min_coverage
    candidate = Version(spec.ranker.version, spec.ranker.encoder_version)

    stable = promote(stable_of(status), candidate, observed.ranker)
    live = live_encoders(spec.encoder.version, stable)
    candidate_synced = (is_synced(observed.spaces.get(candidate.encoder), min_coverage)
                        and observed.encoders_ready.get(candidate.encoder, False))
    served = serve(stable, candidate, candidate_synced, observed.ranker)

    children = [build.build_encoder_configmap(ranker), build.build_encoder_service(ranker),
                build.build_encoder_deployment(ranker), build.build_embedder_deployment(ranker, live)]
    encoder = spec.encoder.version
    jobs = dict(observed.jobs)
    if (needs_backfill(observed.spaces.get(encoder), observed.jobs.get(encoder), min_coverage)
            and spec.embeddings.backfill.catalogue_uri is not None):
        children.append(build.build_backfill_job(ranker, encoder))
        jobs.setdefault(encoder, JobState(completions=spec.embeddings.backfill.parallelism))  # being created
    if served is not None and served == candidate:
        children.append(build.build_inference_service(ranker, spec.ranker))
    keep = [c for c in observed.children if _kept(c, encoder, live, served, candidate)]

    known = known_spaces(status)
    for version in (*live, candidate.encoder):
        if version not in known:
            known.append(version)
    doomed = [] if observed.store_error else spaces_to_delete(known, live, spec.embeddings.retained_spaces)
    listed = [v for v in known if v not in doomed]

    conditions = _conditions(spec, observed, live, candidate, stable, served)
    target = observed.spaces.get(candidate.encoder)
    new_status: dict[str, Any] = {
        "phase": _phase(conditions, candidate, stable, served),
        "observedGeneration": generation,
        "conditions": stamp_conditions(conditions, status.get("conditions") or [], observed.now, generation),
        "stable": stable.as_status() if stable else None,
        "embeddings": {"spaces": [space_status(v, observed.spaces.get(v), jobs.get(v)) for v in listed],
                       "coverage": round(target.coverage, 6) if target and target.coverage is not None else None},
    }
    decisions = _decisions(status, new_status, served, observed.ranker, doomed, known)
    return Desired(children, keep, new_status, doomed, decisions)


def _kept(child: ChildRef, encoder: str, live: Sequence[str], served: Version | None, candidate: Version) -> bool:
    """Children whose spec is no longer in the resource but which must keep running: the encoder
    of the stable ranker while the spec already names a new one, and the InferenceService of a
    stable ranker while the candidate is not synced. They are left exactly as they are."""
    if child.kind == "InferenceService":
        return served is not None and served != candidate
    return child.encoder_version in live and child.encoder_version != encoder


def _conditions(spec: Any, observed: Observed, live: Sequence[str], candidate: Version, stable: Version | None, served: Version | None) -> list[dict[str, str]]:
    min_coverage = spec.embeddings.min_coverage
    not_ready = [v for v in live if not observed.encoders_ready.get(v, False)]
    encoder_ready = condition("EncoderReady", not not_ready, "EncodersReady" if not not_ready else "EncoderNotReady",
                              "encoders ready: " + ", ".join(live) if not not_ready
                              else "waiting for encoder " + ", ".join(not_ready))
    space = observed.spaces.get(candidate.encoder)
    coverage = _coverage_text(observed.spaces, candidate.encoder)
    if observed.store_error and (space is None or space.coverage is None):
        synced = condition("EmbeddingsSynced", None, "StoreUnreachable", f"{coverage}: {observed.store_error}")
    elif is_synced(space, min_coverage):
        synced = condition("EmbeddingsSynced", True, "CoverageReached", f"{coverage} >= minCoverage {min_coverage}")
    else:
        job = observed.jobs.get(candidate.encoder)
        if job is None and spec.embeddings.backfill.catalogue_uri is None:
            synced = condition("EmbeddingsSynced", False, "NoCatalogue",
                               f"{coverage} < minCoverage {min_coverage}, and no backfill can start: "
                               "set spec.embeddings.backfill.catalogueUri")
        else:
            reason = "BackfillFailed" if job is not None and job.failed else "Backfilling"
            synced = condition("EmbeddingsSynced", False, reason, f"{coverage} < minCoverage {min_coverage}")
    want = Version(spec.ranker.version, spec.ranker.encoder_version)
    if observed.ranker is not None and observed.ranker.ready and served == observed.ranker.version:
        ranker_ready = condition("RankerReady", True, "InferenceServiceReady",
                                 f"ranker {served.ranker} on space {served.encoder} is serving")
    elif served is None:
        ranker_ready = condition("RankerReady", False, "WaitingForEmbeddings",
                                 f"ranker {want.ranker} gets no traffic until space {want.encoder} is synced")
    else:
        ranker_ready = condition("RankerReady", False, "InferenceServiceNotReady",
                                 f"waiting for the InferenceService to serve ranker {served.ranker}")
    canary = condition("CanaryHealthy", None, "NoCanary", "no canary analysis in progress")
    all_ok = all(c["status"] == "True" for c in (encoder_ready, synced, ranker_ready)) and served == want \
        and stable == want
    ready = condition("Ready", all_ok, "Ready" if all_ok else "Reconciling",
                      f"ranker {want.ranker} on space {want.encoder} serves all traffic" if all_ok
                      else _waiting_for(encoder_ready, synced, ranker_ready))
    return [encoder_ready, synced, ranker_ready, canary, ready]


def _waiting_for(*conditions: dict[str, str]) -> str:
    waiting = [f"{c['type']}: {c['message']}" for c in conditions if c["status"] != "True"]
    return "; ".join(waiting) or "switching traffic to the new ranker"


def _phase(conditions: Sequence[dict[str, str]], candidate: Version, stable: Version | None,
           served: Version | None) -> str:
    by_type = {c["type"]: c for c in conditions}
    if by_type["Ready"]["status"] == "True":
        return "Ready"
    if served != candidate:
        return "Backfilling" if by_type["EmbeddingsSynced"]["status"] != "True" else "Provisioning"
    return "Progressing" if stable is not None and stable != candidate else "Provisioning"


def _decisions(before: Mapping[str, Any], after: Mapping[str, Any], served: Version | None,
               observed_served: ServedRanker | None, doomed: Sequence[str], known: Sequence[str]) -> list[Decision]:
    out = []
    old_known = set(known_spaces(before))
    for version in known:
        if version not in old_known and version not in doomed:
            out.append(Decision("SpaceAdded", f"embedding space {version} is live"))
    if served is not None and (observed_served is None or observed_served.version != served):
        out.append(Decision("TrafficSwitched", f"InferenceService now serves ranker {served.ranker} "
                                               f"on space {served.encoder}"))
    if before.get("stable") != after.get("stable") and after.get("stable"):
        s = after["stable"]
        out.append(Decision("RankerPromoted", f"ranker {s['rankerVersion']} on space {s['encoderVersion']} is stable"))
    for version in doomed:
        out.append(Decision("SpaceDeleted", f"retired space {version} deleted from the store"))
    if before.get("phase") != after["phase"]:
        ready = next(c for c in after["conditions"] if c["type"] == "Ready")
        kind = "Warning" if after["phase"] == "Failed" else "Normal"
        out.append(Decision(after["phase"], f"phase {before.get('phase') or '-'} -> {after['phase']}: "
                                            f"{ready['message']}", kind))
    return out


def invalid_status(status: Mapping[str, Any], problems: Sequence[str], now: str, generation: int) -> dict[str, Any]:
    """The status of a spec that does not validate: phase Failed and Ready=False/InvalidSpec with
    every problem. Children are left as they are, and nothing is retried until the spec changes."""
    message = "; ".join(problems)[:4000]
    previous = [c for c in status.get("conditions") or [] if c.get("type") != "Ready"]
    ready = condition("Ready", False, "InvalidSpec", message)
    stamped = stamp_conditions([ready], status.get("conditions") or [], now, generation)
    return {**status, "phase": "Failed", "observedGeneration": generation, "conditions": [*previous, *stamped]}
