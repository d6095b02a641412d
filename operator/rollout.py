"""The canary rollout state machine: `next_step(plan, rollout, observation) -> Step`. No I/O.

Modelled on Argo Rollouts' canary reconciler: the whole state lives in `status.canary`, each
transition is one small function, and the I/O layer only gathers an `Observation` (the time, the
analysis it ran because `analysis_due` said so, a pending promote/abort/retry request) and writes
back what comes out. Because the state is in status and a step's window is anchored to
`stepStartedAt`, replaying an observation changes nothing, and a restarted operator continues
exactly where the last one stopped.

States (`status.canary.state`):

    Progressing --last step passed, Automatic--> Promoted
    Progressing --last step passed, Manual-----> AwaitingPromotion --promote--> Promoted
    Progressing / AwaitingPromotion --failedChecks reaches failureLimit, or abort--> RolledBack
    RolledBack --retry--> Progressing (step 0)

A failed check never advances; an inconclusive one (too few requests, no data, Prometheus
unreachable) waits for the next window and never passes. The canary's traffic is always the
current step's share, so the stable ranker keeps at least `100 - step` percent.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from mmrank.operator.analysis import Analysis

State = Literal["Progressing", "AwaitingPromotion", "Promoted", "RolledBack"]
Action = Literal["Promote", "Abort", "Retry"]
ACTIONS: tuple[Action, ...] = ("Promote", "Abort", "Retry")
HISTORY_LIMIT = 30


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the spec says about rollouts, with steps already rounded to what the backend can split."""

    steps: tuple[int, ...]
    interval_seconds: int
    failure_limit: int
    promotion: Literal["Automatic", "Manual"] = "Automatic"


@dataclasses.dataclass(frozen=True)
class Request:
    """A person's promote / abort / retry, written to `status.request` by `kubectl mmrank`."""

    action: Action
    requested_at: str
    requested_by: str = ""

    def as_status(self) -> dict[str, str]:
        out = {"action": self.action, "requestedAt": self.requested_at}
        if self.requested_by:
            out["requestedBy"] = self.requested_by
        return out

    @classmethod
    def from_status(cls, value: Mapping[str, Any] | None) -> Request | None:
        if not value or value.get("action") not in ACTIONS or not value.get("requestedAt"):
            return None
        return cls(value["action"], str(value["requestedAt"]), str(value.get("requestedBy") or ""))


@dataclasses.dataclass(frozen=True)
class Rollout:
    """`status.canary`: one candidate ranker on its way from 0 to 100 % of the traffic."""

    ranker_version: str
    encoder_version: str
    identity: str  # what is being canaried (hash of the ranker spec)
    state: State = "Progressing"
    step: int = 0
    traffic_percent: int = 0
    failed_checks: int = 0
    step_started_at: str = ""
    last_analysis: Mapping[str, Any] | None = None
    last_request: Mapping[str, Any] | None = None  # the request handled last (replays are ignored)

    def as_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rankerVersion": self.ranker_version,
            "encoderVersion": self.encoder_version,
            "identity": self.identity,
            "state": self.state,
            "step": self.step,
            "trafficPercent": self.traffic_percent,
            "failedChecks": self.failed_checks,
            "stepStartedAt": self.step_started_at,
        }
        if self.last_analysis is not None:
            out["lastAnalysis"] = dict(self.last_analysis)
        if self.last_request is not None:
            out["lastRequest"] = dict(self.last_request)
        return out

    @classmethod
    def from_status(cls, value: Mapping[str, Any] | None) -> Rollout | None:
        if (
            not value
            or not value.get("rankerVersion")
            or value.get("state") not in ("Progressing", "AwaitingPromotion", "Promoted", "RolledBack")
        ):
            return None
        return cls(
            ranker_version=value["rankerVersion"],
            encoder_version=value.get("encoderVersion", ""),
            identity=value.get("identity", ""),
            state=value["state"],
            step=int(value.get("step") or 0),
            traffic_percent=int(value.get("trafficPercent") or 0),
            failed_checks=int(value.get("failedChecks") or 0),
            step_started_at=value.get("stepStartedAt") or "",
            last_analysis=value.get("lastAnalysis"),
            last_request=value.get("lastRequest"),
        )

    @property
    def active(self) -> bool:
        """Still deciding (the canary takes traffic or waits for a person)."""
        return self.state in ("Progressing", "AwaitingPromotion")


@dataclasses.dataclass(frozen=True)
class Observation:
    now: str
    analysis: Analysis | None = None
    request: Request | None = None


@dataclasses.dataclass(frozen=True)
class Record:
    """One decision: an entry of `status.history` and an Event."""

    time: str
    reason: str
    message: str
    ranker_version: str
    step: int
    traffic_percent: int
    type: Literal["Normal", "Warning"] = "Normal"
    analysis: Mapping[str, Any] | None = None

    def as_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "time": self.time,
            "reason": self.reason,
            "message": self.message,
            "rankerVersion": self.ranker_version,
            "step": self.step,
            "trafficPercent": self.traffic_percent,
        }
        if self.analysis is not None:
            out["analysis"] = dict(self.analysis)
        return out


@dataclasses.dataclass(frozen=True)
class Step:
    """What one reconcile decided: the next rollout state and the decisions to record."""

    rollout: Rollout
    records: tuple[Record, ...] = ()


# --- time ---------------------------------------------------------------------------------------


def parse_time(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def seconds_between(start: str, end: str) -> float:
    return (parse_time(end) - parse_time(start)).total_seconds()


# --- pure helpers -------------------------------------------------------------------------------


def traffic_of(plan: Plan, rollout: Rollout) -> int:
    """The canary's share in a state: the current step, the last step while awaiting a person,
    everything once promoted, nothing once rolled back."""
    if rollout.state == "Promoted":
        return 100
    if rollout.state == "RolledBack" or not plan.steps:
        return 0
    if rollout.state == "AwaitingPromotion":
        return plan.steps[-1]
    return plan.steps[min(rollout.step, len(plan.steps) - 1)]


def start(plan: Plan, ranker_version: str, encoder_version: str, identity: str, now: str) -> Step:
    """A new rollout at the first step."""
    rollout = Rollout(ranker_version, encoder_version, identity, "Progressing", 0, 0, 0, now)
    rollout = dataclasses.replace(rollout, traffic_percent=traffic_of(plan, rollout))
    return Step(
        rollout,
        (
            _record(
                rollout,
                now,
                "CanaryStarted",
                f"canary {ranker_version} on space {encoder_version} starts at "
                f"{rollout.traffic_percent} % (step 1 of {len(plan.steps)})",
            ),
        ),
    )


def analysis_due(plan: Plan, rollout: Rollout | None, now: str) -> bool:
    """The current window is over: the I/O layer should query Prometheus now."""
    if rollout is None or not rollout.active or not rollout.step_started_at:
        return False
    return seconds_between(rollout.step_started_at, now) >= plan.interval_seconds


def next_step(plan: Plan, rollout: Rollout, observation: Observation) -> Step:
    """One transition. A request is handled first (abort always wins); then an analysis, if its
    window is over (an analysis handed in before its window ends is ignored, so a replayed
    observation is a no-op)."""
    request = observation.request
    records: tuple[Record, ...] = ()
    if request is not None and request.as_status() != rollout.last_request:
        handled = _on_request(plan, rollout, request, observation.now)
        rollout, records = handled.rollout, handled.records
    if observation.analysis is not None and analysis_due(plan, rollout, observation.now):
        judged = _on_analysis(plan, rollout, observation.analysis, observation.now)
        rollout, records = judged.rollout, records + judged.records
    return Step(rollout, records)


def answer_without_rollout(request: Request, now: str, ranker_version: str) -> Record:
    """A request for a resource with no rollout: answered, nothing changes."""
    return Record(
        now,
        f"{request.action}Refused",
        f"{request.action.lower()} refused: no canary rollout in progress (ranker {ranker_version} serves all traffic)",
        ranker_version,
        0,
        0,
        "Warning",
    )


# --- transitions --------------------------------------------------------------------------------


def _record(
    rollout: Rollout,
    now: str,
    reason: str,
    message: str,
    kind: Literal["Normal", "Warning"] = "Normal",
    analysis: Mapping[str, Any] | None = None,
) -> Record:
    return Record(now, reason, message, rollout.ranker_version, rollout.step, rollout.traffic_percent, kind, analysis)


def _moved(plan: Plan, rollout: Rollout, **changes: Any) -> Rollout:
    moved = dataclasses.replace(rollout, **changes)
    return dataclasses.replace(moved, traffic_percent=traffic_of(plan, moved))


def _on_request(plan: Plan, rollout: Rollout, request: Request, now: str) -> Step:
    handled = dataclasses.replace(rollout, last_request=request.as_status())
    who = f" by {request.requested_by}" if request.requested_by else ""
    if request.action == "Abort":
        if not rollout.active:
            return Step(
                handled,
                (
                    _record(
                        rollout,
                        now,
                        "AbortRefused",
                        f"abort refused: canary {rollout.ranker_version} is already {rollout.state}",
                        "Warning",
                    ),
                ),
            )
        after = _moved(plan, handled, state="RolledBack")
        return Step(
            after,
            (
                _record(
                    after,
                    now,
                    "Aborted",
                    f"aborted{who} at step {rollout.step + 1} "
                    f"({rollout.traffic_percent} %): all traffic back on stable",
                    "Warning",
                ),
            ),
        )
    if request.action == "Retry":
        if rollout.state != "RolledBack":
            return Step(
                handled,
                (
                    _record(
                        rollout,
                        now,
                        "RetryRefused",
                        f"retry refused: canary {rollout.ranker_version} is {rollout.state}, not RolledBack",
                        "Warning",
                    ),
                ),
            )
        after = _moved(plan, handled, state="Progressing", step=0, failed_checks=0, step_started_at=now)
        return Step(
            after,
            (
                _record(
                    after,
                    now,
                    "Retried",
                    f"retried{who}: canary {rollout.ranker_version} starts again at {after.traffic_percent} %",
                ),
            ),
        )
    if rollout.state != "AwaitingPromotion":
        why = (
            "it is already promoted"
            if rollout.state == "Promoted"
            else "it was rolled back (retry starts it again)"
            if rollout.state == "RolledBack"
            else f"it is at step {rollout.step + 1} of {len(plan.steps)}; promotion is possible once every "
            "step has passed (AwaitingPromotion), or abort it"
        )
        return Step(
            handled,
            (
                _record(
                    rollout,
                    now,
                    "PromoteRefused",
                    f"promote refused: canary {rollout.ranker_version}: {why}",
                    "Warning",
                ),
            ),
        )
    after = _moved(plan, handled, state="Promoted")
    return Step(
        after, (_record(after, now, "Promoted", f"promoted{who}: canary {rollout.ranker_version} takes all traffic"),)
    )


def _on_analysis(plan: Plan, rollout: Rollout, analysis: Analysis, now: str) -> Step:
    result = analysis.as_status(now)
    measured = dataclasses.replace(rollout, last_analysis=result)
    where = f"step {rollout.step + 1} of {len(plan.steps)} ({rollout.traffic_percent} %)"
    if analysis.verdict == "Inconclusive":
        return Step(measured)
    if analysis.verdict == "Failed":
        failed = rollout.failed_checks + 1
        if failed >= plan.failure_limit:
            after = _moved(plan, measured, failed_checks=failed, state="RolledBack")
            return Step(
                after,
                (
                    _record(
                        after,
                        now,
                        "RolledBack",
                        f"{where}: check failed ({analysis.message}); "
                        f"{failed} of {plan.failure_limit} failed: all traffic back on stable",
                        "Warning",
                        result,
                    ),
                ),
            )
        after = dataclasses.replace(measured, failed_checks=failed, step_started_at=now)
        return Step(
            after,
            (
                _record(
                    after,
                    now,
                    "AnalysisFailed",
                    f"{where}: check failed ({analysis.message}); {failed} of {plan.failure_limit} allowed failures",
                    "Warning",
                    result,
                ),
            ),
        )
    if rollout.state == "AwaitingPromotion":
        return Step(dataclasses.replace(measured, step_started_at=now))
    if rollout.step + 1 < len(plan.steps):
        after = _moved(plan, measured, step=rollout.step + 1, step_started_at=now)
        return Step(
            after,
            (
                _record(
                    after,
                    now,
                    "StepPassed",
                    f"{where} passed ({analysis.message}); canary now at {after.traffic_percent} %",
                    analysis=result,
                ),
            ),
        )
    if plan.promotion == "Manual":
        after = _moved(plan, measured, state="AwaitingPromotion", step_started_at=now)
        return Step(
            after,
            (
                _record(
                    after,
                    now,
                    "AwaitingPromotion",
                    f"{where} passed ({analysis.message}); waiting for `kubectl mmrank promote`",
                    analysis=result,
                ),
            ),
        )
    after = _moved(plan, measured, state="Promoted")
    return Step(
        after,
        (
            _record(
                after,
                now,
                "Promoted",
                f"{where} passed ({analysis.message}); canary {rollout.ranker_version} takes all traffic",
                analysis=result,
            ),
        ),
    )


# --- backends' granularity ----------------------------------------------------------------------


def replica_split(percent: int, replicas: int) -> tuple[int, int]:
    """(canary pods, stable pods) for a share on the plain-Kubernetes backend: the split is by
    replica ratio, rounded down so the canary never gets more than the step."""
    canary = percent * replicas // 100
    return canary, replicas - canary


def achievable(percent: int, backend: str, replicas: int) -> int:
    """The share a backend really gives for `percent`: KServe splits by weight (exact); the
    plain-Kubernetes backend by pods, so the share rounds down to a multiple of 100 / replicas."""
    if backend != "Kubernetes":
        return percent
    canary, _ = replica_split(percent, replicas)
    return canary * 100 // max(1, replicas)


def effective_steps(steps: Sequence[int], backend: str, replicas: int) -> tuple[int, ...]:
    """The steps as the backend can split them; a step that rounds to 0 % or to the share of the
    step before is dropped (it would send the canary nothing new to judge)."""
    out: list[int] = []
    for step in steps:
        share = achievable(step, backend, replicas)
        if share > 0 and (not out or share > out[-1]):
            out.append(share)
    return tuple(out)


def granularity(backend: str, replicas: int) -> float:
    """Percent one unit of traffic is worth: 1 for KServe (weights), 100 / replicas (one pod) for
    the plain-Kubernetes backend."""
    return round(100 / max(1, replicas), 2) if backend == "Kubernetes" else 1.0


def add_history(history: Sequence[Mapping[str, Any]], records: Sequence[Record]) -> list[dict[str, Any]]:
    """The bounded history: newest last, at most HISTORY_LIMIT entries."""
    merged = [dict(h) for h in history] + [r.as_status() for r in records]
    return merged[-HISTORY_LIMIT:]
