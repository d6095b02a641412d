"""Render the `config.pbtxt` of the item encoder's Triton model (torch-free: the operator uses it).

The tensor contract is fixed in docs/architecture.md ("Encoder in Triton"):

| backend | inputs | output |
|---|---|---|
| `python` | `IMAGE` UINT8 `[-1, 64, 64, 3]`, `TITLE` BYTES `[-1, 1]` | `EMBEDDING` FP32 `[-1, dim]` |
| `onnxruntime`, `pytorch` | `IMAGE` UINT8 `[-1, 64, 64, 3]`, `TOKEN_IDS` INT64 `[-1, 32]` | `EMBEDDING` FP32 `[-1, dim]` |

Only the Python backend tokenizes (in `model.py`); the other two take token ids and ship the
tokenizer beside the model as `tokenizer.json`. Instance kind and count come from arguments, so
one repository runs on CPU and GPU nodes alike.
"""

from __future__ import annotations

from mmrank.defaults import ENCODER_MODEL_NAME

BACKENDS = ("python", "onnxruntime", "pytorch")
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU", "KIND_AUTO")
IMAGE_SIZE = 64
TOKEN_LENGTH = 32

# Triton's name for each backend in config.pbtxt (libtorch models also name a platform).
_BACKEND_LINES = {
    "python": 'backend: "python"',
    "onnxruntime": 'backend: "onnxruntime"\nplatform: "onnxruntime_onnx"',
    "pytorch": 'backend: "pytorch"\nplatform: "pytorch_libtorch"',
}

# The file each backend loads from `<repo>/<model>/<version>/`.
MODEL_FILES = {"python": "model.py", "onnxruntime": "model.onnx", "pytorch": "model.pt"}


def check_arguments(
    backend: str, max_batch_size: int, max_queue_delay_us: int, instance_kind: str, instance_count: int, dim: int
) -> None:
    """Reject what Triton would reject only at load time, with a message that names the argument."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if instance_kind not in INSTANCE_KINDS:
        raise ValueError(f"instance_kind must be one of {INSTANCE_KINDS}, got {instance_kind!r}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 (the batch dimension is in the contract), got {max_batch_size}")
    if max_queue_delay_us < 0:
        raise ValueError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
    if instance_count < 1:
        raise ValueError(f"instance_count must be >= 1, got {instance_count}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")


def input_specs(
    backend: str, image_size: int = IMAGE_SIZE, token_length: int = TOKEN_LENGTH
) -> list[tuple[str, str, list[int]]]:
    """(name, Triton data type, dims without the batch dimension) of each input."""
    image = ("IMAGE", "TYPE_UINT8", [image_size, image_size, 3])
    if backend == "python":
        return [image, ("TITLE", "TYPE_STRING", [1])]
    return [image, ("TOKEN_IDS", "TYPE_INT64", [token_length])]


def _tensor_block(name: str, data_type: str, dims: list[int]) -> str:
    shape = ", ".join(str(d) for d in dims)
    return f'  {{\n    name: "{name}"\n    data_type: {data_type}\n    dims: [ {shape} ]\n  }}'


def config_pbtxt(
    model_name: str = ENCODER_MODEL_NAME,
    backend: str = "python",
    max_batch_size: int = 64,
    max_queue_delay_us: int = 2000,
    instance_kind: str = "KIND_CPU",
    instance_count: int = 1,
    dim: int = 128,
    dynamic_batching: bool = True,
    image_size: int = IMAGE_SIZE,
    token_length: int = TOKEN_LENGTH,
) -> str:
    """The text of `<repo>/<model_name>/config.pbtxt` for the item encoder."""
    check_arguments(backend, max_batch_size, max_queue_delay_us, instance_kind, instance_count, dim)
    inputs = ",\n".join(_tensor_block(*spec) for spec in input_specs(backend, image_size, token_length))
    output = _tensor_block("EMBEDDING", "TYPE_FP32", [dim])
    parts = [
        f'name: "{model_name}"',
        _BACKEND_LINES[backend],
        f"max_batch_size: {max_batch_size}",
        f"input [\n{inputs}\n]",
        f"output [\n{output}\n]",
        f"instance_group [\n  {{\n    kind: {instance_kind}\n    count: {instance_count}\n  }}\n]",
    ]
    if dynamic_batching:
        parts.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}")
    if backend == "pytorch":
        # Inputs are bound by the names of forward()'s arguments, not INPUT__0 positions.
        parts.append('parameters: {\n  key: "INFERENCE_MODE"\n  value: { string_value: "true" }\n}')
    return "\n".join(parts) + "\n"
