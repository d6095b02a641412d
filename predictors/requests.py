"""What a ranking request may say, what the answer says, and the limits on both.

One ranking request ranks one user's candidates. A v1 body is KServe's `{"instances": [...]}`
with one ranking request per instance, or one ranking request alone (`RankRequest`, schema
exported to `v1_request.schema.json`); a v2 request (REST or gRPC) carries the same fields as
named tensors (`parse_v2`). Every check here is a pure function that raises `BadRequest` with the
field it is about, so the server answers 4xx with a message and never 500 on bad input.
This module imports neither torch nor kserve: the CLI and the schema test load it cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

SCHEMA_PATH = Path(__file__).with_name("v1_request.schema.json")
UNKNOWN = -1  # category or brand the caller did not send: filled from the artifact's item table


class BadRequest(ValueError):
    """A request the server refuses with a 4xx; `field` names what is wrong, `status` the code."""

    def __init__(self, field: str, message: str, status: int = 400, reason: str = "invalid_request") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.status = status
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on one request; beyond them the answer is 4xx at once, before any store read."""

    max_candidates: int = 500
    max_history: int = 1000
    max_body_bytes: int = 1 << 20
    max_concurrency: int = 8
    max_instances: int = 16  # ranking requests in one v1 `instances` body
    body_timeout_seconds: float = 5.0  # a body still arriving after this is answered 408


DEFAULT_LIMITS = Limits()

ItemId = Annotated[int, Field(ge=0, le=2**62, description="dense item id")]  # MAX_ID
Feature = Annotated[int, Field(ge=UNKNOWN, le=2**31 - 1)]


def _candidate_from_id(value: Any) -> Any:
    """A bare item id is shorthand for a candidate without context features."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"item_id": value}
    return value


class Candidate(BaseModel):
    """One item to score, with the context features the caller knows (-1 or absent: look up)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    item_id: ItemId
    category: Feature = Field(UNKNOWN, description="category id; -1 or absent: the artifact's item table")
    brand: Feature = Field(UNKNOWN, description="brand id; -1 or absent: the artifact's item table")


class User(BaseModel):
    """The user: an id, and the behaviour item ids (oldest first) unless the store holds them."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: Annotated[int, Field(ge=0, le=2**62)]
    history: list[ItemId] | None = Field(
        None, description="clicked item ids, oldest first; absent: read from the store by user id"
    )


class RankRequest(BaseModel):
    """Body of `POST /v1/models/<name>:predict`."""

    model_config = ConfigDict(extra="forbid", strict=True, title="mmrank v1 ranking request")
    user: User
    candidates: list[Annotated[Candidate, BeforeValidator(_candidate_from_id)]] = Field(
        min_length=1, description="items to score, each an item id or an object; one score each, in this order"
    )


Ids = npt.NDArray[np.int64]  # [n]


@dataclasses.dataclass(frozen=True)
class Ranking:
    """A parsed request as arrays: what the model class needs, whichever protocol it came by."""

    user_id: int
    history: Ids | None  # int64 [L], oldest first; None: read from the store
    cand_ids: Ids  # int64 [C]
    cand_category: Ids  # int64 [C], UNKNOWN where not sent
    cand_brand: Ids  # int64 [C]


def first_duplicate(ids: Ids) -> int | None:
    """An id that occurs more than once, or None."""
    if len(ids) < 2:
        return None
    ordered = np.sort(ids)
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    return int(ordered[same[0]]) if len(same) else None


_IDENTIFIER = re.compile(r"[A-Za-z_][\w-]*\Z")


def field_path(loc: Sequence[int | str]) -> tuple[str, str]:
    """pydantic's error location as the caller wrote it, `candidates[3].item_id`, and "" or, when
    the location goes through a key that is no identifier, that key for the message: the field
    is then its parent (`body` at the top)."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.startswith("function-") or part in ("int", "Candidate"):
            continue
        elif not _IDENTIFIER.match(part):
            return text or "body", f"field {json.dumps(part)}: "
        else:
            text += f".{part}" if text else part
    return text or "body", ""


def unknown_field(parent: str, key: Any, known: Iterable[str]) -> BadRequest:
    """A key the protocol does not have, named in the field when it is an identifier."""
    if isinstance(key, str) and _IDENTIFIER.match(key):
        return BadRequest(f"{parent}.{key}" if parent else key, f"unknown field; expected one of {sorted(known)}")
    return BadRequest(parent or "body", f"unknown field {json.dumps(key)}; expected one of {sorted(known)}")


def bad_request_from(exc: ValidationError) -> BadRequest:
    first = exc.errors(include_url=False)[0]
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    field, prefix = field_path(first["loc"])
    return BadRequest(field, f"{prefix}{first['msg']}{more}")


def check_limits(ranking: Ranking, limits: Limits, field: str = "candidates") -> Ranking:
    """The configured limits, which may be tighter than the schema's defaults, and each
    candidate once (a duplicate is a caller's bug: it would get two scores for one item)."""
    if len(ranking.cand_ids) == 0:
        raise BadRequest(field, "at least one candidate is needed")
    duplicate = first_duplicate(ranking.cand_ids)
    if duplicate is not None:
        raise BadRequest(field, f"item {duplicate} is listed more than once", reason="duplicate_candidates")
    if len(ranking.cand_ids) > limits.max_candidates:
        raise BadRequest(
            "candidates",
            f"{len(ranking.cand_ids)} candidates, at most {limits.max_candidates} per request",
            reason="too_many_candidates",
        )
    if ranking.history is not None and len(ranking.history) > limits.max_history:
        raise BadRequest(
            "user.history", f"{len(ranking.history)} items, at most {limits.max_history}", reason="history_too_long"
        )
    return ranking


MAX_ID = 2**62


def _plain_ids(values: Any, limit: int) -> Ids | None:
    """A list of plain integer ids in [0, MAX_ID] as int64, else None."""
    if type(values) is not list or len(values) > limit or not all(type(v) is int for v in values):
        return None
    try:
        ids = np.array(values, dtype=np.int64)
    except OverflowError:
        return None
    return ids if not len(ids) or (ids.min() >= 0 and ids.max() <= MAX_ID) else None


def _plain_v1(body: Mapping[str, Any], limits: Limits) -> Ranking | None:
    """The common body, ids as plain integers and no per-candidate features, read without
    pydantic (a fifth of its time for 200 candidates); None for anything else, which the full
    validation then reads and, if wrong, names the field of."""
    user, cands = body.get("user"), body.get("candidates")
    if len(body) != 2 or type(user) is not dict or set(user) - {"id", "history"}:
        return None
    user_id, history = user.get("id"), user.get("history")
    if type(user_id) is not int or not 0 <= user_id <= MAX_ID:
        return None
    cand_ids = _plain_ids(cands, limits.max_candidates)
    history_ids = None if history is None else _plain_ids(history, limits.max_history)
    if cand_ids is None or not len(cand_ids) or (history is not None and history_ids is None):
        return None
    unknown = np.full(len(cand_ids), UNKNOWN, dtype=np.int64)
    return Ranking(
        user_id=user_id, history=history_ids, cand_ids=cand_ids, cand_category=unknown, cand_brand=unknown.copy()
    )


def parse_v1_body(body: Any, limits: Limits = DEFAULT_LIMITS) -> tuple[list[Ranking], bool]:
    """A decoded v1 body to its rankings and whether it came as KServe `instances` (answered
    as `predictions`, one per instance) rather than one ranking request alone."""
    if not isinstance(body, Mapping):
        raise BadRequest("body", f"expected a JSON object, got {type(body).__name__}")
    if "instances" not in body:
        return [parse_v1(body, limits)], False
    extra = sorted(set(body) - {"instances"})
    if extra:
        raise unknown_field("", extra[0], ["instances"])
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise BadRequest("instances", "expected a non-empty list of ranking requests")
    if len(instances) > limits.max_instances:
        raise BadRequest(
            "instances",
            f"{len(instances)} instances, at most {limits.max_instances} per request",
            reason="too_many_instances",
        )
    return [parse_v1(instance, limits, at=f"instances[{i}]") for i, instance in enumerate(instances)], True


def parse_v1(body: Any, limits: Limits = DEFAULT_LIMITS, at: str = "") -> Ranking:
    """One ranking request (decoded JSON) to a `Ranking`, or `BadRequest` naming the field
    (prefixed with `at`, e.g. `instances[2]`)."""
    try:
        return _parse_v1(body, limits)
    except BadRequest as exc:
        if not at:
            raise
        field = f"{at}.{exc.field}" if exc.field not in ("", "body") else at
        raise BadRequest(field, str(exc).removeprefix(f"{exc.field}: "), exc.status, exc.reason) from None


def _parse_v1(body: Any, limits: Limits) -> Ranking:
    if not isinstance(body, Mapping):
        raise BadRequest("body", f"expected a JSON object, got {type(body).__name__}")
    common = _plain_v1(body, limits)
    if common is not None:
        return check_limits(common, limits)
    count = body.get("candidates")
    if isinstance(count, list) and len(count) > limits.max_candidates:
        raise BadRequest(
            "candidates",
            f"{len(count)} candidates, at most {limits.max_candidates} per request",
            reason="too_many_candidates",
        )
    history = body.get("user", {}).get("history") if isinstance(body.get("user"), Mapping) else None
    if isinstance(history, list) and len(history) > limits.max_history:
        raise BadRequest(
            "user.history", f"{len(history)} items, at most {limits.max_history}", reason="history_too_long"
        )
    try:
        request = RankRequest.model_validate(body)
    except ValidationError as exc:
        raise bad_request_from(exc) from None
    cands = request.candidates
    ranking = Ranking(
        user_id=request.user.id,
        history=None if request.user.history is None else np.asarray(request.user.history, dtype=np.int64),
        cand_ids=np.fromiter((c.item_id for c in cands), dtype=np.int64, count=len(cands)),
        cand_category=np.fromiter((c.category for c in cands), dtype=np.int64, count=len(cands)),
        cand_brand=np.fromiter((c.brand for c in cands), dtype=np.int64, count=len(cands)),
    )
    return check_limits(ranking, limits)


# --- v2: the same fields as named tensors -----------------------------------------------------

V2_INPUTS = {
    "user_id": "INT64 [1]: the user",
    "candidates": "INT64 [C]: item ids to score, each once",
    "history": "INT64 [L], optional: behaviour item ids, oldest first; absent: read from the store",
    "category": "INT64 [C], optional: -1 where unknown",
    "brand": "INT64 [C], optional: -1 where unknown",
}
V2_OUTPUTS = {"scores": "FP32 [C]: click probability of each candidate, in the order sent"}
INT_TYPES = {
    "INT64": "<i8",
    "INT32": "<i4",
    "INT16": "<i2",
    "INT8": "i1",
    "UINT64": "<u8",
    "UINT32": "<u4",
    "UINT16": "<u2",
    "UINT8": "u1",
}
INT64_MAX = 2**63 - 1


def v2_metadata() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) of the model metadata: every tensor's name, datatype and shape (-1:
    any length); which inputs are optional is in the docs and the error messages."""
    inputs = [{"name": name, "datatype": "INT64", "shape": [1] if name == "user_id" else [-1]} for name in V2_INPUTS]
    return inputs, [{"name": "scores", "datatype": "FP32", "shape": [-1]}]


def v2_tensor(name: str, datatype: str, shape: Sequence[Any], read: Callable[[], object]) -> Ids:
    """One named v2 input as a flat int64 array; `read()` decodes its data (may raise).

    JSON data must be integers (no bool, float, string or nesting) within INT64; binary data
    of an unsigned type beyond INT64 is refused too, never wrapped to a negative id."""
    field = f"inputs.{name}"
    if not isinstance(datatype, str) or datatype.upper() not in INT_TYPES:
        raise BadRequest(field, f"datatype {datatype} is not an integer type (send INT64)")
    if not isinstance(shape, Sequence) or len(shape) != 1 or not _is_int(shape[0]) or shape[0] < 0:
        raise BadRequest(field, f"shape {shape!r} must be one-dimensional, [n] with n >= 0")
    try:
        data = read()
    except Exception as exc:  # noqa: BLE001 - whatever the decoder says is the caller's data
        raise BadRequest(field, f"data does not decode as {datatype} {list(shape)}: {exc}") from None
    if isinstance(data, np.ndarray):
        values = data.reshape(-1)
        if values.dtype.kind == "u" and len(values) and values.max() > INT64_MAX:
            raise BadRequest(field, f"value {int(values.max())} is beyond INT64")
        if values.dtype.kind not in "iu":
            raise BadRequest(field, f"data of dtype {values.dtype} is not integer")
        values = values.astype(np.int64)  # a writable copy (binary data is read-only)
    else:
        values = _int_list(field, data)
    if len(values) != shape[0]:
        raise BadRequest(field, f"{len(values)} values for shape {list(shape)}")
    return values


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(field: str, data: object) -> Ids:
    if not isinstance(data, list | tuple):
        raise BadRequest(field, f"data must be a list of integers, got {type(data).__name__}")
    bad = next((i for i, v in enumerate(data) if not _is_int(v)), None)
    if bad is not None:
        raise BadRequest(f"{field}.data[{bad}]", f"{data[bad]!r} is not an integer")
    try:
        return np.array(data, dtype=np.int64)
    except OverflowError:
        big = next(v for v in data if not -INT64_MAX - 1 <= v <= INT64_MAX)
        raise BadRequest(field, f"value {big} is beyond INT64") from None


def parse_v2(tensors: Mapping[str, Ids], limits: Limits = DEFAULT_LIMITS) -> Ranking:
    """Named int64 tensors (already shape- and type-checked by `v2_tensor`) to a `Ranking`."""
    unknown = sorted(set(tensors) - set(V2_INPUTS))
    if unknown:
        raise BadRequest(f"inputs.{unknown[0]}", f"unknown input; expected {sorted(V2_INPUTS)}")
    for required in ("user_id", "candidates"):
        if required not in tensors:
            raise BadRequest(f"inputs.{required}", "missing")
    user = tensors["user_id"]
    if user.shape != (1,) or user[0] < 0:
        raise BadRequest("inputs.user_id", "expected one non-negative id, shape [1]")
    cands = tensors["candidates"]
    if len(cands) > limits.max_candidates:
        raise BadRequest(
            "inputs.candidates",
            f"{len(cands)} candidates, at most {limits.max_candidates} per request",
            reason="too_many_candidates",
        )
    ranking = Ranking(
        user_id=int(user[0]),
        history=tensors.get("history"),
        cand_ids=cands,
        cand_category=tensors.get("category", np.full(len(cands), UNKNOWN, dtype=np.int64)),
        cand_brand=tensors.get("brand", np.full(len(cands), UNKNOWN, dtype=np.int64)),
    )
    for name, values in (("candidates", cands), ("history", ranking.history)):
        if values is not None and len(values) and values.min() < 0:
            raise BadRequest(f"inputs.{name}", "item ids must be non-negative")
    for name in ("category", "brand"):
        if name in tensors:
            values = tensors[name]
            if len(values) != len(cands):
                raise BadRequest(f"inputs.{name}", f"{len(values)} values for {len(cands)} candidates")
            if len(values) and (values.min() < UNKNOWN or values.max() > 2**31 - 1):
                raise BadRequest(f"inputs.{name}", "ids must be in [-1, 2^31 - 1] (-1: unknown)")
    if ranking.history is not None and len(ranking.history) > limits.max_history:
        raise BadRequest(
            "inputs.history", f"{len(ranking.history)} items, at most {limits.max_history}", reason="history_too_long"
        )
    return check_limits(ranking, limits, field="inputs.candidates")


# --- answers, request ids -----------------------------------------------------------------------


def new_request_id(variant: str) -> str:
    """`<variant>.<32 hex>`: feedback posted by request id names the variant that served it, so
    any replica of any variant can attribute a click without shared state."""
    return f"{variant}.{uuid.uuid4().hex}"


def variant_of(request_id: str) -> str | None:
    variant, dot, token = request_id.rpartition(".")
    if not dot or not variant or len(token) != 32 or any(c not in "0123456789abcdef" for c in token):
        return None
    return variant


class Feedback(BaseModel):
    """Body of `POST /v1/feedback` (or the fields of one entry of the ranker's feedback stream)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    request_id: Annotated[str, Field(min_length=34, max_length=300)]
    impressions: Annotated[int, Field(ge=0, le=10_000)] = 0
    clicks: Annotated[int, Field(ge=0, le=10_000)] = 0


def parse_feedback(body: Any, lax: bool = False) -> tuple[Feedback, str]:
    """(feedback, variant); stream entries arrive as strings, hence `lax`."""
    if not isinstance(body, Mapping):
        raise BadRequest("body", f"expected a JSON object, got {type(body).__name__}")
    try:
        feedback = Feedback.model_validate(body, strict=not lax)
    except ValidationError as exc:
        raise bad_request_from(exc) from None
    if feedback.clicks > feedback.impressions:
        raise BadRequest("clicks", f"{feedback.clicks} clicks exceed {feedback.impressions} impressions")
    variant = variant_of(feedback.request_id)
    if variant is None:
        raise BadRequest("request_id", "not a request id this service issued (<variant>.<32 hex>)")
    return feedback, variant


def v1_request_schema(limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The JSON schema of the v1 body with `limits` as maxItems (the server checks its own)."""
    schema = RankRequest.model_json_schema()
    candidates = schema["properties"]["candidates"]
    candidates["maxItems"] = limits.max_candidates
    candidates["items"] = {
        "anyOf": [candidates["items"], {"type": "integer", "minimum": 0, "description": "an item id alone"}]
    }
    history = schema["$defs"]["User"]["properties"]["history"]
    next(a for a in history["anyOf"] if a.get("type") == "array")["maxItems"] = limits.max_history
    return schema


def schema_text(limits: Limits = DEFAULT_LIMITS) -> str:
    return json.dumps(v1_request_schema(limits), indent=2, sort_keys=True) + "\n"


def write_schema(path: Path = SCHEMA_PATH) -> Path:
    path.write_text(schema_text())
    return path


if __name__ == "__main__":
    print(write_schema())
