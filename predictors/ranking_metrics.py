"""The ranking service's Prometheus series, in the default registry: KServe's `/metrics` serves
them beside its own. `variant` is the ranker version, the label a canary analysis compares
(operator/analysis.py reads `mmrank_requests_total`, `mmrank_request_duration_seconds`,
`mmrank_clicks_total` and `mmrank_impressions_total`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Per answer (the REST guard and the gRPC servicer, through `record`).
LATENCY = Histogram(
    "mmrank_request_duration_seconds",
    "Ranking request latency, body read to answer, errors included",
    ["variant", "protocol"],
    buckets=(0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5),
)
REQUESTS = Counter(
    "mmrank_requests",
    "Ranking requests answered, by HTTP status (gRPC: its HTTP equivalent)",
    ["variant", "protocol", "code"],
)
ERRORS = Counter("mmrank_request_errors", "Ranking requests answered with an error", ["variant", "reason"])
INFLIGHT = Gauge("mmrank_inflight_requests", "Ranking requests in flight (REST and gRPC)", ["variant"])

# Per ranking (the model).
STORE_READ = Histogram(
    "mmrank_store_read_duration_seconds",
    "Embedding store read per ranking",
    ["variant", "space"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1),
)
CANDIDATES = Histogram(
    "mmrank_candidates_per_request",
    "Candidates scored per ranking",
    ["variant"],
    buckets=(1, 5, 10, 25, 50, 100, 200, 300, 500, 1000),
)
MISSES = Counter(
    "mmrank_embedding_miss", "Items scored without an embedding (neutral features)", ["variant", "space", "role"]
)
CACHED_ROWS = Counter(
    "mmrank_item_cache_rows",
    "Item vectors a ranking needed, served from the process's cache (hit) or read from the store (miss)",
    ["variant", "space", "result"],
)

# Readiness (the model's re-check).
READY = Gauge("mmrank_ready", "1 while the ranker may serve: space reachable and covered", ["variant", "space"])
COVERAGE = Gauge("mmrank_space_coverage", "Coverage of the ranker's space as last read", ["variant", "space"])

# Feedback (predictors/feedback.py).
IMPRESSIONS = Counter("mmrank_impressions", "Impressions reported by request id", ["variant"])
CLICKS = Counter("mmrank_clicks", "Clicks reported by request id", ["variant"])


def error_reason(status: int, noted: str | None) -> str:
    """The `reason` label of an error answer: what the model noted, else what the status says."""
    if noted:
        return noted
    if status == 413:
        return "body_too_large"
    if status == 408:
        return "body_timeout"
    if status == 422:
        return "invalid_v2_body"
    if status == 404:
        return "model_not_found"
    if status == 503:
        return "not_ready"
    if 400 <= status < 500:
        return "invalid_request"
    return "internal"


def record(variant: str, protocol: str, status: int, reason: str | None, seconds: float) -> None:
    """Every answered ranking, errors included: what the canary analysis reads."""
    REQUESTS.labels(variant, protocol, str(status)).inc()
    LATENCY.labels(variant, protocol).observe(seconds)
    if status >= 400:
        ERRORS.labels(variant, error_reason(status, reason)).inc()
