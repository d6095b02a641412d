"""What a reconcile does when the cluster says no: pure decisions, no I/O.

Refused children. Each child is applied (and each unwanted one deleted) on its own: one refused
write (422 immutable field, 403 forbidden, 409, 429, 5xx, a kind the cluster lacks) does not stop
the others, the deletions or the status. The status says which child was refused and why (the
`ChildrenApplied` condition), Ready is False while any is, and a Warning Event is posted when the
set of refusals changes (not on every timer tick).

`status.observedGeneration` still moves to the generation the reconcile acted on: it means "the
operator has seen this spec and done what it could", not "every child of it exists". Whether
everything landed is `ChildrenApplied` (its own observedGeneration says for which generation), so
`kubectl wait --for=condition=Ready` never passes on a spec whose children were refused.

Status conflicts. Every status write carries the resourceVersion the reconcile read. On 409 the
adapter reads the resource again and `reapply` decides: when another writer changed what the
operator remembers (stable, canary, history, request, the spaces' records), the reconcile is run
again from the fresh status, because its decisions were made on a stale one; when only
observations changed, the operator's own changes are applied on top of the fresh status.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from mmrank.operator.children import plain
from mmrank.operator.core import Decision, condition, stamp_conditions

# Status keys that carry what the operator remembers between runs (a decision made on a stale
# copy of any of them is redone, never merged).
HISTORY_KEYS = ("stable", "canary", "history", "request", "embeddings")


@dataclasses.dataclass(frozen=True)
class Refusal:
    """One write the apiserver (or the store) refused."""

    action: str  # apply, delete
    kind: str
    name: str
    code: int  # HTTP status; 0 when no answer came (connection, timeout)
    reason: str  # the apiserver's message, shortened
    transient: bool  # 409, 429, 5xx, no answer: the next reconcile may succeed as is

    def text(self) -> str:
        code = f"{self.code}" if self.code else "no answer"
        return f"{self.action} {self.kind} {self.name} refused ({code}): {self.reason}"


def applied_condition(refusals: Sequence[Refusal]) -> dict[str, str]:
    if not refusals:
        return condition("ChildrenApplied", True, "AllApplied", "every child is applied as the spec says")
    permanent = [r for r in refusals if not r.transient]
    reason = "ChildRefused" if permanent else "ChildRetrying"
    hint = (
        "; fix the spec (or the operator's permissions) for the refused children, the others are applied"
        if permanent
        else "; retried on the next reconcile"
    )
    return condition("ChildrenApplied", False, reason, "; ".join(r.text() for r in refusals)[:3000] + hint)


def with_refusals(
    status: Mapping[str, Any], previous: Mapping[str, Any], refusals: Sequence[Refusal], now: str, generation: int
) -> tuple[dict[str, Any], list[Decision]]:
    """The status the core computed, told what the apply refused; and the Warning to post, once
    per new set of refusals.

    A refusal makes Ready False (the spec is not realised, even if the old children still serve);
    a permanent one (4xx other than 409/429) makes the phase Failed until the spec changes, a
    transient one leaves the phase but never reports Ready."""
    applied = applied_condition(refusals)

    def stamped(cond: Mapping[str, Any]) -> dict[str, Any]:
        return stamp_conditions([dict(cond)], previous.get("conditions") or [], now, generation)[0]

    conditions = [c for c in status.get("conditions") or [] if c.get("type") != "ChildrenApplied"]
    if refusals:
        conditions = [stamped(_refused_ready(c, applied)) if c.get("type") == "Ready" else c for c in conditions]
    out = {**status, "conditions": [*conditions, stamped(applied)]}
    if refusals:
        permanent = any(not r.transient for r in refusals)
        out["phase"] = (
            "Failed" if permanent else ("Progressing" if status.get("phase") == "Ready" else status.get("phase"))
        )
    decisions = []
    before: Mapping[str, Any] = next(
        (c for c in previous.get("conditions") or [] if c.get("type") == "ChildrenApplied"), {}
    )
    if refusals and before.get("message") != applied["message"]:
        decisions.append(Decision(applied["reason"], applied["message"][:1000], "Warning"))
    elif not refusals and before.get("status") == "False":
        decisions.append(Decision("ChildrenApplied", "every child is applied again"))
    return out, decisions


def _refused_ready(ready: Mapping[str, Any], applied: Mapping[str, str]) -> dict[str, Any]:
    waiting = ready.get("message", "") if ready.get("status") != "True" else ""
    message = applied["message"] + (f"; {waiting}" if waiting else "")
    return {"type": "Ready", "status": "False", "reason": applied["reason"], "message": message}


def reapply(base: Mapping[str, Any], ours: Mapping[str, Any], fresh: Mapping[str, Any]) -> dict[str, Any] | None:
    """After a 409: the status to write on top of `fresh` (what the server holds now), or None
    when the reconcile must run again from `fresh`.

    `base` is the status the reconcile read, `ours` what it computed from it. Another writer's
    change to a history key (see HISTORY_KEYS) means our decisions rest on a stale history: None.
    Otherwise (nobody changed anything we remember; resourceVersion moved for metadata, or another
    writer refreshed an observation) our changed keys go on top of theirs."""
    theirs = {k for k in set(base) | set(fresh) if plain(base.get(k)) != plain(fresh.get(k))}
    if theirs & set(HISTORY_KEYS):
        return None
    mine = {k for k in set(base) | set(ours) if plain(base.get(k)) != plain(ours.get(k))}
    return {**{k: v for k, v in fresh.items()}, **{k: ours.get(k) for k in mine}}
