"""The real-time embedder against the real Triton (serving the exported item encoder) and Redis.

One Triton with two encoder versions (`enc_e1`, `enc_e2`: two randomly initialised small
encoders) serves the module; the fault tests start their own Triton or Redis on fixed ports so
they can kill and restart it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from harness import servers
from mmrank.encoders import item_events
from mmrank.encoders.embedder import Embedder, backoff_delay, latest_per_item
from mmrank.encoders.embedder_app import serve
from mmrank.encoders.embedder_config import EmbedderConfig
from mmrank.encoders.item_stream import next_stream_id, over_delivered, redelivery, trim_floor
from mmrank.encoders.triton_client import EncoderTarget, parse_encoders
from mmrank.store import DEAD_LETTER_STREAM, DEFAULT_SCOPE, EMBEDDER_GROUP, ITEM_STREAM, Scope, open_store

pytestmark = [pytest.mark.triton, pytest.mark.redis]


# --- helpers ----------------------------------------------------------------------------------


def small_encoder(seed: int):  # type: ignore[no-untyped-def]
    import torch

    from mmrank.encoders.model import EncoderConfig, ItemEncoder

    torch.manual_seed(seed)
    config = EncoderConfig(image_channels=(8, 16), text_width=32, text_layers=1, text_heads=2, vocab_size=512)
    return ItemEncoder(config).eval()


def export(encoders: dict[str, Any], repo: Path) -> Path:
    from mmrank.encoders.export import export_repository

    for name, encoder in encoders.items():
        export_repository(encoder, repo, model_name=name, max_batch_size=32, max_queue_delay_us=1000)
    return repo


def reference(encoder: Any, images: np.ndarray, titles: list[str]) -> np.ndarray:
    from mmrank.encoders.model import encode_items

    return encode_items(encoder, images, titles)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Running:
    """An Embedder serving in a background thread with its own event loop."""

    def __init__(self, config: EmbedderConfig) -> None:
        self.config = config
        self.port: int | None = None
        self.error: BaseException | None = None
        self.embedder: Embedder | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        assert self.started.wait(30), "embedder did not start"

    def _main(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self.embedder = Embedder(self.config)
            await serve(self.embedder, self._started)

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc
            self.started.set()

    def _started(self, port: int | None) -> None:
        self.port = port
        self.started.set()

    def http(self, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        try:
            return status, json.loads(raw)
        except json.JSONDecodeError:
            return status, raw.decode()

    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        _, text = self.http("/metrics")
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0

    def stop(self) -> None:
        if self.loop is not None and self.embedder is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.embedder.stop_event.set)
        self.thread.join(30)
        assert not self.thread.is_alive(), "embedder did not stop"
        assert self.error is None, f"embedder failed: {self.error!r}"


class Triton:
    """The module's Triton on fixed ports, so the fault test can kill it and start it again."""

    def __init__(self, repo: Path, workdir: Path) -> None:
        self.repo, self.workdir = repo, workdir
        self.http_port, self.grpc_port = servers.free_port(), servers.free_port()
        self.server = self.start()

    def start(self, *models: str) -> servers.Server:
        """All models, or only `models` (a restart that loads less comes back sooner)."""
        extra = ["--model-control-mode=explicit", *(f"--load-model={m}" for m in models)] if models else []
        self.server = servers.start_triton(
            self.repo, self.workdir, http_port=self.http_port, grpc_port=self.grpc_port, extra_args=extra
        )
        return self.server

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


PICKY_MODEL = textwrap.dedent('''
    import time

    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        """Follows the encoder's contract, but refuses any request with a title containing POISON
        and takes 3 s over one with a title containing HANG."""

        def execute(self, requests):
            responses = []
            for request in requests:
                images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
                titles = [t[0].decode() for t in pb_utils.get_input_tensor_by_name(request, "TITLE").as_numpy()]
                if any("HANG" in t for t in titles):
                    time.sleep(3)
                if any("POISON" in t for t in titles):
                    responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("cannot embed POISON")))
                    continue
                out = np.zeros((len(titles), 128), np.float32)
                out[:, 0] = 1.0
                out[:, 1] = images.reshape(len(titles), -1).mean(axis=1) / 255.0
                out /= np.linalg.norm(out, axis=1, keepdims=True)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("EMBEDDING", out)]))
            return responses
''')


def picky_model(repo: Path) -> None:
    """A stand-in encoder that refuses some inputs: the real one never does, so the isolation
    of a refused item needs a model that does."""
    from mmrank.encoders.triton_config import config_pbtxt

    (repo / "picky" / "1").mkdir(parents=True)
    (repo / "picky" / "config.pbtxt").write_text(config_pbtxt("picky", max_batch_size=32))
    (repo / "picky" / "1" / "model.py").write_text(PICKY_MODEL)


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Triton, dict[str, Any]]]:
    encoders = {"enc_e1": small_encoder(0), "enc_e2": small_encoder(1)}
    repo = export(encoders, tmp_path_factory.mktemp("repo"))
    picky_model(repo)
    holder = Triton(repo, tmp_path_factory.mktemp("triton"))
    yield holder, encoders
    holder.server.stop()


def config(redis_url: str, targets: list[EncoderTarget], **overrides: Any) -> EmbedderConfig:
    values: dict[str, Any] = dict(
        encoders=targets,
        store_url=redis_url,
        redis_url=redis_url,
        batch_size=16,
        max_wait=0.02,
        consumer="test-pod",
        http_host="127.0.0.1",
        http_port=0,
        backoff_base=0.05,
        backoff_cap=0.5,
        idle_block=0.2,
        triton_timeout=10,
    )
    values.update(overrides)
    return EmbedderConfig(**values)


def pending(client: redis.Redis) -> int:
    return int(client.xpending(ITEM_STREAM, EMBEDDER_GROUP)["pending"])


# --- pure parts -------------------------------------------------------------------------------


def test_encoder_specs_parse_from_flags_and_the_environment_form() -> None:
    targets = parse_encoders(["e1=triton-e1:8001", "e2=triton-e2:8001/enc,e3=h:1"])
    assert targets == [
        EncoderTarget("e1", "triton-e1:8001", "item_encoder"),
        EncoderTarget("e2", "triton-e2:8001", "enc"),
        EncoderTarget("e3", "h:1", "item_encoder"),
    ]
    with pytest.raises(ValueError, match="one encoder"):
        parse_encoders(["e1=a:1", "e1=b:2"])
    with pytest.raises(ValueError, match="SPACE=HOST:PORT"):
        parse_encoders(["a:1"])


def test_the_operator_environment_configures_the_embedder(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmrank.encoders.embedder_config import config_from_env

    monkeypatch.setenv("MMRANK_ENCODERS", "e1=r-encoder-e1:8001,e2=r-encoder-e2:8001/enc")
    monkeypatch.setenv("MMRANK_STORE_URL", "redis://store:6379/0")
    monkeypatch.setenv("MMRANK_SCOPE", "ads/shop")
    monkeypatch.setenv("MMRANK_CONSUMER_GROUP", "emb")
    cfg = config_from_env(http_port=0, max_wait=None)
    assert [t.space for t in cfg.encoders] == ["e1", "e2"] and cfg.encoders[1].model == "enc"
    # the ranker's own stream, dead letters and group by default ...
    assert (cfg.redis_url, cfg.stream, cfg.dead_stream, cfg.group, cfg.http_port) == (
        "redis://store:6379/0",
        "mmrank:{ads/shop}:items",
        "mmrank:{ads/shop}:items:dead",
        "mmrank:{ads/shop}:emb",
        0,
    )
    # ... and with a stream named in the spec (shared), its group and dead letters stay its own
    monkeypatch.setenv("MMRANK_ITEM_STREAM", "shop:items")
    cfg = config_from_env()
    assert (cfg.stream, cfg.dead_stream, cfg.group) == (
        "shop:items",
        "mmrank:{ads/shop}:items:dead",
        "mmrank:{ads/shop}:emb",
    )
    assert config_from_env(["e9=h:1"], group="other").encoders == [EncoderTarget("e9", "h:1")]
    assert config_from_env(scope="other/ranker").group == "mmrank:{other/ranker}:emb"
    with pytest.raises(ValueError, match="NAMESPACE/NAME"):
        config_from_env(scope="shop")
    monkeypatch.delenv("MMRANK_SCOPE")
    assert config_from_env().scope == DEFAULT_SCOPE
    monkeypatch.setenv("MMRANK_STORE_URL", "file:///tmp/store")
    with pytest.raises(ValueError, match="MMRANK_REDIS_URL"):
        config_from_env()


def test_backoff_grows_and_stays_under_its_cap() -> None:
    delays = [backoff_delay(attempt, 0.1, 2.0) for attempt in range(1, 30)]
    assert all(0 <= d <= 2.0 for d in delays)
    assert max(delays[10:]) > max(delays[:2])


def test_the_latest_event_of_an_item_wins_within_a_batch() -> None:
    def event(item: int, title: str, event_time: float) -> item_events.ItemEvent:
        return item_events.ItemEvent(item, title, np.zeros((64, 64, 3), np.uint8), event_time)

    first, other, second = event(1, "old", 1.0), event(2, "x", 1.0), event(1, "new", 2.0)
    assert [e.title for e in latest_per_item([first, other, second])] == ["new", "x"]
    replayed = event(1, "replayed", 0.5)  # later in the stream, older event
    assert [e.title for e in latest_per_item([second, other, replayed])] == ["new", "x"]
    tie = event(1, "same time, later in the stream", 2.0)
    assert [e.title for e in latest_per_item([second, tie])] == ["same time, later in the stream"]


def test_entries_delivered_twice_are_delivered_again_alone() -> None:
    assert redelivery([(b"1-0", 1), (b"2-0", 1), (b"3-0", 2), (b"4-0", 1)]) == [(b"1-0", 1), (b"2-0", 1)]
    assert redelivery([(b"3-0", 2), (b"4-0", 1)]) == [(b"3-0", 2)]
    assert redelivery([(b"5-0", 7)]) == [(b"5-0", 7)]


def test_an_entry_delivered_more_than_the_limit_is_refused_with_its_reason() -> None:
    fields = {b"item_id": b"1"}
    keep, refused = over_delivered([(b"1-0", fields, 4), (b"2-0", fields, 3), (b"3-0", None, 9)], limit=3)
    assert keep == [(b"2-0", fields)]
    assert [(entry_id, exc.reason) for entry_id, _, exc in refused] == [
        (b"1-0", "too_many_deliveries"),
        (b"3-0", "too_many_deliveries"),
    ]
    assert "delivered 4 times" in refused[0][2].detail
    with pytest.raises(ValueError, match="at least 3"):
        config("redis://x", [EncoderTarget("e1", "h:1")], max_deliveries=2)


def test_the_stream_is_trimmed_to_the_oldest_entry_a_group_still_needs() -> None:
    assert next_stream_id(b"1700-9") == "1700-10"
    # (pending, oldest pending, last delivered) per group
    assert trim_floor([(0, None, b"1700-3")]) == "1700-4", "all acknowledged: everything up to the last goes"
    assert trim_floor([(2, b"1650-0", b"1700-3"), (0, None, b"1800-0")]) == "1650-0"
    assert trim_floor([(0, None, b"1700-3"), (0, None, b"0-0")]) == "0-1", "a group that read nothing keeps all"
    assert trim_floor([(0, None, b"99-0"), (0, None, b"100-0")]) == "99-1", "ids compare as numbers"
    assert trim_floor([]) is None


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"item_id": "x", "title": "t", "image_path": "/nope"}, "bad_item_id"),
        ({"item_id": "1", "title": "  ", "image_path": "/nope"}, "empty_title"),
        ({"item_id": "1", "title": "t"}, "missing_image"),
        ({"item_id": "1", "title": "t", "image": b"\x89PNG not really"}, "undecodable_image"),
        ({"item_id": "1", "title": "t", "image": b"\0" * (item_events.MAX_IMAGE_BYTES + 1)}, "oversized"),
        ({"item_id": "1", "title": "t" * 2000, "image_path": "/nope"}, "oversized"),
        ({"item_id": "1", "title": "t", "image_path": "/does/not/exist.png"}, "unreadable_image_path"),
        ({"item_id": "1", "title": "t", "image_path": "http://example.com/a.png"}, "unsupported_image_url"),
        ({"item_id": "1", "title": "t", "image_path": "/nope", "event_time": "yesterday"}, "bad_event_time"),
        ({"item_id": "1", "title": "t", "image_path": "/nope", "event_time": "nan"}, "bad_event_time"),
    ],
)
def test_validation_names_the_reason(fields: dict[str, Any], reason: str) -> None:
    with pytest.raises(item_events.BadEvent) as caught:
        item_events.parse_event(fields)
    assert caught.value.reason == reason


def test_an_image_too_large_to_decode_is_refused_from_its_header() -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (5000, 4000)).save(buffer, format="PNG", optimize=True)  # small file, 20 M pixels
    assert len(buffer.getvalue()) < item_events.MAX_IMAGE_BYTES
    with pytest.raises(item_events.BadEvent, match="5000x4000") as caught:
        item_events.parse_event({"item_id": "1", "title": "t", "image": buffer.getvalue()})
    assert caught.value.reason == "oversized"


def test_a_valid_event_decodes_and_resizes_its_image(tmp_path: Path) -> None:
    from PIL import Image

    big = np.full((128, 96, 3), 200, np.uint8)
    path = tmp_path / "item.png"
    Image.fromarray(big).save(path)
    event = item_events.parse_event(
        {b"item_id": b"42", b"title": " Red shoe ", b"image_path": str(path).encode(), b"event_time": b"1700000000.5"},
        "9-0",
    )
    assert (event.item_id, event.title, event.event_time, event.message_id) == (42, "Red shoe", 1700000000.5, "9-0")
    assert event.image.shape == (64, 64, 3) and event.image.dtype == np.uint8 and (event.image == 200).all()
    exact = images(1)[0]
    again = item_events.parse_event(item_events.event_fields(1, "t", exact))
    assert np.array_equal(again.image, exact), "PNG events must reach the encoder pixel-exact"


# --- with the real servers --------------------------------------------------------------------


def test_new_items_appear_in_every_live_space_from_the_stream_and_http(
    triton: tuple[Triton, dict[str, Any]], redis_server: servers.Server, tmp_path: Path
) -> None:
    server, encoders = triton
    grpc = server.grpc
    client = redis.Redis.from_url(redis_server.url)
    trace = tmp_path / "trace.jsonl"
    running = Running(
        config(
            redis_server.url,
            [EncoderTarget("e1", grpc, "enc_e1"), EncoderTarget("e2", grpc, "enc_e2")],
            trace=str(trace),
        )
    )
    try:
        pixels = images(14)
        titles = [f"red leather shoe {i}" for i in range(14)]
        for i in range(12):
            item_events.publish_item(client, 100 + i, titles[i], pixels[i])
        status, body = running.http(
            "/items",
            {
                "item_id": 112,
                "title": titles[12],
                "image": base64.b64encode(item_events.encode_image(pixels[12])).decode(),
            },
        )
        assert status == 202, body
        path = tmp_path / "113.png"
        path.write_bytes(item_events.encode_image(pixels[13]))
        assert running.http("/items", {"item_id": 113, "title": titles[13], "image_path": str(path)})[0] == 202

        store = open_store(redis_server.url)
        ids = np.arange(100, 114)
        wait_for(
            lambda: (
                all(store.get(s, ids)[1].all() for s in ("e1", "e2") if s in store.spaces())
                and len(store.spaces()) == 2
            ),
            60,
            "14 items in both spaces",
        )
        for space, model in (("e1", "enc_e1"), ("e2", "enc_e2")):
            got, _ = store.get(space, ids)
            np.testing.assert_allclose(got, reference(encoders[model], pixels, titles), atol=3e-3)
        assert np.abs(store.get("e1", ids)[0] - store.get("e2", ids)[0]).max() > 0.1, "two versions, two spaces"
        assert store.space_info("e1").dim == 128 and store.space_info("e1").dtype == "float16"
        wait_for(lambda: pending(client) == 0, 10, "every event acknowledged")

        assert running.metric("mmrank_embedder_items_total", space="e1") == 14
        assert running.metric("mmrank_embedder_items_total", space="e2") == 14
        assert running.metric("mmrank_embedding_freshness_seconds_count", space="e2") == 14
        assert running.metric("mmrank_embedding_freshness_seconds_bucket", space="e1", le="60.0") == 14
        wait_for(lambda: running.metric("mmrank_embedder_stream_lag") == 0, 5, "lag back to 0")
        assert running.http("/readyz")[0] == 200
        assert running.http("/healthz")[0] == 200
        assert running.metric("mmrank_embedder_gc_pause_seconds_count", generation="0") > 0
    finally:
        running.stop()
    assert_trace_covers(trace, set(range(100, 114)), ("e1", "e2"))


def assert_trace_covers(trace: Path, items: set[int], spaces: tuple[str, ...]) -> None:
    """--trace: every item in a batch line whose stage times follow the batch's way, per space."""
    batches = [r for r in map(json.loads, trace.read_text().splitlines()) if "batch" in r]
    assert {item for batch in batches for item in batch["items"]} == items
    for batch in batches:
        assert batch["read_start"] <= batch["read"] <= batch["validated"] <= batch["launched"] <= batch["acked"]
        assert set(batch["spaces"]) == set(spaces)
        for marks in batch["spaces"].values():
            assert batch["launched"] <= marks["embed_start"] <= marks["embed_end"] <= marks["stored"] <= batch["acked"]


@pytest.mark.parametrize("shared_stream", [None, "shop:items"], ids=["own streams", "one named stream"])
def test_the_embedders_of_two_rankers_each_receive_every_item_of_their_stream(
    triton: tuple[Triton, dict[str, Any]], redis_server: servers.Server, shared_stream: str | None
) -> None:
    """Two rankers on one Redis, both with space e1: each ranker's embedder reads its own stream
    with its own group (or one stream both name, each with its own group) and writes its own e1."""
    server, _ = triton
    client = redis.Redis.from_url(redis_server.url)
    scopes = (Scope("ads", "shop"), Scope("ads-eu", "shop"))
    target = [EncoderTarget("e1", server.grpc, "enc_e1")]
    running = [
        Running(
            config(
                redis_server.url, target, scope=scope, consumer=f"pod-{i}", http_port=None, stream=shared_stream or ""
            )
        )
        for i, scope in enumerate(scopes)
    ]
    try:
        sent: dict[Scope, list[int]] = {scopes[0]: list(range(10)), scopes[1]: list(range(5, 12))}
        if shared_stream:
            sent = {scope: list(range(12)) for scope in scopes}
            for item in range(12):
                item_events.publish_item(
                    client, item, f"wool scarf {item}", images(1, seed=item)[0], stream=shared_stream
                )
        else:
            for scope, items in sent.items():
                for item in items:
                    item_events.publish_item(
                        client, item, f"wool scarf {item}", images(1, seed=item)[0], stream=scope.item_stream
                    )
        stores = {scope: open_store(redis_server.url, scope) for scope in scopes}
        for scope, items in sent.items():
            store = stores[scope]
            wait_for(
                lambda s=store, i=items: "e1" in s.spaces() and s.space_info("e1").items == len(i),
                60,
                f"the {len(items)} items of {scope} in its e1",
            )
        for scope, items in sent.items():
            found = stores[scope].get("e1", range(12))[1]
            assert np.flatnonzero(found).tolist() == items, f"{scope} holds another ranker's items"
            stream, group = shared_stream or scope.item_stream, scope.consumer_group()
            wait_for(
                lambda st=stream, g=group: client.xpending(st, g)["pending"] == 0,
                10,
                f"{scope}: every event acknowledged",
            )
            info = {g["name"].decode(): g for g in client.xinfo_groups(stream)}
            assert info[group]["entries-read"] == len(items)
        assert client.exists(ITEM_STREAM) == 0, "nothing went to the local default stream"
    finally:
        for embedder in running:
            embedder.stop()


def test_bad_items_land_in_the_dead_letter_stream_with_their_reason(
    triton: tuple[Triton, dict[str, Any]], redis_server: servers.Server
) -> None:
    server, _ = triton
    client = redis.Redis.from_url(redis_server.url)
    running = Running(config(redis_server.url, [EncoderTarget("e1", server.grpc, "enc_e1")]))
    try:
        client.xadd(ITEM_STREAM, {"item_id": "1", "title": "", "image": item_events.encode_image(images(1)[0])})
        client.xadd(ITEM_STREAM, {"item_id": "2", "title": "broken picture", "image": b"GIF89a garbage"})
        client.xadd(ITEM_STREAM, {"item_id": "3", "title": "huge", "image": b"\0" * (item_events.MAX_IMAGE_BYTES + 10)})
        item_events.publish_item(client, 4, "a fine blue hat", images(1, seed=4)[0])

        status, body = running.http("/items", {"item_id": 5, "title": "", "image_path": "/x.png"})
        assert (status, body["error"]) == (400, "empty_title")
        status, body = running.http("/items", {"item_id": 6, "title": "t", "image": "!!not base64!!"})
        assert (status, body["error"]) == (400, "undecodable_image")

        store = open_store(redis_server.url)
        wait_for(lambda: "e1" in store.spaces() and store.get("e1", [4])[1].all(), 60, "the good item stored")
        wait_for(lambda: client.xlen(DEAD_LETTER_STREAM) == 3, 10, "three dead letters")
        dead = {int(f[b"item_id"]): f for _, f in client.xrange(DEAD_LETTER_STREAM)}
        assert {k: v[b"reason"].decode() for k, v in dead.items()} == {
            1: "empty_title",
            2: "undecodable_image",
            3: "oversized",
        }
        assert b"image" not in dead[3], "an oversized payload is not copied into the dead letters"
        assert dead[2][b"image"] == b"GIF89a garbage" and dead[2][b"source_id"]
        assert store.get("e1", [1, 2, 3])[1].tolist() == [False, False, False]
        wait_for(lambda: pending(client) == 0, 10, "dead letters acknowledged too")
        assert running.metric("mmrank_embedder_errors_total", reason="empty_title") == 2  # stream + HTTP
        assert running.metric("mmrank_embedder_errors_total", reason="oversized") == 1
    finally:
        running.stop()


def test_an_item_the_encoder_refuses_is_dead_lettered_and_the_rest_of_its_batch_stored(
    triton: tuple[Triton, dict[str, Any]], redis_server: servers.Server
) -> None:
    holder, _ = triton
    client = redis.Redis.from_url(redis_server.url)
    titles = ["plain mug", "tall mug", "POISON mug", "short mug", "green mug"]
    for i, title in enumerate(titles):
        item_events.publish_item(client, i, title, images(1, seed=i)[0])
    running = Running(
        config(
            redis_server.url,
            [EncoderTarget("e1", holder.grpc, "enc_e1"), EncoderTarget("p1", holder.grpc, "picky")],
            batch_size=8,
            max_wait=0.5,
        )
    )
    try:
        store = open_store(redis_server.url)
        wait_for(
            lambda: client.xlen(DEAD_LETTER_STREAM) == 1 and pending(client) == 0, 60, "the refused item dead-lettered"
        )
        ((_, dead),) = client.xrange(DEAD_LETTER_STREAM)
        assert (dead[b"item_id"], dead[b"reason"]) == (b"2", b"encoder_rejected")
        assert b"POISON" in dead[b"detail"]
        assert store.get("p1", range(5))[1].tolist() == [True, True, False, True, True]
        assert store.get("e1", range(5))[1].all(), "the other encoder version embedded it"
        assert running.metric("mmrank_embedder_errors_total", reason="encoder_rejected") == 1
    finally:
        running.stop()


def test_events_left_pending_by_a_crashed_replica_are_taken_over(
    triton: tuple[Triton, dict[str, Any]], redis_server: servers.Server, tmp_path: Path
) -> None:
    """Also the quick start's combination: the stream in Redis, the vectors in the file store."""
    server, _ = triton
    store_url = f"file://{tmp_path / 'store'}"
    client = redis.Redis.from_url(redis_server.url)
    client.xgroup_create(ITEM_STREAM, EMBEDDER_GROUP, id="0", mkstream=True)
    for i in range(3):
        item_events.publish_item(client, i, f"item {i}", images(1, seed=i)[0])
    # Two consumers read and crash before acknowledging: this pod (restarting) and another one.
    client.xreadgroup(EMBEDDER_GROUP, "test-pod", {ITEM_STREAM: ">"}, count=1)
    client.xreadgroup(EMBEDDER_GROUP, "crashed-pod", {ITEM_STREAM: ">"}, count=2)
    assert pending(client) == 3
    running = Running(
        config(redis_server.url, [EncoderTarget("e1", server.grpc, "enc_e1")], claim_idle=0.5, store_url=store_url)
    )
    try:
        store = open_store(store_url)
        wait_for(lambda: "e1" in store.spaces() and store.get("e1", [0, 1, 2])[1].all(), 60, "all three embedded")
        wait_for(lambda: pending(client) == 0, 10, "all acknowledged")
        assert running.metric("mmrank_embedder_items_total", space="e1") == 3
    finally:
        running.stop()


def test_redis_restarted_loses_nothing_after_recovery(triton: tuple[Triton, dict[str, Any]], tmp_path: Path) -> None:
    server, encoders = triton
    workdir, port = tmp_path / "redis", servers.free_port()
    own = servers.start_redis(workdir, port=port)
    url = own.url
    client = redis.Redis.from_url(url)
    store = open_store(url)
    running = Running(config(url, [EncoderTarget("e1", server.grpc, "enc_e1")]))
    n = 40
    pixels = images(n, seed=9)
    try:
        for i in range(20):
            item_events.publish_item(client, i, f"item {i}", pixels[i])
        wait_for(lambda: "e1" in store.spaces() and store.space_info("e1").items >= 3, 60, "a first batch stored")
        own.kill()  # kill -9 mid-stream; the AOF (fsync always) keeps every acknowledged write
        png = base64.b64encode(item_events.encode_image(pixels[0])).decode()
        status, body = running.http("/items", {"item_id": 0, "title": "item 0", "image": png})
        assert (status, body["error"]) == (503, "redis_unavailable"), "an event it cannot keep is refused, not lost"
        wait_for(lambda: running.http("/readyz")[0] == 503, 10, "not ready while Redis is down")
        own = servers.start_redis(workdir, port=port)
        for i in range(20, n):
            item_events.publish_item(client, i, f"item {i}", pixels[i])
        wait_for(lambda: store.get("e1", np.arange(n))[1].all(), 60, "every item stored after the restart")
        wait_for(lambda: pending(client) == 0, 10, "every event acknowledged")
        assert client.xlen(ITEM_STREAM) == n
        got, _ = store.get("e1", np.arange(n))
        np.testing.assert_allclose(
            got, reference(encoders["enc_e1"], pixels, [f"item {i}" for i in range(n)]), atol=3e-3
        )
        assert running.metric("mmrank_embedder_errors_total", reason="redis_unavailable") > 0
        wait_for(lambda: running.http("/readyz")[0] == 200, 10, "ready again")
    finally:
        running.stop()
        own.stop()


def test_a_store_that_is_down_makes_the_embedder_not_ready_and_loses_nothing(
    triton: tuple[Triton, dict[str, Any]], redis_server: servers.Server, tmp_path: Path
) -> None:
    """The stream's Redis stays up while the store's goes down: batches retry their writes, the
    stream reads keep succeeding, and only the failing store write can tell readiness."""
    server, encoders = triton
    workdir, port = tmp_path / "store", servers.free_port()
    store_redis = servers.start_redis(workdir, port=port)
    stream = redis.Redis.from_url(redis_server.url)
    store = open_store(store_redis.url)
    running = Running(config(redis_server.url, [EncoderTarget("e1", server.grpc, "enc_e1")], store_url=store_redis.url))
    n = 24
    pixels = images(n, seed=11)
    try:
        item_events.publish_item(stream, 0, "item 0", pixels[0])
        wait_for(lambda: "e1" in store.spaces() and store.get("e1", [0])[1].all(), 60, "a first item stored")
        assert running.http("/readyz")[0] == 200
        store_redis.kill()
        for i in range(1, n):
            item_events.publish_item(stream, i, f"item {i}", pixels[i])
        wait_for(lambda: running.http("/readyz")[0] == 503, 15, "not ready while the store is down")
        assert running.http("/readyz")[1]["store"] is False
        store_redis = servers.start_redis(workdir, port=port)
        store = open_store(store_redis.url)
        wait_for(lambda: store.get("e1", np.arange(n))[1].all(), 60, "every item stored once the store is back")
        wait_for(lambda: running.http("/readyz")[0] == 200, 10, "ready again")
        wait_for(lambda: pending(stream) == 0, 10, "every event acknowledged")
        assert running.metric("mmrank_embedder_errors_total", reason="store_write") > 0
    finally:
        running.stop()
        store_redis.stop()


def test_the_cli_reads_its_encoders_from_the_environment_and_drains_on_sigterm(
    triton: tuple[Triton, dict[str, Any]], redis_server: servers.Server, tmp_path: Path
) -> None:
    holder, _ = triton
    http_port = servers.free_port()
    env = {
        **os.environ,
        "MMRANK_ENCODERS": f"e1={holder.grpc}/enc_e1,e2={holder.grpc}/enc_e2",
        "MMRANK_STORE_URL": redis_server.url,
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mmrank",
            "embedder",
            "run",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(http_port),
            "--consumer",
            "cli-pod",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        client = redis.Redis.from_url(redis_server.url)
        item_events.publish_item(client, 7, "green wool scarf", images(1, seed=3)[0])
        store = open_store(redis_server.url)
        wait_for(
            lambda: store.spaces() == ["e1", "e2"] and all(store.get(s, [7])[1].all() for s in ("e1", "e2")),
            60,
            "the item in both spaces",
            interval=0.1,
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=5) as response:
            assert json.loads(response.read())["encoders"] == {"e1": True, "e2": True}
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0].decode()
        assert process.returncode == 0, output[-2000:]
        assert pending(client) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_a_crashed_embedders_500_pending_entries_are_reclaimed_within_seconds(
    triton: tuple[Triton, dict[str, Any]], redis_server: servers.Server
) -> None:
    """XAUTOCLAIM follows its cursor through the pending list at once, instead of claiming one
    batch every `claim_idle / 2` from the start (which took 16 s for these 500 entries)."""
    holder, _ = triton
    client = redis.Redis.from_url(redis_server.url)
    client.xgroup_create(ITEM_STREAM, EMBEDDER_GROUP, id="0", mkstream=True)
    png = item_events.encode_image(images(1, seed=5)[0])
    pipe = client.pipeline()
    for i in range(500):
        pipe.xadd(ITEM_STREAM, item_events.event_fields(i, f"cotton shirt {i}", png))
    pipe.execute()
    client.xreadgroup(EMBEDDER_GROUP, "crashed-pod", {ITEM_STREAM: ">"}, count=500)  # and never acknowledged
    assert pending(client) == 500
    time.sleep(1.0)  # idle for claim_idle
    started = time.monotonic()
    running = Running(
        config(redis_server.url, [EncoderTarget("p1", holder.grpc, "picky")], claim_idle=1.0, forget_consumer_after=0.5)
    )
    try:
        store = open_store(redis_server.url)

        def left_to_the_crashed_pod() -> int:
            return next(
                (
                    int(c["pending"])
                    for c in client.xinfo_consumers(ITEM_STREAM, EMBEDDER_GROUP)
                    if c["name"] == b"crashed-pod"
                ),
                0,
            )

        wait_for(lambda: left_to_the_crashed_pod() == 0, 60, "every entry taken over", interval=0.01)
        taken_over = time.monotonic() - started
        wait_for(lambda: pending(client) == 0, 60, "every entry embedded and acknowledged")
        elapsed = time.monotonic() - started
        assert store.get("p1", np.arange(500))[1].all()
        assert taken_over < 4, f"500 entries took {taken_over:.1f} s to take over"
        assert elapsed < 20, f"500 entries took {elapsed:.1f} s to reclaim and embed"
        # (more than 500 only if some waited here longer than claim_idle and were swept again)
        assert running.metric("mmrank_embedder_claimed_total") >= 500
        assert running.metric("mmrank_embedder_items_total", space="p1") == 500
        wait_for(
            lambda: [c["name"] for c in client.xinfo_consumers(ITEM_STREAM, EMBEDDER_GROUP)] == [b"test-pod"],
            10,
            "the crashed consumer removed from the group",
        )
        print(f"500 pending entries taken over in {taken_over:.1f} s, embedded and acknowledged in {elapsed:.1f} s")
    finally:
        running.stop()


def test_an_entry_that_kills_every_embedder_taking_it_ends_in_dead_letters_after_n_deliveries(
    triton: tuple[Triton, dict[str, Any]], redis_server: servers.Server, tmp_path: Path
) -> None:
    """`mmrank embedder run` processes are killed (-9) while they embed one entry, as a crash in
    a decoder or an OOM kill would end them: twice as the same pod (its own pending entries come
    back on restart), then as a new pod (XAUTOCLAIM takes them over). The next one dead-letters
    the entry (delivered 4 times, limit 3) and stores its batch-mates, delivered alone."""
    holder, _ = triton
    client = redis.Redis.from_url(redis_server.url)
    client.xgroup_create(ITEM_STREAM, EMBEDDER_GROUP, id="0", mkstream=True)
    poison = item_events.publish_item(client, 0, "HANG poison lamp", images(1, seed=1)[0]).encode()
    for i in (1, 2):
        item_events.publish_item(client, i, f"desk lamp {i}", images(1, seed=1 + i)[0])

    def start(consumer: str) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable,
            "-m",
            "mmrank",
            "embedder",
            "run",
            "--encoder",
            f"p1={holder.grpc}/picky",
            "--store",
            redis_server.url,
            "--http-host",
            "127.0.0.1",
            "--http-port",
            "0",
            "--consumer",
            consumer,
            "--claim-idle",
            "0.5",
            "--max-deliveries",
            "3",
            "--forget-consumer-after",
            "0.5",
        ]
        return subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def deliveries() -> int:
        rows = client.xpending_range(ITEM_STREAM, EMBEDDER_GROUP, poison, poison, 1)
        return int(rows[0]["times_delivered"]) if rows else 0

    for attempt, consumer in enumerate(("pod-a", "pod-a", "pod-b"), start=1):
        process = start(consumer)
        try:
            wait_for(lambda: deliveries() == attempt, 60, f"delivery {attempt} of the poison entry", interval=0.02)
            assert process.poll() is None
        finally:
            process.kill()
            process.wait(10)
    store = open_store(redis_server.url)
    assert not store.get("p1", [0, 1, 2])[1].any(), "nothing stored while the poison entry crashed every batch"
    last = start("pod-c")
    try:
        wait_for(lambda: pending(client) == 0, 60, "every entry acknowledged")
        ((_, dead),) = client.xrange(DEAD_LETTER_STREAM)
        assert (dead[b"item_id"], dead[b"reason"], dead[b"source_id"]) == (b"0", b"too_many_deliveries", poison)
        assert b"delivered 4 times" in dead[b"detail"]
        assert store.get("p1", [0, 1, 2])[1].tolist() == [False, True, True]
        wait_for(
            lambda: [c["name"] for c in client.xinfo_consumers(ITEM_STREAM, EMBEDDER_GROUP)] == [b"pod-c"],
            10,
            "the killed pods' consumers removed",
        )
    finally:
        last.kill()
        last.wait(10)


def test_an_old_event_replayed_after_a_new_one_leaves_the_new_vector(
    triton: tuple[Triton, dict[str, Any]], redis_server: servers.Server
) -> None:
    holder, encoders = triton
    client = redis.Redis.from_url(redis_server.url)
    running = Running(config(redis_server.url, [EncoderTarget("e1", holder.grpc, "enc_e1")]))
    pixels = images(3, seed=11)
    now = time.time()
    try:
        store = open_store(redis_server.url)
        item_events.publish_item(client, 5, "linen dress", pixels[0], event_time=now)
        wait_for(lambda: "e1" in store.spaces() and store.get("e1", [5])[1].all(), 60, "the new event stored")
        item_events.publish_item(client, 5, "old linen dress", pixels[1], event_time=now - 3600)
        wait_for(
            lambda: pending(client) == 0 and running.metric("mmrank_embedder_stale_events_total", space="e1") == 1,
            30,
            "the replayed event acknowledged, not written",
        )
        expected = reference(encoders["enc_e1"], pixels[:1], ["linen dress"])
        np.testing.assert_allclose(store.get("e1", [5])[0], expected, atol=3e-3)
        assert store.event_times("e1", [5]).tolist() == [now]
        item_events.publish_item(client, 5, "linen dress, new photo", pixels[2], event_time=now + 1)
        wait_for(lambda: store.event_times("e1", [5]).tolist() == [now + 1], 30, "a newer event written")
        np.testing.assert_allclose(
            store.get("e1", [5])[0], reference(encoders["enc_e1"], pixels[2:], ["linen dress, new photo"]), atol=3e-3
        )
        assert running.metric("mmrank_embedding_freshness_seconds_count", space="e1") == 2, (
            "stale rows are not observed"
        )
    finally:
        running.stop()


def test_acknowledged_events_are_trimmed_and_the_dead_letters_capped(
    triton: tuple[Triton, dict[str, Any]], redis_server: servers.Server
) -> None:
    """A second group ("audit") that has not read yet holds the stream: trimming keeps what any
    group still needs, and producers are refused once the stream holds its limit."""
    holder, _ = triton
    client = redis.Redis.from_url(redis_server.url)
    client.xgroup_create(ITEM_STREAM, "audit", id="0", mkstream=True)
    running = Running(
        config(
            redis_server.url,
            [EncoderTarget("p1", holder.grpc, "picky")],
            trim_interval=0.2,
            stream_max_len=30,
            dead_letter_max_len=5,
        )
    )
    try:
        for i in range(20):
            item_events.publish_item(client, i, f"wool hat {i}", images(1, seed=i)[0], max_len=30)
        for i in range(20, 30):
            client.xadd(ITEM_STREAM, {"item_id": str(i), "title": " ", "image": b"x"})  # empty title
        store = open_store(redis_server.url)
        wait_for(
            lambda: pending(client) == 0 and "p1" in store.spaces() and store.get("p1", range(20))[1].all(),
            60,
            "every event embedded or dead-lettered",
        )
        wait_for(lambda: client.xlen(DEAD_LETTER_STREAM) == 5, 10, "the dead letters capped at 5")
        assert [int(f[b"item_id"]) for _, f in client.xrange(DEAD_LETTER_STREAM)] == [25, 26, 27, 28, 29]
        time.sleep(0.5)
        assert client.xlen(ITEM_STREAM) == 30, "the audit group has read nothing: all kept"
        status, body = running.http("/items", {"item_id": 99, "title": "t", "image_path": "/x.png"})
        assert (status, body["error"]) == (400, "unreadable_image_path"), "validated first"
        png = base64.b64encode(item_events.encode_image(images(1)[0])).decode()
        status, body = running.http("/items", {"item_id": 99, "title": "t", "image": png})
        assert (status, body["error"]) == (503, "stream_full")
        with pytest.raises(item_events.StreamFull):
            item_events.publish_item(client, 99, "t", images(1)[0], max_len=30)

        audit = client.xreadgroup("audit", "auditor", {ITEM_STREAM: ">"}, count=30)[0][1]
        client.xack(ITEM_STREAM, "audit", *[entry_id for entry_id, _ in audit[:15]])
        wait_for(lambda: client.xlen(ITEM_STREAM) == 15, 10, "trimmed to the audit group's oldest pending entry")
        assert client.xrange(ITEM_STREAM, count=1)[0][0] == audit[15][0]
        client.xgroup_destroy(ITEM_STREAM, "audit")
        wait_for(lambda: client.xlen(ITEM_STREAM) == 0, 10, "every acknowledged event trimmed")
        wait_for(lambda: running.metric("mmrank_embedder_stream_entries") == 0, 5, "the stream length reported")
        assert running.http("/items", {"item_id": 99, "title": "t", "image": png})[0] == 202
    finally:
        running.stop()


def test_triton_killed_mid_stream_and_restarted_loses_nothing(
    triton: tuple[Triton, dict[str, Any]], redis_server: servers.Server
) -> None:
    """Last in the module: it kills the module's Triton and starts it again on the same ports."""
    holder, encoders = triton
    client = redis.Redis.from_url(redis_server.url)
    store = open_store(redis_server.url)
    running = Running(config(redis_server.url, [EncoderTarget("e1", holder.grpc, "enc_e1")]))
    n = 40
    pixels = images(n, seed=7)
    try:
        for i in range(15):
            item_events.publish_item(client, i, f"item {i}", pixels[i])
        wait_for(lambda: "e1" in store.spaces() and store.space_info("e1").items >= 5, 60, "a first batch stored")
        holder.server.kill()
        for i in range(15, 30):
            item_events.publish_item(client, i, f"item {i}", pixels[i])
        wait_for(lambda: running.http("/readyz")[0] == 503, 15, "not ready while Triton is down")
        time.sleep(1.0)
        assert store.space_info("e1").items < 30
        holder.server.stop()
        holder.start("enc_e1")
        for i in range(30, n):
            item_events.publish_item(client, i, f"item {i}", pixels[i])
        wait_for(lambda: store.get("e1", np.arange(n))[1].all(), 60, "every item stored after the restart")
        wait_for(lambda: pending(client) == 0, 10, "every event acknowledged")
        got, _ = store.get("e1", np.arange(n))
        np.testing.assert_allclose(
            got, reference(encoders["enc_e1"], pixels, [f"item {i}" for i in range(n)]), atol=3e-3
        )
        assert running.metric("mmrank_embedder_errors_total", reason="triton_unavailable") > 0
        assert running.metric("mmrank_embedder_items_total", space="e1") >= n
        wait_for(lambda: running.http("/readyz")[0] == 200, 10, "ready again")
    finally:
        running.stop()
