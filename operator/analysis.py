"""Canary analysis: what Prometheus says about the canary against the stable ranker.

Two halves. The pure half builds the PromQL (`queries`) and judges measured numbers against
`spec.rollout.analysis` (`judge`); the I/O half (`PrometheusAnalyser`) runs the queries over
Prometheus' HTTP API. The rollout state machine (`rollout.py`) only ever sees an `Analysis`.

Verdicts: Passed (every check inside its threshold), Failed (at least one check outside), or
Inconclusive (fewer than `minRequests` canary requests in the window, a number Prometheus had no
data for, or Prometheus unreachable): an inconclusive step waits, it never passes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from mmrank import api

Verdict = Literal["Passed", "Failed", "Inconclusive"]


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Numbers read from Prometheus over one step's window; None where there was no data."""

    requests: int
    error_rate: float | None = None
    latency_p99_ms: float | None = None
    click_rate_ratio: float | None = None
    stable_requests: int = 0


@dataclasses.dataclass(frozen=True)
class Analysis:
    """One judged analysis: the verdict, which checks failed, the numbers that decided."""

    verdict: Verdict
    requests: int = 0
    error_rate: float | None = None
    latency_p99_ms: float | None = None
    click_rate_ratio: float | None = None
    failed_checks: tuple[str, ...] = ()
    message: str = ""

    def as_status(self, time: str) -> dict[str, Any]:
        """`status.canary.lastAnalysis` (the `AnalysisResult` model)."""
        raise NotImplementedError


def queries(canary_variant: str, stable_variant: str, window_seconds: int) -> dict[str, str]:
    raise NotImplementedError


def judge(measured: Measurement, spec: api.AnalysisSpec) -> Analysis:
    raise NotImplementedError


class PrometheusAnalyser:
    def analyse(self, prometheus_url: str, canary_variant: str, stable_variant: str, window_seconds: int,
                spec: api.AnalysisSpec) -> Analysis:
        raise NotImplementedError
