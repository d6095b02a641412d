"""KServe's v1 and v2 (Open Inference Protocol) bodies to rankings, and rankings to answers.

Pure functions, no I/O: the server's ASGI layer hands bytes in and writes bytes out. A v2 REST
body is decoded here rather than by KServe's FastAPI route because that route validates every
tensor element through pydantic and answers 500 on several malformed bodies (a missing
`inputs`, a binary size beyond the body); here every malformed body is a `BadRequest` that
names the field. The binary tensor extension (`Inference-Header-Content-Length`, per-tensor
`binary_data_size`, `binary_data_output`) is the one Triton's and KServe's clients send.
Answers are encoded by KServe's own `InferResponse`, so the bytes are the ones its clients read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from mmrank.predictors.requests import (
    INT_TYPES,
    V2_INPUTS,
    BadRequest,
    Ids,
    Limits,
    Ranking,
    parse_v1_body,
    parse_v2,
    unknown_field,
    v2_tensor,
)

HEADER_LENGTH = "inference-header-content-length"
_REQUEST_KEYS = {
    "id",
    "parameters",
    "inputs",
    "outputs",
    "model_name",
    "model_version",
}  # KServe's client sends the last two
_INPUT_KEYS = {"name", "datatype", "shape", "parameters", "data"}


@dataclasses.dataclass(frozen=True)
class RankingCall:
    """A parsed call, whichever protocol: one ranking per v1 instance, one for v2."""

    protocol: str  # "v1", "v2" (REST) or "grpc"
    rankings: list[Ranking]
    instances: bool = False  # v1: answered as {"predictions": [...]}, one per instance
    caller_id: str | None = None  # v2 `id`, echoed in the answer
    binary_output: bool = False
    encode: bool = True  # REST: the model's postprocess writes the answer's bytes


@dataclasses.dataclass(frozen=True)
class Scored:
    request_id: str  # `<variant>.<32 hex>`: what click feedback names
    scores: npt.NDArray[np.float32]  # [C], click probabilities
    cand_misses: int
    hist_misses: int
    history_length: int


def decode_v1(body: bytes, limits: Limits) -> RankingCall:
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest("body", f"not valid JSON: {exc}") from None
    rankings, instances = parse_v1_body(decoded, limits)
    return RankingCall("v1", rankings, instances=instances)


def decode_v2(body: bytes, header_length: str | None, limits: Limits) -> RankingCall:
    """A v2 REST body (JSON, or JSON then binary tensors) to one ranking."""
    json_length = _json_length(header_length, len(body))
    try:
        request = orjson.loads(body[:json_length])
    except orjson.JSONDecodeError as exc:
        raise BadRequest("body", f"not valid JSON: {exc}") from None
    if not isinstance(request, Mapping):
        raise BadRequest("body", f"expected a JSON object, got {type(request).__name__}")
    extra = sorted(set(request) - _REQUEST_KEYS)
    if extra:
        raise unknown_field("", extra[0], _REQUEST_KEYS)
    caller_id = request.get("id")
    if caller_id is not None and (not isinstance(caller_id, str) or len(caller_id) > 256):
        raise BadRequest("id", "must be a string of at most 256 characters")
    parameters = _mapping(request.get("parameters"), "parameters")
    binary_output = _flag(parameters.get("binary_data_output"), "parameters.binary_data_output")
    binary_output = _requested_outputs(request.get("outputs"), binary_output)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("inputs", "expected a non-empty list of tensors")
    tensors, offset = {}, json_length
    for i, tensor in enumerate(inputs):
        name, values, offset = _tensor(tensor, i, body, offset)
        if name in tensors:
            raise BadRequest(f"inputs.{name}", "given more than once")
        tensors[name] = values
    if offset != len(body):
        raise BadRequest("body", f"{len(body) - offset} bytes of binary data that no input's binary_data_size claims")
    return RankingCall("v2", [parse_v2(tensors, limits)], caller_id=caller_id, binary_output=binary_output)


def _json_length(header: str | None, body_length: int) -> int:
    if header is None:
        return body_length
    if not header.isdigit() or not 0 < int(header) <= body_length:
        raise BadRequest(
            "Inference-Header-Content-Length", f"{header!r} is not a length within the {body_length}-byte body"
        )
    return int(header)


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadRequest(field, "must be an object")
    return value


def _flag(value: Any, field: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(field, "must be true or false")
    return value


def _requested_outputs(outputs: Any, binary_output: bool) -> bool:
    if outputs is None:
        return binary_output
    if not isinstance(outputs, list):
        raise BadRequest("outputs", "must be a list")
    for i, output in enumerate(outputs):
        if not isinstance(output, Mapping) or output.get("name") != "scores":
            raise BadRequest(f"outputs[{i}]", 'the only output is {"name": "scores"}')
        binary = _mapping(output.get("parameters"), f"outputs[{i}].parameters").get("binary_data")
        if binary is not None:
            binary_output = _flag(binary, f"outputs[{i}].parameters.binary_data")
    return binary_output


def _tensor(tensor: Any, index: int, body: bytes, offset: int) -> tuple[str, Ids, int]:
    """(name, int64 values, offset after its binary data) of inputs[index]."""
    if not isinstance(tensor, Mapping):
        raise BadRequest(f"inputs[{index}]", "expected a tensor object")
    name = tensor.get("name")
    if not isinstance(name, str) or name not in V2_INPUTS:
        raise BadRequest(f"inputs[{index}].name", f"{name!r} is not one of {sorted(V2_INPUTS)}")
    field = f"inputs.{name}"
    extra = sorted(set(tensor) - _INPUT_KEYS)
    if extra:
        raise unknown_field(field, extra[0], _INPUT_KEYS)
    for key in ("datatype", "shape"):
        if key not in tensor:
            raise BadRequest(f"{field}.{key}", "missing")
    datatype, shape = tensor["datatype"], tensor["shape"]
    size = _mapping(tensor.get("parameters"), f"{field}.parameters").get("binary_data_size")
    if "data" in tensor:
        if size is not None:
            raise BadRequest(field, "both data and binary_data_size given")
        return name, v2_tensor(name, datatype, shape, lambda: tensor["data"]), offset
    if size is None:
        raise BadRequest(f"{field}.data", "missing (or give parameters.binary_data_size)")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(body) - offset:
        raise BadRequest(
            f"{field}.parameters.binary_data_size",
            f"{size!r} is not within the {len(body) - offset} bytes left in the body",
        )
    chunk = body[offset : offset + size]
    return name, v2_tensor(name, datatype, shape, lambda: _from_binary(chunk, datatype, shape)), offset + size


def _from_binary(chunk: bytes, datatype: str, shape: Sequence[int]) -> npt.NDArray[np.integer[Any]]:
    dtype = np.dtype(INT_TYPES[datatype.upper()])
    if len(chunk) != int(shape[0]) * dtype.itemsize:
        raise ValueError(f"{len(chunk)} bytes, {datatype} {list(shape)} needs {int(shape[0]) * dtype.itemsize}")
    return np.frombuffer(chunk, dtype=dtype)


def v1_answer(call: RankingCall, scored: list[Scored], version: str, space: str) -> dict[str, Any]:
    """`{"predictions": [...]}`: for `instances`, one object per instance; for one ranking
    request alone, its scores (the body this service answered before `instances`)."""
    if call.instances:
        return {
            "predictions": [
                {
                    "scores": s.scores.tolist(),
                    "request_id": s.request_id,
                    "embedding_misses": {"candidates": s.cand_misses, "history": s.hist_misses},
                }
                for s in scored
            ],
            "ranker_version": version,
            "space": space,
        }
    s = scored[0]
    return {
        "predictions": s.scores.tolist(),
        "ranker_version": version,
        "space": space,
        "request_id": s.request_id,
        "embedding_misses": {"candidates": s.cand_misses, "history": s.hist_misses},
    }


def v2_parameters(scored: Scored, version: str, space: str) -> dict[str, Any]:
    return {
        "ranker_version": version,
        "space": space,
        "request_id": scored.request_id,
        "embedding_misses": scored.cand_misses + scored.hist_misses,
    }


def v2_answer(call: RankingCall, scored: Scored, model_name: str, version: str, space: str) -> Any:
    """KServe's `InferResponse` (the gRPC answer): `scores`, the caller's id echoed (else the
    service's request id), and the ranker version, space and request id in `parameters`."""
    from kserve.protocol.infer_type import InferOutput, InferResponse

    output = InferOutput("scores", [len(scored.scores)], "FP32", data=scored.scores.tolist())
    return InferResponse(
        call.caller_id or scored.request_id,
        model_name,
        [output],
        model_version=version,
        parameters=v2_parameters(scored, version, space),
        use_binary_outputs=call.binary_output,
    )


def encode_v1(answer: dict[str, Any]) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    return orjson.dumps(answer), [(b"content-type", b"application/json")]


def encode_v2(
    call: RankingCall, scored: Scored, model_name: str, version: str, space: str
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The v2 REST answer, byte for byte what KServe's `InferResponse.to_rest` writes, without
    its round trip of the scores through a Python list: JSON, or with `binary_data_output` the
    JSON then the float32 scores and `Inference-Header-Content-Length`."""
    output: dict[str, Any] = {"name": "scores", "shape": [len(scored.scores)], "datatype": "FP32"}
    raw = np.ascontiguousarray(scored.scores, dtype="<f4")
    if call.binary_output:
        output["parameters"] = {"binary_data_size": raw.nbytes}
    else:
        output["data"] = raw
    head = orjson.dumps(
        {
            "id": call.caller_id or scored.request_id,
            "model_name": model_name,
            "model_version": version,
            "outputs": [output],
            "parameters": v2_parameters(scored, version, space),
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    if not call.binary_output:
        return head, [(b"content-type", b"application/json")]
    return head + raw.tobytes(), [
        (b"content-type", b"application/octet-stream"),
        (HEADER_LENGTH.encode(), str(len(head)).encode()),
    ]
