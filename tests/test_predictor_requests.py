"""The predictor's pure parts: request parsing and limits, the v1 schema, readiness and metric
decisions. No server: the HTTP behaviour is in test_predictor_server.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import hypothesis
import jsonschema
import numpy as np
import pytest
from hypothesis import strategies as st

from mmrank.predictors import requests as rq
from mmrank.predictors.http_guard import route_of
from mmrank.predictors.ranker_model import fill_features, newest, readiness
from mmrank.predictors.ranking_metrics import error_reason

GOOD = {"user": {"id": 7, "history": [3, 4]}, "candidates": [1, {"item_id": 2, "category": 5}]}


def test_the_exported_schema_is_current() -> None:
    assert rq.SCHEMA_PATH.read_text() == rq.schema_text(), (
        "run `mmrank predictor schema` to regenerate predictors/v1_request.schema.json"
    )


def test_the_schema_and_the_parser_agree_on_a_good_and_a_bad_body() -> None:
    schema = json.loads(rq.SCHEMA_PATH.read_text())
    jsonschema.validate(GOOD, schema)
    ranking = rq.parse_v1(GOOD)
    assert ranking.cand_ids.tolist() == [1, 2] and ranking.cand_category.tolist() == [rq.UNKNOWN, 5]
    assert ranking.history.tolist() == [3, 4] and ranking.user_id == 7
    too_many = {"user": {"id": 1}, "candidates": list(range(rq.DEFAULT_LIMITS.max_candidates + 1))}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(too_many, schema)
    with pytest.raises(rq.BadRequest, match="candidates"):
        rq.parse_v1(too_many)


@pytest.mark.parametrize(
    "body, field",
    [
        ([1, 2], "body"),
        ({"candidates": [1]}, "user"),
        ({"user": {"id": "7"}, "candidates": [1]}, "user.id"),
        ({"user": {"id": -1}, "candidates": [1]}, "user.id"),
        ({"user": {"id": 7}, "candidates": []}, "candidates"),
        ({"user": {"id": 7}, "candidates": [1, "2"]}, "candidates[1]"),
        ({"user": {"id": 7}, "candidates": [1, {"item_id": 2.5}]}, "candidates[1].item_id"),
        ({"user": {"id": 7}, "candidates": [{"item_id": 1, "colour": 3}]}, "candidates[0].colour"),
        ({"user": {"id": 7, "history": [1, True]}, "candidates": [1]}, "user.history[1]"),
        ({"user": {"id": 7}, "candidates": [1], "extra": 1}, "extra"),
    ],
)
def test_a_malformed_v1_body_is_refused_naming_the_field(body: object, field: str) -> None:
    with pytest.raises(rq.BadRequest) as caught:
        rq.parse_v1(body)
    assert caught.value.field == field and caught.value.status == 400
    assert str(caught.value).startswith(f"{field}: ")


def test_configured_limits_bound_candidates_and_history() -> None:
    limits = rq.Limits(max_candidates=3, max_history=2)
    with pytest.raises(rq.BadRequest, match="4 candidates, at most 3") as caught:
        rq.parse_v1({"user": {"id": 1}, "candidates": [1, 2, 3, 4]}, limits)
    assert caught.value.reason == "too_many_candidates"
    with pytest.raises(rq.BadRequest, match="user.history: 3 items, at most 2"):
        rq.parse_v1({"user": {"id": 1, "history": [1, 2, 3]}, "candidates": [1]}, limits)
    assert len(rq.parse_v1({"user": {"id": 1, "history": [1, 2]}, "candidates": [1, 2, 3]}, limits).cand_ids) == 3


def _tensors(**named: list[int]) -> dict[str, np.ndarray]:
    return {k: rq.v2_tensor(k, "INT64", [len(v)], lambda v=v: v) for k, v in named.items()}


def test_v2_tensors_parse_to_the_same_ranking_as_v1() -> None:
    v2 = rq.parse_v2(_tensors(user_id=[7], history=[3, 4], candidates=[1, 2], category=[-1, 5]))
    v1 = rq.parse_v1(GOOD)
    for name in ("cand_ids", "cand_category", "cand_brand", "history"):
        assert getattr(v2, name).tolist() == getattr(v1, name).tolist()
    assert rq.parse_v2(_tensors(user_id=[7], candidates=[1])).history is None  # absent: from the store


@pytest.mark.parametrize(
    "tensors, field",
    [
        (dict(candidates=[1]), "inputs.user_id"),
        (dict(user_id=[7]), "inputs.candidates"),
        (dict(user_id=[7, 8], candidates=[1]), "inputs.user_id"),
        (dict(user_id=[7], candidates=[1, 2], brand=[1]), "inputs.brand"),
        (dict(user_id=[7], candidates=[1, -2]), "inputs.candidates"),
        (dict(user_id=[7], candidates=[1], colour=[1]), "inputs.colour"),
    ],
)
def test_a_malformed_v2_request_is_refused_naming_the_input(tensors: dict, field: str) -> None:
    with pytest.raises(rq.BadRequest) as caught:
        rq.parse_v2(_tensors(**tensors))
    assert caught.value.field == field


def test_v2_inputs_must_be_integer_vectors() -> None:
    with pytest.raises(rq.BadRequest, match="inputs.user_id: datatype FP32"):
        rq.v2_tensor("user_id", "FP32", [1], lambda: [7.0])
    with pytest.raises(rq.BadRequest, match="inputs.candidates: shape"):
        rq.v2_tensor("candidates", "INT64", [1, 2], lambda: [[1, 2]])


def test_a_request_id_names_the_variant_that_served_it() -> None:
    for variant in ("r1", "simtier-make-e2.1", "a.b.c"):
        request_id = rq.new_request_id(variant)
        assert rq.variant_of(request_id) == variant
        feedback, seen = rq.parse_feedback({"request_id": request_id, "impressions": 2, "clicks": 1})
        assert seen == variant and (feedback.impressions, feedback.clicks) == (2, 1)
    assert rq.variant_of("r1.not-hex") is None and rq.variant_of("0123456789abcdef0123456789abcdef") is None
    with pytest.raises(rq.BadRequest, match="clicks"):
        rq.parse_feedback({"request_id": rq.new_request_id("r1"), "impressions": 1, "clicks": 2})
    lax, _ = rq.parse_feedback({"request_id": rq.new_request_id("r1"), "impressions": "3", "clicks": "0"}, lax=True)
    assert lax.impressions == 3


def _info(dim: int = 16, items: int = 99, catalogue: int = 100) -> SimpleNamespace:
    return SimpleNamespace(dim=dim, items=items, catalogue_size=catalogue, coverage=items / catalogue)


def test_readiness_needs_a_reachable_space_of_the_right_width_and_coverage() -> None:
    assert readiness("e1", 16, 0.99, _info(), None).ready
    low = readiness("e1", 16, 0.99, _info(items=50), None)
    assert not low.ready and "coverage 0.5000 is below the minimum 0.9900" in low.reason
    wide = readiness("e1", 128, 0.99, _info(), None)
    assert not wide.ready and "dim 16" in wide.reason
    down = readiness("e1", 16, 0.99, None, "store unreachable: ConnectionError")
    assert not down.ready and down.reason.startswith("store unreachable")
    elsewhere = readiness("e1", 16, 0.99, _info(), None, expected_space="e2")
    assert not elsewhere.ready and "deployed for space e2" in elsewhere.reason
    assert readiness("e1", 16, 0.99, _info(), None, expected_space="e1").ready


def test_missing_features_come_from_the_item_table_and_unknown_items_stay_unknown() -> None:
    table = np.array([[10, 20], [11, 21], [12, 22]])
    ids = np.array([0, 2, 7, 1])
    given = np.array([-1, 5, -1, -1])
    assert fill_features(ids, given, table, 0).tolist() == [10, 5, -1, 11]
    assert fill_features(ids, np.full(4, -1), np.zeros((0, 2), np.int64), 1).tolist() == [-1] * 4


def test_guarded_routes_history_window_and_error_reasons() -> None:
    assert route_of("/v1/models/ranker:predict", "POST") == "v1"
    assert route_of("/v2/models/ranker/infer", "POST") == "v2"
    assert route_of("/v1/feedback", "POST") == "feedback"
    assert route_of("/v1/models/ranker", "GET") is None and route_of("/metrics", "GET") is None
    assert newest(np.arange(10), 3).tolist() == [7, 8, 9] and newest(np.arange(10), 0).tolist() == []
    assert error_reason(400, "too_many_candidates") == "too_many_candidates"
    assert [error_reason(code, None) for code in (400, 413, 422, 503, 500)] == [
        "invalid_request",
        "body_too_large",
        "invalid_v2_body",
        "not_ready",
        "internal",
    ]


def test_the_model_class_ranks_from_the_embedded_file_store_of_the_quick_start(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No HTTP: `RankerModel.rank` on the LMDB store, with a history longer than the window."""
    from mmrank.predictors.artifact import write_random_ranker
    from mmrank.predictors.ranker_model import RankerModel
    from mmrank.store import open_store

    url = f"file://{tmp_path / 'store'}"
    store = open_store(url)
    store.create_space("e1", 8)
    store.set_catalogue_size("e1", 10)
    store.put("e1", np.arange(10), np.eye(8, dtype=np.float32)[np.arange(10) % 8])
    store.put_history(3, [1, 2, 3, 4, 5])
    write_random_ranker(tmp_path / "ranker", "e1", dim=8, history_length=4, version="r9")
    model = RankerModel("ranker", tmp_path / "ranker", url, min_coverage=0.99, feedback_stream=False)
    try:
        model.load()
        assert model.state.ready and model.version == "r9" and model.space == "e1"
        scored = model.rank(rq.parse_v1({"user": {"id": 3}, "candidates": [1, 2, 12]}))
        assert scored.scores.shape == (3,) and ((scored.scores > 0) & (scored.scores < 1)).all()
        assert (scored.cand_misses, scored.hist_misses, scored.history_length) == (1, 0, 4)
        assert rq.variant_of(scored.request_id) == "r9"
        from prometheus_client import REGISTRY

        def clicks() -> float:
            return REGISTRY.get_sample_value("mmrank_clicks_total", {"variant": "r9"}) or 0.0

        before = clicks()
        assert model.record_feedback({"request_id": scored.request_id, "impressions": 2, "clicks": 1})["counted"]
        assert clicks() == before + 1
        with pytest.raises(rq.BadRequest, match="served by variant r8") as caught:
            model.record_feedback({"request_id": rq.new_request_id("r8"), "impressions": 1})
        assert caught.value.status == 409 and clicks() == before + 1
    finally:
        model.stop()


# --- KServe's protocols: decoding and answers, byte for byte ----------------------------------------


def test_v1_instances_are_one_ranking_each_and_errors_name_the_instance() -> None:
    rankings, instances = rq.parse_v1_body({"instances": [GOOD, {"user": {"id": 8}, "candidates": [3]}]})
    assert instances and [r.user_id for r in rankings] == [7, 8]
    alone, instances = rq.parse_v1_body(GOOD)
    assert not instances and alone[0].cand_ids.tolist() == [1, 2]
    with pytest.raises(rq.BadRequest, match=r"^instances\[1\]\.user\.id: ") as caught:
        rq.parse_v1_body({"instances": [GOOD, {"user": {"id": "8"}, "candidates": [3]}]})
    assert caught.value.field == "instances[1].user.id"
    with pytest.raises(rq.BadRequest, match=r'^body: unknown field ""'):
        rq.parse_v1_body({"instances": [GOOD], "": 1})
    with pytest.raises(rq.BadRequest, match=r'^user: field "a b": Extra inputs are not permitted'):
        rq.parse_v1({"user": {"id": 1, "a b": 2}, "candidates": [1]})
    with pytest.raises(rq.BadRequest, match="candidates: item 2 is listed more than once"):
        rq.parse_v1({"user": {"id": 1}, "candidates": [2, 1, {"item_id": 2}]})


def test_a_v2_binary_body_decodes_like_its_json_twin() -> None:
    from mmrank.predictors.protocol import decode_v2

    limits = rq.Limits()
    as_json = json.dumps(
        {
            "id": "x",
            "inputs": [
                {"name": "user_id", "datatype": "INT64", "shape": [1], "data": [7]},
                {"name": "candidates", "datatype": "INT64", "shape": [3], "data": [5, 2, 9]},
            ],
        }
    ).encode()
    head = json.dumps(
        {
            "inputs": [
                {"name": "user_id", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": 8}},
                {"name": "candidates", "datatype": "UINT32", "shape": [3], "parameters": {"binary_data_size": 12}},
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    binary = head + np.array([7], "<i8").tobytes() + np.array([5, 2, 9], "<u4").tobytes()
    from_json, from_binary = decode_v2(as_json, None, limits), decode_v2(binary, str(len(head)), limits)
    assert from_json.caller_id == "x" and not from_json.binary_output and from_binary.binary_output
    assert from_json.rankings[0].cand_ids.tolist() == from_binary.rankings[0].cand_ids.tolist() == [5, 2, 9]
    for body, length, field in [
        (binary, "0", "Inference-Header-Content-Length"),
        (binary + b"x", str(len(head)), "body"),
        (binary[:-4], str(len(head)), "inputs.candidates.parameters.binary_data_size"),
        (as_json.replace(b'"id"', b'"nope"'), None, "nope"),
    ]:
        with pytest.raises(rq.BadRequest) as caught:
            decode_v2(body, length, limits)
        assert caught.value.field == field, caught.value


@pytest.mark.parametrize("binary", [False, True])
def test_the_v2_answer_is_what_kserves_own_encoder_writes(binary: bool) -> None:
    from kserve.protocol.infer_type import InferOutput, InferResponse

    from mmrank.predictors.protocol import RankingCall, Scored, encode_v2, v2_parameters

    scored = Scored("r1." + "a" * 32, np.array([0.25, 0.5, 0.125], np.float32), 1, 0, 4)
    call = RankingCall("v2", [], caller_id="caller", binary_output=binary)
    body, headers = encode_v2(call, scored, "ranker", "r1", "e1")
    output = InferOutput("scores", [3], "FP32")
    output.set_data_from_numpy(scored.scores, binary_data=binary)
    theirs, json_length = InferResponse(
        "caller",
        "ranker",
        [output],
        model_version="r1",
        parameters=v2_parameters(scored, "r1", "e1"),
        use_binary_outputs=binary,
    ).to_rest()
    if binary:
        assert dict(headers)[b"inference-header-content-length"] == str(json_length).encode()
        assert json.loads(body[:json_length]) == json.loads(theirs[:json_length])
        assert body[json_length:] == theirs[json_length:] == scored.scores.tobytes()
    else:
        assert json.loads(body) == json.loads(json.dumps(theirs))


def test_kserve_finds_none_of_the_serve_flags_in_argv() -> None:
    """kserve parses sys.argv when imported (`parse_known_args`, for ModelServer's defaults), so
    no flag of `mmrank predictor serve`, nor a prefix of one, may be one of KServe's: the server
    passes KServe its options as ModelServer's arguments and leaves sys.argv alone."""
    import argparse

    from kserve.model_server import parser as kserve_parser

    from mmrank.predictors import predictor_cli

    def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return action.choices[name]

    root = argparse.ArgumentParser()
    predictor_cli.register_cli(root.add_subparsers())
    serve = subcommand(subcommand(root, "predictor"), "serve")
    argv = ["predictor", "serve"]
    for action in serve._actions:
        for flag in action.option_strings:
            argv += [flag] if action.nargs == 0 else [flag, "1"]
    assert "--http-port" in argv and "--access-log" in argv
    known, _ = kserve_parser.parse_known_args(argv)
    assert vars(known) == vars(kserve_parser.parse_known_args([])[0])


def test_exceptions_map_to_statuses_and_grpc_codes() -> None:
    from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady

    from mmrank.predictors.admission import classify
    from mmrank.predictors.grpc_service import grpc_code
    from mmrank.predictors.ranker_model import StoreUnavailable

    assert classify(rq.BadRequest("x", "y", status=413, reason="body_too_large"))[:2] == (413, "body_too_large")
    assert classify(InvalidInput("bad"))[:2] == (400, "invalid_request")
    assert classify(ModelNotFound("m"))[:2] == (404, "model_not_found")
    assert classify(ModelNotReady("m", "coverage"))[:2] == (503, "not_ready")
    assert classify(StoreUnavailable("store read failed"))[:2] == (503, "store_unavailable")
    assert classify(KeyError("bug")) == (500, "internal", "internal error: KeyError: 'bug'")
    assert [grpc_code(s) for s in (400, 404, 408, 413, 422, 503, 500)] == [
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "DEADLINE_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "INVALID_ARGUMENT",
        "UNAVAILABLE",
        "INTERNAL",
    ]


def test_an_unexpected_failure_is_answered_500_counted_timed_and_logged_once(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A fault inside the model (its item table gone) behind the real ASGI layer: a 500 with a
    message, in mmrank_requests_total and the latency histogram, one traceback in the log."""
    import asyncio
    import logging

    import httpx
    from prometheus_client import REGISTRY

    from mmrank.predictors.admission import Admission
    from mmrank.predictors.artifact import write_random_ranker
    from mmrank.predictors.http_guard import Guard
    from mmrank.predictors.ranker_model import RankerModel
    from mmrank.store import open_store

    url = f"file://{tmp_path / 'store'}"
    store = open_store(url)
    store.create_space("e1", 8)
    store.set_catalogue_size("e1", 4)
    store.put("e1", np.arange(4), np.eye(8, dtype=np.float32)[:4])
    write_random_ranker(tmp_path / "ranker", "e1", dim=8, history_length=4, version="r500")
    model = RankerModel("ranker", tmp_path / "ranker", url, min_coverage=0.5, feedback_stream=False)

    async def not_found(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        raise AssertionError("the ranking routes never reach KServe's app")

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, {"variant": "r500", **labels}) or 0.0

    async def call() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=Guard(not_found, model, Admission(model)))
        async with httpx.AsyncClient(transport=transport, base_url="http://ranker") as client:
            body = {"user": {"id": 1, "history": [0, 1]}, "candidates": [2, 3]}
            ok = await client.post("/v1/models/ranker:predict", json=body)
            model.features = None  # the fault
            failed = await client.post("/v1/models/ranker:predict", json=body)
            return [ok, failed]

    try:
        model.load()
        with caplog.at_level(logging.ERROR, logger="mmrank.predictor"):
            ok, failed = asyncio.run(call())
    finally:
        model.stop()
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 2
    assert failed.status_code == 500 and failed.json()["error"].startswith("internal error: TypeError")
    assert sample("mmrank_requests_total", protocol="v1", code="500") == 1
    assert sample("mmrank_request_duration_seconds_count", protocol="v1") == 2
    assert sample("mmrank_request_errors_total", reason="internal") == 1
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and isinstance(tracebacks[0].exc_info[1], TypeError)


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True, database=None)
@hypothesis.given(
    user=st.integers(-2, 2**63) | st.booleans(),
    history=st.none() | st.lists(st.integers(-2, 2**64), max_size=8),
    candidates=st.lists(st.integers(-2, 2**63) | st.booleans() | st.floats(0, 5), max_size=8),
)
def test_the_plain_body_reader_agrees_with_the_full_validation(
    user: object, history: object, candidates: object
) -> None:
    """Bodies of plain ids skip pydantic (rq._plain_v1); whatever it accepts, pydantic accepts
    the same way, and what it passes on gets pydantic's message naming the field."""
    user_part = {"id": user} if history is None else {"id": user, "history": history}
    body = {"user": user_part, "candidates": candidates}
    plain = rq._plain_v1(body, rq.DEFAULT_LIMITS)
    try:
        full = rq.RankRequest.model_validate(body)
    except Exception:  # noqa: BLE001 - pydantic refuses it: so must the plain reader
        assert plain is None
        return
    if plain is not None:
        assert plain.user_id == full.user.id and plain.cand_ids.tolist() == [c.item_id for c in full.candidates]
        assert (plain.history is None) == (full.user.history is None)
        assert plain.history is None or plain.history.tolist() == full.user.history
        assert plain.cand_category.tolist() == plain.cand_brand.tolist() == [rq.UNKNOWN] * len(candidates)
