"""`mmrank predictor serve`: KServe's ModelServer running one ranker, REST and gRPC on one event loop.

The service in parts, each a module to read on its own:

- predictors/ranker_model.py: `RankerModel`, what KServe sees (load, preprocess, predict,
  postprocess) and the readiness it reports; nothing about HTTP.
- predictors/feedback.py: click feedback, counted by the variant that served the request, passed
  on through the ranker's feedback stream otherwise.
- predictors/http_guard.py: REST, an ASGI layer in front of KServe's FastAPI app (body limit and
  deadline, slots, the ranking routes answered), and the routes added to KServe's app.
- predictors/grpc_service.py: gRPC, KServe's `GRPCInferenceService` servicer with the same slots.
- predictors/admission.py: what both front ends share, the slots and the status of each failure.
- predictors/ranking_metrics.py: the Prometheus series (errors counted and timed too).
- predictors/protocol.py and predictors/requests.py: bodies in and out (v1, v2 JSON and binary,
  gRPC tensors), limits; predictors/item_cache.py: the per-process item vector cache.

This module wires them: `serve()` loads the model, adds the routes to KServe's app and starts
`RankingServer`, KServe's ModelServer with the guard in front of its REST app and the ranking
servicer on its gRPC port, both bound to `--host`.

KServe's options are `ModelServer`'s arguments. kserve 0.21 also parses `sys.argv` once, when the
package is imported (`kserve.model_server`, `parse_known_args`, for those arguments' defaults);
its flags (`--http_port`, `--workers`, ...) share no name or prefix with `mmrank predictor
serve`'s, so it finds none of ours and keeps its defaults (tests/test_predictor_requests.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from kserve import ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.model_server import app as kserve_app
from kserve.protocol.rest.server import RESTServer

from mmrank.predictors.admission import Admission, classify
from mmrank.predictors.allocator import keep_freed_memory
from mmrank.predictors.grpc_service import RankingGRPCServer
from mmrank.predictors.http_guard import Guard, add_routes
from mmrank.predictors.ranker_model import RankerModel

log = logging.getLogger("mmrank.predictor")


class RankingServer(ModelServer):  # type: ignore[misc]  # KServe ships no type information: an Any base
    """KServe's ModelServer, one process: its REST app behind `Guard`, its gRPC servicer with the
    same slots, both on `host` (KServe binds 0.0.0.0 and [::])."""

    def __init__(
        self, model: RankerModel, host: str, http_port: int, grpc_port: int, workers_threads: int | None
    ) -> None:
        # KServe's own gRPC server stays off (enable_grpc): `start` runs the ranking one on grpc_port.
        super().__init__(
            http_port=http_port,
            grpc_port=grpc_port,
            enable_grpc=False,
            max_asyncio_workers=workers_threads,
            enable_latency_logging=False,
        )
        self.model, self.host = model, host

    def start(self, models: list[Any]) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        admission = Admission(self.model)
        rest = RESTServer(
            FASTAPI_APP_IMPORT_STRING,
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            grace_period=self.grace_period,
            event_loop=self.event_loop,
            timeout_keep_alive=self.timeout_keep_alive,
        )
        rest.config.host = self.host
        rest.create_application()
        kserve_app.add_middleware(Guard, model=self.model, admission=admission)  # outermost: before KServe's timing
        self.servers.append(rest._server.serve())
        if self.grpc_port:
            self._grpc_server = RankingGRPCServer(
                self.host, self.grpc_port, self.dataplane, self.model_repository_extension, admission
            )
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.register_signal_handler()

        async def run() -> None:
            self.setup_event_loop()  # on the running loop: its worker threads, its exception handler
            log.info("event loop: %s", type(asyncio.get_running_loop()).__module__)
            await self._serve()

        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(run())


def serve(
    model: RankerModel,
    http_port: int,
    grpc_port: int = 8081,
    host: str = "0.0.0.0",
    workers_threads: int | None = None,
    access_log: bool = False,
    malloc_keep_mib: int = 0,
) -> None:
    """Load the model and run KServe's ModelServer, REST on `http_port` and gRPC on `grpc_port`
    (0: no gRPC), both bound to `host`, until SIGTERM. Per-request access and timing log lines are
    off unless `access_log`: metrics carry that, at a fraction of the cost. `malloc_keep_mib`:
    `allocator.keep_freed_memory`."""
    server = RankingServer(model, host, http_port, grpc_port, workers_threads)
    _log_to_stderr()
    keep_freed_memory(malloc_keep_mib)
    logging.getLogger("kserve").addFilter(QuietClientErrors())
    if not access_log:
        for name in ("uvicorn.access", "kserve.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
    model.load()
    add_routes(kserve_app, model)
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
