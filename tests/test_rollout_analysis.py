"""The canary analysis: PromQL and judgement by value, then the analyser against a real Prometheus
scraping two real predictor processes (stable `r1`, canary `r2`) under the load generator.

The predictors run as subprocesses (`mmrank predictor serve`), so kserve stays out of this process.
The rig (`harness.loadgen.CanaryRig`: a Redis store per variant, so the canary's can be stopped or
slowed alone, the two predictors, one Prometheus) serves the whole module; each test judges only
the window of its own load.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import servers
from harness.loadgen import (
    CanaryRig,
    ClickSampler,
    LoadGenerator,
    Throttle,
    canary_share,
    ready_status,
    route_to_canary,
)
from mmrank import api
from mmrank.operator.analysis import (
    Analysis,
    Measurement,
    PrometheusAnalyser,
    PrometheusUnavailable,
    judge,
    label_value,
    queries,
    query_value,
)

SPEC = api.AnalysisSpec(max_error_rate=0.01, max_latency_p99_ms=100.0, min_click_rate_ratio=0.95, min_requests=100)


# --- queries ------------------------------------------------------------------------------------


def test_queries_name_every_number_over_the_window_for_the_right_variant() -> None:
    promql = queries("r2", "r1", 45)
    assert set(promql) == {"requests", "stable_requests", "error_rate", "latency_p99_ms", "click_rate_ratio"}
    assert all("[45s]" in q for q in promql.values())
    assert promql["requests"] == 'sum(increase(mmrank_requests_total{variant="r2"}[45s]))'
    assert promql["stable_requests"] == 'sum(increase(mmrank_requests_total{variant="r1"}[45s]))'
    for key in ("requests", "error_rate", "latency_p99_ms"):
        assert 'variant="r2"' in promql[key] and 'variant="r1"' not in promql[key], key
    assert 'variant="r2"' in promql["click_rate_ratio"] and 'variant="r1"' in promql["click_rate_ratio"]


def test_error_rate_is_5xx_over_all_answers_and_zero_without_any_5xx_series() -> None:
    error_rate = queries("r2", "r1", 30)["error_rate"]
    assert error_rate == (
        '((sum(rate(mmrank_requests_total{variant="r2",code=~"5.."}[30s]))) or vector(0)) / '
        'sum(rate(mmrank_requests_total{variant="r2"}[30s]))'
    )


def test_p99_is_the_histogram_quantile_of_every_answer_in_milliseconds() -> None:
    assert queries("r2", "r1", 60)["latency_p99_ms"] == (
        '1000 * histogram_quantile(0.99, sum by (le) (rate(mmrank_request_duration_seconds_bucket{variant="r2"}[60s])))'
    )
    assert "code" not in queries("r2", "r1", 60)["latency_p99_ms"]  # errors included


def test_click_rate_ratio_is_canary_ctr_over_stable_ctr() -> None:
    ratio = queries("r2", "r1", 30)["click_rate_ratio"]
    canary, _, stable = ratio.partition(" / ((")
    assert 'mmrank_clicks_total{variant="r2"}' in canary and 'mmrank_impressions_total{variant="r2"}' in canary
    assert 'mmrank_clicks_total{variant="r1"}' in stable and 'mmrank_impressions_total{variant="r1"}' in stable
    assert ratio.count("or vector(0)") == 2  # no click yet is a click rate of 0, not "no data"


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("r2", '"r2"'),
        ('say "hi"', r'"say \"hi\""'),
        ("back\\slash", r'"back\\slash"'),
        ("two\nlines\ttab", r'"two\nlines\ttab"'),
        ("", '""'),
    ],
)
def test_label_values_are_escaped_as_promql_strings(value: str, literal: str) -> None:
    assert label_value(value) == literal
    assert f"variant={literal}" in queries(value, "r1", 10)["requests"]


def test_a_scope_adds_its_matchers_to_every_series_of_both_variants() -> None:
    promql = queries("r2", "r1", 30, scope={"namespace": "shop", "mmrank_io_ranker": 'x"y'})
    scoped = ',mmrank_io_ranker="x\\"y",namespace="shop"'
    for key, query in promql.items():
        selectors = query.count("{variant=")
        assert query.count(scoped) == selectors > 0, key
    assert queries("r2", "r1", 30, scope={}) == queries("r2", "r1", 30)
    with pytest.raises(ValueError, match="not Prometheus label names: 'mmrank.io/ranker'"):
        queries("r2", "r1", 30, scope={"mmrank.io/ranker": "shop"})


def test_a_window_below_one_second_is_refused() -> None:
    with pytest.raises(ValueError, match="window_seconds must be at least 1"):
        queries("r2", "r1", 0)


# --- judge --------------------------------------------------------------------------------------

HEALTHY = Measurement(requests=500, error_rate=0.001, latency_p99_ms=40.0, click_rate_ratio=1.01, stable_requests=4500)


def test_healthy_numbers_pass_and_the_message_shows_each_number_beside_its_threshold() -> None:
    result = judge(HEALTHY, SPEC)
    assert result.verdict == "Passed" and result.failed_checks == ()
    assert (result.requests, result.error_rate, result.latency_p99_ms, result.click_rate_ratio) == (
        500,
        0.001,
        40.0,
        1.01,
    )
    assert "errorRate 0.001 <= maxErrorRate 0.01" in result.message
    assert "latencyP99Ms 40 ms <= maxLatencyP99Ms 100 ms" in result.message
    assert "clickRateRatio 1.01 >= minClickRateRatio 0.95" in result.message


@pytest.mark.parametrize(
    ("change", "check", "text"),
    [
        ({"error_rate": 0.05}, "errorRate", "errorRate 0.05 > maxErrorRate 0.01"),
        ({"latency_p99_ms": 250.0}, "latencyP99Ms", "latencyP99Ms 250 ms > maxLatencyP99Ms 100 ms"),
        ({"click_rate_ratio": 0.8}, "clickRateRatio", "clickRateRatio 0.8 < minClickRateRatio 0.95"),
    ],
)
def test_each_check_outside_its_threshold_fails_by_name(change: dict[str, float], check: str, text: str) -> None:
    import dataclasses

    result = judge(dataclasses.replace(HEALTHY, **change), SPEC)
    assert result.verdict == "Failed" and result.failed_checks == (check,)
    assert text in result.message and "500 requests" in result.message


def test_every_failing_check_is_named_in_order() -> None:
    result = judge(Measurement(900, error_rate=0.5, latency_p99_ms=2500.0, click_rate_ratio=0.1), SPEC)
    assert result.failed_checks == ("errorRate", "latencyP99Ms", "clickRateRatio")
    assert (
        result.message.index("errorRate")
        < result.message.index("latencyP99Ms")
        < result.message.index("clickRateRatio")
    )


def test_a_threshold_is_inside_it_passes() -> None:
    at = Measurement(100, error_rate=0.01, latency_p99_ms=100.0, click_rate_ratio=0.95)
    assert judge(at, SPEC).verdict == "Passed"


@pytest.mark.parametrize("requests", [0, 1, 99])
def test_fewer_than_min_requests_waits_whatever_the_numbers(requests: int) -> None:
    result = judge(Measurement(requests, error_rate=1.0, latency_p99_ms=9000.0, click_rate_ratio=0.0), SPEC)
    assert result.verdict == "Inconclusive" and result.failed_checks == ()
    assert f"{requests} canary requests in the window, fewer than minRequests 100" in result.message


def test_exactly_min_requests_is_judged() -> None:
    assert judge(Measurement(100, 0.0, 10.0, 1.0), SPEC).verdict == "Passed"
    assert judge(Measurement(0, 0.0, 10.0, 1.0), SPEC.model_copy(update={"min_requests": 0})).verdict == "Passed"


@pytest.mark.parametrize("missing", ["error_rate", "latency_p99_ms", "click_rate_ratio"])
@pytest.mark.parametrize("how", [None, math.nan, math.inf, -math.inf])
def test_a_needed_number_without_data_waits(missing: str, how: float | None) -> None:
    import dataclasses

    result = judge(dataclasses.replace(HEALTHY, **{missing: how}), SPEC)
    assert result.verdict == "Inconclusive" and result.failed_checks == ()
    name = {"error_rate": "errorRate", "latency_p99_ms": "latencyP99Ms", "click_rate_ratio": "clickRateRatio"}[missing]
    assert f"no data for {name}" in result.message
    assert getattr(result, missing) is None  # never NaN or Inf into status


def test_a_failed_check_outranks_missing_data() -> None:
    """An all-5xx canary may have no latency to read; it must still be rolled back."""
    result = judge(Measurement(300, error_rate=1.0, latency_p99_ms=None, click_rate_ratio=None), SPEC)
    assert result.verdict == "Failed" and result.failed_checks == ("errorRate",)
    assert "no data for latencyP99Ms, clickRateRatio" in result.message


def test_a_disabled_check_needs_no_data_and_never_fails() -> None:
    no_clicks = SPEC.model_copy(update={"min_click_rate_ratio": 0.0})
    assert judge(Measurement(200, 0.0, 20.0, None), no_clicks).verdict == "Passed"
    assert judge(Measurement(200, 0.0, 20.0, 0.0), no_clicks).verdict == "Passed"
    any_errors = SPEC.model_copy(update={"max_error_rate": 1.0})
    assert judge(Measurement(200, None, 20.0, 1.0), any_errors).verdict == "Passed"
    assert judge(Measurement(200, 1.0, 20.0, 1.0), any_errors).verdict == "Passed"


numbers = st.one_of(st.none(), st.floats(min_value=0, max_value=5000), st.sampled_from([math.nan, math.inf]))
specs = st.builds(
    api.AnalysisSpec,
    max_error_rate=st.floats(0, 1),
    max_latency_p99_ms=st.floats(0.1, 60_000),
    min_click_rate_ratio=st.floats(0, 10),
    min_requests=st.integers(0, 1000),
)


@given(requests=st.integers(0, 2000), error_rate=numbers, p99=numbers, ratio=numbers, spec=specs)
def test_judge_properties(
    requests: int, error_rate: float | None, p99: float | None, ratio: float | None, spec: api.AnalysisSpec
) -> None:
    measured = Measurement(requests, error_rate, p99, ratio)
    result = judge(measured, spec)
    known = {
        k: v
        for k, v in (("errorRate", error_rate), ("latencyP99Ms", p99), ("clickRateRatio", ratio))
        if v is not None and math.isfinite(v)
    }
    needed = (
        {"latencyP99Ms"}
        | ({"errorRate"} if spec.max_error_rate < 1 else set())
        | ({"clickRateRatio"} if spec.min_click_rate_ratio > 0 else set())
    )
    outside = {
        name
        for name, v in known.items()
        if name in needed
        and (
            v > spec.max_error_rate
            if name == "errorRate"
            else v > spec.max_latency_p99_ms
            if name == "latencyP99Ms"
            else v < spec.min_click_rate_ratio
        )
    }
    if requests < spec.min_requests:
        assert result.verdict == "Inconclusive"
    elif outside:
        assert result.verdict == "Failed" and set(result.failed_checks) == outside
    elif needed - set(known):
        assert result.verdict == "Inconclusive"
    else:
        assert result.verdict == "Passed"
    assert (result.verdict == "Failed") == bool(result.failed_checks)
    status = result.as_status("2026-12-01T10:00:00Z")
    api.AnalysisResult.model_validate(status)  # NaN or Inf never reaches status
    json.dumps(status, allow_nan=False)


# --- the status it writes -----------------------------------------------------------------------


def test_as_status_is_an_analysis_result_with_explicit_nulls() -> None:
    failed = judge(Measurement(300, error_rate=0.2, latency_p99_ms=None, click_rate_ratio=1.0), SPEC)
    status = failed.as_status("2026-12-01T10:00:00Z")
    assert status == {
        "time": "2026-12-01T10:00:00Z",
        "requests": 300,
        "errorRate": 0.2,
        "latencyP99Ms": None,
        "clickRateRatio": 1.0,
        "passed": False,
        "verdict": "Failed",
        "failedChecks": ["errorRate"],
        "message": failed.message,
    }
    assert api.AnalysisResult.model_validate(status).failed_checks == ["errorRate"]
    passed = judge(HEALTHY, SPEC).as_status("2026-12-01T10:00:00Z")
    assert passed["passed"] is True and passed["verdict"] == "Passed" and passed["failedChecks"] == []
    waiting = Analysis("Inconclusive", message="x" * 5000).as_status("2026-12-01T10:00:00Z")
    assert waiting["passed"] is False and waiting["verdict"] == "Inconclusive" and len(waiting["message"]) == 4096


# --- Prometheus' answers ------------------------------------------------------------------------


def answer(result_type: str, result: Any) -> bytes:
    return json.dumps({"status": "success", "data": {"resultType": result_type, "result": result}}).encode()


@pytest.mark.parametrize(
    ("body", "value"),
    [
        (answer("vector", [{"metric": {}, "value": [1.0, "0.25"]}]), 0.25),
        (answer("vector", []), None),
        (answer("vector", [{"metric": {}, "value": [1.0, "NaN"]}]), None),
        (answer("vector", [{"metric": {}, "value": [1.0, "+Inf"]}]), None),
        (answer("scalar", [1.0, "3"]), 3.0),
    ],
)
def test_query_value_reads_one_number_or_none(body: bytes, value: float | None) -> None:
    assert query_value(200, body) == value


@pytest.mark.parametrize(
    ("status", "body", "text"),
    [
        (400, b'{"status":"error","errorType":"bad_data","error":"parse error at char 5"}', "bad_data: parse error"),
        (503, b"<html>down for maintenance</html>", "HTTP 503 that is not JSON"),
        (200, answer("matrix", []), "answered a matrix"),
        (
            200,
            answer("vector", [{"metric": {"a": "1"}, "value": [1, "1"]}, {"metric": {"a": "2"}, "value": [1, "2"]}]),
            "2 series where one was expected",
        ),
    ],
)
def test_query_value_refuses_what_is_not_one_number(status: int, body: bytes, text: str) -> None:
    with pytest.raises(PrometheusUnavailable, match=text):
        query_value(status, body)


# --- the load generator's own rules ---------------------------------------------------------------


@given(share=st.floats(0, 1), n=st.integers(1, 500))
def test_routing_never_gives_the_canary_more_than_its_share(share: float, n: int) -> None:
    canary = 0
    for sent in range(n):
        canary += route_to_canary(share, sent, canary)
        assert canary <= share * (sent + 1) + 1e-9
    assert canary >= math.floor(share * n) - 1


@given(p=st.floats(0, 1), impressions=st.integers(1, 50), n=st.integers(1, 200))
def test_click_sampler_keeps_the_click_rate_within_one_click(p: float, impressions: int, n: int) -> None:
    sampler = ClickSampler(p)
    clicks = [sampler.clicks(impressions) for _ in range(n)]
    assert all(0 <= c <= impressions for c in clicks)
    assert abs(sum(clicks) - p * impressions * n) < 1 + 1e-6


@pytest.mark.parametrize(
    ("status", "share"),
    [
        ({}, 0.0),
        ({"stable": {"rankerVersion": "r1"}}, 0.0),
        (
            {
                "stable": {"rankerVersion": "r1"},
                "canary": {"rankerVersion": "r2", "state": "Progressing", "trafficPercent": 30},
            },
            0.3,
        ),
        (
            {
                "stable": {"rankerVersion": "r1"},
                "canary": {"rankerVersion": "r2", "state": "AwaitingPromotion", "trafficPercent": 60},
            },
            0.6,
        ),
        (
            {
                "stable": {"rankerVersion": "r1"},
                "canary": {"rankerVersion": "r2", "state": "Promoted", "trafficPercent": 100},
            },
            1.0,
        ),
        (
            {
                "stable": {"rankerVersion": "r1"},
                "canary": {"rankerVersion": "r2", "state": "RolledBack", "trafficPercent": 0},
            },
            0.0,
        ),
        ({"stable": {"rankerVersion": "r2"}}, 1.0),
        (
            {
                "stable": {"rankerVersion": "r1"},
                "canary": {"rankerVersion": "r3", "state": "Progressing", "trafficPercent": 30},
            },
            0.0,
        ),
    ],
)
def test_the_router_gives_the_canary_what_status_says(status: dict[str, Any], share: float) -> None:
    assert canary_share(status, "r2") == share


def test_the_controller_stand_ins_report_ready_once_per_generation() -> None:
    deployment = {"metadata": {"generation": 3}, "spec": {"replicas": 2}, "status": {}}
    ready = ready_status("Deployment", deployment, "2026-12-01T00:00:00Z")
    assert ready == {
        "observedGeneration": 3,
        "replicas": 2,
        "updatedReplicas": 2,
        "readyReplicas": 2,
        "availableReplicas": 2,
    }
    assert ready_status("Deployment", {**deployment, "status": ready}, "2026-12-01T00:00:00Z") is None
    isvc = {"metadata": {"generation": 5}, "spec": {}, "status": {"observedGeneration": 4}}
    assert ready_status("InferenceService", isvc, "t")["conditions"][0]["type"] == "Ready"
    assert ready_status("InferenceService", {**isvc, "status": {"observedGeneration": 5}}, "t") is None
    assert ready_status("Job", {"metadata": {}, "spec": {"completions": 4}, "status": {}}, "t")["succeeded"] == 4


# --- against a real Prometheus scraping two real predictors ---------------------------------------

STABLE, CANARY = "r1", "r2"


def real_parts(test: Any) -> Any:
    for mark in (pytest.mark.redis, pytest.mark.prometheus, pytest.mark.slow):
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CanaryRig]:
    try:
        rig = CanaryRig(tmp_path_factory.mktemp("rig"), STABLE, CANARY)
    except servers.ServerUnavailable as exc:
        pytest.fail(f"real server unavailable: {exc}", pytrace=False)
    yield rig
    rig.stop()


@pytest.fixture
def prometheus(rig: CanaryRig, request: pytest.FixtureRequest) -> servers.Server:
    """The module's Prometheus, with every server's log attached to a failing test. Tests share
    it safely: each judges only the window of its own load, which starts after the previous
    test's load ended."""
    conftest = next(p for p in request.config.pluginmanager.get_plugins() if hasattr(p, "_attach"))
    for server in rig.servers():
        conftest._attach(request, server)
    return rig.prometheus


def load(rig: CanaryRig, canary_click: float = 0.1, rate: float = 30.0, share: float = 0.5) -> LoadGenerator:
    return rig.generator(rate=rate, canary_click=canary_click, share=share, concurrency=4, timeout=5.0)


def analyse_after(
    generator: LoadGenerator,
    prometheus: servers.Server,
    seconds: float,
    spec: api.AnalysisSpec,
    analyser: PrometheusAnalyser | None = None,
) -> tuple[Analysis, dict[str, Any]]:
    """Run the load for `seconds`, let Prometheus scrape the last of it, analyse that window."""
    with generator:
        tallies = generator.run(seconds)
    time.sleep(2.5)  # two scrapes: the last answers are in Prometheus
    analyser = analyser or PrometheusAnalyser()
    return analyser.analyse(prometheus.url, CANARY, STABLE, int(seconds) + 2, spec), tallies


# Thresholds far from both the healthy and the broken canary's numbers (the machine is shared):
# healthy p99 is tens of ms, the throttled one's hundreds; healthy CTR ratio 1, the low one 0.8.
TEST_SPEC = api.AnalysisSpec(max_error_rate=0.05, max_latency_p99_ms=250.0, min_click_rate_ratio=0.9, min_requests=40)


@real_parts
def test_a_healthy_canary_passes(rig: CanaryRig, prometheus: servers.Server) -> None:
    result, tallies = analyse_after(load(rig), prometheus, 6, TEST_SPEC)
    served = tallies[CANARY]
    assert served.ok >= 40 and served.server_errors == 0 and tallies[STABLE].ok >= 40
    assert result.verdict == "Passed", result.message
    assert result.error_rate == 0.0 and result.click_rate_ratio == pytest.approx(1.0, abs=0.05)
    assert abs(result.requests - served.ok) <= 0.25 * served.ok  # Prometheus' window vs the client's count
    assert 0 < result.latency_p99_ms <= TEST_SPEC.max_latency_p99_ms


@real_parts
def test_a_canary_answering_5xx_fails_on_its_error_rate(rig: CanaryRig, prometheus: servers.Server) -> None:
    """Its store stopped: every ranking request needs a vector read, so the canary answers 503."""
    rig.stop_canary_store()
    try:
        result, tallies = analyse_after(load(rig), prometheus, 6, TEST_SPEC)
    finally:
        rig.restart_canary_store()  # same append-only file: the space is back
    assert tallies[CANARY].server_errors >= 40 and tallies[CANARY].ok == 0 and tallies[STABLE].server_errors == 0
    assert result.verdict == "Failed" and "errorRate" in result.failed_checks, result.message
    assert result.error_rate == pytest.approx(1.0)
    assert "errorRate 1 > maxErrorRate 0.05" in result.message
    assert result.latency_p99_ms is not None  # the predictor times its error answers too
    rig.wait_canary_ready()


@real_parts
def test_a_slow_canary_fails_on_its_p99(rig: CanaryRig, prometheus: servers.Server) -> None:
    """Its store answers slowly: the canary's Redis runs 20 ms of every 600 ms (SIGSTOP/SIGCONT),
    and every ranking request waits for one store round trip: right answers, hundreds of ms late.
    (Starving the predictor itself would not do: its timer starts once it has read a request, and
    a request needs under a millisecond of CPU, so pauses fall between requests.)"""
    with Throttle(rig.stores[CANARY].process.pid, running=0.02, period=0.6):
        result, tallies = analyse_after(load(rig), prometheus, 8, TEST_SPEC)
    assert tallies[CANARY].ok >= 40 and tallies[CANARY].server_errors == 0
    assert result.verdict == "Failed" and result.failed_checks == ("latencyP99Ms",), result.message
    assert result.latency_p99_ms > TEST_SPEC.max_latency_p99_ms


@real_parts
def test_a_canary_with_a_20_percent_lower_click_rate_fails_on_the_ratio(
    rig: CanaryRig, prometheus: servers.Server
) -> None:
    result, tallies = analyse_after(load(rig, canary_click=0.08), prometheus, 6, TEST_SPEC)
    assert tallies[CANARY].click_rate == pytest.approx(0.08, abs=0.005)
    assert tallies[STABLE].click_rate == pytest.approx(0.1, abs=0.005)
    assert result.verdict == "Failed" and result.failed_checks == ("clickRateRatio",), result.message
    assert result.click_rate_ratio == pytest.approx(0.8, abs=0.04)


@real_parts
def test_too_few_canary_requests_wait_and_ask_nothing_more(rig: CanaryRig, prometheus: servers.Server) -> None:
    analyser = PrometheusAnalyser()
    result, tallies = analyse_after(load(rig, share=0.05), prometheus, 4, TEST_SPEC, analyser)
    assert 0 < tallies[CANARY].sent < TEST_SPEC.min_requests
    assert result.verdict == "Inconclusive" and "fewer than minRequests 40" in result.message
    assert analyser.queries_sent == 1  # the request count only


@real_parts
def test_a_full_analysis_sends_five_queries_and_one_less_with_the_click_check_off(
    rig: CanaryRig, prometheus: servers.Server
) -> None:
    analyser = PrometheusAnalyser()
    analyse_after(load(rig), prometheus, 4, TEST_SPEC.model_copy(update={"min_requests": 1}), analyser)
    assert analyser.queries_sent == 5
    analyser.analyse(
        prometheus.url, CANARY, STABLE, 6, TEST_SPEC.model_copy(update={"min_requests": 1, "min_click_rate_ratio": 0.0})
    )
    assert analyser.queries_sent == 9


@real_parts
def test_a_scope_reads_only_the_series_with_its_labels(rig: CanaryRig, prometheus: servers.Server) -> None:
    """`job` is a target label Prometheus gives every series it scrapes here."""
    spec = TEST_SPEC.model_copy(update={"min_requests": 1})
    analyser = PrometheusAnalyser()
    ours, _ = analyse_after(load(rig), prometheus, 4, spec, analyser)
    assert ours.verdict == "Passed", ours.message
    scoped = analyser.analyse(prometheus.url, CANARY, STABLE, 6, spec, scope={"job": "mmrank"})
    assert scoped.verdict == "Passed" and scoped.requests == pytest.approx(ours.requests, rel=0.25)
    other = analyser.analyse(prometheus.url, CANARY, STABLE, 6, spec, scope={"job": "another-ranker"})
    assert other.verdict == "Inconclusive" and other.requests == 0


@real_parts
def test_prometheus_down_is_inconclusive_with_the_reason(rig: CanaryRig, start_prometheus: Any) -> None:
    own = start_prometheus([f"127.0.0.1:{rig.canary.port}"])
    url = own.url
    own.stop()
    started = time.monotonic()
    result = PrometheusAnalyser(timeout_seconds=2.0).analyse(url, CANARY, STABLE, 30, TEST_SPEC)
    assert result.verdict == "Inconclusive" and result.failed_checks == ()
    assert f"Prometheus at {url} unreachable: ConnectError" in result.message
    assert time.monotonic() - started < 5


@real_parts
def test_real_prometheus_errors_and_escaped_labels(prometheus: servers.Server) -> None:
    analyser = PrometheusAnalyser()
    with pytest.raises(PrometheusUnavailable, match="bad_data"):
        analyser.query(prometheus.url, "sum(")
    for promql in queries('we"ird\\variant\n', 'st\\"able', 30).values():  # parses, and matches nothing
        assert analyser.query(prometheus.url, promql) is None


def test_the_operator_analyses_a_canary_on_its_own_rankers_series_only() -> None:
    """Version names are the owner's choice: without the ranker's namespace and name in every
    query, ranker `shop` in another namespace serving an `r2` of its own would count in this
    canary's analysis (a neighbour could fail it, or pass it)."""
    from mmrank.operator import children as build
    from mmrank.operator import core, reconcile

    ranker = api.MultimodalRanker.model_validate(
        {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": "shop", "namespace": "ads"},
            "spec": {
                "encoder": {"version": "e1", "modelUri": "s3://models/encoder/e1"},
                "ranker": {"version": "r2", "modelUri": "s3://models/ranker/r2", "encoderVersion": "e1"},
                "embeddings": {"store": {"url": "redis://redis:6379/0"}},
                "rollout": {"steps": [50], "interval": "30s"},
            },
        }
    )
    status = {
        "stable": {"rankerVersion": "r1", "encoderVersion": "e1"},
        "canary": {
            "rankerVersion": "r2",
            "encoderVersion": "e1",
            "identity": build.ranker_identity(ranker.spec.ranker),
            "state": "Progressing",
            "trafficPercent": 50,
            "stepStartedAt": "2026-12-01T10:00:00Z",
        },
    }
    asked: list[dict[str, Any]] = []

    class Recording:
        def analyse(self, *args: Any, **kwargs: Any) -> Analysis:
            asked.append({"args": args, **kwargs})
            return Analysis("Inconclusive", message="recorded")

    observed = core.Observed(now="2026-12-01T10:00:31Z", status=status)
    after = reconcile.analyse_if_due(Recording(), ranker, observed)
    assert after.analysis is not None and len(asked) == 1
    assert asked[0]["args"][1:3] == ("r2", "r1")
    assert asked[0]["scope"] == {"namespace": "ads", "mmrank_io_ranker": "shop"}
    scoped = queries("r2", "r1", 30, asked[0]["scope"])
    assert all('namespace="ads"' in q and 'mmrank_io_ranker="shop"' in q for q in scoped.values())
