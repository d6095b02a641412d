"""The MultimodalRanker resource: pydantic models and validation.

The models are the one source of truth: the CRD (`mmrank.api_crd`) and docs/api.md
(`mmrank.api_docs`) are generated from them. Each cross-field rule exists twice: as a CEL
`x-kubernetes-validations` rule the models declare for the CRD and as a model validator here, so
it also holds where CEL is not evaluated (Kubernetes < 1.25, the operator, `mmrank validate`).

Torch-free and kubernetes-free: the operator and the CLI import this module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from mmrank.defaults import ENCODER_MODEL_NAME

GROUP = "mmrank.io"
VERSION = "v1alpha1"
KIND: Final = "MultimodalRanker"
PLURAL = "multimodalrankers"
SINGULAR = "multimodalranker"
SHORT_NAMES = ["mmr"]
API_VERSION = f"{GROUP}/{VERSION}"
CRD_NAME = f"{PLURAL}.{GROUP}"

# Child objects are named `<name>-<suffix>`; Services and labels cap names at 63 characters
# (DNS-1035 label), so the resource name plus the encoder version must leave room for the
# longest suffix ("-backfill-").
DNS_LABEL_MAX = 63
VERSION_MAX = 20
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A Go duration in whole hours, minutes and seconds, in that order, each part at least 1 ("90s",
# "2m30s", "1h30m"): the CRD's pattern and `duration_seconds` are this one expression (RE2 and
# ECMA alike, no lookaround), so what the apiserver admits the operator can read.
DURATION = (
    r"^(?:([1-9][0-9]*)h(?:([1-9][0-9]*)m)?(?:([1-9][0-9]*)s)?"
    r"|([1-9][0-9]*)m(?:([1-9][0-9]*)s)?|([1-9][0-9]*)s)$"
)
# A Kubernetes quantity without a sign ("500m", "2Gi", "1", "1.5", "1e3").
QUANTITY = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|([eE][0-9]+))?$"
# redis://host:port/db, rediss://..., or file:///path. No `user:password@` part and no query
# (redis-py reads `?password=`): credentials come from `passwordSecretRef`, never from the spec.
STORE_URL = r"^(rediss?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?)(:[0-9]{1,5})?(/[0-9]{1,2})?|file:///[^@\s?#]*)$"
MODEL_URI = r"^[a-z][a-z0-9+.-]*://[^\s@]+$"
IMAGE = r"^[^\s]+$"
HTTP_URL = r"^https?://[^\s@]+$"

PHASES = ("Provisioning", "Backfilling", "Progressing", "AwaitingPromotion", "Ready", "RolledBack", "Failed")
CONDITION_TYPES = (
    "EncoderReady",
    "EmbeddingsSynced",
    "RankerReady",
    "CanaryHealthy",
    "SpecAccepted",
    "ChildrenApplied",
    "Ready",
)
Phase = Literal["Provisioning", "Backfilling", "Progressing", "AwaitingPromotion", "Ready", "RolledBack", "Failed"]

DEFAULT_TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
DEFAULT_MMRANK_IMAGE = "ghcr.io/mmrank/mmrank:0.1.0"

# Cross-field rules: CEL in the CRD and model validators raise the same message.
RULE_STEPS = "steps must be strictly increasing"
RULE_TOLERATION = "a toleration with operator Exists must not set value"
RULE_SECRET_NEEDS_REDIS = "passwordSecretRef needs a redis:// or rediss:// url"
RULE_RANKER_SPACE = "ranker.encoderVersion must name the encoder version in spec.encoder (the space it was trained on)"
RULE_CHILD_NAMES = (
    "metadata.name plus spec.encoder.version is too long: child <name>-backfill-<version> must fit in 63 characters"
)
# A transition rule (it compares with the previous spec, `oldSelf`): no model validator can mirror
# it; the operator's own check (`core.immutable_changes`, against what status recorded for the
# version) is the one that holds on every apiserver.
RULE_ENCODER_IMMUTABLE = (
    "spec.encoder.modelUri and spec.encoder.dimension cannot change while "
    "spec.encoder.version stays the same: set a new version to change the model"
)
TRANSITION_RULES = (RULE_ENCODER_IMMUTABLE,)


def duration_seconds(value: str) -> int:
    """Seconds of a DURATION ("30s", "5m", "1h30m")."""
    match = re.fullmatch(DURATION, value)
    if not match:
        raise ValueError(f"{value!r} is not a duration like 30s, 5m, 2m30s or 1h30m")
    hours, minutes, seconds, only_minutes, and_seconds, only_seconds = (int(g or 0) for g in match.groups())
    return 3600 * hours + 60 * (minutes + only_minutes) + seconds + and_seconds + only_seconds


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, bool) or (isinstance(value, int) and value < 0):
        raise ValueError("a quantity is a non-negative integer or a string like 500m, 2Gi")
    if isinstance(value, str) and not re.fullmatch(QUANTITY, value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2Gi, 1)")
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY}),
]


def child_names(name: str, encoder_version: str) -> dict[str, str]:
    """Names of the children one MultimodalRanker owns: the one place that decides them."""
    return {
        "encoder": f"{name}-encoder-{encoder_version}",
        "embedder": f"{name}-embedder",
        "backfill": f"{name}-backfill-{encoder_version}",
        "ranker": f"{name}-ranker",
    }


def max_name_length(encoder_version: str) -> int:
    """The longest resource name whose every child name still fits in a DNS label."""
    longest_suffix = max(len(child) for child in child_names("", encoder_version).values())
    return DNS_LABEL_MAX - longest_suffix


def child_name_problem(name: str, encoder_version: str) -> str | None:
    """Why these names would give a child a name over 63 characters, or None."""
    child, longest = max(child_names(name, encoder_version).items(), key=lambda item: len(item[1]))
    if len(longest) <= DNS_LABEL_MAX:
        return None
    return (
        f"{RULE_CHILD_NAMES}: child {child} name {longest!r} is {len(longest)} characters, over "
        f"{DNS_LABEL_MAX}; shorten the name (at most {max_name_length(encoder_version)} characters with "
        "this encoder version) or the version"
    )


# --- spec -------------------------------------------------------------------------------------


class _Spec(BaseModel):
    """Spec models: camelCase on the wire, unknown fields are errors (the apiserver would prune
    them silently, so a typo must fail here), strict types as the apiserver's schema has them
    ("3" is not an integer)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _plain_mapping(cls, data: Any) -> Any:
        """kopf hands over read-only Mapping views; strict mode wants a dict."""
        return dict(data) if isinstance(data, Mapping) and not isinstance(data, dict) else data


class _Status(BaseModel):
    """Status models: camelCase on the wire, unknown fields ignored (an older operator may read
    a status a newer one wrote)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


def _cel(rule: str, message: str) -> dict[str, Any]:
    return {"x-kubernetes-validations": [{"rule": rule, "message": message}]}


class DynamicBatching(_Spec):
    """Triton dynamic batching of encoder requests."""

    max_batch_size: int = Field(
        64,
        ge=1,
        le=4096,
        description="Largest batch Triton forms from queued requests (config.pbtxt max_batch_size).",
        examples=[64],
    )
    max_queue_delay_microseconds: int = Field(
        2000,
        ge=0,
        le=10_000_000,
        description="How long a request may wait in the queue for a batch to fill, in microseconds.",
        examples=[2000],
    )


class Toleration(_Spec):
    """A Kubernetes toleration, so encoder pods may run on tainted GPU nodes."""

    model_config = ConfigDict(
        json_schema_extra=_cel("self.operator != 'Exists' || !has(self.value) || self.value == ''", RULE_TOLERATION)
    )

    key: str | None = Field(
        None,
        max_length=316,
        description="Taint key the toleration matches; empty with operator Exists matches every taint.",
        examples=["nvidia.com/gpu"],
    )
    operator: Literal["Exists", "Equal"] = Field(
        "Equal", description="Exists (any value) or Equal (value must match).", examples=["Equal"]
    )
    value: str | None = Field(
        None, max_length=63, description="Taint value to match when operator is Equal.", examples=["present"]
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all effects.", examples=["NoExecute"]
    )
    toleration_seconds: int | None = Field(
        None,
        ge=0,
        description="For NoExecute: how long the pod stays bound after the taint appears, in seconds.",
        examples=[300],
    )

    @model_validator(mode="after")
    def _exists_has_no_value(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError(RULE_TOLERATION)
        return self


class ResourceRequirements(_Spec):
    """Kubernetes compute resources (requests and limits) for one container."""

    requests: dict[str, Quantity] | None = Field(
        None,
        description="Resources the scheduler reserves, by name (cpu, memory, nvidia.com/gpu).",
        examples=[{"cpu": "1", "memory": "2Gi"}],
    )
    limits: dict[str, Quantity] | None = Field(
        None, description="Most the container may use, by name.", examples=[{"memory": "4Gi"}]
    )


class EncoderSpec(_Spec):
    """The item encoder served by Triton: one Deployment per live encoder version."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            "self.version != oldSelf.version || (self.modelUri == oldSelf.modelUri && "
            "self.dimension == oldSelf.dimension)",
            RULE_ENCODER_IMMUTABLE,
        )
    )

    version: str = Field(
        ...,
        min_length=1,
        max_length=VERSION_MAX,
        pattern=DNS1035_LABEL,
        description="Encoder version, the name of its embedding space. A DNS-1035 label: it "
        "becomes part of child names (<name>-encoder-<version>, <name>-backfill-<version>), "
        "which must stay within 63 characters.",
        examples=["e2"],
    )
    model_uri: str = Field(
        ...,
        max_length=1024,
        pattern=MODEL_URI,
        description="Where the Triton model "
        "repository lives (s3://, gs://, https://, pvc://); an init container pulls it. "
        "Fixed for a version once set (like dimension): another model is a new version.",
        examples=["s3://models/encoder/e2"],
    )
    model_name: str = Field(
        ENCODER_MODEL_NAME,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$",
        description="Triton model name of the encoder inside the repository.",
        examples=["item_encoder"],
    )
    image: str = Field(
        DEFAULT_TRITON_IMAGE,
        max_length=512,
        pattern=IMAGE,
        description="Triton Inference Server image.",
        examples=[DEFAULT_TRITON_IMAGE],
    )
    backend: Literal["python", "onnxruntime", "pytorch"] = Field(
        "python",
        description="Triton backend of the exported encoder: python (tokenizes titles itself), "
        "onnxruntime or pytorch (take TOKEN_IDS).",
        examples=["onnxruntime"],
    )
    replicas: int = Field(1, ge=1, le=100, description="Triton pods per encoder version.", examples=[2])
    gpus: int = Field(
        1, ge=0, le=16, description="nvidia.com/gpu per replica; 0 runs the encoder on CPU.", examples=[1]
    )
    dimension: int = Field(
        128,
        ge=8,
        le=4096,
        description="Width of the L2-normalised item embedding. Fixed for a version once set.",
        examples=[128],
    )
    dynamic_batching: DynamicBatching = Field(
        default_factory=DynamicBatching,
        description="Triton dynamic batching settings.",
        json_schema_extra={"default": {}},
    )
    node_selector: dict[str, Annotated[str, Field(min_length=1, max_length=63)]] = Field(
        default_factory=dict,
        description="Node labels (with non-empty values) the encoder pods must run on.",
        examples=[{"nvidia.com/gpu.product": "NVIDIA-A10"}],
        json_schema_extra={"default": {}},
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=32,
        description="Tolerations of the encoder pods (e.g. for tainted GPU nodes).",
        json_schema_extra={"default": []},
    )
    resources: ResourceRequirements | None = Field(
        None,
        description="CPU and memory of the Triton container; GPUs come from `gpus`. Unset: requests cpu 1, memory 2Gi.",
        examples=[{"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}],
    )


class RankerModelSpec(_Spec):
    """The CTR ranker served by a KServe InferenceService, pinned to one embedding space."""

    version: str = Field(
        ...,
        min_length=1,
        max_length=VERSION_MAX,
        pattern=DNS1035_LABEL,
        description="Ranker version; a new version goes through the canary rollout.",
        examples=["r2"],
    )
    model_uri: str = Field(
        ...,
        max_length=1024,
        pattern=MODEL_URI,
        description="Where the ranker artifact (ranker.json, weights.pt) lives; KServe's storage initializer pulls it.",
        examples=["s3://models/ranker/r2"],
    )
    encoder_version: str = Field(
        ...,
        min_length=1,
        max_length=VERSION_MAX,
        pattern=DNS1035_LABEL,
        description="The embedding space (encoder version) this ranker was trained on; "
        "it serves only while that space is fresh and backfilled.",
        examples=["e2"],
    )
    image: str = Field(
        DEFAULT_MMRANK_IMAGE,
        max_length=512,
        pattern=IMAGE,
        description="Predictor image (the mmrank KServe model server).",
        examples=[DEFAULT_MMRANK_IMAGE],
    )
    replicas: int = Field(1, ge=1, le=100, description="Predictor pods.", examples=[3])
    resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(requests={"cpu": "1", "memory": "2Gi"}),
        description="CPU and memory of the predictor container.",
        json_schema_extra={"default": {"requests": {"cpu": "1", "memory": "2Gi"}}},
    )
    max_candidates: int = Field(
        500,
        ge=1,
        le=10_000,
        description="Most candidates one rank request may carry; larger requests are refused.",
        examples=[500],
    )
    history_length: int = Field(
        1000,
        ge=1,
        le=10_000,
        description="Most behaviour-history items the ranker reads per user (SimTier and MAKE attention).",
        examples=[1000],
    )
    serving: Literal["KServe", "Kubernetes"] = Field(
        "KServe",
        description="Serving backend. KServe: an InferenceService (spec.rollout.kserveMode picks "
        "Standard or Knative), the canary split by weight in 1 % steps. Kubernetes: for clusters without "
        "KServe, a stable and a canary Deployment behind one Service, the split by replica ratio, so a step "
        "rounds down to a multiple of 100 / replicas percent (steps that round to 0 % are skipped).",
        examples=["Kubernetes"],
    )


class SecretKeyRef(_Spec):
    """A key of a Secret in the resource's namespace."""

    name: str = Field(
        ...,
        min_length=1,
        max_length=253,
        pattern=DNS1123_SUBDOMAIN,
        description="Secret name.",
        examples=["redis-auth"],
    )
    key: str = Field(
        "password",
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="Key inside the Secret.",
        examples=["password"],
    )


class StoreSpec(_Spec):
    """Connection to the embedding store; credentials only by Secret reference."""

    model_config = ConfigDict(
        json_schema_extra=_cel("!has(self.passwordSecretRef) || self.url.startsWith('redis')", RULE_SECRET_NEEDS_REDIS)
    )

    url: str = Field(
        ...,
        max_length=512,
        pattern=STORE_URL,
        description="redis://host:port/db (or rediss://, "
        "or file:///path for a single-node quick start). Never credentials: use "
        "passwordSecretRef.",
        examples=["redis://redis.ads.svc:6379/0"],
    )
    password_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the store password; no password is ever written in the spec."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_inline_password(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if isinstance(key, str) and key.lower() in {"password", "pass", "auth", "token", "secret"}:
                    raise ValueError(
                        f"{key}: no password in the spec; put it in a Secret and set passwordSecretRef {{name, key}}"
                    )
        return data

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, url: str) -> str:
        authority = url.split("://", 1)[-1].split("/", 1)[0]
        if "@" in authority:
            raise ValueError("url must not carry credentials (user:password@); use passwordSecretRef")
        return url

    @model_validator(mode="after")
    def _secret_needs_redis(self) -> StoreSpec:
        if self.password_secret_ref is not None and not self.url.startswith("redis"):
            raise ValueError(RULE_SECRET_NEEDS_REDIS)
        return self


# Defaults of the embedder's and a backfill pod's resources (docs/operator.md, "Pod security").
EMBEDDER_REQUESTS: dict[str, Any] = {"cpu": "250m", "memory": "256Mi"}
EMBEDDER_LIMITS: dict[str, Any] = {"memory": "1Gi"}
BACKFILL_REQUESTS: dict[str, Any] = {"cpu": "250m", "memory": "512Mi"}
BACKFILL_LIMITS: dict[str, Any] = {"memory": "2Gi"}


class BackfillSpec(_Spec):
    """The Indexed Job that embeds the whole catalogue into a new space."""

    parallelism: int = Field(
        4, ge=1, le=256, description="Backfill pods running at once (shards in flight).", examples=[4]
    )
    batch_size: int = Field(
        256, ge=1, le=8192, description="Items per encoder request during backfill.", examples=[256]
    )
    catalogue_uri: str | None = Field(
        None,
        max_length=1024,
        pattern=MODEL_URI,
        description="Where the catalogue snapshot to re-embed lives (a directory of items.parquet and "
        "images.npy, as `mmrank shop generate` or the catalogue export writes it); every backfill pod "
        "fetches it into /mnt/catalogue before it starts. Without it a new space cannot be backfilled: "
        "status says so and the ranker stays on its current space.",
        examples=["s3://catalogue/snapshots/2026-11-29"],
    )
    max_attempts: int = Field(
        4,
        ge=1,
        le=100,
        description="Backfill Jobs tried for one space before it is "
        "marked Failed: a failed Job is replaced by a new one after retryBackoff, doubled "
        "after each failure (at most 10 minutes).",
        examples=[4],
    )
    retry_backoff: str = Field(
        "30s",
        pattern=DURATION,
        description="Wait after the first failed backfill Job before the next starts (a Go duration: 30s, 2m).",
        examples=["30s"],
    )
    resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(requests=dict(BACKFILL_REQUESTS), limits=dict(BACKFILL_LIMITS)),
        description="CPU and memory of each backfill pod's container (default: requests cpu 250m, memory "
        "512Mi; limit memory 2Gi). Its memory grows with the catalogue's titles (images are memory-mapped): "
        "raise the limit for catalogues of several million items.",
        examples=[{"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}],
        json_schema_extra={"default": {"requests": BACKFILL_REQUESTS, "limits": BACKFILL_LIMITS}},
    )


class ItemEventsSpec(_Spec):
    """The Redis Stream of new and changed items the embedder consumes."""

    stream: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Stream key of item events. "
        "Unset: the ranker's own, mmrank:{<namespace>/<name>}:items. A stream named here "
        "may be shared by several rankers: each reads every event with its own consumer "
        "group, and deleting a ranker leaves the stream in place.",
        examples=["shop:items"],
    )
    consumer_group: str = Field(
        "embedder",
        min_length=1,
        max_length=256,
        description="Consumer group the "
        "embedder reads the stream with, within the ranker's scope: "
        "mmrank:{<namespace>/<name>}:<consumerGroup>.",
        examples=["embedder"],
    )


class EmbedderSpec(_Spec):
    """The Deployment embedding new items into every live space in real time."""

    image: str = Field(
        DEFAULT_MMRANK_IMAGE,
        max_length=512,
        pattern=IMAGE,
        description="Embedder image.",
        examples=[DEFAULT_MMRANK_IMAGE],
    )
    replicas: int = Field(1, ge=1, le=100, description="Embedder pods (consumers in the group).", examples=[1])
    resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(requests=dict(EMBEDDER_REQUESTS), limits=dict(EMBEDDER_LIMITS)),
        description="CPU and memory of the embedder container (default: requests cpu 250m, memory 256Mi; "
        "limit memory 1Gi). It forwards items to Triton and writes vectors: no model runs in it.",
        examples=[{"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}}],
        json_schema_extra={"default": {"requests": EMBEDDER_REQUESTS, "limits": EMBEDDER_LIMITS}},
    )


class EmbeddingsSpec(_Spec):
    """Where embeddings live and how a new space gets filled."""

    store: StoreSpec = Field(..., description="Embedding store connection.")
    min_coverage: float = Field(
        0.99,
        ge=0.0,
        le=1.0,
        description="Fraction of the catalogue a space must hold before a ranker trained on it takes traffic.",
        examples=[0.99],
    )
    backfill: BackfillSpec = Field(
        default_factory=BackfillSpec, description="Backfill Job settings.", json_schema_extra={"default": {}}
    )
    item_events: ItemEventsSpec = Field(
        default_factory=ItemEventsSpec, description="Item event stream.", json_schema_extra={"default": {}}
    )
    retained_spaces: int = Field(
        1,
        ge=0,
        le=10,
        description="Retired spaces kept in the store after a rollout (for a fast rollback); older ones are deleted.",
        examples=[1],
    )
    embedder: EmbedderSpec = Field(
        default_factory=EmbedderSpec, description="Real-time embedder settings.", json_schema_extra={"default": {}}
    )


class AnalysisSpec(_Spec):
    """Canary checks, each comparing canary with stable over one interval (from Prometheus)."""

    max_error_rate: float = Field(
        0.01, ge=0.0, le=1.0, description="Highest canary error rate (errors / requests) that passes.", examples=[0.01]
    )
    max_latency_p99_ms: float = Field(
        100.0,
        gt=0.0,
        le=60_000.0,
        description="Highest canary p99 latency in milliseconds that passes.",
        examples=[100],
    )
    min_click_rate_ratio: float = Field(
        0.95,
        ge=0.0,
        le=10.0,
        description="Lowest canary CTR / stable CTR (from click feedback) that passes.",
        examples=[0.95],
    )
    min_requests: int = Field(
        500,
        ge=0,
        le=1_000_000_000,
        description="Canary requests a step needs before it is judged; fewer means wait.",
        examples=[500],
    )
    failure_limit: int = Field(
        2, ge=1, le=100, description="Failed checks before the canary is rolled back.", examples=[2]
    )


def _steps_problem(steps: list[int]) -> str | None:
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        return RULE_STEPS
    return None


class RolloutSpec(_Spec):
    """How a new ranker version reaches traffic: canary steps, checks, promotion."""

    steps: list[Annotated[int, Field(ge=1, le=99)]] = Field(
        default_factory=lambda: [10, 25, 50],
        max_length=20,
        description="Canary traffic percentages, strictly increasing, each 1..99; after the last step the "
        "canary is promoted to 100 %.",
        examples=[[10, 25, 50]],
        json_schema_extra={
            "default": [10, 25, 50],
            **_cel("self.isSorted() && self.all(x, self.indexOf(x) == self.lastIndexOf(x))", RULE_STEPS),
        },
    )
    interval: str = Field(
        "5m",
        max_length=16,
        pattern=DURATION,
        description="Time at each step before the "
        "analysis judges it: a Go duration in whole h, m, s (e.g. 30s, 5m, 1h30m).",
        examples=["5m"],
    )
    analysis: AnalysisSpec = Field(
        default_factory=AnalysisSpec,
        description="Checks that decide advance or rollback.",
        json_schema_extra={"default": {}},
    )
    promotion: Literal["Automatic", "Manual"] = Field(
        "Automatic",
        description="Automatic: promote after the last step passes. Manual: wait in AwaitingPromotion for a person.",
        examples=["Manual"],
    )
    kserve_mode: Literal["Standard", "Knative"] = Field(
        "Standard",
        description="KServe deployment mode: "
        "Standard (raw Deployments, spec.canary weights) or "
        "Knative (canaryTrafficPercent).",
        examples=["Knative"],
    )
    prometheus_url: str = Field(
        "http://prometheus.monitoring.svc:9090",
        max_length=512,
        pattern=HTTP_URL,
        description="Prometheus the canary analysis queries; the embedder's freshness p99 "
        "(status.embeddings.freshnessP99Seconds) is read there too.",
        examples=["http://prometheus.monitoring.svc:9090"],
    )

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: list[int]) -> list[int]:
        problem = _steps_problem(steps)
        if problem:
            raise ValueError(problem)
        return steps


class StorageSpec(_Spec):
    """How pods fetch what the spec points at (encoder repository, ranker artifact, catalogue):
    an init container runs `mmrank fetch`, which is KServe's own storage code (s3://, gs://,
    http(s)://, hf://, ...); `pvc://CLAIM/PATH` mounts the claim read-only and copies from it."""

    image: str = Field(
        DEFAULT_MMRANK_IMAGE,
        max_length=512,
        pattern=IMAGE,
        description="Image of the fetch init containers (the mmrank runtime image carries KServe's storage module).",
        examples=[DEFAULT_MMRANK_IMAGE],
    )
    secret_name: str | None = Field(
        None,
        max_length=253,
        pattern=DNS1123_SUBDOMAIN,
        description="Secret "
        "whose keys become the fetch containers' environment, the variables "
        "KServe's storage code reads (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AZURE_STORAGE_ACCESS_KEY, HF_TOKEN, ...).",
        examples=["model-store-credentials"],
    )
    service_account_name: str | None = Field(
        None,
        max_length=253,
        pattern=DNS1123_SUBDOMAIN,
        description=(
            "ServiceAccount the pods that fetch run under, for cloud identities bound to it (IRSA, GKE Workload "
            "Identity); also set on the KServe predictor."
        ),
        examples=["model-reader"],
    )


class RankerSpec(_Spec):
    """Desired state: which encoder and ranker serve, where embeddings live, how rollouts go."""

    model_config = ConfigDict(
        json_schema_extra=_cel("self.ranker.encoderVersion == self.encoder.version", RULE_RANKER_SPACE)
    )

    encoder: EncoderSpec = Field(..., description="The item encoder (Triton).")
    ranker: RankerModelSpec = Field(..., description="The CTR ranker (KServe).")
    embeddings: EmbeddingsSpec = Field(..., description="Embedding store, coverage gate, backfill, real-time embedder.")
    rollout: RolloutSpec = Field(
        default_factory=RolloutSpec,
        description="Canary rollout of new ranker versions.",
        json_schema_extra={"default": {}},
    )
    storage: StorageSpec = Field(
        default_factory=StorageSpec,
        description="How pods fetch model artifacts and the catalogue, with which credentials.",
        json_schema_extra={"default": {}},
    )

    @model_validator(mode="after")
    def _ranker_on_encoder_space(self) -> RankerSpec:
        if self.ranker.encoder_version != self.encoder.version:
            raise ValueError(
                f"{RULE_RANKER_SPACE}: ranker.encoderVersion is {self.ranker.encoder_version!r}, "
                f"spec.encoder.version is {self.encoder.version!r}"
            )
        return self


# --- status -----------------------------------------------------------------------------------


class Condition(_Status):
    """A Kubernetes condition (metav1.Condition shape)."""

    type: str = Field(
        ...,
        min_length=1,
        max_length=316,
        pattern=r"^[A-Za-z][A-Za-z0-9]*$",
        description="Condition type: EncoderReady, EmbeddingsSynced, RankerReady, CanaryHealthy, "
        "SpecAccepted, ChildrenApplied, Ready.",
        examples=["CanaryHealthy"],
    )
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.", examples=["True"])
    reason: str = Field(
        ...,
        min_length=1,
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="CamelCase reason for the last transition.",
        examples=["ChecksPassed"],
    )
    message: str = Field(
        "", max_length=32768, description="Human-readable detail.", examples=["step 2 of 3 (25 %): all checks passed"]
    )
    last_transition_time: str = Field(
        ...,
        description="When status last changed (RFC 3339).",
        examples=["2026-11-29T03:00:00Z"],
        json_schema_extra={"format": "date-time"},
    )
    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation the condition was computed from.", examples=[4]
    )


class VersionPair(_Status):
    """A ranker version and the encoder version (space) it runs on."""

    ranker_version: str = Field(..., description="Ranker version.", examples=["r1"])
    encoder_version: str = Field(
        ..., description="Encoder version (embedding space) the ranker reads.", examples=["e1"]
    )
    ranker: dict[str, Any] | None = Field(
        None,
        description="The stable ranker's spec.ranker as it was "
        "promoted: what the operator keeps serving beside a canary.",
        examples=[{"version": "r1", "modelUri": "s3://models/ranker/r1", "encoderVersion": "e1"}],
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class AnalysisResult(_Status):
    """One canary check as measured in Prometheus; null values had no data."""

    time: str = Field(
        ...,
        description="When the check ran (RFC 3339).",
        examples=["2026-11-29T03:05:00Z"],
        json_schema_extra={"format": "date-time"},
    )
    requests: int = Field(0, ge=0, description="Canary requests during the interval.", examples=[1200])
    error_rate: float | None = Field(None, ge=0.0, description="Canary errors / requests.", examples=[0.002])
    latency_p99_ms: float | None = Field(
        None, ge=0.0, description="Canary p99 latency in milliseconds.", examples=[42.5]
    )
    click_rate_ratio: float | None = Field(None, ge=0.0, description="Canary CTR / stable CTR.", examples=[1.03])
    passed: bool = Field(..., description="Whether every check passed.", examples=[True])
    verdict: Literal["Passed", "Failed", "Inconclusive"] | None = Field(
        None,
        description="Passed (every check inside its threshold), Failed (at least one outside) or "
        "Inconclusive (fewer than minRequests, no data, or Prometheus unreachable: the step waits).",
        examples=["Passed"],
    )
    failed_checks: list[Literal["errorRate", "latencyP99Ms", "clickRateRatio"]] | None = Field(
        None,
        max_length=3,
        description="The checks outside their thresholds (named after the measured fields); empty when none failed.",
        examples=[[]],
    )
    message: str = Field(
        "", max_length=4096, description="Which check failed and why, or why it waits.", examples=["all checks passed"]
    )


class RolloutRequest(_Status):
    """A person's decision about the canary, written by `kubectl mmrank promote|abort|retry` (or
    `kubectl patch --subresource=status`); the operator acts on it, records it in history and
    clears it."""

    action: Literal["Promote", "Abort", "Retry"] = Field(
        ...,
        description="Promote (from AwaitingPromotion), Abort (any time) or Retry (from RolledBack).",
        examples=["Promote"],
    )
    requested_at: str = Field(
        ..., max_length=64, description="When it was asked (RFC 3339).", examples=["2026-11-29T03:20:00Z"]
    )
    requested_by: str = Field(
        "", max_length=253, description="Who asked (free text, for the history).", examples=["alice"]
    )


class CanaryStatus(_Status):
    """The canary ranker being rolled out (kept after a rollback, so `retry` knows what to retry)."""

    ranker_version: str = Field(..., description="Canary ranker version.", examples=["r2"])
    encoder_version: str = Field(..., description="Encoder version (space) the canary reads.", examples=["e2"])
    identity: str = Field(
        "",
        description="Hash of the canary's ranker spec (version, encoder, modelUri, "
        "image): a rollout rolled back stays RolledBack until it changes or `retry`.",
        examples=["4f1c2a9e0b7d3c55"],
    )
    state: Literal["Progressing", "AwaitingPromotion", "Promoted", "RolledBack"] = Field(
        "Progressing",
        description="Progressing (stepping through spec.rollout.steps), AwaitingPromotion "
        "(every step passed, Manual promotion), Promoted (taking all traffic) or RolledBack.",
        examples=["Progressing"],
    )
    step: int = Field(0, ge=0, description="Index of the current step in `steps`.", examples=[1])
    steps: list[int] = Field(
        default_factory=list,
        description="The canary's traffic at each step as the "
        "serving backend can split it (spec.rollout.steps rounded down to "
        "`granularityPercent`).",
        examples=[[25, 50]],
    )
    granularity_percent: float = Field(
        1.0,
        description="Smallest traffic share the backend can give: 1 "
        "for KServe, 100 / replicas for the Kubernetes backend.",
        examples=[25.0],
    )
    traffic_percent: int = Field(
        0, ge=0, le=100, description="Share of requests the canary receives now.", examples=[25]
    )
    failed_checks: int = Field(0, ge=0, description="Failed analysis checks so far.", examples=[0])
    step_started_at: str = Field(
        "",
        description="When the current step's analysis window started "
        "(RFC 3339); the step is judged `interval` after it.",
        examples=["2026-11-29T03:00:00Z"],
    )
    last_analysis: AnalysisResult | None = Field(None, description="The most recent analysis with its measured values.")
    last_request: RolloutRequest | None = Field(
        None, description="The last request handled (a replayed request is not acted on twice)."
    )


class HistoryEntry(_Status):
    """One rollout decision: what was asked or observed, when, and the numbers that decided."""

    time: str = Field(..., description="When it was decided (RFC 3339).", examples=["2026-11-29T03:05:00Z"])
    reason: str = Field(
        ...,
        description="CanaryStarted, StepPassed, AnalysisFailed, AwaitingPromotion, "
        "Promoted, RolledBack, Aborted, Retried, Superseded, or *Refused.",
        examples=["StepPassed"],
    )
    message: str = Field(
        "", max_length=4096, description="What happened, in words.", examples=["step 1 of 3 (10 %) passed"]
    )
    ranker_version: str = Field("", description="Canary ranker version.", examples=["r2"])
    step: int = Field(0, ge=0, description="Step index when it was decided.", examples=[0])
    traffic_percent: int = Field(0, ge=0, le=100, description="Canary traffic after the decision.", examples=[25])
    analysis: AnalysisResult | None = Field(None, description="The analysis that decided, if any.")


class BackfillProgress(_Status):
    """Progress and attempts of the backfill of one space."""

    completed_shards: int = Field(0, ge=0, description="Shards of the current Job finished.", examples=[8])
    total_shards: int = Field(0, ge=0, description="Shards of the current Job.", examples=[8])
    progress: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Catalogue rows the backfill has stored / "
        "catalogue size (completedShards / totalShards while the store is not read).",
        examples=[1.0],
    )
    job: str | None = Field(
        None,
        description="The Job of the current (or last) attempt: "
        "<name>-backfill-<version>-<shape>-<attempt>, shape a hash of what a Job cannot change.",
        examples=["shop-backfill-e2-3f9a2c-1"],
    )
    attempts: int | None = Field(
        None, ge=0, description="Backfill Jobs started for this space (of its current shape).", examples=[1]
    )
    state: Literal["Running", "Retrying", "Failed", "Complete"] | None = Field(
        None,
        description="Running, Retrying (a Job failed; the next starts at retryAt), Failed (maxAttempts "
        "Jobs failed: none starts until spec.embeddings.backfill or the encoder changes) or Complete.",
        examples=["Running"],
    )
    retry_at: str | None = Field(
        None, description="When the next attempt starts (RFC 3339), while Retrying.", examples=["2026-11-29T03:01:00Z"]
    )
    last_failure: str | None = Field(
        None,
        max_length=4096,
        description="Why the last failed attempt failed.",
        examples=[
            "attempt 1 of 4 (shop-backfill-e2-3f9a2c-1): BackoffLimitExceeded: "
            "Job has reached the specified backoff limit"
        ],
    )


class SpaceStatus(_Status):
    """One embedding space in the store."""

    version: str = Field(..., description="Encoder version that produced the space.", examples=["e2"])
    coverage: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of the catalogue with an embedding: "
        "catalogue rows the backfill stored / catalogue size (items outside the catalogue "
        "never count).",
        examples=[0.995],
    )
    items: int = Field(0, ge=0, description="Items embedded (catalogue or not).", examples=[9950])
    model_uri: str | None = Field(
        None,
        description="spec.encoder.modelUri this version was first seen with: "
        "a spec changing it for this version is refused.",
        examples=["s3://models/encoder/e2"],
    )
    dimension: int | None = Field(
        None,
        ge=1,
        description="spec.encoder.dimension this version was first seen "
        "with: a spec changing it for this version is refused.",
        examples=[128],
    )
    backfill: BackfillProgress | None = Field(None, description="Backfill progress, while one runs or ran.")


class EmbeddingsStatus(_Status):
    """Embedding spaces and how fresh they are."""

    spaces: list[SpaceStatus] = Field(
        default_factory=list,
        description="Live and retained spaces.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["version"]},
    )
    coverage: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Coverage of the space of "
        "spec.encoder.version (what the minCoverage gate reads; the Coverage column).",
        examples=[0.995],
    )
    freshness_p99_seconds: float | None = Field(
        None, ge=0.0, description="p99 seconds from an item event to its embedding in the store.", examples=[1.2]
    )


class RankerStatus(_Status):
    """Observed state, written by the operator only."""

    phase: Phase | None = Field(
        None,
        description="Provisioning, Backfilling, Progressing, AwaitingPromotion, Ready, RolledBack or Failed.",
        examples=["Progressing"],
    )
    observed_generation: int | None = Field(
        None,
        ge=0,
        description="metadata.generation the operator last acted on; whether all of it was applied is ChildrenApplied.",
        examples=[4],
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="EncoderReady, EmbeddingsSynced, RankerReady, CanaryHealthy, SpecAccepted, ChildrenApplied, Ready.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    stable: VersionPair | None = Field(None, description="Versions serving all traffic outside a canary.")
    canary: CanaryStatus | None = Field(None, description="The rollout in progress, or the last one rolled back.")
    request: RolloutRequest | None = Field(
        None, description="A pending promote/abort/retry (see `kubectl mmrank`); cleared once handled."
    )
    history: list[HistoryEntry] = Field(
        default_factory=list, max_length=30, description="The last 30 rollout decisions, oldest first."
    )
    embeddings: EmbeddingsStatus | None = Field(None, description="Embedding spaces, coverage, freshness.")

    @field_validator("conditions")
    @classmethod
    def _one_per_type(cls, conditions: list[Condition]) -> list[Condition]:
        types = [c.type for c in conditions]
        if len(types) != len(set(types)):
            raise ValueError("conditions must have one entry per type")
        return conditions


# --- the resource -----------------------------------------------------------------------------


class ObjectMeta(BaseModel):
    """The metadata fields mmrank reads; everything else the apiserver sets is kept as is."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str = Field(
        ...,
        min_length=1,
        max_length=DNS_LABEL_MAX,
        pattern=DNS1035_LABEL,
        description="Resource name; prefix of every child name.",
    )
    namespace: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    generation: int | None = None
    uid: str | None = None
    resource_version: str | None = None


class MultimodalRanker(BaseModel):
    """A multimodal CTR ranker in production: encoder, embeddings, ranker, rollout."""

    model_config = ConfigDict(
        populate_by_name=True,
        extra="forbid",
        json_schema_extra=_cel(
            f"size(self.metadata.name) + size(self.spec.encoder.version) <= {DNS_LABEL_MAX - len('--backfill')}",
            RULE_CHILD_NAMES,
        ),
    )

    # API_VERSION is built by an f-string, a plain str to mypy; its text is this Literal.
    api_version: Literal["mmrank.io/v1alpha1"] = Field(API_VERSION, alias="apiVersion")  # type: ignore[arg-type]  # API_VERSION is a str to mypy
    kind: Literal["MultimodalRanker"] = KIND
    metadata: ObjectMeta
    spec: RankerSpec
    status: RankerStatus | None = None

    @model_validator(mode="after")
    def _child_names_fit(self) -> MultimodalRanker:
        problem = child_name_problem(self.metadata.name, self.spec.encoder.version)
        if problem:
            raise ValueError(problem)
        return self

    def children(self) -> dict[str, str]:
        return child_names(self.metadata.name, self.spec.encoder.version)

    def to_manifest(self) -> dict[str, Any]:
        """The object as the apiserver stores it (camelCase, no nulls)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --- validation for `mmrank validate` ---------------------------------------------------------


def _loc_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in {"function-after", "function-before"} or "[" in str(part):
            continue
        else:
            path += f".{part}" if path else str(part)
    return path or "(root)"


def problems(manifest: Any) -> list[str]:
    """Every problem of one manifest, each prefixed with its field path (empty: valid)."""
    found: list[str] = []
    try:
        MultimodalRanker.model_validate(manifest)
    except ValidationError as exc:
        found = list(dict.fromkeys(_problem(err) for err in exc.errors()))
    raw = _raw_child_name_problem(manifest)
    if raw and raw not in found:
        found.append(raw)
    return found


def _raw_child_name_problem(manifest: Any) -> str | None:
    """The child-name check on the raw manifest, so it is reported even when other fields fail."""
    try:
        name, version = manifest["metadata"]["name"], manifest["spec"]["encoder"]["version"]
    except (KeyError, TypeError):
        return None
    return child_name_problem(name, version) if isinstance(name, str) and isinstance(version, str) else None


_UNION_BRANCHES = {"int", "str"}  # pydantic tags each branch of `int | str` (a quantity) in `loc`


def _problem(err: Any) -> str:
    """`path: message`; root-level rules name their fields in the message itself."""
    loc = tuple(err["loc"])
    if loc and loc[-1] in _UNION_BRANCHES:
        return f"{_loc_path(loc[:-1])}: Input should be a quantity: an integer or a string like 500m, 2Gi"
    return f"{_loc_path(loc)}: {_message(err)}" if loc else _message(err)


def _message(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field (the apiserver would drop it silently)"
    if err["type"] == "model_type":
        return "Input should be an object (a mapping of fields)"
    return str(err["msg"]).removeprefix("Value error, ")


def _is_ours(document: Any) -> bool:
    """Other kinds in the same file (a Secret beside the ranker) are not ours to judge; a wrong
    apiVersion of our group or a missing kind is."""
    if not isinstance(document, dict):
        return True
    kind, api_version = document.get("kind"), document.get("apiVersion")
    group = api_version.split("/")[0] if isinstance(api_version, str) and "/" in api_version else None
    return not (isinstance(kind, str) and kind != KIND and group != GROUP)


def validate_file(filename: str) -> list[tuple[str, list[str]]]:
    """(label, problems) for each YAML document in `filename` (`-` reads stdin)."""
    import pathlib
    import sys

    import yaml

    try:
        text = sys.stdin.read() if filename == "-" else pathlib.Path(filename).read_text(encoding="utf-8")
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        return [(filename, [f"(file): cannot read a YAML manifest: {exc}"])]
    if not documents:
        return [(filename, ["(file): no manifest in it"])]
    results = []
    for index, document in enumerate(documents):
        if not _is_ours(document):
            continue
        name = document.get("metadata", {}).get("name") if isinstance(document, dict) else None
        label = filename if len(documents) == 1 else f"{filename}#{index}"
        results.append((f"{label} ({name})" if isinstance(name, str) else label, problems(document)))
    return results
