"""The rollout state machine by value: a transition table, then properties over random runs.

`next_step` is pure, so every rule of the issue is checked here exhaustively: traffic never above
the current step, a failed check never advances, an inconclusive one waits, Automatic promotes
only after the last step passes, Manual only on a promote request, abort always wins, and
replaying an observation changes nothing.
"""

from __future__ import annotations

import dataclasses
import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmrank.operator import rollout as roll
from mmrank.operator.analysis import Analysis

T0 = "2026-01-01T00:00:00Z"
PLAN = roll.Plan(steps=(10, 25, 50), interval_seconds=60, failure_limit=2, promotion="Automatic")
MANUAL = dataclasses.replace(PLAN, promotion="Manual")

PASSED = Analysis(
    "Passed", requests=900, error_rate=0.0, latency_p99_ms=20.0, click_rate_ratio=1.01, message="all checks passed"
)
FAILED = Analysis(
    "Failed",
    requests=900,
    error_rate=0.2,
    latency_p99_ms=20.0,
    click_rate_ratio=1.0,
    failed_checks=("errorRate",),
    message="error rate 0.2 > 0.01",
)
INCONCLUSIVE = Analysis("Inconclusive", requests=3, message="3 requests < minRequests 500")


def at(seconds: float) -> str:
    moment = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def started(plan: roll.Plan = PLAN) -> roll.Rollout:
    return roll.start(plan, "r2", "e2", "id-r2", T0).rollout


def request(action: str, seconds: float) -> roll.Request:
    return roll.Request(action, at(seconds), "alice")  # type: ignore[arg-type]


# --- the transition table -----------------------------------------------------------------------


def test_a_rollout_starts_at_the_first_step() -> None:
    step = roll.start(PLAN, "r2", "e2", "id-r2", T0)
    assert step.rollout.state == "Progressing" and step.rollout.step == 0
    assert step.rollout.traffic_percent == 10 and step.rollout.step_started_at == T0
    assert [r.reason for r in step.records] == ["CanaryStarted"]


@pytest.mark.parametrize(
    ("plan", "state", "step", "analysis", "want_state", "want_step", "want_traffic", "want_failed", "reason"),
    [
        (PLAN, "Progressing", 0, PASSED, "Progressing", 1, 25, 0, "StepPassed"),
        (PLAN, "Progressing", 1, PASSED, "Progressing", 2, 50, 0, "StepPassed"),
        (PLAN, "Progressing", 2, PASSED, "Promoted", 2, 100, 0, "Promoted"),
        (MANUAL, "Progressing", 2, PASSED, "AwaitingPromotion", 2, 50, 0, "AwaitingPromotion"),
        (PLAN, "Progressing", 1, FAILED, "Progressing", 1, 25, 1, "AnalysisFailed"),
        (PLAN, "Progressing", 1, INCONCLUSIVE, "Progressing", 1, 25, 0, None),
        (MANUAL, "AwaitingPromotion", 2, PASSED, "AwaitingPromotion", 2, 50, 0, None),
        (MANUAL, "AwaitingPromotion", 2, FAILED, "AwaitingPromotion", 2, 50, 1, "AnalysisFailed"),
    ],
)
def test_analysis_transitions(
    plan: roll.Plan,
    state: str,
    step: int,
    analysis: Analysis,
    want_state: str,
    want_step: int,
    want_traffic: int,
    want_failed: int,
    reason: str | None,
) -> None:
    rollout = dataclasses.replace(started(plan), state=state, step=step)
    rollout = dataclasses.replace(rollout, traffic_percent=roll.traffic_of(plan, rollout))
    out = roll.next_step(plan, rollout, roll.Observation(at(60), analysis))
    assert (out.rollout.state, out.rollout.step, out.rollout.traffic_percent, out.rollout.failed_checks) == (
        want_state,
        want_step,
        want_traffic,
        want_failed,
    )
    assert [r.reason for r in out.records] == ([reason] if reason else [])
    assert out.rollout.last_analysis is not None and out.rollout.last_analysis["requests"] == analysis.requests


def test_the_failure_limit_rolls_back_with_the_numbers_in_history() -> None:
    once = roll.next_step(PLAN, started(), roll.Observation(at(60), FAILED)).rollout
    assert once.step_started_at == at(60)  # a new window: the next check is a fresh one
    twice = roll.next_step(PLAN, once, roll.Observation(at(120), FAILED))
    assert twice.rollout.state == "RolledBack" and twice.rollout.traffic_percent == 0
    record = twice.records[0]
    assert record.reason == "RolledBack" and record.type == "Warning"
    assert "2 of 2 failed" in record.message and "error rate 0.2" in record.message
    assert record.analysis is not None and record.analysis["errorRate"] == 0.2


def test_an_analysis_before_the_window_ends_is_ignored() -> None:
    rollout = started()
    assert not roll.analysis_due(PLAN, rollout, at(59))
    assert roll.next_step(PLAN, rollout, roll.Observation(at(59), PASSED)) == roll.Step(rollout)
    assert roll.analysis_due(PLAN, rollout, at(60))


@pytest.mark.parametrize(
    ("state", "action", "want_state", "reason"),
    [
        ("Progressing", "Abort", "RolledBack", "Aborted"),
        ("AwaitingPromotion", "Abort", "RolledBack", "Aborted"),
        ("RolledBack", "Abort", "RolledBack", "AbortRefused"),
        ("Promoted", "Abort", "Promoted", "AbortRefused"),
        ("AwaitingPromotion", "Promote", "Promoted", "Promoted"),
        ("Progressing", "Promote", "Progressing", "PromoteRefused"),
        ("Promoted", "Promote", "Promoted", "PromoteRefused"),
        ("RolledBack", "Promote", "RolledBack", "PromoteRefused"),
        ("RolledBack", "Retry", "Progressing", "Retried"),
        ("Progressing", "Retry", "Progressing", "RetryRefused"),
        ("AwaitingPromotion", "Retry", "AwaitingPromotion", "RetryRefused"),
    ],
)
def test_request_transitions(state: str, action: str, want_state: str, reason: str) -> None:
    rollout = dataclasses.replace(
        started(MANUAL), state=state, step=2 if state != "Progressing" else 1, failed_checks=1
    )
    rollout = dataclasses.replace(rollout, traffic_percent=roll.traffic_of(MANUAL, rollout))
    out = roll.next_step(MANUAL, rollout, roll.Observation(at(5), None, request(action, 5)))
    assert out.rollout.state == want_state
    assert [r.reason for r in out.records] == [reason]
    assert out.rollout.last_request == request(action, 5).as_status()
    if reason.endswith("Refused"):
        assert dataclasses.replace(out.rollout, last_request=None) == dataclasses.replace(rollout, last_request=None)
        assert out.records[0].type == "Warning"
    if reason == "Retried":
        assert (out.rollout.step, out.rollout.failed_checks, out.rollout.traffic_percent) == (0, 0, 10)
        assert out.rollout.step_started_at == at(5)


def test_a_refused_promote_says_why() -> None:
    out = roll.next_step(PLAN, started(), roll.Observation(at(5), None, request("Promote", 5)))
    assert "step 1 of 3" in out.records[0].message and "AwaitingPromotion" in out.records[0].message


def test_abort_wins_over_a_passing_analysis_in_the_same_reconcile() -> None:
    out = roll.next_step(PLAN, started(), roll.Observation(at(60), PASSED, request("Abort", 60)))
    assert out.rollout.state == "RolledBack" and out.rollout.traffic_percent == 0


def test_a_request_without_a_rollout_is_answered_and_changes_nothing() -> None:
    record = roll.answer_without_rollout(request("Promote", 1), at(1), "r1")
    assert record.reason == "PromoteRefused" and "no canary rollout in progress" in record.message


def test_status_round_trip() -> None:
    out = roll.next_step(PLAN, started(), roll.Observation(at(60), FAILED)).rollout
    assert roll.Rollout.from_status(out.as_status()) == out
    assert roll.Rollout.from_status({"rankerVersion": "r2", "state": "Bogus"}) is None
    assert roll.Request.from_status({"action": "Promote"}) is None
    assert roll.Request.from_status({"action": "Delete", "requestedAt": T0}) is None


def test_history_is_bounded_newest_last() -> None:
    records = [roll.Record(at(i), "StepPassed", str(i), "r2", 0, 10) for i in range(roll.HISTORY_LIMIT + 5)]
    history = roll.add_history([], records)
    assert len(history) == roll.HISTORY_LIMIT and history[-1]["message"] == str(roll.HISTORY_LIMIT + 4)


# --- the backends' granularity ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "backend", "replicas", "want"),
    [
        ((10, 25, 50), "KServe", 1, (10, 25, 50)),
        ((10, 25, 50), "Kubernetes", 4, (25, 50)),  # 10 % of 4 pods is 0 pods: skipped
        ((10, 25, 50), "Kubernetes", 10, (10, 20, 50)),  # 25 % of 10 pods is 2 pods = 20 %
        (
            (10, 20, 30),
            "Kubernetes",
            3,
            (),
        ),  # 33 % steps: every one rounds to 0
        ((5, 10, 25, 50), "Kubernetes", 2, (50,)),
        ((40, 60), "Kubernetes", 3, (33,)),  # 60 % of 3 pods is 1 pod: the same 33 % as 40 %
    ],
)
def test_effective_steps(steps: tuple[int, ...], backend: str, replicas: int, want: tuple[int, ...]) -> None:
    assert roll.effective_steps(steps, backend, replicas) == want


@given(st.integers(1, 99), st.integers(1, 100))
def test_a_replica_split_never_gives_the_canary_more_than_the_step(percent: int, replicas: int) -> None:
    canary, stable = roll.replica_split(percent, replicas)
    assert canary + stable == replicas and canary >= 0 and stable >= 1
    assert canary * 100 <= percent * replicas
    assert roll.achievable(percent, "Kubernetes", replicas) <= percent


# --- properties over random runs ----------------------------------------------------------------

events = st.lists(
    st.tuples(
        st.sampled_from([None, "Passed", "Failed", "Inconclusive"]),
        st.sampled_from([None, None, None, "Promote", "Abort", "Retry"]),
        st.integers(0, 120),
    ),
    max_size=25,
)
plans = st.builds(
    roll.Plan,
    steps=st.lists(st.integers(1, 99), min_size=1, max_size=5, unique=True).map(lambda s: tuple(sorted(s))),
    interval_seconds=st.integers(1, 90),
    failure_limit=st.integers(1, 4),
    promotion=st.sampled_from(["Automatic", "Manual"]),
)
VERDICTS = {"Passed": PASSED, "Failed": FAILED, "Inconclusive": INCONCLUSIVE}


@settings(max_examples=300, deadline=None)
@given(plans, events)
def test_properties_of_every_run(plan: roll.Plan, run: list) -> None:
    rollout = roll.start(plan, "r2", "e2", "id", T0).rollout
    clock = 0
    for verdict, action, wait in run:
        clock += wait
        now = at(clock)
        analysis = VERDICTS[verdict] if verdict else None
        req = roll.Request(action, now) if action else None  # type: ignore[arg-type]
        before = rollout
        out = roll.next_step(plan, rollout, roll.Observation(now, analysis, req))
        rollout = out.rollout
        traffic = rollout.traffic_percent
        assert traffic == roll.traffic_of(plan, rollout)
        if rollout.state in ("Progressing", "AwaitingPromotion"):
            current = plan.steps[rollout.step]
            assert traffic <= current and 100 - traffic >= 100 - current
            assert rollout.step < len(plan.steps)
        if action == "Abort" and before.active:
            assert rollout.state == "RolledBack" and traffic == 0  # abort always wins
        elif req is None or not before.active or action != "Abort":
            if verdict == "Failed" or verdict == "Inconclusive" or verdict is None:
                assert rollout.step <= before.step or action == "Retry"  # a failed or missing check never advances
            if verdict == "Inconclusive" and action is None:
                assert rollout.failed_checks == before.failed_checks
            if rollout.state == "Promoted" and before.state != "Promoted":
                if plan.promotion == "Manual":
                    assert action == "Promote" and before.state == "AwaitingPromotion"
                else:
                    assert verdict == "Passed" and before.step == len(plan.steps) - 1
        # the state lives in status: replaying the same observation changes nothing
        again = roll.next_step(plan, rollout, roll.Observation(now, analysis, req))
        assert again.rollout == rollout and again.records == ()
        assert roll.Rollout.from_status(rollout.as_status()) == rollout
