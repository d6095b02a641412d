"""What the two front ends (the REST guard, predictors/http_guard.py, and the gRPC servicer,
predictors/grpc_service.py) share: the `max_concurrency` slots a ranking takes, and the answer
each failure gets (`classify`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady

from mmrank.predictors.ranker_model import StoreUnavailable
from mmrank.predictors.ranking_metrics import INFLIGHT
from mmrank.predictors.requests import BadRequest

if TYPE_CHECKING:
    from mmrank.predictors.ranker_model import RankerModel


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
        return (
            f"overloaded: {self.inflight} requests in flight, at most {self.model.limits.max_concurrency}; retry later"
        )

    def _step(self, step: int) -> None:
        self.inflight += step
        INFLIGHT.labels(self.model.version).set(self.inflight)


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
