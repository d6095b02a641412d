"""Export the item encoder as a Triton model repository.

    <repo>/<model_name>/config.pbtxt          (mmrank.encoders.triton_config.config_pbtxt)
    <repo>/<model_name>/<version>/model.py    python backend: tokenizes TITLE, runs model.pt
                                 /model.pt    TorchScript: forward(IMAGE uint8, TOKEN_IDS int64) -> EMBEDDING
                                 /model.onnx  onnxruntime backend (instead of model.py + model.pt)
                                 /tokenizer.py, tokenizer.json   the tokenizer (python backend runs it;
                                                                  the others ship it for the caller)
                                 /encoder.json                    EncoderConfig, backend, source checkpoint

The python backend is the caller-friendly one (raw pixels and the title as text); the
onnxruntime and libtorch (`pytorch`) backends take token ids from `tokenizer.json`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmrank.defaults import ENCODER_MODEL_NAME
from mmrank.encoders import tokenizer as tokenizer_module
from mmrank.encoders.model import ItemEncoder, load_encoder
from mmrank.encoders.triton_config import MODEL_FILES, config_pbtxt


class ExportedEncoder(nn.Module):
    """The encoder with the Triton tensor names as forward()'s arguments (libtorch binds by name)."""

    def __init__(self, encoder: ItemEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, IMAGE: torch.Tensor, TOKEN_IDS: torch.Tensor) -> torch.Tensor:  # noqa: N803
        return self.encoder(IMAGE, TOKEN_IDS)


def example_inputs(encoder: ItemEncoder, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    size = encoder.config.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=generator)
    ids = torch.from_numpy(encoder.tokenizer.encode(["example item title"] * batch))
    return images, ids


def to_torchscript(encoder: ItemEncoder) -> torch.jit.ScriptModule:
    """Trace on CPU; the graph has no data-dependent control flow, so any batch size runs."""
    wrapper = ExportedEncoder(encoder.cpu()).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes other than the batch are fixed
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is what Triton's backends load
        return torch.jit.trace(wrapper, example_inputs(encoder), check_trace=False)


def to_onnx(encoder: ItemEncoder, path: Path, opset: int = 17) -> Path:
    wrapper = ExportedEncoder(encoder.cpu()).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer notes
        torch.onnx.export(
            wrapper,
            example_inputs(encoder),
            str(path),
            input_names=["IMAGE", "TOKEN_IDS"],
            output_names=["EMBEDDING"],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={"IMAGE": {0: "batch"}, "TOKEN_IDS": {0: "batch"}, "EMBEDDING": {0: "batch"}},
        )
    return path


def _as_encoder(encoder_or_checkpoint_dir: ItemEncoder | str | Path) -> tuple[ItemEncoder, str]:
    if isinstance(encoder_or_checkpoint_dir, ItemEncoder):
        return encoder_or_checkpoint_dir, ""
    return load_encoder(encoder_or_checkpoint_dir), str(Path(encoder_or_checkpoint_dir).resolve())


def export_repository(
    encoder_or_checkpoint_dir: ItemEncoder | str | Path,
    repo_dir: str | Path,
    version: str = "1",
    backend: str = "python",
    max_batch_size: int = 64,
    max_queue_delay_us: int = 2000,
    instance_kind: str = "KIND_CPU",
    instance_count: int = 1,
    model_name: str = ENCODER_MODEL_NAME,
    dynamic_batching: bool = True,
) -> Path:
    """Write (or add a version to) `<repo_dir>/<model_name>`; returns that model directory."""
    encoder, source = _as_encoder(encoder_or_checkpoint_dir)
    encoder = encoder.cpu().eval()
    config = encoder.config
    text = config_pbtxt(
        model_name,
        backend,
        max_batch_size,
        max_queue_delay_us,
        instance_kind,
        instance_count,
        config.dim,
        dynamic_batching,
        config.image_size,
        config.token_length,
    )
    model_dir = Path(repo_dir) / model_name
    version_dir = model_dir / str(version)
    if version_dir.exists():
        shutil.rmtree(version_dir)
    version_dir.mkdir(parents=True)
    if backend == "onnxruntime":
        to_onnx(encoder, version_dir / MODEL_FILES[backend])
    else:
        to_torchscript(encoder).save(str(version_dir / "model.pt"))
    if backend == "python":
        (version_dir / "model.py").write_text(MODEL_PY)
    shutil.copyfile(tokenizer_module.__file__, version_dir / "tokenizer.py")
    encoder.tokenizer.save(version_dir)
    meta = {
        "model_name": model_name,
        "version": str(version),
        "backend": backend,
        "checkpoint": source,
        "encoder": config.to_dict(),
        "inputs": _input_doc(backend, config.image_size, config.token_length),
    }
    (version_dir / "encoder.json").write_text(json.dumps(meta, indent=2) + "\n")
    (model_dir / "config.pbtxt").write_text(text)
    return model_dir


def _input_doc(backend: str, image_size: int, token_length: int) -> dict[str, str]:
    image = f"UINT8 [-1, {image_size}, {image_size}, 3] RGB pixels"
    if backend == "python":
        return {"IMAGE": image, "TITLE": "BYTES [-1, 1] UTF-8 title, not empty"}
    return {"IMAGE": image, "TOKEN_IDS": f"INT64 [-1, {token_length}] from tokenizer.json"}


def load_exported(version_dir: str | Path) -> tuple[object, tokenizer_module.Tokenizer]:
    """(a callable images, token_ids -> embeddings numpy, the tokenizer) for an exported version:
    onnxruntime for model.onnx, torch.jit for model.pt. Used by the parity checks and the bench."""
    version_dir = Path(version_dir)
    tok = tokenizer_module.load_tokenizer(version_dir)
    if (version_dir / "model.onnx").exists():
        import onnxruntime as ort

        session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])

        def run_onnx(images: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
            return session.run(["EMBEDDING"], {"IMAGE": images, "TOKEN_IDS": token_ids})[0]

        return run_onnx, tok
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is what Triton's backends load
        module = torch.jit.load(str(version_dir / "model.pt"), map_location="cpu").eval()

    def run_torchscript(images: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(images), torch.from_numpy(token_ids)).numpy()

    return run_torchscript, tok


# The Python-backend model, written as <version>/model.py. It must not import mmrank (Triton's
# Python may not have it): it loads tokenizer.py from its own directory.
MODEL_PY = r'''
"""Triton Python-backend model of the mmrank item encoder (copied as `model.py` by `mmrank encoders export`).

Inputs `IMAGE` uint8 [B, 64, 64, 3] (RGB pixels) and `TITLE` bytes [B, 1] (UTF-8 title); output
`EMBEDDING` fp32 [B, dim], L2-normalised. Titles are tokenized here with `tokenizer.py` (copied
beside this file, numpy only), then the TorchScript towers in `model.pt` run on the instance's
device (KIND_GPU instances use their GPU). A request with an empty or non-UTF-8 title gets an
error response; the other requests of the same batch are answered normally.
"""
import importlib.util
import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))


def _tokenizer_module():
    spec = importlib.util.spec_from_file_location("mmrank_item_encoder_tokenizer", os.path.join(HERE, "tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def decode_titles(raw):
    """Titles from a BYTES tensor [B, 1]; raises ValueError naming the first bad row."""
    titles = []
    for row, value in enumerate(np.asarray(raw).reshape(-1)):
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        if not text.strip():
            raise ValueError(f"TITLE of row {row} is empty: every item needs a title")
        titles.append(text)
    return titles


def invalid_argument(message):
    """A TritonError Triton reports as a client error (400), where this Triton knows error codes."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


class TritonPythonModel:
    def initialize(self, args):
        gpu = args.get("model_instance_kind") == "GPU" and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{args.get('model_instance_device_id', 0)}" if gpu else "cpu")
        self.model = torch.jit.load(os.path.join(HERE, "model.pt"), map_location=self.device).eval()
        self.tokenizer = _tokenizer_module().load_tokenizer(HERE)
        self.warm_up(json.loads(args["model_config"]))

    def warm_up(self, model_config):
        """Run the model twice before the first request: TorchScript's profiling executor
        profiles the first call and optimises the graph on the second (about 45 and 15 ms of
        CPU for the small encoder), which the first items would otherwise wait for."""
        dims = next(i["dims"] for i in model_config["input"] if i["name"] == "IMAGE")
        images = np.zeros((2, *[int(d) for d in dims]), dtype=np.uint8)
        token_ids = self.tokenizer.encode(["warm up", "warm up"])
        with torch.inference_mode():
            for _ in range(2):
                self.model(torch.from_numpy(images).to(self.device), torch.from_numpy(token_ids).to(self.device))

    def execute(self, requests):
        images, token_ids, sizes, errors = [], [], [], []
        for request in requests:
            try:
                pixels = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
                titles = decode_titles(pb_utils.get_input_tensor_by_name(request, "TITLE").as_numpy())
                if len(titles) != len(pixels):
                    raise ValueError(f"{len(pixels)} images but {len(titles)} titles")
            except (ValueError, UnicodeDecodeError) as exc:
                errors.append(str(exc))
                sizes.append(0)
                continue
            errors.append(None)
            sizes.append(len(titles))
            images.append(pixels)
            token_ids.append(self.tokenizer.encode(titles))
        vectors = np.zeros((0, 0), dtype=np.float32)
        if images:
            with torch.inference_mode():
                batch_images = torch.from_numpy(np.ascontiguousarray(np.concatenate(images))).to(self.device)
                batch_ids = torch.from_numpy(np.concatenate(token_ids)).to(self.device)
                vectors = self.model(batch_images, batch_ids).float().cpu().numpy()
        responses, start = [], 0
        for size, error in zip(sizes, errors):
            if error is not None:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=invalid_argument(error)))
                continue
            out = pb_utils.Tensor("EMBEDDING", np.ascontiguousarray(vectors[start:start + size]))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            start += size
        return responses
'''.lstrip()
