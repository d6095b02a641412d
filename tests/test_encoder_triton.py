"""The exported Python-backend repository served by the real Triton: parity with torch, errors.

One Triton serves the whole module (it takes seconds to start); a server that cannot start fails
every test here with the reason.
"""

from __future__ import annotations

import concurrent.futures
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import servers
from mmrank.encoders.export import export_repository
from mmrank.encoders.model import EncoderConfig, ItemEncoder, encode_items

pytestmark = pytest.mark.triton

TITLES = [
    "red wool hat",
    "blue silk scarf",
    "oak desk lamp",
    "steel water bottle",
    "green cotton shirt",
    "black leather boots",
    "white ceramic mug",
]


@pytest.fixture(scope="module")
def minilm_encoder() -> ItemEncoder:
    torch.manual_seed(1)
    return ItemEncoder(EncoderConfig(text_tower="hf", text_model="minilm"))


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, minilm_encoder: ItemEncoder
) -> Iterator[tuple[servers.Server, ItemEncoder]]:
    """One Triton with two models: the default encoder and one with the pretrained MiniLM text tower."""
    torch.manual_seed(0)
    encoder = ItemEncoder()
    repo = tmp_path_factory.mktemp("repo")
    export_repository(encoder, repo, version="1", max_batch_size=8, max_queue_delay_us=5000)
    export_repository(minilm_encoder, repo, version="2", model_name="item_encoder_minilm")
    try:
        server = servers.start_triton(repo, tmp_path_factory.mktemp("triton"))
    except servers.ServerUnavailable as exc:
        pytest.fail(f"real server unavailable: {exc}", pytrace=False)
    yield server, encoder
    server.stop()


def items(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8), [TITLES[i % len(TITLES)] for i in range(n)]


def http_inputs(images: np.ndarray, titles: list[str], image_dtype: str = "UINT8"):  # type: ignore[no-untyped-def]
    import tritonclient.http as httpclient

    image = httpclient.InferInput("IMAGE", list(images.shape), image_dtype)
    image.set_data_from_numpy(images)
    title = httpclient.InferInput("TITLE", [len(titles), 1], "BYTES")
    title.set_data_from_numpy(np.array([[t.encode("utf-8")] for t in titles], dtype=object))
    return [image, title]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_http_and_grpc_answer_with_torch_embeddings(served):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    server, encoder = served
    images, titles = items(7)
    expected = encode_items(encoder, images, titles)

    http = httpclient.InferenceServerClient(server.url)
    got_http = http.infer("item_encoder", http_inputs(images, titles)).as_numpy("EMBEDDING")

    grpc = grpcclient.InferenceServerClient(server.extra["grpc_url"])
    image = grpcclient.InferInput("IMAGE", list(images.shape), "UINT8")
    image.set_data_from_numpy(images)
    title = grpcclient.InferInput("TITLE", [len(titles), 1], "BYTES")
    title.set_data_from_numpy(np.array([[t.encode()] for t in titles], dtype=object))
    got_grpc = grpc.infer("item_encoder", [image, title]).as_numpy("EMBEDDING")

    for got in (got_http, got_grpc):
        assert got.shape == (7, 128) and got.dtype == np.float32
        assert cosines(got, expected).min() >= 0.9999


def test_a_hugging_face_text_tower_tokenizes_inside_triton_like_in_torch(served, minilm_encoder):
    import tritonclient.http as httpclient

    server, _ = served
    images, titles = items(4, seed=3)
    http = httpclient.InferenceServerClient(server.url)
    got = http.infer("item_encoder_minilm", http_inputs(images, titles)).as_numpy("EMBEDDING")
    assert cosines(got, encode_items(minilm_encoder, images, titles)).min() >= 0.9999


def test_wrong_inputs_get_triton_errors_and_the_model_keeps_serving(served):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    server, encoder = served
    http = httpclient.InferenceServerClient(server.url)
    images, titles = items(3, seed=1)

    with pytest.raises(InferenceServerException, match="FP32.*UINT8|UINT8.*FP32"):
        http.infer("item_encoder", http_inputs(images.astype(np.float32), titles, "FP32"))
    with pytest.raises(InferenceServerException, match="shape|dims"):
        http.infer("item_encoder", http_inputs(images[:, :32], titles))
    with pytest.raises(InferenceServerException, match="TITLE of row 1 is empty"):
        http.infer("item_encoder", http_inputs(images, [titles[0], "  ", titles[2]]))
    with pytest.raises(InferenceServerException, match="batch-size must be <= 8"):
        http.infer("item_encoder", http_inputs(*items(9, seed=2)))  # max_batch_size is 8

    assert http.is_model_ready("item_encoder")
    got = http.infer("item_encoder", http_inputs(images, titles)).as_numpy("EMBEDDING")
    assert cosines(got, encode_items(encoder, images, titles)).min() >= 0.9999


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(served):
    import tritonclient.http as httpclient

    server, encoder = served
    requests = [items(2, seed=10 + i) for i in range(8)]

    def ask(request: tuple[np.ndarray, list[str]]) -> np.ndarray:
        client = httpclient.InferenceServerClient(server.url)
        return client.infer("item_encoder", http_inputs(*request)).as_numpy("EMBEDDING")

    before = _metric(server, "nv_inference_exec_count")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, requests))
    for (images, titles), got in zip(requests, answers, strict=False):
        assert cosines(got, encode_items(encoder, images, titles)).min() >= 0.9999
    executions = _metric(server, "nv_inference_exec_count") - before
    assert 1 <= executions < len(requests)  # several requests shared a model execution


def _metric(server: servers.Server, name: str) -> float:
    with urllib.request.urlopen(str(server.extra["metrics_url"]), timeout=5) as response:
        text = response.read().decode()
    lines = [line for line in text.splitlines() if line.startswith(name + "{") and 'model="item_encoder"' in line]
    assert lines, f"{name} missing from Triton's metrics"
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_export_writes_the_documented_layout(served):
    server, _ = served
    model_dir = Path(str(server.extra["model_repository"])) / "item_encoder"
    assert sorted(p.name for p in (model_dir / "1").iterdir() if p.name != "__pycache__") == [
        "encoder.json",
        "model.pt",
        "model.py",
        "tokenizer.json",
        "tokenizer.py",
    ]
    assert 'backend: "python"' in (model_dir / "config.pbtxt").read_text()
