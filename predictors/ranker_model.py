"""The ranker as KServe sees it: `RankerModel` (load, preprocess, predict, postprocess), which
scores one user's candidates from the embedding store and knows nothing about HTTP.

Per ranking it reads the store once or twice (predictors/item_cache.py: the user's history and
the space's version log in one MULTI, then HMGET of the vectors the process does not hold yet),
runs SimTier and MAKE inside one forward pass of the ranker, and answers one score per candidate.
An item the store has no vector for (new, not embedded yet) is scored with neutral features and
counted in `mmrank_embedding_miss_total`, never a 500.

Readiness is the embedding-sync invariant: the model reports ready only while the space its
ranker was trained on is reachable and covers at least `min_coverage` of the catalogue. A
background thread re-checks it and logs every change; the model-ready routes say why
(predictors/http_guard.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson
from kserve import Model
from kserve.errors import ModelNotReady
from kserve.protocol.infer_type import InferRequest

from mmrank.predictors.feedback import Feedback
from mmrank.predictors.item_cache import ItemVectorCache
from mmrank.predictors.protocol import RankingCall, Scored, encode_v1, encode_v2, v1_answer, v2_answer
from mmrank.predictors.ranking_metrics import CACHED_ROWS, CANDIDATES, COVERAGE, MISSES, READY, STORE_READ
from mmrank.predictors.requests import (
    UNKNOWN,
    BadRequest,
    Ids,
    Limits,
    Ranking,
    new_request_id,
    parse_v1_body,
    parse_v2,
    v2_metadata,
    v2_tensor,
)
from mmrank.store import DEFAULT_SCOPE, Found, Scope, SpaceInfo, Vectors, redacted

if TYPE_CHECKING:
    from mmrank.predictors.artifact import ArtifactMeta

log = logging.getLogger("mmrank.predictor")


# --- pure decisions -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str
    coverage: float | None = None


def readiness(
    space: str,
    dim: int,
    min_coverage: float,
    info: SpaceInfo | None,
    error: str | None,
    expected_space: str | None = None,
) -> Readiness:
    """May the ranker trained on `space` serve? `info` is the store's SpaceInfo, `error` why it
    could not be read. Never ready when deployed for another space, on a space of another width,
    or below the minimum coverage."""
    if expected_space and expected_space != space:
        return Readiness(False, f"deployed for space {expected_space}, but the ranker was trained on space {space}")
    if error is not None or info is None:
        return Readiness(False, error or f"space {space}: no space info read")
    if info.dim != dim:
        return Readiness(False, f"space {space} has dim {info.dim}, the ranker was trained on {dim}", info.coverage)
    if info.coverage < min_coverage:
        return Readiness(
            False,
            f"space {space} coverage {info.coverage:.4f} is below the minimum "
            f"{min_coverage:.4f} ({info.items} of {info.catalogue_size} items)",
            info.coverage,
        )
    return Readiness(True, f"space {space} coverage {info.coverage:.4f} >= {min_coverage:.4f}", info.coverage)


def fill_features(ids: Ids, given: Ids, table: npt.NDArray[np.int64], column: int) -> Ids:
    """Category or brand per item: what the request gave, else the artifact's table, else -1."""
    known = (ids >= 0) & (ids < len(table))
    looked_up = np.full(len(ids), UNKNOWN, dtype=np.int64)
    if len(table):
        looked_up[known] = table[ids[known], column]
    return np.where(given >= 0, given, looked_up)


def newest(history: Ids, length: int) -> Ids:
    """The last `length` behaviours (the window the ranker was trained on); oldest first."""
    return history[-length:] if length > 0 else history[:0]


# --- the model ----------------------------------------------------------------------------------


class RankerModel(Model):  # type: ignore[misc]  # KServe ships no annotations: its Model is Any here
    """A ranker artifact served against the embedding store; knows nothing about HTTP."""

    ready: bool  # kserve.Model's: False until `load` has run

    def __init__(
        self,
        name: str,
        model_dir: str | Path,
        store_url: str,
        limits: Limits = Limits(),  # noqa: B008 (frozen dataclass: one shared default is safe)
        min_coverage: float = 0.99,
        recheck_seconds: float = 5.0,
        feedback_stream: bool = True,
        expected_space: str | None = None,
        version: str | None = None,
        history_length: int | None = None,
        item_cache_size: int = 200_000,
        scope: Scope = DEFAULT_SCOPE,
    ) -> None:
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
        self.meta: ArtifactMeta = {}
        self.store: Any = None
        self.features = np.zeros((0, 2), np.int64)
        self.feedback: Feedback | None = None

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
        log.info(
            "loaded ranker %s (artifact %s, %s) from %s, trained on space %s; history window %d; store %s "
            "%s (reply parser: %s; item vector cache: %s)",
            self.version,
            self.meta.get("version"),
            self.meta.get("variant"),
            self.model_dir,
            self.space,
            self.window,
            redacted(self.store_url),
            self.store.scope,
            "hiredis" if redis.utils.HIREDIS_AVAILABLE else "python",
            f"{self.item_cache.capacity} items" if self.item_cache else "off",
        )
        self.check()
        threading.Thread(target=self._recheck_loop, name="mmrank-readiness", daemon=True).start()
        self.feedback = Feedback(self.store, self.version, retry_seconds=self.recheck_seconds)
        if self.feedback_stream and hasattr(self.store, "client"):
            threading.Thread(
                target=self.feedback.consume, args=(self._stop,), name="mmrank-feedback", daemon=True
            ).start()
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
        self._set_state(
            readiness(self.space, int(self.meta["dim"]), self.min_coverage, info, error, self.expected_space)
        )
        return self.state

    def _set_state(self, state: Readiness) -> None:
        previous, self.state = self.state, state
        READY.labels(self.version, self.space).set(1.0 if state.ready else 0.0)
        if state.coverage is not None:
            COVERAGE.labels(self.version, self.space).set(state.coverage)
        if previous.ready != state.ready or (not state.ready and previous.reason != state.reason):
            (log.info if state.ready else log.warning)(
                "ranker %s %s: %s", self.version, "ready" if state.ready else "NOT ready", state.reason
            )

    def _recheck_loop(self) -> None:
        while not self._stop.wait(self.recheck_seconds):
            self.check()

    def status(self) -> dict[str, Any]:
        import redis.utils

        cache = self.item_cache
        return {
            "name": self.name,
            "ready": self.serving,
            "reason": self.state.reason,
            "ranker_version": self.version,
            "variant": self.meta.get("variant"),
            "space": self.space,
            "coverage": self.state.coverage,
            "min_coverage": self.min_coverage,
            "redis_parser": "hiredis" if redis.utils.HIREDIS_AVAILABLE else "python",
            "item_cache": dataclasses.asdict(cache.stats) | {"capacity": cache.capacity} if cache else None,
        }

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
            tensors: dict[str, Ids] = {}
            for tensor in payload.inputs:
                if tensor.name in tensors:
                    raise BadRequest(f"inputs.{tensor.name}", "given more than once")
                tensors[tensor.name] = v2_tensor(tensor.name, tensor.datatype, tensor.shape, tensor.as_numpy)
            return RankingCall(
                "grpc",
                [parse_v2(tensors, self.limits)],
                caller_id=payload.id or None,
                binary_output=payload.use_binary_outputs,
            )
        if isinstance(payload, bytes | bytearray | str):
            payload = _json_body(payload)
        rankings, instances = parse_v1_body(payload, self.limits)
        return RankingCall("v1", rankings, instances=instances, encode=False)

    async def predict(
        self, payload: RankingCall, headers: dict[str, str] | None = None
    ) -> tuple[RankingCall, list[Scored]]:
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
            ranking.user_id,
            t(history),
            torch.ones(n_hist, dtype=torch.bool),
            t(vectors[:n_hist]),
            t(hist_found),
            t(ranking.cand_ids),
            t(vectors[n_hist:]),
            t(cand_found),
            cand_category=t(fill_features(ranking.cand_ids, ranking.cand_category, self.features, 0)),
            cand_brand=t(fill_features(ranking.cand_ids, ranking.cand_brand, self.features, 1)),
            history_category=t(hist_category),
            history_brand=t(hist_brand),
        )
        scores = torch.sigmoid(logits).numpy().astype(np.float32, copy=False)
        return Scored(new_request_id(variant), scores, cand_misses, hist_misses, n_hist)

    def _read(self, ranking: Ranking, space: str, window: int) -> tuple[Ids, Vectors, Found]:
        """(history ids, vectors of history then candidates, found): through the item vector
        cache when the store is Redis (one MULTI for history and version log, then only the
        vectors the cache lacks), else history and vectors straight from the store."""
        cache = self.item_cache
        if cache is None:
            history = (
                ranking.history if ranking.history is not None else self.store.get_history(ranking.user_id, window)
            )
            history = newest(np.asarray(history, dtype=np.int64), window)
            vectors, found = self.store.get(space, np.concatenate([history, ranking.cand_ids]))
            return history, vectors, found
        stored_history, version_log = cache.sync(
            self.store, space, None if ranking.history is not None else ranking.user_id, window
        )
        requested = ranking.history if ranking.history is not None else stored_history
        assert requested is not None  # the sync read the user's history: the request sent none
        history = newest(requested, window)
        ids = np.concatenate([history, ranking.cand_ids])
        vectors, found, hits = cache.vectors(self.store, space, int(self.meta["dim"]), version_log, ids)
        misses = len(ids) - hits
        if hits > 0:
            CACHED_ROWS.labels(self.version, space, "hit").inc(hits)
        if misses > 0:
            CACHED_ROWS.labels(self.version, space, "miss").inc(misses)
        return history, vectors, found

    # click feedback (predictors/feedback.py) ---------------------------------------------------
    def record_feedback(self, body: Any, lax: bool = False) -> dict[str, Any]:
        """Count a report when this variant served the request, else pass it on (`Feedback.record`)."""
        if self.feedback is None:
            raise ModelNotReady(self.name, "not loaded")
        return self.feedback.record(body, lax=lax)


@dataclasses.dataclass(frozen=True)
class RestAnswer:
    """A REST answer as `postprocess` encodes it; the guard writes it as it is."""

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


class StoreUnavailable(ModelNotReady):  # type: ignore[misc]  # KServe ships no annotations: ModelNotReady is Any here
    """The store did not answer a ranking's read: the answer is 503, and the model not ready."""

    def __init__(self, reason: str) -> None:
        super().__init__("ranker", reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason
