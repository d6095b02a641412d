"""The item encoder's Triton client: how the embedder and the backfill call an encoder version.

An encoder version is a Triton model (`EncoderTarget`: the space it fills, the server's gRPC
address, the model name) with the tensor contract of docs/architecture.md ("Encoder in
Triton"): `IMAGE` UINT8 `[n, 64, 64, 3]`, `TITLE` BYTES `[n, 1]` in, `EMBEDDING` FP32 `[n, dim]`
out. `TritonEncoder` is its async gRPC client; it splits a batch to the model's max_batch_size
and checks that every item got a finite vector. `is_rejection` tells an encoder that refuses
these inputs (no retry helps: the embedder isolates the item) from one that is unreachable (an
outage: retry).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from mmrank.defaults import ENCODER_MODEL_NAME

# gRPC statuses with which Triton refuses the request itself; anything else (UNAVAILABLE,
# DEADLINE_EXCEEDED, NOT_FOUND while a restarted server loads its models...) is an outage.
REJECTING_STATUSES = ("StatusCode.INTERNAL", "StatusCode.INVALID_ARGUMENT")


@dataclasses.dataclass(frozen=True)
class EncoderTarget:
    """One live encoder version: the space it fills and the Triton model that computes it."""

    space: str
    url: str
    model: str = ENCODER_MODEL_NAME


def parse_encoder(spec: str) -> EncoderTarget:
    """`SPACE=HOST:PORT[/MODEL]` -> EncoderTarget."""
    space, sep, rest = spec.strip().partition("=")
    if not sep or not space or not rest:
        raise ValueError(f"encoder {spec!r} must look like SPACE=HOST:PORT[/MODEL]")
    url, _, model = rest.partition("/")
    return EncoderTarget(space.strip(), url.strip(), model.strip() or ENCODER_MODEL_NAME)


def parse_encoders(specs: Sequence[str]) -> list[EncoderTarget]:
    """Flags and comma-separated lists alike; one space may appear only once."""
    targets = [parse_encoder(s) for spec in specs for s in spec.split(",") if s.strip()]
    spaces = [t.space for t in targets]
    if len(set(spaces)) != len(spaces):
        raise ValueError(f"each space may have one encoder, got {spaces}")
    return targets


class EncoderOutputError(RuntimeError):
    """The encoder answered, but with something that is not one unit vector per item."""


def check_embeddings(vectors: npt.NDArray[Any], n: int, space: str) -> npt.NDArray[np.float32]:
    if vectors is None or vectors.ndim != 2 or vectors.shape[0] != n:
        raise EncoderOutputError(f"encoder for {space} returned shape {getattr(vectors, 'shape', None)} for {n} items")
    if not np.isfinite(vectors).all():
        raise EncoderOutputError(f"encoder for {space} returned NaN or infinity")
    return vectors.astype(np.float32, copy=False)


def is_rejection(exc: BaseException) -> bool:
    """Did the encoder refuse these inputs (as opposed to being unreachable)?"""
    status_of = getattr(exc, "status", None)  # tritonclient's InferenceServerException.status()
    status = status_of() if callable(status_of) else None
    return isinstance(exc, EncoderOutputError) or status in REJECTING_STATUSES


class TritonEncoder:
    """Async gRPC client of one encoder model; splits batches to the model's max_batch_size."""

    def __init__(self, target: EncoderTarget, timeout: float = 30.0) -> None:
        import tritonclient.grpc.aio as grpcclient

        self.target = target
        self.timeout = timeout
        self.client = grpcclient.InferenceServerClient(target.url)
        self.max_batch = 0
        self.dim = 0

    async def describe(self) -> tuple[int, int]:
        """(max_batch_size, embedding dim) from the model's config."""
        config = (await self.client.get_model_config(self.target.model, as_json=True))["config"]
        dims = [int(d) for o in config["output"] if o["name"] == "EMBEDDING" for d in o["dims"]]
        self.max_batch = int(config.get("max_batch_size", 0)) or 64
        self.dim = dims[-1]
        return self.max_batch, self.dim

    async def ready(self) -> bool:
        return bool(await self.client.is_model_ready(self.target.model))

    async def embed(self, images: npt.NDArray[np.uint8], titles: Sequence[str]) -> npt.NDArray[np.float32]:
        if not self.max_batch:
            await self.describe()
        parts = [
            await self._infer(images[i : i + self.max_batch], titles[i : i + self.max_batch])
            for i in range(0, len(titles), self.max_batch)
        ]
        return check_embeddings(np.concatenate(parts), len(titles), self.target.space)

    async def _infer(self, images: npt.NDArray[np.uint8], titles: Sequence[str]) -> npt.NDArray[Any]:
        import tritonclient.grpc.aio as grpcclient

        image = grpcclient.InferInput("IMAGE", list(images.shape), "UINT8")
        image.set_data_from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
        title = grpcclient.InferInput("TITLE", [len(titles), 1], "BYTES")
        title.set_data_from_numpy(np.array([[t.encode()] for t in titles], dtype=object))
        result = await self.client.infer(
            self.target.model,
            [image, title],
            outputs=[grpcclient.InferRequestedOutput("EMBEDDING")],
            client_timeout=self.timeout,
        )
        embeddings: npt.NDArray[Any] = result.as_numpy("EMBEDDING")  # the dtype the model's config names
        return embeddings

    async def close(self) -> None:
        await self.client.close()
