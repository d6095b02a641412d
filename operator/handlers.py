"""kopf wiring, thin: every handler is gather -> core -> apply (`reconcile.reconcile`).

Create, update and resume react to changes; a timer re-reconciles every `interval` seconds
(level-triggered: store coverage and child readiness change without any event on the ranker).
One lock per object keeps the timer and the change handlers from interleaving. Transient API
errors retry with exponential backoff; an invalid spec is a status condition, never a retry.

Nothing is registered at import: `register(registry, interval)` puts the handlers into a kopf
registry with the interval it is given (`mmrank operator run --interval`), and kopf runs that
registry.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import kopf

from mmrank import api
from mmrank.operator import metrics, observe, peering, reconcile

DEFAULT_INTERVAL = 30.0  # seconds between level-triggered reconciles of each ranker
BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
FINALIZER = "mmrank.io/finalizer"


class Context:
    """The operator's shared clients, created on startup (tests may preset them)."""

    kube: Any = None
    store: observe.CoverageObserver | None = None
    analyser: Any = None
    freshness: observe.FreshnessObserver | None = None
    locks: dict[str, threading.Lock] = {}
    guard = threading.Lock()

    @classmethod
    def lock(cls, uid: str) -> threading.Lock:
        with cls.guard:
            return cls.locks.setdefault(uid, threading.Lock())


def delay(retry: int) -> float:
    return BACKOFF[min(retry, len(BACKOFF) - 1)]


def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    from mmrank.operator.kube import Kube

    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="mmrank.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="mmrank.io", key="last-handled-configuration"
    )
    settings.posting.loggers = False  # Events are our decisions, not kopf's log lines
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.queueing.error_delays = BACKOFF
    if Context.kube is None:
        Context.kube = Kube()
    if Context.store is None:
        Context.store = observe.StoreCoverage()
    if Context.analyser is None:
        from mmrank.operator.analysis import PrometheusAnalyser

        Context.analyser = metrics.CountingAnalyser(PrometheusAnalyser())
    if Context.freshness is None:
        Context.freshness = observe.FreshnessObserver(Context.analyser)


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: the service account; outside: the kubeconfig KUBECONFIG names, read now (not when
    a client library was imported)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def run_reconcile(
    body: kopf.Body, retry: int, logger: logging.Logger | logging.LoggerAdapter[Any], timer: bool = False
) -> str:
    """Transient errors retry with backoff; others are reported once and left to the next
    change of the spec (or the next timer tick), never retried in a loop."""
    uid = body.metadata.uid or body.metadata.name or ""
    with Context.lock(uid):
        started = time.perf_counter()
        try:
            # Context.store is None only before startup() has run; no handler runs before it.
            outcome = reconcile.reconcile(
                Context.kube,
                Context.store,  # type: ignore[arg-type]  # Context.store is set by startup()
                body,
                Context.analyser,
                Context.freshness,
            )
        except Exception as exc:
            from mmrank.operator.kube import is_transient

            metrics.observe_error(exc, time.perf_counter() - started, retried=is_transient(exc))
            if is_transient(exc):
                raise kopf.TemporaryError(f"transient: {exc}", delay=delay(retry)) from exc
            message = f"{type(exc).__name__}: {exc}"[:1000]
            if timer:
                logger.error(f"reconcile failed: {message}")
                return "Failed"
            kopf.event(body, type="Warning", reason="ReconcileFailed", message=message)
            raise kopf.PermanentError(message) from exc
    metrics.observe_reconcile(
        body,
        time.perf_counter() - started,
        outcome.phase,
        [d.reason for d in outcome.decisions],
        getattr(outcome, "refusals", ()),
    )
    for decision in outcome.decisions:
        kopf.event(body, type=decision.type, reason=decision.reason, message=decision.message)
        logger.info(f"{decision.reason}: {decision.message}")
    return outcome.phase


def on_change(body: kopf.Body, retry: int, logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any) -> None:
    run_reconcile(body, retry, logger)


def on_timer(body: kopf.Body, retry: int, logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any) -> None:
    run_reconcile(body, retry, logger, timer=True)


def on_delete(body: kopf.Body, retry: int, logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any) -> None:
    """The finalizer step (operator/teardown.py): delete every child and wait until they are gone
    (their pods with them), then remove the ranker's keys from the store, with an Event. Until
    the store is cleaned the ranker stays, with a Warning and the StoreCleanup condition."""
    from mmrank.operator import teardown

    kube, namespace, name = Context.kube, body.metadata.namespace or "default", body.metadata.name or ""
    remaining = teardown.delete_children(kube, namespace, name, body.metadata.uid or "")
    if remaining:
        raise kopf.TemporaryError(teardown.waiting_message(remaining), delay=min(delay(retry), 5.0))
    try:
        # Context.store is None only before startup() has run; no handler runs before it.
        message = teardown.clean_store(kube, Context.store, namespace, name, body.spec)  # type: ignore[arg-type]  # Context.store is set by startup()
    except Exception as exc:
        problem = (
            f"the store could not be cleaned (retrying; to give up, remove the finalizer {FINALIZER}: "
            f"docs/operator.md): {type(exc).__name__}: {exc}"[:1000]
        )
        reason = "SecretNotAllowed" if isinstance(exc, observe.SecretRefused) else "StoreUnreachable"
        if teardown.changed(body.status, reason, problem):  # one Event per new problem, not per retry
            kopf.event(body, type="Warning", reason="StoreCleanupFailed", message=problem)
            conditions = teardown.cleanup_condition(
                body.status, False, reason, problem, reconcile.now(), int(body.metadata.get("generation") or 0)
            )
            kube.patch_status(namespace, name, {"conditions": conditions})
        raise kopf.TemporaryError(problem, delay=delay(retry)) from exc
    kopf.event(body, type="Normal", reason="StoreCleaned", message=message)
    logger.info(f"StoreCleaned: {message}")
    with Context.guard:
        Context.locks.pop(body.metadata.uid or "", None)
    metrics.forget(body)


def register(registry: kopf.OperatorRegistry, interval: float = DEFAULT_INTERVAL) -> kopf.OperatorRegistry:
    """Every handler of the operator into `registry`, the timer every `interval` seconds."""
    resource = (api.GROUP, api.VERSION, api.PLURAL)
    kopf.on.startup(registry=registry)(configure)
    kopf.on.login(registry=registry)(login)
    kopf.on.create(*resource, registry=registry)(on_change)
    kopf.on.update(*resource, field="spec", registry=registry)(on_change)
    kopf.on.resume(*resource, registry=registry)(on_change)
    # kopf passes `retry` to every handler (its execution.py); only its TimerFn protocol omits it.
    kopf.timer(
        *resource,
        interval=interval,
        initial_delay=interval,
        idle=None,
        errors=kopf.ErrorsMode.TEMPORARY,
        backoff=BACKOFF[1],
        registry=registry,
    )(on_timer)  # type: ignore[arg-type]  # kopf's TimerFn omits `retry`
    kopf.on.delete(*resource, registry=registry)(on_delete)
    kopf.on.startup(registry=registry)(peering.serve_readiness)  # --readiness (peering.config)
    kopf.on.cleanup(registry=registry)(peering.stop_readiness)
    return registry
