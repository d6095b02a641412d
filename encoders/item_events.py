"""Item events: the Redis Stream of new or changed items the embedder reads, and their validation.

An event is a stream entry on the ranker's item stream, `mmrank:{<namespace>/<name>}:items`
(`mmrank.store.Scope.item_stream`; `ITEM_STREAM` is the local default scope's), with fields
`item_id`, `title`, `image` (PNG or JPEG bytes) or `image_path` (a local path or `file://` URL),
and `event_time` (unix seconds, when the item was created or changed: freshness counts from it).
The embedder reads through the ranker's consumer group (`Scope.consumer_group()`); an event that
fails validation goes to the ranker's dead letters (`Scope.dead_letter_stream`) with its fields
and a `reason`. The same validation answers the embedder's
HTTP endpoint, so a bad event is refused there with the same reason. Torch-free.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mmrank.store import DEAD_LETTER_STREAM, EMBEDDER_GROUP, ITEM_STREAM

IMAGE_SIZE = 64
MAX_TITLE_BYTES = 1024
MAX_IMAGE_BYTES = 4 << 20
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_EVENT_BYTES = MAX_IMAGE_BYTES + (64 << 10)
MAX_DEAD_LETTER_FIELD_BYTES = 64 << 10  # a dead letter keeps the fields to diagnose it, not 4 MB images

__all__ = [
    "DEAD_LETTER_STREAM",
    "EMBEDDER_GROUP",
    "ITEM_STREAM",
    "BadEvent",
    "ItemEvent",
    "StreamFull",
    "event_fields",
    "parse_event",
    "publish_item",
]


class BadEvent(ValueError):
    """An event no retry can fix; `reason` is a short label (metrics label, dead-letter field)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class StreamFull(RuntimeError):
    """The stream holds its limit of entries (a backlog the embedders have not drained): the
    event was not added; try again later. Nothing already in the stream is dropped for it."""

    def __init__(self, stream: str, max_len: int) -> None:
        super().__init__(f"stream {stream} holds {max_len} entries or more (its limit); retry later")
        self.stream = stream
        self.max_len = max_len


RGBImage = npt.NDArray[np.uint8]  # RGB [height, width, 3]


@dataclasses.dataclass(frozen=True)
class ItemEvent:
    item_id: int
    title: str
    image: RGBImage  # [64, 64, 3]
    event_time: float
    message_id: str = ""


def _text(fields: Mapping[Any, Any], name: str) -> Any:
    value = fields.get(name, fields.get(name.encode()))
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _raw(fields: Mapping[Any, Any], name: str) -> bytes | None:
    value = fields.get(name, fields.get(name.encode()))
    return value.encode() if isinstance(value, str) else value


def decode_image(data: bytes) -> RGBImage:
    """PNG/JPEG bytes -> RGB uint8 [64, 64, 3]; other sizes are resized (the encoder's input)."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        with PILImage.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > MAX_IMAGE_PIXELS:  # checked before decoding a single pixel
                raise BadEvent(
                    "oversized", f"image is {opened.width}x{opened.height} (limit {MAX_IMAGE_PIXELS} pixels)"
                )
            image = opened.convert("RGB")
            if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                image = image.resize((IMAGE_SIZE, IMAGE_SIZE), PILImage.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8).copy()
    except BadEvent:
        raise
    except (UnidentifiedImageError, OSError, ValueError, PILImage.DecompressionBombError) as exc:
        raise BadEvent("undecodable_image", str(exc)[:200]) from exc


def encode_image(image: npt.ArrayLike) -> bytes:
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def read_image_path(path_or_url: str) -> bytes:
    parsed = urllib.parse.urlparse(path_or_url)
    if parsed.scheme not in ("", "file"):
        raise BadEvent("unsupported_image_url", f"only local paths and file:// URLs are read, got {path_or_url!r}")
    path = Path(urllib.parse.unquote(parsed.path) if parsed.scheme else path_or_url)
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise BadEvent("oversized", f"image file {path} has {size} bytes (limit {MAX_IMAGE_BYTES})")
        if not path.is_file():
            raise BadEvent("unreadable_image_path", f"{path} is not a regular file")
        return path.read_bytes()
    except BadEvent:
        raise
    except OSError as exc:
        raise BadEvent("unreadable_image_path", f"{path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a NUL byte in the path
        raise BadEvent("unreadable_image_path", f"{path_or_url!r}: {exc}") from exc


def event_size(fields: Mapping[Any, Any]) -> int:
    return sum(len(v) if isinstance(v, (bytes, str)) else 16 for v in fields.values())


def parse_event(fields: Mapping[Any, Any], message_id: str = "", now: float | None = None) -> ItemEvent:
    """Validate a stream entry's (or HTTP body's) fields; raise BadEvent with the reason."""
    if event_size(fields) > MAX_EVENT_BYTES:
        raise BadEvent("oversized", f"event has {event_size(fields)} bytes (limit {MAX_EVENT_BYTES})")
    raw_id = _text(fields, "item_id")
    try:
        item_id = int(raw_id)
    except (TypeError, ValueError):
        raise BadEvent("bad_item_id", f"item_id must be an integer, got {raw_id!r}") from None
    if item_id < 0:
        raise BadEvent("bad_item_id", f"item_id must be >= 0, got {item_id}")
    title = (_text(fields, "title") or "").strip()
    if not title:
        raise BadEvent("empty_title", "title is missing or blank")
    if len(title.encode()) > MAX_TITLE_BYTES:
        raise BadEvent("oversized", f"title has {len(title.encode())} bytes (limit {MAX_TITLE_BYTES})")
    raw_time = _text(fields, "event_time")
    try:
        event_time = float(raw_time) if raw_time not in (None, "") else (now or time.time())
    except (TypeError, ValueError):
        raise BadEvent("bad_event_time", f"event_time must be unix seconds, got {raw_time!r}") from None
    if not math.isfinite(event_time):
        raise BadEvent("bad_event_time", f"event_time must be finite, got {raw_time!r}")
    image_bytes = _raw(fields, "image")
    path = _text(fields, "image_path")
    if not image_bytes and not path:
        raise BadEvent("missing_image", "an event needs `image` bytes or an `image_path`")
    if not image_bytes:
        image_bytes = read_image_path(path)
    if len(image_bytes) > MAX_IMAGE_BYTES:
        raise BadEvent("oversized", f"image has {len(image_bytes)} bytes (limit {MAX_IMAGE_BYTES})")
    return ItemEvent(item_id, title, decode_image(image_bytes), event_time, message_id)


def event_fields(
    item_id: int,
    title: str,
    image: RGBImage | bytes | None = None,
    image_path: str | None = None,
    event_time: float | None = None,
) -> dict[str, Any]:
    """The stream fields of one event (an array image is sent as PNG)."""
    fields: dict[str, Any] = {
        "item_id": str(int(item_id)),
        "title": title,
        "event_time": repr(float(event_time if event_time is not None else time.time())),
    }
    if image is not None:
        fields["image"] = image if isinstance(image, bytes) else encode_image(image)
    if image_path is not None:
        fields["image_path"] = image_path
    return fields


def publish_item(
    client: Any,
    item_id: int,
    title: str,
    image: RGBImage | bytes | None = None,
    image_path: str | None = None,
    event_time: float | None = None,
    stream: str = ITEM_STREAM,
    max_len: int | None = None,
) -> str:
    """XADD one event with a synchronous redis client; returns the entry id. With `max_len`,
    raises StreamFull instead when the stream already holds that many entries."""
    if max_len is not None and client.xlen(stream) >= max_len:
        raise StreamFull(stream, max_len)
    entry = client.xadd(stream, event_fields(item_id, title, image, image_path, event_time))
    return entry.decode() if isinstance(entry, bytes) else str(entry)


def dead_letter_fields(fields: Mapping[Any, Any], reason: str, detail: str, message_id: str) -> dict[Any, Any]:
    """The original fields (those over 64 KiB dropped, their names in `dropped`) plus why and
    where the event came from."""
    kept = {k: v for k, v in fields.items() if event_size({k: v}) <= MAX_DEAD_LETTER_FIELD_BYTES}
    dropped = [k.decode() if isinstance(k, bytes) else str(k) for k in fields if k not in kept]
    kept.update({"reason": reason, "detail": detail[:500], "source_id": message_id, "dead_time": repr(time.time())})
    if dropped:
        kept["dropped"] = ",".join(dropped)
    return kept
