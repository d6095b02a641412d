"""Click feedback: impressions and clicks reported by request id, counted by the variant that served
the request.

Canary and stable share one route, so a report may reach a variant that did not serve it. That
variant passes it on through the ranker's feedback stream (`Scope.feedback_stream`,
mmrank:{<namespace>/<name>}:feedback), where every variant reads in its own consumer group and
counts only its own. The stream is the ranker's own, so another ranker's variants never count it.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from mmrank.predictors.ranking_metrics import CLICKS, IMPRESSIONS
from mmrank.predictors.requests import BadRequest, parse_feedback
from mmrank.store import DEFAULT_SCOPE

log = logging.getLogger("mmrank.predictor")

# The local default scope's feedback stream.
FEEDBACK_STREAM = DEFAULT_SCOPE.feedback_stream


class Feedback:
    """One variant's feedback: `record` for a report, `consume` for the stream (a thread)."""

    def __init__(self, store: Any, variant: str, retry_seconds: float) -> None:
        self.store = store
        self.variant = variant
        self.retry_seconds = retry_seconds

    def record(self, body: Any, lax: bool = False) -> dict[str, Any]:
        """Count it when this variant served the request, else pass it on through the stream
        (`lax`: an entry read from the stream, never passed on again)."""
        feedback, variant = parse_feedback(body, lax=lax)
        if variant == self.variant:
            IMPRESSIONS.labels(variant).inc(feedback.impressions)
            CLICKS.labels(variant).inc(feedback.clicks)
            return {"counted": True, "variant": variant}
        client = getattr(self.store, "client", None)
        if lax:
            return {"counted": False, "variant": variant}  # the serving variant's consumers count it
        if client is None:
            raise BadRequest(
                "request_id",
                f"served by variant {variant}, this is {self.variant}, and the "
                "embedded store has no feedback stream to pass it on",
                status=409,
                reason="other_variant",
            )
        stream = self.store.scope.feedback_stream
        client.xadd(
            stream,
            {"request_id": feedback.request_id, "impressions": feedback.impressions, "clicks": feedback.clicks},
            maxlen=1_000_000,
            approximate=True,
        )
        return {"counted": False, "relayed": stream, "variant": variant}

    def consume(self, stop: threading.Event) -> None:
        """Read the stream in this variant's consumer group until `stop`; a store that is down is
        retried every `retry_seconds`, each new error logged once."""
        client, group = self.store.client, f"feedback-{self.variant}"
        stream = self.store.scope.feedback_stream
        consumer = f"{os.uname().nodename}-{os.getpid()}"
        last_error = ""
        while not stop.is_set():
            try:
                try:
                    client.xgroup_create(stream, group, id="$", mkstream=True)
                except Exception as exc:  # noqa: BLE001 - BUSYGROUP: it exists already
                    if "BUSYGROUP" not in str(exc):
                        raise
                while not stop.is_set():
                    batches = client.xreadgroup(group, consumer, {stream: ">"}, count=500, block=1000)
                    for _, entries in batches or []:
                        for entry_id, fields in entries:
                            self._count_stream_entry(fields)
                            client.xack(stream, group, entry_id)
            except Exception as exc:  # noqa: BLE001 - keep consuming once the store is back
                error = f"{type(exc).__name__}: {exc}"
                if error != last_error:
                    log.warning("feedback stream %s: %s (retrying every %.1f s)", stream, error, self.retry_seconds)
                last_error = error
                stop.wait(self.retry_seconds)

    def _count_stream_entry(self, fields: dict[bytes, bytes]) -> None:
        body = {k.decode(): v.decode() for k, v in fields.items()}
        try:
            self.record(body, lax=True)
        except BadRequest as exc:
            log.warning("feedback stream entry dropped: %s", exc)
