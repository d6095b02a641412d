"""The ranking service as a real process (`mmrank predictor serve`) on the real Redis store.

One predictor process serves the whole module (starting one costs seconds of torch and KServe
imports); it is pinned to space `e1` (16 dimensions, 100-item catalogue, 99 embedded, so item 99
is a miss) and runs with tight limits so the bad-request matrix and the overload bound are cheap
to reach. Redis is started by the same launcher the `redis_server` fixture uses, at module scope
because the predictor outlives one test. Logs of both are attached to any failing test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from harness import servers
from mmrank.store import open_store

MODEL = "ranker"
VERSION = "r1"
SPACE = "e1"
DIM = 16
CATALOGUE = 100
WINDOW = 20  # --history-length: the artifact was trained with 50
USER = 7
LIMITS = {
    "max_candidates": 50,
    "max_history": 100,
    "max_body_bytes": 20_000,
    "max_concurrency": 1,
    "body_timeout_seconds": 1.0,
    "max_instances": 4,
}
REQUEST_ID = re.compile(r"^r1\.[0-9a-f]{32}$")


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    try:
        server = servers.start_redis(tmp_path_factory.mktemp("redis"))
    except servers.ServerUnavailable as exc:
        pytest.fail(f"real server unavailable: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def artifact(redis: servers.Server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Space e1 at 99 % coverage, a user history of 30 items, an untrained ranker pinned to e1."""
    from mmrank.predictors.artifact import write_random_ranker

    store = open_store(redis.url)
    store.create_space(SPACE, DIM)
    store.set_catalogue_size(SPACE, CATALOGUE)
    store.put(SPACE, np.arange(CATALOGUE - 1), unit_vectors(CATALOGUE - 1, DIM, seed=1))
    store.put_history(USER, np.arange(40, 70))
    store.close()
    features = np.stack([np.arange(CATALOGUE) % 5, np.arange(CATALOGUE) % 7], axis=1)
    directory = tmp_path_factory.mktemp("ranker")
    meta = write_random_ranker(directory, SPACE, dim=DIM, item_features=features, history_length=50, n_users=20)
    assert meta["version"] != VERSION  # the operator's name for it comes from MMRANK_RANKER_VERSION
    return directory


@pytest.fixture(scope="module")
def predictor(
    redis: servers.Server, artifact: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[servers.Server]:
    workdir = tmp_path_factory.mktemp("predictor")
    port, grpc_port = servers.free_port(), servers.free_port()
    # Configured the way the operator's InferenceService does: store, space and version by env.
    argv = [
        sys.executable,
        "-m",
        "mmrank",
        "predictor",
        "serve",
        "--model-dir",
        str(artifact),
        "--model-name",
        MODEL,
        "--host",
        "127.0.0.1",
        "--http-port",
        str(port),
        "--grpc-port",
        str(grpc_port),
        "--history-length",
        str(WINDOW),
        "--min-coverage",
        "0.99",
        "--recheck-seconds",
        "0.3",
        "--torch-threads",
        "1",
        *[a for k, v in LIMITS.items() for a in (f"--{k.replace('_', '-')}", str(v))],
    ]
    env = {**os.environ, "MMRANK_STORE_URL": redis.url, "MMRANK_SPACE": SPACE, "MMRANK_RANKER_VERSION": VERSION}
    log_path = workdir / "predictor.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True
        )
    server = servers.Server(
        "predictor",
        process,
        log_path,
        f"http://127.0.0.1:{port}",
        port,
        workdir,
        extra={"grpc": f"127.0.0.1:{grpc_port}"},
    )
    try:
        servers.wait_until(server, lambda: servers.http_ok(f"{server.url}/v2/models/{MODEL}/ready"), 120, "ready")
    except servers.ServerUnavailable as exc:
        server.stop()
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _attach_logs(request: pytest.FixtureRequest) -> None:
    """Give this module's servers to conftest's report hook, which prints their logs on failure."""
    if "predictor" not in request.fixturenames:
        return
    conftest = next(p for p in request.config.pluginmanager.get_plugins() if hasattr(p, "_attach"))
    for name in ("redis", "predictor"):
        conftest._attach(request, request.getfixturevalue(name))


def http(
    server: servers.Server, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        server.url + path, data=data, method=method, headers={"content-type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def metric(server: servers.Server, name: str, **labels: str) -> float:
    """One sample from the server's own /metrics (0 when the series does not exist yet)."""
    text = urllib.request.urlopen(f"{server.url}/metrics", timeout=10).read().decode()
    want = {f'{k}="{v}"' for k, v in labels.items()}
    total = 0.0
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] == name and want <= set(series.partition("{")[2].rstrip("}").split(",")):
            total += float(value)
    return total


def expected_scores(redis: servers.Server, artifact: Path, history: np.ndarray, candidates: list[int]) -> np.ndarray:
    """The ranker called directly on the store's vectors: what the service must answer."""
    import torch

    from mmrank.predictors.artifact import load_ranker

    model, _ = load_ranker(artifact)
    store = open_store(redis.url)
    hist = np.asarray(history, dtype=np.int64)[-WINDOW:]
    cands = np.asarray(candidates, dtype=np.int64)
    hist_emb, hist_found = store.get(SPACE, hist)
    cand_emb, cand_found = store.get(SPACE, cands)
    store.close()
    t = torch.from_numpy
    logits = model.score_candidates(
        USER,
        t(hist),
        torch.ones(len(hist), dtype=torch.bool),
        t(hist_emb),
        t(hist_found),
        t(cands),
        t(cand_emb),
        t(cand_found),
    )
    return torch.sigmoid(logits).numpy()


# --- round trips ------------------------------------------------------------------------------


def test_v1_through_kserve_client_and_plain_http_scores_each_candidate_in_order(
    predictor: servers.Server, redis: servers.Server, artifact: Path
) -> None:
    from kserve import InferenceRESTClient, RESTConfig

    candidates = [5, 17, 3, 42, 88]
    body = {"user": {"id": USER}, "candidates": candidates}  # history: from the store

    async def call() -> dict[str, Any]:
        async with InferenceRESTClient(RESTConfig(protocol="v1", retries=0)) as client:
            return await client.infer(predictor.url, body, model_name=MODEL)

    answer = asyncio.run(call())
    bad = {"user": {"id": "seven"}, "candidates": candidates}

    async def call_bad() -> None:
        async with InferenceRESTClient(RESTConfig(protocol="v1", retries=0)) as client:
            await client.infer(predictor.url, bad, model_name=MODEL)

    with pytest.raises(httpx.HTTPStatusError, match="user.id: Input should be a valid integer") as caught:
        asyncio.run(call_bad())
    assert caught.value.response.status_code == 400
    expected = expected_scores(redis, artifact, np.arange(40, 70), candidates)
    np.testing.assert_allclose(answer["predictions"], expected, rtol=1e-5, atol=1e-6)
    assert answer["ranker_version"] == VERSION and answer["space"] == SPACE
    assert REQUEST_ID.match(answer["request_id"])

    reordered = candidates[::-1]
    status, plain = http(
        predictor,
        "POST",
        f"/v1/models/{MODEL}:predict",
        {"user": {"id": USER, "history": list(range(40, 70))}, "candidates": reordered},
    )
    assert status == 200
    np.testing.assert_allclose(plain["predictions"], expected[::-1], rtol=1e-5, atol=1e-6)
    assert plain["request_id"] != answer["request_id"]


def test_v2_through_kserve_client_matches_v1(predictor: servers.Server) -> None:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    candidates = np.array([5, 17, 3], dtype=np.int64)
    inputs = [
        InferInput("user_id", [1], "INT64", [USER]),
        InferInput("candidates", [3], "INT64", candidates.tolist()),
        InferInput("history", [4], "INT64", [40, 41, 42, 43]),
    ]
    binary = InferInput("brand", [3], "INT64")
    binary.set_data_from_numpy(np.array([-1, 2, -1], dtype=np.int64), binary_data=True)

    async def call(request: InferRequest) -> Any:
        async with InferenceRESTClient(RESTConfig(protocol="v2", retries=0)) as client:
            return await client.infer(predictor.url, request, model_name=MODEL)

    response = asyncio.run(call(InferRequest(MODEL, inputs, request_id="caller-1")))
    scores = response.outputs[0].as_numpy()
    assert response.outputs[0].name == "scores" and scores.shape == (3,) and scores.dtype == np.float32
    assert response.id == "caller-1" and response.parameters["ranker_version"] == VERSION  # the caller's id echoed
    assert response.parameters["space"] == SPACE and REQUEST_ID.match(response.parameters["request_id"])
    status, v1 = http(
        predictor,
        "POST",
        f"/v1/models/{MODEL}:predict",
        {"user": {"id": USER, "history": [40, 41, 42, 43]}, "candidates": candidates.tolist()},
    )
    assert status == 200
    np.testing.assert_allclose(scores, v1["predictions"], rtol=1e-5, atol=1e-6)
    # A binary-encoded tensor (KServe's binary extension) works too, and the brand it gives is used.
    with_brand = asyncio.run(call(InferRequest(MODEL, [*inputs, binary])))
    changed = with_brand.outputs[0].as_numpy() != scores
    assert not changed[0] and not changed[2]  # -1: looked up as before


def test_v1_instances_through_kserve_client_one_prediction_per_instance(
    predictor: servers.Server, redis: servers.Server, artifact: Path
) -> None:
    from kserve import InferenceRESTClient, RESTConfig

    body = {
        "instances": [
            {"user": {"id": USER}, "candidates": [5, 17, 3]},
            {"user": {"id": USER, "history": [40, 41]}, "candidates": [{"item_id": 9, "brand": 2}, 88]},
        ]
    }

    async def call() -> dict[str, Any]:
        async with InferenceRESTClient(RESTConfig(protocol="v1", retries=0)) as client:
            return await client.infer(predictor.url, body, model_name=MODEL)

    answer = asyncio.run(call())
    first, second = answer["predictions"]
    np.testing.assert_allclose(
        first["scores"], expected_scores(redis, artifact, np.arange(40, 70), [5, 17, 3]), rtol=1e-5, atol=1e-6
    )
    assert REQUEST_ID.match(first["request_id"]) and REQUEST_ID.match(second["request_id"])
    assert first["request_id"] != second["request_id"] and first["embedding_misses"] == {"candidates": 0, "history": 0}
    assert (answer["ranker_version"], answer["space"]) == (VERSION, SPACE)
    status, alone = http(predictor, "POST", f"/v1/models/{MODEL}:predict", body["instances"][1])
    assert status == 200
    np.testing.assert_allclose(second["scores"], alone["predictions"], rtol=1e-5, atol=1e-6)


def test_v2_model_metadata_describes_every_tensor_and_both_servers_bind_the_host(predictor: servers.Server) -> None:
    status, meta = http(predictor, "GET", f"/v2/models/{MODEL}")
    assert status == 200 and meta["name"] == MODEL
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
        "user_id": ("INT64", [1]),
        "candidates": ("INT64", [-1]),
        "history": ("INT64", [-1]),
        "category": ("INT64", [-1]),
        "brand": ("INT64", [-1]),
    }
    assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1]}]
    log = predictor.log_path.read_text()  # --host 127.0.0.1: both servers on the loopback only
    assert f"Uvicorn running on http://127.0.0.1:{predictor.port}" in log
    assert f"gRPC (GRPCInferenceService) on {predictor.extra['grpc']}" in log


def test_binary_tensors_from_tritonclient_both_ways(predictor: servers.Server) -> None:
    """Triton's own HTTP client: binary inputs (Inference-Header-Content-Length) and a binary
    `scores` output; the same scores as JSON."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    def tensor(name: str, values: list[int], datatype: str = "INT64") -> Any:
        t = triton.InferInput(name, [len(values)], datatype)
        t.set_data_from_numpy(np.array(values, dtype=np.uint64 if datatype == "UINT64" else np.int64), binary_data=True)
        return t

    client = triton.InferenceServerClient(predictor.url.removeprefix("http://"))
    try:
        inputs = [tensor("user_id", [USER]), tensor("candidates", [5, 17, 3]), tensor("history", [40, 41, 42, 43])]
        result = client.infer(
            MODEL, inputs, request_id="t-1", outputs=[triton.InferRequestedOutput("scores", binary_data=True)]
        )
        response = result.get_response()
        assert response["id"] == "t-1" and "data" not in response["outputs"][0]  # the scores came as bytes
        scores = result.as_numpy("scores")
        with pytest.raises(InferenceServerException, match="inputs.candidates: value 9223372036854775808 is beyond"):
            client.infer(MODEL, [tensor("user_id", [USER]), tensor("candidates", [1, 2**63], "UINT64")])
    finally:
        client.close()
    status, v1 = http(
        predictor,
        "POST",
        f"/v1/models/{MODEL}:predict",
        {"user": {"id": USER, "history": [40, 41, 42, 43]}, "candidates": [5, 17, 3]},
    )
    assert status == 200 and scores.dtype == np.float32
    np.testing.assert_allclose(scores, v1["predictions"], rtol=1e-6)


def test_grpc_through_kserve_client_matches_rest_and_is_counted(predictor: servers.Server) -> None:
    import grpc
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    def request(candidates: list[int], request_id: str) -> InferRequest:
        return InferRequest(
            MODEL,
            [
                InferInput("user_id", [1], "INT64", [USER]),
                InferInput("candidates", [len(candidates)], "INT64", candidates),
            ],
            request_id=request_id,
        )

    ok = metric(predictor, "mmrank_requests_total", variant=VERSION, protocol="grpc", code="200")
    refused = metric(predictor, "mmrank_requests_total", variant=VERSION, protocol="grpc", code="400")

    async def call() -> tuple[bool, Any, Any]:
        client = InferenceGRPCClient(predictor.extra["grpc"])
        try:
            ready = await client.is_model_ready(MODEL)
            response = await client.infer(request([5, 17, 3], "g-1"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.infer(request([5, -1], "g-2"))
            return ready, response, caught.value
        finally:
            await client.close()

    ready, response, error = asyncio.run(call())
    parameters = {k: v.string_param or v.int64_param for k, v in response.parameters.items()}  # gRPC InferParameter
    assert ready and response.id == "g-1" and (parameters["ranker_version"], parameters["space"]) == (VERSION, SPACE)
    assert REQUEST_ID.match(parameters["request_id"])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs.candidates" in error.details()
    status, v1 = http(
        predictor, "POST", f"/v1/models/{MODEL}:predict", {"user": {"id": USER}, "candidates": [5, 17, 3]}
    )
    assert status == 200
    np.testing.assert_allclose(response.outputs[0].as_numpy(), v1["predictions"], rtol=1e-5, atol=1e-6)
    assert metric(predictor, "mmrank_requests_total", variant=VERSION, protocol="grpc", code="200") == ok + 1
    assert metric(predictor, "mmrank_requests_total", variant=VERSION, protocol="grpc", code="400") == refused + 1


def test_an_item_without_embedding_is_scored_and_counted_never_a_500(predictor: servers.Server) -> None:
    before = metric(predictor, "mmrank_embedding_miss_total", variant=VERSION, role="candidate")
    # 99 is in the catalogue but not embedded yet; 5000 arrived after training and has no vector.
    status, answer = http(
        predictor, "POST", f"/v1/models/{MODEL}:predict", {"user": {"id": USER}, "candidates": [99, 5000, 3]}
    )
    assert status == 200 and len(answer["predictions"]) == 3
    assert all(0.0 < p < 1.0 for p in answer["predictions"])
    assert answer["embedding_misses"] == {"candidates": 2, "history": 0}
    assert metric(predictor, "mmrank_embedding_miss_total", variant=VERSION, role="candidate") == before + 2


def test_a_re_embedded_item_is_scored_with_its_new_vector_at_once(
    predictor: servers.Server, redis: servers.Server, artifact: Path
) -> None:
    """The process caches item vectors (hiredis parses the replies); a put that has returned is
    seen by the next request."""
    body = {"user": {"id": USER}, "candidates": [5, 17, 3]}
    hits = metric(predictor, "mmrank_item_cache_rows_total", variant=VERSION, result="hit")
    assert http(predictor, "POST", f"/v1/models/{MODEL}:predict", body)[0] == 200
    status, before = http(predictor, "POST", f"/v1/models/{MODEL}:predict", body)
    assert (
        status == 200 and metric(predictor, "mmrank_item_cache_rows_total", variant=VERSION, result="hit") >= hits + 23
    )
    store = open_store(redis.url)
    try:
        store.put(SPACE, [17], unit_vectors(1, DIM, seed=99))  # what the embedder does
    finally:
        store.close()
    status, after = http(predictor, "POST", f"/v1/models/{MODEL}:predict", body)
    assert status == 200 and after["predictions"][1] != before["predictions"][1]
    np.testing.assert_allclose(
        after["predictions"], expected_scores(redis, artifact, np.arange(40, 70), [5, 17, 3]), rtol=1e-5, atol=1e-6
    )
    status, info = http(predictor, "GET", f"/v1/models/{MODEL}/status")
    assert info["redis_parser"] == "hiredis" and info["item_cache"]["dropped"] >= 1


# --- bad requests ---------------------------------------------------------------------------------

BAD = [
    # (name, method, path, body, expected status, text the error must contain)
    (
        "malformed JSON",
        "POST",
        f"/v1/models/{MODEL}:predict",
        b'{"user": {"id": 7}, "candidates": [1,',
        400,
        "body: not valid JSON",
    ),
    ("not an object", "POST", f"/v1/models/{MODEL}:predict", [1, 2], 400, "body: expected a JSON object"),
    ("user id type", "POST", f"/v1/models/{MODEL}:predict", {"user": {"id": "7"}, "candidates": [1]}, 400, "user.id"),
    (
        "candidate type",
        "POST",
        f"/v1/models/{MODEL}:predict",
        {"user": {"id": 7}, "candidates": [1, 2.5]},
        400,
        "candidates[1]",
    ),
    (
        "missing candidates",
        "POST",
        f"/v1/models/{MODEL}:predict",
        {"user": {"id": 7}},
        400,
        "candidates: Field required",
    ),
    (
        "too many candidates",
        "POST",
        f"/v1/models/{MODEL}:predict",
        {"user": {"id": 7}, "candidates": list(range(51))},
        400,
        "candidates: 51 candidates, at most 50",
    ),
    (
        "history too long",
        "POST",
        f"/v1/models/{MODEL}:predict",
        {"user": {"id": 7, "history": list(range(101))}, "candidates": [1]},
        400,
        "user.history: 101 items, at most 100",
    ),
    ("body too large", "POST", f"/v1/models/{MODEL}:predict", b" " * 20_001, 413, "larger than 20000 bytes"),
    (
        "v2 wrong datatype",
        "POST",
        f"/v2/models/{MODEL}/infer",
        {
            "inputs": [
                {"name": "user_id", "datatype": "FP32", "shape": [1], "data": [7.0]},
                {"name": "candidates", "datatype": "INT64", "shape": [1], "data": [1]},
            ]
        },
        400,
        "inputs.user_id",
    ),
    (
        "v2 missing candidates",
        "POST",
        f"/v2/models/{MODEL}/infer",
        {"inputs": [{"name": "user_id", "datatype": "INT64", "shape": [1], "data": [7]}]},
        400,
        "inputs.candidates",
    ),
    (
        "v2 shape and data disagree",
        "POST",
        f"/v2/models/{MODEL}/infer",
        {
            "inputs": [
                {"name": "user_id", "datatype": "INT64", "shape": [1], "data": [7]},
                {"name": "candidates", "datatype": "INT64", "shape": [3], "data": [1]},
            ]
        },
        400,
        "inputs.candidates",
    ),
    (
        "v2 not an inference request",
        "POST",
        f"/v2/models/{MODEL}/infer",
        {"inputs": [{"name": "user_id"}]},
        400,
        "inputs.user_id.datatype: missing",
    ),
    ("unknown model", "POST", "/v1/models/nope:predict", {"user": {"id": 7}, "candidates": [1]}, 404, "nope"),
    (
        "duplicate candidates",
        "POST",
        f"/v1/models/{MODEL}:predict",
        {"user": {"id": 7}, "candidates": [4, 2, 4]},
        400,
        "candidates: item 4 is listed more than once",
    ),
    (
        "too many instances",
        "POST",
        f"/v1/models/{MODEL}:predict",
        {"instances": [{"user": {"id": 7}, "candidates": [1]}] * 5},
        400,
        "instances: 5 instances, at most 4",
    ),
    (
        "bad instance",
        "POST",
        f"/v1/models/{MODEL}:predict",
        {"instances": [{"user": {"id": 7}, "candidates": [1]}, {"user": {"id": 7}, "candidates": []}]},
        400,
        "instances[1].candidates",
    ),
    (
        "v2 binary size beyond the body",
        "POST",
        f"/v2/models/{MODEL}/infer",
        {"inputs": [{"name": "user_id", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": 8}}]},
        400,
        "inputs.user_id.parameters.binary_data_size",
    ),
    ("v2 no inputs", "POST", f"/v2/models/{MODEL}/infer", {"id": "x"}, 400, "inputs: expected a non-empty list"),
    (
        "v2 NaN",
        "POST",
        f"/v2/models/{MODEL}/infer",
        b'{"inputs": [{"name": "user_id", "datatype": "INT64", "shape": [1], "data": [NaN]}]}',
        400,
        "body: not valid JSON",
    ),
    ("unknown model's metadata", "GET", "/v2/models/nope", None, 404, "nope"),
    (
        "v2 route with a model version",
        "POST",
        f"/v2/models/{MODEL}/versions/7/infer",
        {"inputs": []},
        400,
        "inputs: expected a non-empty list",
    ),
    ("feedback request id", "POST", "/v1/feedback", {"request_id": "x" * 40, "impressions": 1}, 400, "request_id"),
    (
        "feedback clicks",
        "POST",
        "/v1/feedback",
        {"request_id": f"r1.{'a' * 32}", "impressions": 1, "clicks": 2},
        400,
        "clicks",
    ),
]


def test_the_bad_request_matrix_answers_4xx_with_a_message(predictor: servers.Server) -> None:
    """Each answer is counted and timed (errors too, all under the variant label) and no 4xx
    writes a traceback to the log."""
    before = metric(predictor, "mmrank_request_errors_total", variant=VERSION, reason="too_many_candidates")
    answered = metric(predictor, "mmrank_requests_total", variant=VERSION)
    timed = metric(predictor, "mmrank_request_duration_seconds_count", variant=VERSION)
    rankings = sum(1 for _, _, path, *_ in BAD if path.endswith((":predict", "/infer")))
    failures = []
    for name, method, path, body, want_status, want_text in BAD:
        status, answer = http(predictor, method, path, body)
        message = json.dumps(answer)
        if status != want_status or want_text not in message:
            failures.append(f"{name}: {status} {message[:300]}")
    assert not failures, "\n".join(failures)
    assert metric(predictor, "mmrank_request_errors_total", variant=VERSION, reason="too_many_candidates") == before + 1
    assert metric(predictor, "mmrank_requests_total", variant=VERSION) == answered + rankings
    assert metric(predictor, "mmrank_request_duration_seconds_count", variant=VERSION) == timed + rankings
    assert "Traceback" not in predictor.log_path.read_text()
    status, _ = http(predictor, "POST", f"/v1/models/{MODEL}:predict", {"user": {"id": 7}, "candidates": [1]})
    assert status == 200  # and the server is still serving


def test_overload_answers_503_at_once_instead_of_queueing(predictor: servers.Server, redis: servers.Server) -> None:
    """max_concurrency is 1: a ranking stuck in its store read (Redis paused) holds the only slot."""
    import redis as redis_py

    body = {"user": {"id": USER}, "candidates": [1, 2]}
    before = metric(predictor, "mmrank_requests_total", variant=VERSION, protocol="v1", code="503")
    grpc_before = metric(predictor, "mmrank_requests_total", variant=VERSION, protocol="grpc", code="503")
    client = redis_py.Redis.from_url(redis.url)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            client.execute_command("CLIENT", "PAUSE", "2000", "ALL")
            held = pool.submit(http, predictor, "POST", f"/v1/models/{MODEL}:predict", body)
            wait_for(lambda: metric(predictor, "mmrank_inflight_requests", variant=VERSION) >= 1, timeout=5)
            started = time.monotonic()
            status, answer = http(predictor, "POST", f"/v1/models/{MODEL}:predict", body)
            assert status == 503 and "overloaded: 1 requests in flight, at most 1" in answer["error"]
            assert time.monotonic() - started < 0.5
            code, details = grpc_infer(predictor, [1, 2])  # gRPC takes the same slots
            assert code == "UNAVAILABLE" and "overloaded" in details
            assert held.result()[0] == 200  # answered once Redis is back
    finally:
        client.execute_command("CLIENT", "UNPAUSE")
        client.close()
    assert metric(predictor, "mmrank_requests_total", variant=VERSION, protocol="v1", code="503") == before + 1
    assert metric(predictor, "mmrank_requests_total", variant=VERSION, protocol="grpc", code="503") == grpc_before + 1
    assert metric(predictor, "mmrank_request_errors_total", variant=VERSION, reason="overloaded") >= 2
    assert http(predictor, "POST", f"/v1/models/{MODEL}:predict", body)[0] == 200


def grpc_infer(predictor: servers.Server, candidates: list[int]) -> tuple[str, str]:
    """(status name, details) of one ModelInfer on a plain stub (KServe's client retries UNAVAILABLE)."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    tensor = pb.ModelInferRequest.InferInputTensor
    request = pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            tensor(name="user_id", datatype="INT64", shape=[1], contents=pb.InferTensorContents(int64_contents=[USER])),
            tensor(
                name="candidates",
                datatype="INT64",
                shape=[len(candidates)],
                contents=pb.InferTensorContents(int64_contents=candidates),
            ),
        ],
    )
    with grpc.insecure_channel(predictor.extra["grpc"]) as channel:
        try:
            GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details()
    return "OK", ""


def test_idle_uploads_hold_no_slot_and_are_answered_408(predictor: servers.Server) -> None:
    """Eight connections that send headers and a few body bytes, then nothing: the one slot stays
    free for real requests, the server stays ready, and each idle one gets 408 after the deadline."""
    body = json.dumps({"user": {"id": USER}, "candidates": [1, 2]}).encode()
    before = metric(predictor, "mmrank_requests_total", variant=VERSION, protocol="v1", code="408")
    idle = [socket.create_connection(("127.0.0.1", predictor.port), timeout=10) for _ in range(8)]
    try:
        for sock in idle:
            sock.sendall(
                f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body[:10]
            )
        started = time.monotonic()
        for _ in range(3):
            assert http(predictor, "POST", f"/v1/models/{MODEL}:predict", body)[0] == 200
        assert http(predictor, "GET", "/v2/health/ready")[0] == 200
        assert time.monotonic() - started < 1.0  # served while the uploads were still open
        for sock in idle:
            status, answer = read_response(sock)
            assert status == 408 and "body: 10 bytes received, the rest not within 1 s" in answer["error"]
            assert sock.recv(1) == b""  # and the connection closed: the rest is never taken for a request
    finally:
        for sock in idle:
            sock.close()
    assert metric(predictor, "mmrank_requests_total", variant=VERSION, protocol="v1", code="408") == before + 8


def read_response(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 response with a Content-Length, read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split()[1]), json.loads(rest[:length])


def exchange(sock: socket.socket, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode()
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return read_response(sock)


def v2_body(user: Any, candidates: list[Any], datatype: str = "INT64") -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "user_id", "datatype": datatype, "shape": [1], "data": [user]},
            {"name": "candidates", "datatype": datatype, "shape": [len(candidates)], "data": candidates},
        ]
    }


def test_ids_beyond_int64_are_400_and_the_kept_alive_connection_serves_on(predictor: servers.Server) -> None:
    infer = f"/v2/models/{MODEL}/infer"
    with socket.create_connection(("127.0.0.1", predictor.port), timeout=10) as sock:
        for body, field in [
            (v2_body(2**63, [1, 2]), "inputs.user_id"),
            (v2_body(7, [1, 2**64]), "inputs.candidates"),
            (v2_body(-(2**63) - 1, [1]), "inputs.user_id"),
            (v2_body(7, [1.5]), "inputs.candidates"),
            (v2_body(7, [2**63 - 1, 3]), None),
        ]:
            status, answer = exchange(sock, infer, body)
            if field is None:
                assert status == 200 and len(answer["outputs"][0]["data"]) == 2  # the largest INT64 is an id too
            else:
                assert status == 400 and answer["error"].startswith(field), answer
        status, answer = exchange(sock, f"/v1/models/{MODEL}:predict", {"user": {"id": 2**64}, "candidates": [1]})
        assert status == 400 and answer["error"].startswith("user.id")
        assert exchange(sock, infer, v2_body(USER, [1, 2]))[0] == 200  # same connection, still served
    assert "Traceback" not in predictor.log_path.read_text()


# --- readiness ---------------------------------------------------------------------------------


def wait_for(check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_readiness_follows_coverage_and_store_reachability(predictor: servers.Server, redis: servers.Server) -> None:
    store = open_store(redis.url)
    try:
        store.set_catalogue_size(SPACE, 2 * CATALOGUE)  # the catalogue doubled: coverage 0.495
        status, answer = wait_for(lambda: (r := http(predictor, "GET", f"/v2/models/{MODEL}/ready"))[0] == 503 and r)
        assert "coverage 0.4950 is below the minimum 0.9900" in answer["error"]
        status, answer = http(predictor, "GET", f"/v1/models/{MODEL}")
        assert status == 503 and "coverage 0.4950" in answer["error"] and answer["ready"] is False
        status, answer = http(predictor, "GET", "/v2/health/ready")  # what a readiness probe reads
        assert status == 503 and "coverage 0.4950" in answer["error"]
        status, answer = http(predictor, "POST", f"/v1/models/{MODEL}:predict", {"user": {"id": 7}, "candidates": [1]})
        assert status == 503
        status, answer = http(predictor, "GET", f"/v1/models/{MODEL}/status")
        assert status == 200 and answer["coverage"] == pytest.approx(0.495) and answer["space"] == SPACE
        assert "NOT ready: space e1 coverage 0.4950" in predictor.log_path.read_text()

        store.set_catalogue_size(SPACE, CATALOGUE)  # the backfill caught up
        wait_for(lambda: http(predictor, "GET", f"/v2/models/{MODEL}/ready")[0] == 200)
        assert http(predictor, "GET", f"/v1/models/{MODEL}") == (200, {"name": MODEL, "ready": True})
        assert http(predictor, "GET", "/v2/health/ready")[0] == 200
    finally:
        store.set_catalogue_size(SPACE, CATALOGUE)
        store.close()

    port, workdir = redis.port, redis.workdir
    redis.stop()
    try:
        status, answer = wait_for(lambda: (r := http(predictor, "GET", f"/v2/models/{MODEL}/ready"))[0] == 503 and r)
        assert "store unreachable" in answer["error"]
        status, answer = http(predictor, "POST", f"/v1/models/{MODEL}:predict", {"user": {"id": 7}, "candidates": [1]})
        assert status == 503  # never a 500
        status, answer = http(predictor, "POST", "/v1/feedback", {"request_id": f"r2.{'c' * 32}", "impressions": 1})
        assert status == 503 and "feedback stream unavailable" in answer["error"]
    finally:
        restarted = servers.start_redis(workdir, port=port)  # same AOF: the space is still there
        redis.process, redis.log_path = restarted.process, restarted.log_path
    wait_for(lambda: http(predictor, "GET", f"/v2/models/{MODEL}/ready")[0] == 200)
    assert "store unreachable" in predictor.log_path.read_text()


# --- click feedback --------------------------------------------------------------------------------


def test_feedback_by_http_and_stream_reaches_prometheus_by_variant(
    predictor: servers.Server, redis: servers.Server, start_prometheus: Any
) -> None:
    import redis as redis_py

    from mmrank.predictors.feedback import FEEDBACK_STREAM

    before_impressions = metric(predictor, "mmrank_impressions_total", variant=VERSION)
    before_clicks = metric(predictor, "mmrank_clicks_total", variant=VERSION)
    _, served = http(predictor, "POST", f"/v1/models/{MODEL}:predict", {"user": {"id": USER}, "candidates": [1, 2]})
    status, answer = http(
        predictor, "POST", "/v1/feedback", {"request_id": served["request_id"], "impressions": 5, "clicks": 2}
    )
    assert (status, answer["counted"]) == (200, True)

    client = redis_py.Redis.from_url(redis.url)
    try:
        # Another variant's request id is passed on to the stream, where its own consumers count it.
        stream_length = client.xlen(FEEDBACK_STREAM)
        status, answer = http(
            predictor, "POST", "/v1/feedback", {"request_id": f"r2.{'b' * 32}", "impressions": 4, "clicks": 4}
        )
        assert (status, answer.get("relayed")) == (202, FEEDBACK_STREAM)
        assert client.xlen(FEEDBACK_STREAM) == stream_length + 1
        client.xadd(FEEDBACK_STREAM, {"request_id": served["request_id"], "impressions": 3, "clicks": 1})
    finally:
        client.close()

    prometheus = start_prometheus([f"127.0.0.1:{predictor.port}"])

    def query(expr: str) -> float | None:
        url = f"{prometheus.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        result = json.loads(urllib.request.urlopen(url, timeout=10).read())["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    impressions = f'sum(mmrank_impressions_total{{variant="{VERSION}"}})'
    wait_for(lambda: query(impressions) == before_impressions + 8, timeout=30)
    assert query(f'sum(mmrank_clicks_total{{variant="{VERSION}"}})') == before_clicks + 3
    assert query('mmrank_impressions_total{variant="r2"}') is None  # counted only by r2's own servers
    assert query(f'mmrank_ready{{variant="{VERSION}", space="{SPACE}"}}') == 1.0
    assert query(f'sum(mmrank_request_duration_seconds_count{{variant="{VERSION}"}})') >= 1
    assert query(f'sum(request_predict_seconds_count{{model_name="{MODEL}"}})') >= 1  # KServe's own, beside ours


# --- property-based fuzzing of every endpoint and protocol -----------------------------------------
# Whatever a caller sends, the answer is 200 or a 4xx whose message starts with the field it is
# about: never a 5xx, a traceback in the log, or a connection left hanging (every call has a 10 s
# timeout). Derandomized, so a run is repeatable; the examples are drawn around the valid shape.

FUZZ = hypothesis.settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture, hypothesis.HealthCheck.too_slow],
)
FIELD_MESSAGE = re.compile(r"^([A-Za-z_][\w.\[\]-]*: |Model with name )")
ANY_ID = st.one_of(
    st.integers(-3, 120), st.integers(-(2**70), 2**70), st.floats(), st.booleans(), st.text(max_size=3), st.none()
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def candidates_strategy() -> st.SearchStrategy[Any]:
    candidate = ANY_ID | st.fixed_dictionaries(
        {"item_id": ANY_ID}, optional={"category": ANY_ID, "brand": ANY_ID, "colour": ANY_ID}
    )
    return st.lists(candidate, max_size=60) | JSON


def ranking_strategy() -> st.SearchStrategy[Any]:
    user = st.fixed_dictionaries({"id": ANY_ID}, optional={"history": st.lists(ANY_ID, max_size=110) | JSON})
    return (
        st.fixed_dictionaries({"user": user | JSON, "candidates": candidates_strategy()}, optional={"extra": JSON})
        | JSON
    )


def tensor_strategy() -> st.SearchStrategy[Any]:
    name = st.sampled_from(["user_id", "candidates", "history", "category", "brand", "colour"]) | st.text(max_size=4)
    datatype = st.sampled_from(["INT64", "INT32", "UINT64", "UINT8", "FP32", "BYTES", "BOOL"]) | JSON
    shape = st.lists(st.integers(-2, 60) | st.integers(-(2**70), 2**70), max_size=3) | JSON
    return st.fixed_dictionaries(
        {"name": name, "datatype": datatype, "shape": shape},
        optional={
            "data": st.lists(ANY_ID, max_size=60) | JSON,
            "parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-8, 2**40) | JSON}) | JSON,
        },
    )


def v2_request_strategy() -> st.SearchStrategy[Any]:
    return (
        st.fixed_dictionaries(
            {"inputs": st.lists(tensor_strategy(), max_size=6) | JSON},
            optional={
                "id": JSON,
                "parameters": st.fixed_dictionaries({"binary_data_output": JSON}) | JSON,
                "outputs": JSON,
            },
        )
        | JSON
    )


def check_answer(response: httpx.Response) -> None:
    assert response.status_code < 500, f"{response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert FIELD_MESSAGE.match(error), error


@pytest.fixture(scope="module")
def fuzz_client(predictor: servers.Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=predictor.url, timeout=10) as client:
        yield client


@FUZZ
@hypothesis.given(
    body=ranking_strategy() | st.fixed_dictionaries({"instances": st.lists(ranking_strategy(), max_size=5)})
)
def test_fuzz_v1_answers_200_or_a_4xx_naming_the_field(fuzz_client: httpx.Client, body: Any) -> None:
    response = fuzz_client.post(
        f"/v1/models/{MODEL}:predict", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    check_answer(response)
    if response.status_code == 200:
        predictions = response.json()["predictions"]
        wanted = len(body["instances"]) if "instances" in body else len(body["candidates"])
        assert len(predictions) == wanted


@FUZZ
@hypothesis.given(body=v2_request_strategy())
def test_fuzz_v2_json_answers_200_or_a_4xx_naming_the_field(fuzz_client: httpx.Client, body: Any) -> None:
    check_answer(
        fuzz_client.post(
            f"/v2/models/{MODEL}/infer", content=json.dumps(body), headers={"content-type": "application/json"}
        )
    )


@FUZZ
@hypothesis.given(
    head=v2_request_strategy(),
    tail=st.binary(max_size=64),
    length=st.none() | st.integers(-5, 400).map(str) | st.text("0123456789x-", min_size=1, max_size=4),
)
def test_fuzz_v2_binary_answers_200_or_a_4xx_naming_the_field(
    fuzz_client: httpx.Client, head: Any, tail: bytes, length: str | None
) -> None:
    header = json.dumps(head).encode()
    headers = {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)) if length is None else length,
    }
    check_answer(fuzz_client.post(f"/v2/models/{MODEL}/infer", content=header + tail, headers=headers))


@FUZZ
@hypothesis.given(
    body=JSON | st.fixed_dictionaries({"request_id": JSON, "impressions": ANY_ID, "clicks": ANY_ID}),
    raw=st.binary(max_size=30),
)
def test_fuzz_feedback_never_answers_5xx(fuzz_client: httpx.Client, body: Any, raw: bytes) -> None:
    for content in (json.dumps(body).encode(), raw):
        response = fuzz_client.post("/v1/feedback", content=content, headers={"content-type": "application/json"})
        assert response.status_code < 500 or "feedback stream unavailable" in response.text, response.text[:300]


@FUZZ
@hypothesis.given(
    name=st.text(min_size=1, max_size=12),
    route=st.sampled_from(
        [
            "GET /v1/models/{}",
            "GET /v1/models/{}/status",
            "GET /v2/models/{}",
            "GET /v2/models/{}/ready",
            "POST /v1/models/{}:predict",
            "POST /v2/models/{}/infer",
            "GET /v2/models/{}/versions/1",
        ]
    ),
)
def test_fuzz_model_names_in_every_route_answer_without_5xx(fuzz_client: httpx.Client, name: str, route: str) -> None:
    method, path = route.split(" ")
    response = fuzz_client.request(
        method,
        path.format(urllib.parse.quote(name, safe="")),
        json={"user": {"id": USER}, "candidates": [1]} if method == "POST" else None,
    )
    assert response.status_code < 500 or response.status_code == 501, f"{response.status_code} {response.text[:200]}"
    if name != MODEL and response.status_code >= 400 and response.headers.get("content-type") == "application/json":
        assert "error" in response.json() or "detail" in response.json()


def grpc_tensor_strategy() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "name": st.sampled_from(["user_id", "candidates", "history", "brand", "colour"]),
            "datatype": st.sampled_from(["INT64", "INT32", "UINT64", "FP32", "BYTES", "WHAT"]),
            "shape": st.lists(st.integers(-2, 60), max_size=3),
            "contents": st.sampled_from(["int64_contents", "uint64_contents", "fp32_contents", "int_contents"]),
            "values": st.lists(st.integers(0, 2**63 - 1) | st.integers(-3, 120), max_size=40),
            "raw": st.none() | st.binary(max_size=80),
        }
    )


@FUZZ
@hypothesis.given(
    tensors=st.lists(grpc_tensor_strategy(), max_size=5),
    model=st.sampled_from([MODEL, MODEL, "nope"]),
    request_id=st.text(max_size=8),
)
def test_fuzz_grpc_answers_ok_or_a_client_error(
    predictor: servers.Server, tensors: list[dict[str, Any]], model: str, request_id: str
) -> None:
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    inputs, raw = [], []
    for t in tensors:
        contents = {}
        if t["raw"] is None:
            fits = {"int_contents": lambda v: -(2**31) <= v < 2**31, "uint64_contents": lambda v: v >= 0}
            values = [v for v in t["values"] if fits.get(t["contents"], lambda v: True)(v)]
            contents = {t["contents"]: [float(v) for v in values] if t["contents"] == "fp32_contents" else values}
        else:
            raw.append(t["raw"])
        inputs.append(
            pb.ModelInferRequest.InferInputTensor(
                name=t["name"], datatype=t["datatype"], shape=t["shape"], contents=pb.InferTensorContents(**contents)
            )
        )
    if raw and len(raw) != len(inputs):
        raw = []
    request = pb.ModelInferRequest(model_name=model, id=request_id, inputs=inputs, raw_input_contents=raw)
    with grpc.insecure_channel(predictor.extra["grpc"]) as channel:
        try:
            GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (
                f"{exc.code()} {exc.details()}"
            )


def test_deep_nesting_and_the_log_after_fuzzing(predictor: servers.Server, fuzz_client: httpx.Client) -> None:
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"user": ' * 5000 + b"1" + b"}" * 5000):
        response = fuzz_client.post(f"/v1/models/{MODEL}:predict", content=body[:19_000])
        assert response.status_code == 400 and response.json()["error"].startswith("body: ")
    assert (
        fuzz_client.post(f"/v1/models/{MODEL}:predict", json={"user": {"id": USER}, "candidates": [1]}).status_code
        == 200
    )
    assert "Traceback" not in predictor.log_path.read_text()
