"""The embedder's configuration: flags of `mmrank embedder run`, or what the operator sets.

Encoders ("every live encoder version") come from `--encoder SPACE=HOST:PORT[/MODEL]` or the
environment variable `MMRANK_ENCODERS` ("e1=triton-e1:8001,e2=triton-e2:8001/item_encoder"),
which the operator sets on the embedder Deployment. `MMRANK_STORE_URL` (with
`MMRANK_STORE_PASSWORD`), `MMRANK_REDIS_URL` (the stream's Redis; defaults to the store when that
is Redis), `MMRANK_SCOPE`, `MMRANK_ITEM_STREAM` and `MMRANK_CONSUMER_GROUP` likewise.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Sequence
from typing import Any

from mmrank.encoders.triton_client import EncoderTarget, parse_encoders
from mmrank.store import DEFAULT_SCOPE, Scope, scope_from_env

ENV_ENCODERS = "MMRANK_ENCODERS"
ENV_STORE = "MMRANK_STORE_URL"
ENV_REDIS = "MMRANK_REDIS_URL"
ENV_STREAM = "MMRANK_ITEM_STREAM"
ENV_GROUP = "MMRANK_CONSUMER_GROUP"


@dataclasses.dataclass
class EmbedderConfig:
    """One embedder process; `config_from_env` fills it from flags and the operator's environment."""

    encoders: list[EncoderTarget]
    store_url: str
    redis_url: str
    batch_size: int = 32
    max_wait: float = 0.05
    in_flight: int = 2
    consumer: str = dataclasses.field(default_factory=socket.gethostname)
    claim_idle: float = 30.0
    idle_block: float = 1.0
    dtype: str = "float16"
    http_host: str = "0.0.0.0"
    http_port: int | None = 8080
    backoff_base: float = 0.1
    backoff_cap: float = 5.0
    triton_timeout: float = 30.0
    scope: Scope = DEFAULT_SCOPE
    stream: str = ""  # default: the scope's item stream; a named one may be shared by rankers
    dead_stream: str = ""  # default: the scope's dead letters (always the ranker's own)
    group: str = "embedder"  # scoped to the ranker: <prefix>embedder
    max_deliveries: int = 5
    forget_consumer_after: float = 600.0
    trim_interval: float = 5.0
    stream_max_len: int = 100_000
    dead_letter_max_len: int = 10_000
    trace: str = ""  # debug: JSON lines of per-batch stage times, GC pauses and loop delays
    freeze_gc: bool = False  # gc.freeze() after setup: for the embedder's own process (the CLI), not a library user

    def __post_init__(self) -> None:
        if self.max_deliveries < 3:
            raise ValueError(
                f"max_deliveries must be at least 3 (a batch-mate of a crashing entry is delivered "
                f"up to 3 times), got {self.max_deliveries}"
            )
        self.stream = self.stream or self.scope.item_stream
        self.dead_stream = self.dead_stream or self.scope.dead_letter_stream
        if not self.scope.owns(self.group):
            self.group = self.scope.consumer_group(self.group)


def config_from_env(
    encoders: Sequence[str] = (),
    store_url: str | None = None,
    redis_url: str | None = None,
    scope: str | None = None,
    **overrides: Any,
) -> EmbedderConfig:
    """Flags first, then MMRANK_ENCODERS / MMRANK_STORE_URL / MMRANK_REDIS_URL / MMRANK_SCOPE /
    MMRANK_ITEM_STREAM / MMRANK_CONSUMER_GROUP (what the operator sets on the Deployment)."""
    specs = list(encoders) or [os.environ.get(ENV_ENCODERS, "")]
    store_url = store_url or os.environ.get(ENV_STORE, "")
    if not store_url:
        raise ValueError(f"no store: pass --store URL or set {ENV_STORE}")
    redis_url = redis_url or os.environ.get(ENV_REDIS) or (store_url if store_url.startswith("redis") else "")
    if not redis_url:
        raise ValueError(f"the item stream needs Redis: pass --redis URL or set {ENV_REDIS}")
    overrides.setdefault("stream", os.environ.get(ENV_STREAM) or None)
    overrides.setdefault("group", os.environ.get(ENV_GROUP) or None)
    return EmbedderConfig(
        encoders=parse_encoders(specs),
        store_url=store_url,
        redis_url=redis_url,
        scope=scope_from_env(scope),
        **{k: v for k, v in overrides.items() if v is not None},
    )
