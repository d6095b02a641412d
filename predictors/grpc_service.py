"""gRPC: KServe's `GRPCInferenceService` servicer and server, with the REST side's slots and
metrics (`ModelInfer` takes a slot from the same `Admission` and is counted like a REST answer),
bound to `--host`."""

from __future__ import annotations

import logging
import time
from concurrent import futures
from typing import Any

from grpc import StatusCode, aio
from kserve.errors import ModelNotFound, ModelNotReady
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer

from mmrank.predictors.admission import Admission, classify
from mmrank.predictors.ranking_metrics import record

log = logging.getLogger("mmrank.predictor")

GRPC_CODES = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "FAILED_PRECONDITION",
    413: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
    500: "INTERNAL",
}


def grpc_code(status: int) -> str:
    """The gRPC status name for an HTTP status this service answers."""
    return GRPC_CODES.get(status, "INVALID_ARGUMENT" if 400 <= status < 500 else "INTERNAL")


class RankingServicer(InferenceServicer):  # type: ignore[misc]  # KServe ships no annotations: InferenceServicer is Any here
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


class RankingGRPCServer(GRPCServer):  # type: ignore[misc]  # KServe ships no annotations: GRPCServer is Any here
    """KServe's gRPC server on `host`, with the ranking servicer and the body limit."""

    def __init__(self, host: str, port: int, data_plane: Any, repository: Any, admission: Admission) -> None:
        super().__init__(port, data_plane, repository, kwargs={})
        self.host, self.admission = host, admission

    async def start(self, max_workers: int) -> None:
        limit = self.admission.model.limits.max_body_bytes
        # No SO_REUSEPORT: a second server on the port (another variant) must fail to bind, not
        # silently share the port's traffic.
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(ExceptionToStatusInterceptor(),),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.so_reuseport", 0),
            ],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            RankingServicer(self._data_plane, self._model_repository_extension, self.admission), self._server
        )
        address = f"[{self.host}]:{self._port}" if ":" in self.host else f"{self.host}:{self._port}"
        try:
            self._server.add_insecure_port(address)
        except RuntimeError as exc:
            log.error(
                "gRPC is OFF: cannot listen on %s (%s); REST serves on (--grpc-port 0 turns gRPC off, "
                "another port moves it)",
                address,
                exc,
            )
            self._server = None
            return
        log.info("gRPC (GRPCInferenceService) on %s", address)
        await self._server.start()
        await self._server.wait_for_termination()
