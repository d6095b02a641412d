"""Canary analysis: what Prometheus says about the canary against the stable ranker.

Two halves. The pure half builds the PromQL (`queries`) and judges measured numbers against
`spec.rollout.analysis` (`judge`); the I/O half (`PrometheusAnalyser`) runs the queries over
Prometheus' HTTP API. The rollout state machine (`rollout.py`) only ever sees an `Analysis`.

Verdicts: Passed (every check inside its threshold), Failed (at least one check outside), or
Inconclusive (fewer than `minRequests` canary requests in the window, a number Prometheus had no
data for, or Prometheus unreachable): an inconclusive step waits, it never passes. A check that
failed on the numbers it had outranks one that had none: a canary answering nothing but 5xx may
have no latency to read, and it must still be rolled back.

The numbers come from the predictor's own metrics (predictors/ranking_metrics.py), labelled by `variant`,
the ranker version: `mmrank_requests_total{variant,protocol,code}` (every answered ranking
request, errors included), `mmrank_request_duration_seconds` (latency, errors included once the
predictor observes them: see issue 15), and the click feedback `mmrank_clicks_total` /
`mmrank_impressions_total`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from collections.abc import Mapping
from typing import Any, Literal

from mmrank import api

Verdict = Literal["Passed", "Failed", "Inconclusive"]

ERROR_RATE, LATENCY_P99, CLICK_RATE_RATIO = "errorRate", "latencyP99Ms", "clickRateRatio"
CHECKS = (ERROR_RATE, LATENCY_P99, CLICK_RATE_RATIO)  # the order of messages and failedChecks
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


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
        """`status.canary.lastAnalysis` (the `AnalysisResult` model). A number without data is an
        explicit null, so a merge patch clears what the previous analysis had measured."""
        result = api.AnalysisResult(
            time=time,
            requests=max(0, self.requests),
            error_rate=_finite(self.error_rate),
            latency_p99_ms=_finite(self.latency_p99_ms),
            click_rate_ratio=_finite(self.click_rate_ratio),
            passed=self.verdict == "Passed",
            verdict=self.verdict,
            failed_checks=list(self.failed_checks),
            message=self.message[:4096],
        )
        return result.model_dump(mode="json", by_alias=True)


# --- PromQL -----------------------------------------------------------------------------------


def label_value(value: str) -> str:
    """A PromQL double-quoted string literal (Go escaping: backslash, quote, control characters)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'


def ranker_series(namespace: str, name: str) -> dict[str, str]:
    """The labels that tell one ranker's series from another's: its pods' namespace and their
    `mmrank.io/ranker` label, as the usual pod-discovery relabelling names them (docs/operator.md,
    "Monitoring"). Versions are names a ranker's owner picks, so without these a ranker in another
    namespace serving a version of the same name would count in this one's canary analysis."""
    return {"namespace": namespace, "mmrank_io_ranker": name}


def queries(
    canary_variant: str, stable_variant: str, window_seconds: int, scope: Mapping[str, str] | None = None
) -> dict[str, str]:
    """PromQL per measured number, each over the last `window_seconds`.

    `scope`: extra label matchers on every series (e.g. `namespace` and `mmrank_io_ranker`, the
    target labels a `kubernetes_sd` scrape config adds), for a Prometheus that scrapes several
    rankers whose versions share names; without it every series of the variant counts.

    Keys: `requests` and `stable_requests` (answered ranking requests, any code), `error_rate`
    (5xx / all: a 4xx is the caller's fault, as bad for stable as for canary), `latency_p99_ms`,
    `click_rate_ratio` (canary clicks/impressions ÷ stable's). A counter that has no series yet
    (no 5xx ever, no click yet) counts as 0 through `or vector(0)`; a denominator without data
    leaves the result empty (no data), and 0/0 is NaN: both read as "no data".
    """
    if window_seconds < 1:
        raise ValueError(f"window_seconds must be at least 1, got {window_seconds}")
    bad = [name for name in (scope or {}) if not LABEL_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"scope: not Prometheus label names: {', '.join(map(repr, bad))}")
    canary, stable, w = label_value(canary_variant), label_value(stable_variant), f"{int(window_seconds)}s"
    scoped = "".join(f",{name}={label_value(value)}" for name, value in sorted((scope or {}).items()))
    canary, stable = canary + scoped, stable + scoped
    server_errors = ',code=~"5.."'

    def total(metric: str, variant: str, extra: str = "") -> str:
        return f"sum(rate({metric}{{variant={variant}{extra}}}[{w}]))"

    def click_rate(variant: str) -> str:
        return (
            f"((({total('mmrank_clicks_total', variant)}) or vector(0)) / {total('mmrank_impressions_total', variant)})"
        )

    return {
        "requests": f"sum(increase(mmrank_requests_total{{variant={canary}}}[{w}]))",
        "stable_requests": f"sum(increase(mmrank_requests_total{{variant={stable}}}[{w}]))",
        "error_rate": f"(({total('mmrank_requests_total', canary, server_errors)}) or vector(0)) / "
        f"{total('mmrank_requests_total', canary)}",
        "latency_p99_ms": "1000 * histogram_quantile(0.99, sum by (le) "
        f"(rate(mmrank_request_duration_seconds_bucket{{variant={canary}}}[{w}])))",
        "click_rate_ratio": f"{click_rate(canary)} / {click_rate(stable)}",
    }


# --- the judgement ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Check:
    name: str
    value: float | None
    threshold: float
    higher_is_worse: bool
    enabled: bool
    unit: str = ""

    def failed(self) -> bool:
        assert self.value is not None
        return self.value > self.threshold if self.higher_is_worse else self.value < self.threshold

    def describe(self) -> str:
        relation = (">" if self.failed() else "<=") if self.higher_is_worse else ("<" if self.failed() else ">=")
        limit = ("max" if self.higher_is_worse else "min") + self.name[0].upper() + self.name[1:]
        return f"{self.name} {_number(self.value)}{self.unit} {relation} {limit} {_number(self.threshold)}{self.unit}"


def checks(measured: Measurement, spec: api.AnalysisSpec) -> list[_Check]:
    """The three checks with their thresholds. A threshold nothing can cross disables its check
    (maxErrorRate 1, minClickRateRatio 0): it needs no data then."""
    return [
        _Check(ERROR_RATE, _finite(measured.error_rate), spec.max_error_rate, True, spec.max_error_rate < 1.0),
        _Check(LATENCY_P99, _finite(measured.latency_p99_ms), spec.max_latency_p99_ms, True, True, " ms"),
        _Check(
            CLICK_RATE_RATIO,
            _finite(measured.click_rate_ratio),
            spec.min_click_rate_ratio,
            False,
            spec.min_click_rate_ratio > 0.0,
        ),
    ]


def judge(measured: Measurement, spec: api.AnalysisSpec) -> Analysis:
    """Passed, Failed or Inconclusive, with every failing check and its number in the message."""
    numbers: dict[str, Any] = {
        "requests": measured.requests,
        "error_rate": _finite(measured.error_rate),
        "latency_p99_ms": _finite(measured.latency_p99_ms),
        "click_rate_ratio": _finite(measured.click_rate_ratio),
    }
    if measured.requests < spec.min_requests:
        return Analysis(
            "Inconclusive",
            **numbers,
            message=f"{measured.requests} canary requests in the window, fewer than minRequests "
            f"{spec.min_requests}: waiting for traffic",
        )
    enabled = [c for c in checks(measured, spec) if c.enabled]
    missing = [c.name for c in enabled if c.value is None]
    failing = [c for c in enabled if c.value is not None and c.failed()]
    no_data = f"no data for {', '.join(missing)}" if missing else ""
    if failing:
        message = "; ".join(c.describe() for c in failing)
        return Analysis(
            "Failed",
            **numbers,
            failed_checks=tuple(c.name for c in failing),
            message=f"{message} ({measured.requests} requests)" + (f"; {no_data}" if no_data else ""),
        )
    if missing:
        return Analysis(
            "Inconclusive", **numbers, message=f"{no_data} over {measured.requests} canary requests: waiting"
        )
    passed = ", ".join(c.describe() for c in enabled)
    return Analysis("Passed", **numbers, message=f"all checks passed over {measured.requests} requests: {passed}")


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


# --- Prometheus ---------------------------------------------------------------------------------


class PrometheusUnavailable(RuntimeError):
    """Prometheus did not answer a query, or answered with an error: the analysis waits."""


class PrometheusAnalyser:
    """Runs `queries` against Prometheus' `/api/v1/query` (instant queries, JSON answers).

    One analyser serves every ranker: `queries_sent` counts what it asked, the load a benchmark
    reports. A query that is not needed is not sent: below `minRequests` nothing after the request
    count, and no click query while that check is disabled.
    """

    def __init__(self, timeout_seconds: float = 5.0) -> None:
        import httpx

        self.timeout_seconds = timeout_seconds
        self._client = httpx.Client(timeout=timeout_seconds, follow_redirects=False)
        self._lock = threading.Lock()
        self.queries_sent = 0

    def close(self) -> None:
        self._client.close()

    def analyse(
        self,
        prometheus_url: str,
        canary_variant: str,
        stable_variant: str,
        window_seconds: int,
        spec: api.AnalysisSpec,
        scope: Mapping[str, str] | None = None,
    ) -> Analysis:
        try:
            measured = self.measure(prometheus_url, canary_variant, stable_variant, window_seconds, spec, scope)
        except PrometheusUnavailable as exc:
            return Analysis("Inconclusive", message=str(exc))
        return judge(measured, spec)

    def measure(
        self,
        prometheus_url: str,
        canary_variant: str,
        stable_variant: str,
        window_seconds: int,
        spec: api.AnalysisSpec,
        scope: Mapping[str, str] | None = None,
    ) -> Measurement:
        promql = queries(canary_variant, stable_variant, window_seconds, scope)
        requests = self.query(prometheus_url, promql["requests"])
        count = round(requests) if requests is not None else 0
        if count < spec.min_requests:
            return Measurement(requests=count)
        wanted = {c.name for c in checks(Measurement(count), spec) if c.enabled}
        values = {
            key: self.query(prometheus_url, promql[key]) if name in wanted else None
            for key, name in (
                ("error_rate", ERROR_RATE),
                ("latency_p99_ms", LATENCY_P99),
                ("click_rate_ratio", CLICK_RATE_RATIO),
            )
        }
        stable = self.query(prometheus_url, promql["stable_requests"])
        return Measurement(requests=count, stable_requests=round(stable) if stable is not None else 0, **values)

    def query(self, prometheus_url: str, promql: str) -> float | None:
        """One instant query's single value; None for an empty result or NaN/±Inf."""
        import httpx

        url = prometheus_url.rstrip("/") + "/api/v1/query"
        with self._lock:
            self.queries_sent += 1
        try:
            response = self._client.get(url, params={"query": promql})
        except httpx.HTTPError as exc:
            raise PrometheusUnavailable(
                f"Prometheus at {prometheus_url} unreachable: {type(exc).__name__}: {exc}"
            ) from None
        return query_value(response.status_code, response.content, prometheus_url)


def query_value(status_code: int, body: bytes, prometheus_url: str = "Prometheus") -> float | None:
    """The value of one `/api/v1/query` answer (a vector of at most one sample, or a scalar)."""
    import json

    try:
        answer = json.loads(body)
    except ValueError:
        raise PrometheusUnavailable(
            f"Prometheus at {prometheus_url} answered HTTP {status_code} that is not JSON: {body[:200]!r}"
        ) from None
    if not isinstance(answer, dict) or answer.get("status") != "success":
        error = answer.get("error") if isinstance(answer, dict) else None
        kind = answer.get("errorType") if isinstance(answer, dict) else None
        raise PrometheusUnavailable(
            f"Prometheus at {prometheus_url} answered HTTP {status_code}: "
            f"{kind or 'error'}: {error or str(answer)[:200]}"
        )
    data = answer.get("data") or {}
    result = data.get("result")
    samples: list[Any]
    if data.get("resultType") == "scalar":
        samples = [result]
    elif data.get("resultType") == "vector":
        samples = [s.get("value") for s in result or []]
    else:
        raise PrometheusUnavailable(
            f"Prometheus at {prometheus_url} answered a {data.get('resultType')} where one number was expected"
        )
    if not samples:
        return None
    if len(samples) > 1:
        raise PrometheusUnavailable(
            f"Prometheus at {prometheus_url} answered {len(samples)} series where one was expected"
        )
    return _finite(float(samples[0][1]))
