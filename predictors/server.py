"""The ranking service: a KServe model that scores one user's candidates from the embedding store.

`RankerModel` is what KServe sees (load, preprocess, predict, postprocess). Per ranking it reads
the store once or twice (predictors/item_cache.py: the user's history and the space's version log
in one MULTI, then HMGET of the vectors the process does not hold yet), runs SimTier and MAKE
inside one forward pass of the ranker, and answers one score per candidate. An item the store has
no vector for (new, not embedded yet) is scored with neutral features and counted in
`mmrank_embedding_miss_total`, never a 500.

Readiness is the embedding-sync invariant: the model reports ready only while the space its
ranker was trained on is reachable and covers at least `min_coverage` of the catalogue. A
background thread re-checks it, logs every change, and the model-ready routes say why.

`serve()` runs KServe's ModelServer, REST and gRPC (`GRPCInferenceService`, KServe's servicer),
on `--host`. The ranking routes (`POST /v1/models/<m>:predict`, `POST /v2/models/<m>/infer`) are
answered by an ASGI layer in front of KServe's FastAPI app (`Guard`) that reads the body under a
size limit and a deadline *before* taking one of `max_concurrency` slots (503 at once when none is
free), decodes it (predictors/protocol.py: every malformed body a 4xx naming the field), calls the
model's hooks and writes the answer; the gRPC servicer takes the same slots. Every answer, errors
included, is counted in `mmrank_requests_total{variant,protocol,code}` and observed in
`mmrank_request_duration_seconds{variant,protocol}`. Beside these, KServe's own routes: `POST
/v1/feedback` (impressions and clicks by request id) and the model-ready routes with the reason.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import JSONResponse
from kserve import Model
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
from kserve.protocol.infer_type import InferRequest
from prometheus_client import Counter, Gauge, Histogram

from mmrank.predictors.item_cache import ItemVectorCache
from mmrank.predictors.protocol import (
    HEADER_LENGTH,
    RankingCall,
    Scored,
    decode_v1,
    decode_v2,
    encode_v1,
    encode_v2,
    v1_answer,
    v2_answer,
)
from mmrank.predictors.requests import (
    UNKNOWN,
    BadRequest,
    Limits,
    Ranking,
    new_request_id,
    parse_feedback,
    parse_v1_body,
    parse_v2,
    v2_metadata,
    v2_tensor,
)
from mmrank.store import DEFAULT_SCOPE, Scope

log = logging.getLogger("mmrank.predictor")

# Feedback travels on the ranker's own stream, `Scope.feedback_stream` (mmrank:{<namespace>/<name>}:feedback);
# this is the local default scope's.
FEEDBACK_STREAM = DEFAULT_SCOPE.feedback_stream

# --- metrics (the default registry: KServe's /metrics serves it beside its own) ---------------

LATENCY = Histogram("mmrank_request_duration_seconds", "Ranking request latency, body read to answer, "
                    "errors included", ["variant", "protocol"],
                    buckets=(0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5))
REQUESTS = Counter("mmrank_requests", "Ranking requests answered, by HTTP status (gRPC: its HTTP equivalent)",
                   ["variant", "protocol", "code"])
ERRORS = Counter("mmrank_request_errors", "Ranking requests answered with an error", ["variant", "reason"])
STORE_READ = Histogram("mmrank_store_read_duration_seconds", "Embedding store read per ranking",
                       ["variant", "space"],
                       buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1))
CANDIDATES = Histogram("mmrank_candidates_per_request", "Candidates scored per ranking", ["variant"],
                       buckets=(1, 5, 10, 25, 50, 100, 200, 300, 500, 1000))
MISSES = Counter("mmrank_embedding_miss", "Items scored without an embedding (neutral features)",
                 ["variant", "space", "role"])
CACHED_ROWS = Counter("mmrank_item_cache_rows", "Item vectors a ranking needed, served from the process's "
                      "cache (hit) or read from the store (miss)", ["variant", "space", "result"])
IMPRESSIONS = Counter("mmrank_impressions", "Impressions reported by request id", ["variant"])
CLICKS = Counter("mmrank_clicks", "Clicks reported by request id", ["variant"])
READY = Gauge("mmrank_ready", "1 while the ranker may serve: space reachable and covered", ["variant", "space"])
COVERAGE = Gauge("mmrank_space_coverage", "Coverage of the ranker's space as last read", ["variant", "space"])
INFLIGHT = Gauge("mmrank_inflight_requests", "Ranking requests in flight (REST and gRPC)", ["variant"])


# --- pure decisions -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str
    coverage: float | None = None


def readiness(space: str, dim: int, min_coverage: float, info: Any | None, error: str | None,
              expected_space: str | None = None) -> Readiness:
    """May the ranker trained on `space` serve? `info` is the store's SpaceInfo, `error` why it
    could not be read. Never ready when deployed for another space, on a space of another width,
    or below the minimum coverage."""
    if expected_space and expected_space != space:
        return Readiness(False, f"deployed for space {expected_space}, but the ranker was trained on space {space}")
    if error is not None:
        return Readiness(False, error)
    if info.dim != dim:
        return Readiness(False, f"space {space} has dim {info.dim}, the ranker was trained on {dim}", info.coverage)
    if info.coverage < min_coverage:
        return Readiness(False, f"space {space} coverage {info.coverage:.4f} is below the minimum "
                         f"{min_coverage:.4f} ({info.items} of {info.catalogue_size} items)", info.coverage)
    return Readiness(True, f"space {space} coverage {info.coverage:.4f} >= {min_coverage:.4f}", info.coverage)


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


def fill_features(ids: np.ndarray, given: np.ndarray, table: np.ndarray, column: int) -> np.ndarray:
    """Category or brand per item: what the request gave, else the artifact's table, else -1."""
    known = (ids >= 0) & (ids < len(table))
    looked_up = np.full(len(ids), UNKNOWN, dtype=np.int64)
    if len(table):
        looked_up[known] = table[ids[known], column]
    return np.where(given >= 0, given, looked_up)


def newest(history: np.ndarray, length: int) -> np.ndarray:
    """The last `length` behaviours (the window the ranker was trained on); oldest first."""
    return history[-length:] if length > 0 else history[:0]


def with_password(url: str, password: str | None) -> str:
    """The store URL with the password from its Secret, unless the URL carries one already."""
    import urllib.parse

    parsed = urllib.parse.urlsplit(url)
    if not password or parsed.scheme not in ("redis", "rediss") or parsed.password:
        return url
    user = urllib.parse.quote(parsed.username or "", safe="")
    netloc = f"{user}:{urllib.parse.quote(password, safe='')}@{parsed.hostname}" + \
        (f":{parsed.port}" if parsed.port else "")
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc))


def redact(url: str) -> str:
    import urllib.parse

    parsed = urllib.parse.urlsplit(url)
    if not parsed.password:
        return url
    return urllib.parse.urlunsplit(parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@")))


def ranking_route(path: str, method: str) -> tuple[str, str] | None:
    """(protocol, model name) of a ranking call, or None for every other route."""
    if method != "POST":
        return None
    if path.startswith("/v1/models/") and path.endswith(":predict"):
        return "v1", path[len("/v1/models/"):-len(":predict")]
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        name = path[len("/v2/models/"):-len("/infer")]
        return "v2", name.split("/versions/")[0]
    return None


def route_of(path: str, method: str) -> str | None:
    """Which guarded route a request is for: 'v1', 'v2', 'feedback' or None (not guarded)."""
    if path == "/v1/feedback" and method == "POST":
        return "feedback"
    route = ranking_route(path, method)
    return route[0] if route else None


def classify(exc: BaseException) -> tuple[int, str, str]:
    """(HTTP status, reason label, message) of an exception met while answering a ranking."""
    if isinstance(exc, BadRequest):
        return exc.status, exc.reason, str(exc)
    if isinstance(exc, InvalidInput):
        return 400, "invalid_request", str(exc)
    if isinstance(exc, ModelNotFound):
        return 404, "model_not_found", str(exc)
    if isinstance(exc, StoreUnavailable):
        return 503, "store_unavailable", str(exc)
    if isinstance(exc, ModelNotReady):
        return 503, "not_ready", str(exc)
    return 500, "internal", f"internal error: {type(exc).__name__}: {exc}"


GRPC_CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED", 409: "FAILED_PRECONDITION",
              413: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE", 500: "INTERNAL"}


def grpc_code(status: int) -> str:
    """The gRPC status name for an HTTP status this service answers."""
    return GRPC_CODES.get(status, "INVALID_ARGUMENT" if 400 <= status < 500 else "INTERNAL")


def record(variant: str, protocol: str, status: int, reason: str | None, seconds: float) -> None:
    """Every answered ranking, errors included: what the canary analysis reads."""
    REQUESTS.labels(variant, protocol, str(status)).inc()
    LATENCY.labels(variant, protocol).observe(seconds)
    if status >= 400:
        ERRORS.labels(variant, error_reason(status, reason)).inc()


# --- the model ----------------------------------------------------------------------------------

class RankerModel(Model):
    """A ranker artifact served against the embedding store; knows nothing about HTTP."""

    def __init__(self, name: str, model_dir: str | Path, store_url: str, limits: Limits = Limits(),  # noqa: B008 (frozen dataclass: one shared default is safe)
                 min_coverage: float = 0.99, recheck_seconds: float = 5.0, feedback_stream: bool = True,
                 expected_space: str | None = None, version: str | None = None,
                 history_length: int | None = None, item_cache_size: int = 200_000,
                 scope: Scope = DEFAULT_SCOPE) -> None:
        super().__init__(name)
        self.model_dir = Path(model_dir)
        self.store_url = store_url
        self.scope = scope  # the ranker whose keys and feedback stream these are
        self.expected_space = expected_space or None
        self.version_override = version or None
        self.history_length = history_length
        self.limits = limits
        self.min_coverage = min_coverage
        self.recheck_seconds = recheck_seconds
        self.feedback_stream = feedback_stream
        self.item_cache = ItemVectorCache(item_cache_size) if item_cache_size > 0 else None
        self.state = Readiness(False, "not loaded")
        self._stop = threading.Event()
        self.ranker: Any = None
        self.meta: dict[str, Any] = {}
        self.store: Any = None
        self.features = np.zeros((0, 2), np.int64)

    # identity of what is served
    @property
    def version(self) -> str:
        """The variant label: the operator's name for this ranker when given, else ranker.json's."""
        return self.version_override or str(self.meta.get("version", ""))

    @property
    def window(self) -> int:
        """Newest behaviours read per user: `--history-length`, else what the ranker trained on."""
        return int(self.history_length or self.meta.get("history_length", self.limits.max_history))

    @property
    def space(self) -> str:
        return str(self.meta.get("encoder_version", ""))

    @property
    def serving(self) -> bool:
        return self.ready and self.state.ready

    def load(self) -> bool:
        """Load the artifact (idempotent: KServe calls it again when a model is not ready)."""
        if self.ranker is not None:
            return self.ready
        import redis.utils

        from mmrank.predictors.artifact import load_ranker
        from mmrank.store import RedisStore, open_store

        self.ranker, self.meta = load_ranker(self.model_dir)
        self.features = self.ranker.item_features.numpy()
        self.store = open_store(self.store_url, self.scope)
        if not isinstance(self.store, RedisStore) or not hasattr(self.store, "changes_key"):
            self.item_cache = None  # the embedded store is a local memory map; no version log: no cache
        log.info("loaded ranker %s (artifact %s, %s) from %s, trained on space %s; history window %d; store %s "
                 "%s (reply parser: %s; item vector cache: %s)", self.version, self.meta.get("version"),
                 self.meta.get("variant"), self.model_dir, self.space, self.window, redact(self.store_url), self.store.scope,
                 "hiredis" if redis.utils.HIREDIS_AVAILABLE else "python",
                 f"{self.item_cache.capacity} items" if self.item_cache else "off")
        self.check()
        threading.Thread(target=self._recheck_loop, name="mmrank-readiness", daemon=True).start()
        if self.feedback_stream and hasattr(self.store, "client"):
            threading.Thread(target=self._feedback_loop, name="mmrank-feedback", daemon=True).start()
        self.ready = True
        return self.ready

    def stop(self) -> None:
        self._stop.set()
        super().stop()

    async def healthy(self) -> bool:
        return self.serving

    def get_input_types(self) -> list[dict[str, Any]]:
        return v2_metadata()[0]

    def get_output_types(self) -> list[dict[str, Any]]:
        return v2_metadata()[1]

    # readiness ------------------------------------------------------------------------------
    def check(self) -> Readiness:
        from mmrank.store import SpaceNotFound

        info, error = None, None
        try:
            info = self.store.space_info(self.space)
        except SpaceNotFound:
            error = f"space {self.space} is not in the store"
        except Exception as exc:  # noqa: BLE001 - any failure to read means 'unreachable'
            error = f"store unreachable: {type(exc).__name__}: {exc}"
        self._set_state(readiness(self.space, int(self.meta["dim"]), self.min_coverage, info, error,
                                  self.expected_space))
        return self.state

    def _set_state(self, state: Readiness) -> None:
        previous, self.state = self.state, state
        READY.labels(self.version, self.space).set(1.0 if state.ready else 0.0)
        if state.coverage is not None:
            COVERAGE.labels(self.version, self.space).set(state.coverage)
        if previous.ready != state.ready or (not state.ready and previous.reason != state.reason):
            (log.info if state.ready else log.warning)(
                "ranker %s %s: %s", self.version, "ready" if state.ready else "NOT ready", state.reason)

    def _recheck_loop(self) -> None:
        while not self._stop.wait(self.recheck_seconds):
            self.check()

    def status(self) -> dict[str, Any]:
        import redis.utils

        cache = self.item_cache
        return {"name": self.name, "ready": self.serving, "reason": self.state.reason,
                "ranker_version": self.version, "variant": self.meta.get("variant"), "space": self.space,
                "coverage": self.state.coverage, "min_coverage": self.min_coverage,
                "redis_parser": "hiredis" if redis.utils.HIREDIS_AVAILABLE else "python",
                "item_cache": dataclasses.asdict(cache.stats) | {"capacity": cache.capacity} if cache else None}

    # KServe hooks -----------------------------------------------------------------------------
    def validate(self, payload: Any) -> Any:
        return payload  # `preprocess` has validated it already, per protocol

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> RankingCall:
        """A `RankingCall` from the REST layer as it is; gRPC's `InferRequest` and a v1 dict
        (KServe's own route) parsed here."""
        if isinstance(payload, RankingCall):
            return payload
        if not self.serving:
            raise ModelNotReady(self.name, self.state.reason)
        if isinstance(payload, InferRequest):
            tensors: dict[str, np.ndarray] = {}
            for tensor in payload.inputs:
                if tensor.name in tensors:
                    raise BadRequest(f"inputs.{tensor.name}", "given more than once")
                tensors[tensor.name] = v2_tensor(tensor.name, tensor.datatype, tensor.shape, tensor.as_numpy)
            return RankingCall("grpc", [parse_v2(tensors, self.limits)], caller_id=payload.id or None,
                               binary_output=payload.use_binary_outputs)
        if isinstance(payload, bytes | bytearray | str):
            payload = _json_body(payload)
        rankings, instances = parse_v1_body(payload, self.limits)
        return RankingCall("v1", rankings, instances=instances, encode=False)

    async def predict(self, payload: RankingCall, headers: dict[str, str] | None = None) -> tuple[RankingCall, list[Scored]]:
        try:
            scored = await asyncio.to_thread(self.rank_all, payload.rankings)
        except StoreUnavailable as exc:
            self._set_state(Readiness(False, str(exc)))
            raise
        return payload, scored

    async def postprocess(self, result: tuple[RankingCall, list[Scored]], headers: dict[str, str] | None = None) -> Any:
        """gRPC: KServe's `InferResponse`; REST: the encoded answer (`RestAnswer`)."""
        call, scored = result
        if call.protocol == "grpc":
            return v2_answer(call, scored[0], self.name, self.version, self.space)
        if call.protocol == "v2":
            return RestAnswer(*encode_v2(call, scored[0], self.name, self.version, self.space))
        answer = v1_answer(call, scored, self.version, self.space)
        return RestAnswer(*encode_v1(answer)) if call.encode else answer

    # the work of one call (runs in a worker thread) ------------------------------------------
    def rank_all(self, rankings: list[Ranking]) -> list[Scored]:
        return [self.rank(ranking) for ranking in rankings]

    def rank(self, ranking: Ranking) -> Scored:
        import torch

        space, variant, window = self.space, self.version, self.window
        started = time.perf_counter()
        try:
            history, vectors, found = self._read(ranking, space, window)
        except Exception as exc:  # noqa: BLE001 - the store's client raises its own errors
            raise StoreUnavailable(f"store read failed: {type(exc).__name__}: {exc}") from exc
        STORE_READ.labels(variant, space).observe(time.perf_counter() - started)
        n_hist = len(history)
        hist_found, cand_found = found[:n_hist], found[n_hist:]
        cand_misses, hist_misses = int((~cand_found).sum()), int((~hist_found).sum())
        if cand_misses:
            MISSES.labels(variant, space, "candidate").inc(cand_misses)
        if hist_misses:
            MISSES.labels(variant, space, "history").inc(hist_misses)
        CANDIDATES.labels(variant).observe(len(ranking.cand_ids))
        t = torch.from_numpy
        hist_category = fill_features(history, np.full(n_hist, UNKNOWN), self.features, 0)
        hist_brand = fill_features(history, np.full(n_hist, UNKNOWN), self.features, 1)
        logits = self.ranker.score_candidates(
            ranking.user_id, t(history), torch.ones(n_hist, dtype=torch.bool), t(vectors[:n_hist]),
            t(hist_found), t(ranking.cand_ids), t(vectors[n_hist:]), t(cand_found),
            cand_category=t(fill_features(ranking.cand_ids, ranking.cand_category, self.features, 0)),
            cand_brand=t(fill_features(ranking.cand_ids, ranking.cand_brand, self.features, 1)),
            history_category=t(hist_category), history_brand=t(hist_brand))
        scores = torch.sigmoid(logits).numpy().astype(np.float32, copy=False)
        return Scored(new_request_id(variant), scores, cand_misses, hist_misses, n_hist)

    def _read(self, ranking: Ranking, space: str, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(history ids, vectors of history then candidates, found): through the item vector
        cache when the store is Redis (one MULTI for history and version log, then only the
        vectors the cache lacks), else history and vectors straight from the store."""
        cache = self.item_cache
        if cache is None:
            history = ranking.history if ranking.history is not None \
                else self.store.get_history(ranking.user_id, window)
            history = newest(np.asarray(history, dtype=np.int64), window)
            vectors, found = self.store.get(space, np.concatenate([history, ranking.cand_ids]))
            return history, vectors, found
        stored_history, version_log = cache.sync(self.store, space, None if ranking.history is not None
                                                 else ranking.user_id, window)
        history = newest(ranking.history if ranking.history is not None else stored_history, window)
        ids = np.concatenate([history, ranking.cand_ids])
        vectors, found, hits = cache.vectors(self.store, space, int(self.meta["dim"]), version_log, ids)
        misses = len(ids) - hits
        if hits > 0:
            CACHED_ROWS.labels(self.version, space, "hit").inc(hits)
        if misses > 0:
            CACHED_ROWS.labels(self.version, space, "miss").inc(misses)
        return history, vectors, found

    # click feedback ---------------------------------------------------------------------------
    def record_feedback(self, body: Any, lax: bool = False) -> dict[str, Any]:
        """Count it when this variant served the request, else pass it on through the stream,
        where the serving variant's consumer group counts it (canary and stable share a route)."""
        feedback, variant = parse_feedback(body, lax=lax)
        if variant == self.version:
            IMPRESSIONS.labels(variant).inc(feedback.impressions)
            CLICKS.labels(variant).inc(feedback.clicks)
            return {"counted": True, "variant": variant}
        client = getattr(self.store, "client", None)
        if lax:
            return {"counted": False, "variant": variant}  # the serving variant's consumers count it
        if client is None:
            raise BadRequest("request_id", f"served by variant {variant}, this is {self.version}, and the "
                             "embedded store has no feedback stream to pass it on", status=409, reason="other_variant")
        stream = self.store.scope.feedback_stream
        client.xadd(stream, {"request_id": feedback.request_id, "impressions": feedback.impressions,
                             "clicks": feedback.clicks}, maxlen=1_000_000, approximate=True)
        return {"counted": False, "relayed": stream, "variant": variant}

    def _feedback_loop(self) -> None:
        """One consumer group per variant, so every variant sees every entry and counts its own;
        the stream is the ranker's own (its scope), so another ranker's variants never count it."""
        client, group = self.store.client, f"feedback-{self.version}"
        stream = self.store.scope.feedback_stream
        consumer = f"{os.uname().nodename}-{os.getpid()}"
        last_error = ""
        while not self._stop.is_set():
            try:
                try:
                    client.xgroup_create(stream, group, id="$", mkstream=True)
                except Exception as exc:  # noqa: BLE001 - BUSYGROUP: it exists already
                    if "BUSYGROUP" not in str(exc):
                        raise
                while not self._stop.is_set():
                    batches = client.xreadgroup(group, consumer, {stream: ">"}, count=500, block=1000)
                    for _, entries in batches or []:
                        for entry_id, fields in entries:
                            self._count_stream_entry(fields)
                            client.xack(stream, group, entry_id)
            except Exception as exc:  # noqa: BLE001 - keep consuming once the store is back
                error = f"{type(exc).__name__}: {exc}"
                if error != last_error:
                    log.warning("feedback stream %s: %s (retrying every %.1f s)", stream, error,
                                self.recheck_seconds)
                last_error = error
                self._stop.wait(self.recheck_seconds)

    def _count_stream_entry(self, fields: dict[bytes, bytes]) -> None:
        body = {k.decode(): v.decode() for k, v in fields.items()}
        try:
            self.record_feedback(body, lax=True)
        except BadRequest as exc:
            log.warning("feedback stream entry dropped: %s", exc)


@dataclasses.dataclass(frozen=True)
class RestAnswer:
    body: bytes
    headers: list[tuple[bytes, bytes]]


def _json_body(payload: Any) -> Any:
    """KServe hands the v1 body over undecoded when the content type is not JSON: decode it."""
    if isinstance(payload, bytes | bytearray | str):
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise BadRequest("body", f"not valid JSON: {exc}") from None
    return payload


class StoreUnavailable(ModelNotReady):
    """The store did not answer a ranking's read: the answer is 503, and the model not ready."""

    def __init__(self, reason: str) -> None:
        super().__init__("ranker", reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


# --- REST: an ASGI layer in front of KServe's own FastAPI app ------------------------------------

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Admission:
    """The `max_concurrency` slots that REST and gRPC rankings share. Both servers run on one
    event loop, so a plain counter is enough. A ranking takes a slot only once its body is in:
    a slow or idle upload holds a connection, never capacity."""

    def __init__(self, model: RankerModel) -> None:
        self.model = model
        self.inflight = 0

    def enter(self) -> bool:
        if self.inflight >= self.model.limits.max_concurrency:
            return False
        self._step(+1)
        return True

    def leave(self) -> None:
        self._step(-1)

    def refusal(self) -> str:
        return (f"overloaded: {self.inflight} requests in flight, at most {self.model.limits.max_concurrency}; "
                "retry later")

    def _step(self, step: int) -> None:
        self.inflight += step
        INFLIGHT.labels(self.model.version).set(self.inflight)


class Guard:
    """Answers the ranking routes itself (body limit and deadline, slots, decoding, the model's
    hooks, metrics for every answer); every other route goes on to KServe's app, the feedback
    route after the same body limit and deadline."""

    def __init__(self, app: Any, model: RankerModel, admission: Admission) -> None:
        self.app = app
        self.model = model
        self.admission = admission

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        path, method = scope.get("path", ""), scope.get("method", "")
        route = ranking_route(path, method) if scope["type"] == "http" else None
        if route is None:
            if scope["type"] == "http" and route_of(path, method) == "feedback":
                await self._feedback(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        answered: list[int] = []

        async def tracked(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answered.append(int(message["status"]))
            await send(message)

        status: int | None
        reason: str | None = None
        try:
            status, reason = await self._ranking(scope, receive, tracked, *route)
        except Exception as exc:  # noqa: BLE001 - a bug of ours: answered 500, counted, logged once
            status, reason, message = classify(exc)
            log.error("%s %s: %s", method, path, message, exc_info=exc)
            if not answered:
                await _json(tracked, status, {"error": message})
        if status is not None:
            record(self.model.version, route[0], status, reason, time.perf_counter() - started)

    async def _ranking(self, scope: MutableMapping[str, Any], receive: Receive, send: Send, protocol: str,
                       name: str) -> tuple[int | None, str | None]:
        """(status, reason) of the answer sent; (None, None) when the client left first."""
        model, limits = self.model, self.model.limits
        body, refused = await read_body(scope, receive, limits)
        if refused:
            await _json(send, refused[0], {"error": refused[1]}, close=True)
            return refused[0], None
        if body is None:
            return None, None
        if not self.admission.enter():
            await _json(send, 503, {"error": self.admission.refusal()}, {"retry-after": "1"})
            return 503, "overloaded"
        try:
            if name != model.name:
                raise ModelNotFound(name)
            if not model.serving:
                raise ModelNotReady(name, model.state.reason)
            call = decode_v1(body, limits) if protocol == "v1" else \
                decode_v2(body, header(scope, HEADER_LENGTH), limits)
            answer, _ = await model(call)
        except Exception as exc:  # noqa: BLE001 - each kind has its status (classify)
            status, reason, message = classify(exc)
            if status >= 500 and reason == "internal":
                log.error("%s: %s", scope.get("path"), message, exc_info=exc)
            await _json(send, status, {"error": message}, {"retry-after": "1"} if status == 503 else None)
            return status, reason
        finally:
            self.admission.leave()
        headers = [*answer.headers, (b"content-length", str(len(answer.body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})
        return 200, None

    async def _feedback(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        body, refused = await read_body(scope, receive, self.model.limits)
        if refused:
            await _json(send, refused[0], {"error": refused[1]}, close=True)
        elif body is not None:
            await self.app(scope, _replay(body, receive), send)


def header(scope: MutableMapping[str, Any], name: str) -> str | None:
    wanted = name.encode()
    for key, value in scope.get("headers", []):
        if key == wanted:
            return value.decode("latin-1")
    return None


async def read_body(scope: MutableMapping[str, Any], receive: Receive,
                    limits: Limits) -> tuple[bytes | None, tuple[int, str] | None]:
    """(body, None), or (None, (status, message)) when refused: 413 beyond `max_body_bytes`
    (before reading when Content-Length says so), 408 when it is not all in within
    `body_timeout_seconds`; (None, None) when the client disconnected."""
    too_large = (413, f"body: larger than {limits.max_body_bytes} bytes")
    length = header(scope, "content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
        return None, too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(limits.body_timeout_seconds):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None, None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limits.max_body_bytes:
                    return None, too_large
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        return None, (408, f"body: {size} bytes received, the rest not within {limits.body_timeout_seconds:g} s")
    return b"".join(chunks), None


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read by the guard, then the client's own channel (for its disconnect)."""
    sent = False

    async def replay() -> MutableMapping[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _json(send: Send, status: int, content: dict[str, Any], headers: dict[str, str] | None = None,
                close: bool = False) -> None:
    """A JSON answer; `close` ends the connection (the rest of an unread body must not be taken
    for the next request)."""
    body = orjson.dumps(content)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def add_routes(app: Any, model: RankerModel) -> None:
    """Registered before KServe's own routes, so the model-ready routes here (same paths, same
    answers, plus the reason when not ready) take precedence."""
    async def v1_model_ready(model_name: str) -> JSONResponse:
        return _ready_answer(model, model_name, {"name": model_name, "ready": True})

    async def v2_model_ready(model_name: str) -> JSONResponse:
        return _ready_answer(model, model_name, {"name": model_name, "ready": True})

    async def model_status(model_name: str) -> JSONResponse:
        if model_name != model.name:
            return JSONResponse({"error": f"Model with name {model_name} does not exist."}, status_code=404)
        return JSONResponse(model.status())

    async def feedback(request: Request) -> JSONResponse:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return JSONResponse({"error": f"body: not JSON: {exc}"}, status_code=400)
        try:
            answer = await asyncio.to_thread(model.record_feedback, body)
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        except Exception as exc:  # noqa: BLE001 - the stream is in the store; it may be down
            return JSONResponse({"error": f"feedback stream unavailable: {type(exc).__name__}: {exc}"},
                                status_code=503, headers={"retry-after": "1"})
        return JSONResponse(answer, status_code=200 if answer["counted"] else 202)

    async def server_ready() -> JSONResponse:
        """One model per server: the server is ready when the ranker is (Kubernetes probes this)."""
        if model.serving:
            return JSONResponse({"ready": True})
        return JSONResponse({"error": f"Server is not ready. {model.state.reason}", "ready": False}, status_code=503)

    app.add_api_route("/v2/health/ready", server_ready, methods=["GET"])
    app.add_api_route("/v1/models/{model_name}", v1_model_ready, methods=["GET"])
    app.add_api_route("/v1/models/{model_name}/status", model_status, methods=["GET"])
    app.add_api_route("/v2/models/{model_name}/ready", v2_model_ready, methods=["GET"])
    app.add_api_route("/v1/feedback", feedback, methods=["POST"])


def _ready_answer(model: RankerModel, name: str, ok: dict[str, Any]) -> JSONResponse:
    if name != model.name:
        return JSONResponse({"error": f"Model with name {name} does not exist."}, status_code=404)
    if model.serving:
        return JSONResponse(ok)
    return JSONResponse({"error": str(ModelNotReady(name, model.state.reason)), **model.status()},
                        status_code=503)


# --- gRPC: KServe's servicer, with the same slots and metrics ---------------------------------------

def _grpc_classes() -> tuple[type, type]:
    """(servicer, server) classes; built on first use, so importing this module stays cheap."""
    from concurrent import futures

    from grpc import StatusCode, aio
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.grpc.servicer import InferenceServicer

    class RankingServicer(InferenceServicer):
        """KServe's `GRPCInferenceService`; `ModelInfer` takes a slot and is counted like REST."""

        def __init__(self, data_plane: Any, repository: Any, admission: Admission) -> None:
            super().__init__(data_plane, repository)
            self.admission = admission

        async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802 - the proto's name
            model, started = self.admission.model, time.perf_counter()
            status, reason, message, response = 200, None, "", None
            if not self.admission.enter():
                status, reason, message = 503, "overloaded", self.admission.refusal()
            else:
                try:
                    if request.model_name != model.name:
                        raise ModelNotFound(request.model_name)
                    if not model.serving:
                        raise ModelNotReady(model.name, model.state.reason)
                    response = await super().ModelInfer(request, context)
                except Exception as exc:  # noqa: BLE001 - each kind has its status (classify)
                    status, reason, message = classify(exc)
                    if reason == "internal":
                        log.error("gRPC ModelInfer: %s", message, exc_info=exc)
                finally:
                    self.admission.leave()
            record(model.version, "grpc", status, reason, time.perf_counter() - started)
            if status != 200:
                context.set_code(getattr(StatusCode, grpc_code(status)))
                context.set_details(message)
                return pb.ModelInferResponse()
            return response

    class RankingGRPCServer(GRPCServer):
        """KServe's gRPC server on `host`, with the ranking servicer and the body limit."""

        def __init__(self, host: str, port: int, data_plane: Any, repository: Any, admission: Admission) -> None:
            super().__init__(port, data_plane, repository, kwargs={})
            self.host, self.admission = host, admission

        async def start(self, max_workers: int) -> None:
            limit = self.admission.model.limits.max_body_bytes
            # No SO_REUSEPORT: a second server on the port (another variant) must fail to bind, not
            # silently share the port's traffic.
            self._server = aio.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                                      interceptors=(ExceptionToStatusInterceptor(),),
                                      options=[("grpc.max_receive_message_length", limit),
                                               ("grpc.max_send_message_length", 64 << 20), ("grpc.so_reuseport", 0)])
            grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
                RankingServicer(self._data_plane, self._model_repository_extension, self.admission), self._server)
            address = f"[{self.host}]:{self._port}" if ":" in self.host else f"{self.host}:{self._port}"
            try:
                self._server.add_insecure_port(address)
            except RuntimeError as exc:
                log.error("gRPC is OFF: cannot listen on %s (%s); REST serves on (--grpc-port 0 turns gRPC off, "
                          "another port moves it)", address, exc)
                self._server = None
                return
            log.info("gRPC (GRPCInferenceService) on %s", address)
            await self._server.start()
            await self._server.wait_for_termination()

    return RankingServicer, RankingGRPCServer


# --- the server ------------------------------------------------------------------------------------

def serve(model: RankerModel, http_port: int, grpc_port: int = 8081, host: str = "0.0.0.0",
          workers_threads: int | None = None, access_log: bool = False) -> None:
    """Load the model and run KServe's ModelServer, REST on `http_port` and gRPC on `grpc_port`
    (0: no gRPC), both bound to `host`, until SIGTERM. Per-request access and timing log lines are
    off unless `access_log`: metrics carry that, at a fraction of the cost."""
    import sys

    argv, sys.argv = sys.argv, sys.argv[:1]  # kserve.model_server parses sys.argv on import
    try:
        from kserve import ModelServer
        from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
        from kserve.model_server import app
        from kserve.protocol.rest.server import RESTServer
    finally:
        sys.argv = argv

    class RankingServer(ModelServer):  # type: ignore[misc]  # KServe ships no type information: an Any base
        """KServe's ModelServer, one process: its REST app behind `Guard`, its gRPC servicer
        with the same slots, both on `host` (KServe binds 0.0.0.0 and [::])."""

        def start(self, models: list[Any]) -> None:
            self._register_and_check_atleast_one_model_is_ready(models)
            admission = Admission(model)
            rest = RESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
                              self.http_port, grace_period=self.grace_period, event_loop=self.event_loop,
                              timeout_keep_alive=self.timeout_keep_alive)
            rest.config.host = host
            rest.create_application()
            app.add_middleware(Guard, model=model, admission=admission)  # outermost: before KServe's timing
            self.servers.append(rest._server.serve())
            if grpc_port:
                _, server_class = _grpc_classes()
                self._grpc_server = server_class(host, grpc_port, self.dataplane, self.model_repository_extension,
                                                 admission)
                self.servers.append(self._grpc_server.start(self.max_threads))
            self.register_signal_handler()

            async def run() -> None:
                self.setup_event_loop()  # on the running loop: its worker threads, its exception handler
                log.info("event loop: %s", type(asyncio.get_running_loop()).__module__)
                await self._serve()

            with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
                runner.run(run())

    server = RankingServer(http_port=http_port, grpc_port=grpc_port, enable_grpc=False,
                           max_asyncio_workers=workers_threads, enable_latency_logging=False)
    _log_to_stderr()
    logging.getLogger("kserve").addFilter(QuietClientErrors())
    if not access_log:
        for name in ("uvicorn.access", "kserve.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
    model.load()
    add_routes(app, model)
    log.info("serving %s on %s: REST port %d, gRPC port %s", model.name, host, http_port, grpc_port or "off")
    server.start([model])


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop (libuv) for the loop both servers share, where installed: KServe's `asyncio.run`
    starts the default selector loop, whose socket reads and writes cost more CPU per request."""
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed: the default asyncio event loop serves")
        return None
    return uvloop.new_event_loop


class QuietClientErrors(logging.Filter):
    """KServe's exception handlers log every error answer with its traceback; a caller's mistake
    or a not-ready model (status < 500, or 503) becomes one line without it. Server errors keep
    their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        status = classify(exc)[0] if not isinstance(exc, NotImplementedError) else 501
        if status < 500 or status in (501, 503) or type(exc).__name__ in ("ServerNotReady", "ServerNotLive"):
            record.msg, record.args = f"answered {status}: {type(exc).__name__}: {exc}", ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _log_to_stderr() -> None:
    """After KServe's dictConfig (which disables loggers it does not name)."""
    log.disabled = False
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
