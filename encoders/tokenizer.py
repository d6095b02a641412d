"""Titles and queries to token ids `int64 [B, 32]`.

This file imports only the standard library and numpy (and `tokenizers` lazily, for a Hugging
Face tokenizer): `mmrank encoders export` copies it beside the Triton Python model, which
tokenizes with it without mmrank installed.

Ids of the default `WordTokenizer`: 0 padding, 1 `[CLS]`, then the vocabulary built from the
pre-training text, then hash buckets (crc32 of the word) for every word the vocabulary lacks, so a
new item's new words still get stable ids.
"""

from __future__ import annotations

import json
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

PAD_ID = 0
CLS_ID = 1
FILE_NAME = "tokenizer.json"
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Lower-cased words, a vocabulary and hash buckets for the rest; fixed length with padding."""

    kind = "words"

    def __init__(self, vocab: Sequence[str] = (), vocab_size: int = 4096, max_length: int = 32) -> None:
        if vocab_size < len(vocab) + 3:
            raise ValueError(f"vocab_size {vocab_size} leaves no hash bucket beside {len(vocab)} words")
        self.vocab = list(vocab)
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.pad_id = PAD_ID
        self._ids = {word: 2 + i for i, word in enumerate(self.vocab)}
        self._first_bucket = 2 + len(self.vocab)
        self._buckets = vocab_size - self._first_bucket

    @classmethod
    def build(cls, texts: Iterable[str], vocab_size: int = 4096, max_length: int = 32) -> WordTokenizer:
        """The most frequent words fill at most half the table; the other half are hash buckets."""
        counts = Counter(word for text in texts for word in words(text))
        keep = (vocab_size - 2) // 2
        vocab = sorted(word for word, _ in counts.most_common(keep))
        return cls(vocab, vocab_size, max_length)

    def word_id(self, word: str) -> int:
        known = self._ids.get(word)
        if known is not None:
            return known
        return self._first_bucket + zlib.crc32(word.encode("utf-8")) % self._buckets

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.int64]:
        ids = np.full((len(texts), self.max_length), PAD_ID, dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [CLS_ID] + [self.word_id(w) for w in words(text)]
            tokens = tokens[: self.max_length]
            ids[row, : len(tokens)] = tokens
        return ids

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "max_length": self.max_length, "vocab": self.vocab}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILE_NAME
        tmp = path.with_name(FILE_NAME + ".tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        tmp.replace(path)  # a training run killed mid-checkpoint leaves the previous file whole
        return path


class HFTokenizer:
    """A Hugging Face fast tokenizer (for a Hugging Face text tower such as MiniLM), padded to
    `max_length`. It runs on the `tokenizers` library alone, not `transformers`: Triton's Python
    stub then loads it without importing transformers' HTTP stack."""

    kind = "hf"

    def __init__(self, tokenizer: object, max_length: int = 32, pad_id: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        padding = getattr(tokenizer, "padding", None) or {}
        self.pad_id = int(pad_id if pad_id is not None else padding.get("pad_id", PAD_ID))
        fast: Any = tokenizer
        pad_token = padding.get("pad_token") or fast.id_to_token(self.pad_id) or "[PAD]"
        fast.enable_truncation(max_length)
        fast.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=pad_token)
        self.vocab_size = int(fast.get_vocab_size())

    @classmethod
    def from_pretrained(cls, path: str | Path, max_length: int = 32) -> HFTokenizer:
        """From a model directory with a fast `tokenizer.json`, or through transformers otherwise."""
        import tokenizers

        file = Path(path) / FILE_NAME
        if file.exists():
            return cls(tokenizers.Tokenizer.from_file(str(file)), max_length)
        from transformers import AutoTokenizer

        slow_or_fast = AutoTokenizer.from_pretrained(str(path), use_fast=True)
        return cls(slow_or_fast.backend_tokenizer, max_length, slow_or_fast.pad_token_id)

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.int64]:
        encodings = self.tokenizer.encode_batch(list(texts))  # type: ignore[attr-defined]  # a `tokenizers.Tokenizer` typed loosely
        return np.asarray([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), self.max_length)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILE_NAME
        self.tokenizer.save(str(path))  # type: ignore[attr-defined]  # a `tokenizers.Tokenizer` typed loosely
        marker = Path(directory) / "mmrank_tokenizer.json"
        marker.write_text(json.dumps({"kind": self.kind, "max_length": self.max_length, "pad_id": self.pad_id}))
        return path


Tokenizer = WordTokenizer | HFTokenizer


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved in `directory` (ours in tokenizer.json, or a Hugging Face one)."""
    directory = Path(directory)
    hf_marker = directory / "mmrank_tokenizer.json"
    if hf_marker.exists():
        import tokenizers

        meta = json.loads(hf_marker.read_text())
        return HFTokenizer(
            tokenizers.Tokenizer.from_file(str(directory / FILE_NAME)), int(meta["max_length"]), int(meta["pad_id"])
        )
    data = json.loads((directory / FILE_NAME).read_text())
    if data.get("kind") != WordTokenizer.kind:
        raise ValueError(f"{directory / FILE_NAME}: unknown tokenizer kind {data.get('kind')!r}")
    return WordTokenizer(data["vocab"], int(data["vocab_size"]), int(data["max_length"]))
