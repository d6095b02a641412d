"""`kubectl mmrank` by value: which requests it refuses and why, and the status view a person reads.
(tests/test_operator_apiserver.py runs it through the real kubectl against the real apiserver.)"""

from __future__ import annotations

import datetime

import pytest

from mmrank.operator import plugin

STABLE = {"stable": {"rankerVersion": "r1", "encoderVersion": "e1"}}


def canary(state: str, step: int = 1) -> dict:
    return {
        **STABLE,
        "canary": {
            "rankerVersion": "r2",
            "encoderVersion": "e2",
            "state": state,
            "step": step,
            "steps": [10, 25, 50],
            "trafficPercent": 25,
        },
    }


@pytest.mark.parametrize(
    ("action", "status", "allowed", "why"),
    [
        ("Promote", STABLE, False, "no canary rollout in progress (ranker r1 serves all traffic)"),
        ("Abort", STABLE, False, "no canary rollout in progress"),
        ("Retry", STABLE, False, "no canary rollout in progress"),
        ("Promote", canary("Progressing"), False, "at step 2 of 3"),
        ("Promote", canary("AwaitingPromotion"), True, ""),
        ("Promote", canary("Promoted"), False, "already promoted"),
        ("Promote", canary("RolledBack"), False, "kubectl mmrank retry"),
        ("Abort", canary("Progressing"), True, ""),
        ("Abort", canary("AwaitingPromotion"), True, ""),
        ("Abort", canary("RolledBack"), False, "nothing to abort"),
        ("Retry", canary("RolledBack"), True, ""),
        ("Retry", canary("Progressing"), False, "only a rolled-back canary"),
        (
            "Promote",
            {**canary("AwaitingPromotion"), "request": {"action": "Promote", "requestedAt": "t"}},
            False,
            "still waiting for the operator",
        ),
    ],
)
def test_refusal(action: str, status: dict, allowed: bool, why: str) -> None:
    found = plugin.refusal(action, status)
    assert (found is None) == allowed
    if not allowed:
        assert found is not None and why in found


def test_the_request_is_stamped_in_utc_with_who_asked() -> None:
    now = datetime.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.UTC)
    assert plugin.request_body("Abort", now, "alice") == {
        "status": {"request": {"action": "Abort", "requestedAt": "2026-01-02T03:04:05.678901Z", "requestedBy": "alice"}}
    }


def test_the_status_view_shows_steps_traffic_analysis_and_history() -> None:
    obj = {
        "metadata": {"name": "shop", "namespace": "ads"},
        "spec": {"rollout": {"interval": "5m", "promotion": "Manual", "analysis": {"failureLimit": 3}}},
        "status": {
            **canary("Progressing"),
            "phase": "Progressing",
            "canary": {
                **canary("Progressing")["canary"],
                "failedChecks": 1,
                "granularityPercent": 1.0,
                "lastAnalysis": {
                    "time": "2026-01-01T00:05:00Z",
                    "requests": 800,
                    "errorRate": 0.02,
                    "latencyP99Ms": 30.0,
                    "clickRateRatio": 0.97,
                    "passed": False,
                    "verdict": "Failed",
                    "message": "errorRate 0.02 > maxErrorRate 0.01",
                },
            },
            "history": [
                {
                    "time": "2026-01-01T00:00:00Z",
                    "reason": "CanaryStarted",
                    "trafficPercent": 10,
                    "message": "canary r2 starts",
                }
            ],
        },
    }
    text = plugin.render_status(obj)
    assert "Name:       ads/shop" in text and "Stable:     r1 on space e1" in text
    assert "Canary:     r2 on space e2 (Progressing)" in text
    assert "✓10% → *25% →  50% → 100% (Manual promotion, every 5m)" in text
    assert "25 % canary / 75 % stable" in text and "failed 1 of 3 allowed" in text
    assert (
        "Failed at 2026-01-01T00:05:00Z: requests 800, error rate 0.0200, p99 30.0 ms, click-rate ratio 0.970" in text
    )
    assert "CanaryStarted" in text and "canary r2 starts" in text


def test_a_bad_command_line_is_one_line_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        plugin.main(["launch", "shop"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
