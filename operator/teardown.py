"""Deleting a ranker: its children first, then everything it holds in the store.

The operator's finalizer keeps a deleted MultimodalRanker until `handlers.on_delete` has run to
the end. That handler deletes the children with foreground propagation, so a Deployment or Job
object disappears only after its pods are gone; while any child is still there it waits (kopf
retries it), because a live embedder, backfill or predictor pod would write keys again after the
cleanup. Then the ranker's keys are deleted from the store (`mmrank.store.Scope`: spaces,
catalogue sizes, backfill progress, histories, its item, dead-letter and feedback streams), and
its consumer group leaves an item stream named in its spec (shared with other rankers, so kept).

An unreachable store (or a Secret that no longer allows the ranker) is a Warning Event and the
condition `StoreCleanup` False on the ranker, retried with backoff; docs/operator.md says how to
force the delete and what then remains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from mmrank.operator import children as build
from mmrank.operator import core, observe

CONDITION = "StoreCleanup"


@dataclasses.dataclass(frozen=True)
class StoreRef:
    """Where a ranker's data lives, read from the raw spec (a spec that no longer validates still
    names its store)."""

    url: str
    secret: tuple[str, str] | None  # (Secret name, key) of the password
    stream: str | None  # an item stream named in the spec (else the ranker's own)
    group: str


def store_ref(spec: Mapping[str, Any]) -> StoreRef | None:
    embeddings = spec.get("embeddings") or {}
    store = embeddings.get("store") or {}
    if not store.get("url"):
        return None
    ref = store.get("passwordSecretRef") or {}
    events = embeddings.get("itemEvents") or {}
    return StoreRef(
        url=str(store["url"]),
        secret=(ref["name"], ref.get("key") or "password") if ref.get("name") else None,
        stream=events.get("stream") or None,
        group=events.get("consumerGroup") or "embedder",
    )


def deleting(obj: Mapping[str, Any]) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def waiting_message(remaining: Sequence[Mapping[str, Any]]) -> str:
    names = ", ".join(sorted(f"{o['kind']} {o['metadata']['name']}" for o in remaining))
    return f"waiting for {len(remaining)} children to go before the store is cleaned: {names}"


def cleaned_message(deleted: Any, scope: str, stream: str | None, group: str) -> str:
    spaces = ", ".join(deleted.spaces) or "none"
    text = f"removed {deleted.keys} keys of ranker {scope} from the store: {len(deleted.spaces)} spaces ({spaces})"
    from mmrank.store import Scope

    if stream and not Scope.parse(scope).owns(stream):
        text += f"; consumer group {group} left the shared stream {stream}, which stays"
    return text


def changed(status: Mapping[str, Any], reason: str, message: str) -> bool:
    """Whether the StoreCleanup condition says something else than this failure."""
    now = next((c for c in status.get("conditions") or [] if c.get("type") == CONDITION), None)
    return now is None or (now.get("status"), now.get("reason"), now.get("message")) != ("False", reason, message)


def cleanup_condition(
    status: Mapping[str, Any], ok: bool, reason: str, message: str, now: str, generation: int
) -> list[dict[str, Any]]:
    """The status conditions with `StoreCleanup` set (the others as they are)."""
    previous = list(status.get("conditions") or [])
    stamped = core.stamp_conditions([core.condition(CONDITION, ok, reason, message)], previous, now, generation)
    return [c for c in previous if c.get("type") != CONDITION] + stamped


def delete_children(kube: Any, namespace: str, name: str, uid: str) -> list[dict[str, Any]]:
    """Ask for every child's deletion (foreground: its pods go first); returns those still there."""
    remaining = kube.list_children(namespace, name, uid)
    for child in remaining:
        if not deleting(child):
            kube.delete(
                child["apiVersion"],
                child["kind"],
                child["metadata"]["namespace"],
                child["metadata"]["name"],
                propagation="Foreground",
            )
    return list(remaining)


def clean_store(kube: Any, store: observe.CoverageObserver, namespace: str, name: str, spec: Mapping[str, Any]) -> str:
    """Delete the ranker's keys; the Event's message. Raises when the store cannot be cleaned."""
    ref = store_ref(spec)
    scope = build.scope_of(namespace, name)
    if ref is None:
        return f"no store in the spec: nothing of ranker {scope} to remove"
    password = kube.secret_value(namespace, ref.secret[0], ref.secret[1], name) if ref.secret else None
    deleted = store.delete_ranker(ref.url, password, scope=scope, stream=ref.stream, group=ref.group)
    return cleaned_message(deleted, scope, ref.stream, ref.group)
