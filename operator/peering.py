"""One operator at a time: kopf peering between the replicas of the chart's Deployment, and a
readiness endpoint that says a replica is logged in and taking part.

kopf pauses an operator while a peer with a higher priority is alive, and pauses *every* operator
when two share a priority (kopf 1.45, `process_peering_event`: "Pausing all operators, including
self"), so replicas started from one command line need distinct priorities. A replica's priority
is its seniority: minus its start time in nanoseconds. The oldest live replica leads, a new one (a
rolling update's) waits behind it, and any explicit `--priority` of 0 or more (an operator on a
developer's workstation) outranks them all. A leader that stops cleanly deletes its record, so a
standby resumes at once; a killed leader is believed alive until its record's lifetime ends, so a
standby takes over within about `--peering-lifetime` seconds.

kopf watches the peering object but does not create it; without it a mandatory peering waits
paused for ever, so `ensure_objects` creates it before the operator starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import socket
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any, cast

GROUP, VERSION = "kopf.dev", "v1"
CLUSTER_PLURAL, NAMESPACED_PLURAL = "clusterkopfpeerings", "kopfpeerings"
READY_TIMEOUT = 5.0


@dataclasses.dataclass
class Config:
    """What `mmrank operator run` asked for; read by the startup handler below."""

    name: str | None = None  # the peering object; None: standalone (no peers)
    namespaces: Sequence[str] = ()  # empty: cluster-wide (ClusterKopfPeering)
    identity: str = ""
    readiness: str | None = None  # e.g. http://0.0.0.0:8081/readyz


config = Config()


def seniority(start_ns: int) -> int:
    """The priority of a replica started at `start_ns`: older replicas rank higher."""
    return -start_ns


def own_identity() -> str:
    """How peers name this process: the pod's name (POD_ID, kopf's own convention), else host and pid."""
    return os.environ.get("POD_ID") or f"{socket.gethostname()}-{os.getpid()}"


def peering_objects(name: str, namespaces: Sequence[str]) -> list[tuple[str, str | None]]:
    """(plural, namespace) of every peering object kopf uses: one ClusterKopfPeering for a
    cluster-wide operator, a KopfPeering in each namespace for a namespaced one."""
    if not namespaces:
        return [(CLUSTER_PLURAL, None)]
    return [(NAMESPACED_PLURAL, namespace) for namespace in namespaces]


def record_alive(status: Mapping[str, Any] | None, identity: str, now: datetime.datetime) -> bool:
    """Whether the peering status holds a live keep-alive of `identity` (kopf's Peer fields)."""
    record = (status or {}).get(identity)
    if not isinstance(record, Mapping) or "lastseen" not in record:
        return False
    lastseen = datetime.datetime.fromisoformat(str(record["lastseen"]))
    if lastseen.tzinfo is None:
        lastseen = lastseen.replace(tzinfo=datetime.UTC)
    return now < lastseen + datetime.timedelta(seconds=int(record.get("lifetime", 60)))


def ensure_objects(name: str, namespaces: Sequence[str]) -> list[str]:
    """Create the peering objects that are missing; the names of those created.

    Raises LookupError when the cluster does not serve kopf's peering CRD (install the chart with
    `crds.peering: true`, or kopf's peering.yaml)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    objects = client.CustomObjectsApi()
    created = []
    for plural, namespace in peering_objects(name, namespaces):
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "KopfPeering" if namespace else "ClusterKopfPeering",
            "metadata": {"name": name, **({"namespace": namespace} if namespace else {})},
        }
        try:
            if namespace:
                objects.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)
            else:
                objects.create_cluster_custom_object(GROUP, VERSION, plural, body)
        except ApiException as exc:
            if exc.status == 409:
                continue
            if exc.status == 404 and "could not find the requested resource" in str(exc.body):
                raise LookupError(
                    f"the cluster does not serve {plural}.{GROUP}: install the chart's CRDs "
                    f"(crds.peering: true) or kopf's peering.yaml"
                ) from exc
            raise
        created.append(f"{plural}/{name}" + (f" in {namespace}" if namespace else ""))
    return created


def ready(conf: Config, now: datetime.datetime) -> tuple[bool, str]:
    """Logged in and taking part: with peering, this replica's keep-alive is live in every peering
    object (kopf's orchestrator runs, and the apiserver accepts its credentials); standalone, the
    apiserver answers a list of rankers. A standby counts as ready: it is the one that takes over."""
    from kubernetes import client

    from mmrank import api

    objects = client.CustomObjectsApi()
    if conf.name is None:
        for watched in conf.namespaces:
            objects.list_namespaced_custom_object(
                api.GROUP, api.VERSION, watched, api.PLURAL, limit=1, _request_timeout=READY_TIMEOUT
            )
        if not conf.namespaces:
            objects.list_cluster_custom_object(
                api.GROUP, api.VERSION, api.PLURAL, limit=1, _request_timeout=READY_TIMEOUT
            )
        return True, "the apiserver answers (standalone)"
    for plural, namespace in peering_objects(conf.name, conf.namespaces):
        if namespace:
            got = objects.get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, conf.name, _request_timeout=READY_TIMEOUT
            )
        else:
            got = objects.get_cluster_custom_object(GROUP, VERSION, plural, conf.name, _request_timeout=READY_TIMEOUT)
        body = cast(dict[str, Any], got)  # the client returns the object's JSON as a dict
        if not record_alive(body.get("status"), conf.identity, now):
            where = f"{plural}/{conf.name}" + (f" in {namespace}" if namespace else "")
            return False, f"no live keep-alive of {conf.identity} in {where} yet"
    return True, f"taking part in peering {conf.name} as {conf.identity}"


async def _readyz(_: Any) -> Any:
    from aiohttp import web

    try:
        ok, why = await asyncio.to_thread(ready, config, datetime.datetime.now(datetime.UTC))
    except Exception as exc:  # noqa: BLE001 - any failure to ask the apiserver means not ready
        ok, why = False, f"{type(exc).__name__}: {exc}"[:300]
    return web.Response(status=200 if ok else 503, text=why + "\n")


_runner: Any = None


async def serve_readiness(logger: Any, **_: Any) -> None:
    """The readiness endpoint runs in kopf's event loop: a stuck loop stops answering it too.
    A startup handler (and `stop_readiness` a cleanup one): `handlers.register` registers both."""
    global _runner
    if not config.readiness or _runner is not None:
        return
    from aiohttp import web

    parts = urllib.parse.urlsplit(config.readiness)
    app = web.Application()
    app.add_routes([web.get(parts.path or "/", _readyz)])
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0, access_log=None)  # a probe every 10 s
    await runner.setup()
    await web.TCPSite(runner, parts.hostname or "0.0.0.0", parts.port or 8081).start()  # noqa: S104 - a pod's probe port
    _runner = runner
    logger.info(f"readiness at {config.readiness}")


async def stop_readiness(**_: Any) -> None:
    global _runner
    if _runner is not None:
        await _runner.cleanup()
        _runner = None
