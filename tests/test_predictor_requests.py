"""The predictor's pure parts: request parsing and limits, the v1 schema, readiness and metric
decisions. No server: the HTTP behaviour is in test_predictor_server.py."""
from __future__ import annotations

import json
from types import SimpleNamespace

import jsonschema
import numpy as np
import pytest

from mmrank.predictors import requests as rq
from mmrank.predictors.server import error_reason, fill_features, newest, readiness, redact, route_of, with_password

GOOD = {"user": {"id": 7, "history": [3, 4]}, "candidates": [1, {"item_id": 2, "category": 5}]}


def test_the_exported_schema_is_current() -> None:
    assert rq.SCHEMA_PATH.read_text() == rq.schema_text(), \
        "run `mmrank predictor schema` to regenerate predictors/v1_request.schema.json"


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


@pytest.mark.parametrize("body, field", [
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
])
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


@pytest.mark.parametrize("tensors, field", [
    (dict(candidates=[1]), "inputs.user_id"),
    (dict(user_id=[7]), "inputs.candidates"),
    (dict(user_id=[7, 8], candidates=[1]), "inputs.user_id"),
    (dict(user_id=[7], candidates=[1, 2], brand=[1]), "inputs.brand"),
    (dict(user_id=[7], candidates=[1, -2]), "inputs.candidates"),
    (dict(user_id=[7], candidates=[1], colour=[1]), "inputs.colour"),
])
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


def test_the_store_password_goes_into_the_url_and_never_into_the_log() -> None:
    url = with_password("redis://store:6379/0", "p@ss/word")
    assert url == "redis://:p%40ss%2Fword@store:6379/0" and redact(url) == "redis://:***@store:6379/0"
    assert with_password("redis://:own@store:6379/0", "other") == "redis://:own@store:6379/0"
    assert with_password("file:///tmp/store", "x") == "file:///tmp/store"


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
    assert [error_reason(code, None) for code in (400, 413, 422, 503, 500)] == \
        ["invalid_request", "body_too_large", "invalid_v2_body", "not_ready", "internal"]


def test_the_model_class_ranks_from_the_embedded_file_store_of_the_quick_start(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No HTTP: `RankerModel.rank` on the LMDB store, with a history longer than the window."""
    from mmrank.predictors.artifact import write_random_ranker
    from mmrank.predictors.server import RankerModel
    from mmrank.store import open_store

    url = f"file://{tmp_path / 'store'}"
    store = open_store(url)
    store.create_space("e1", 8)
    store.set_catalogue_size(10)
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
