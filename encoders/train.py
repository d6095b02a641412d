"""Pre-train the item encoder on a shop: SCL (query ↔ bought item) or CLIP (image ↔ title).

Both objectives share this loop, the batch size, the schedule and the step count, so the
comparison in docs/results.md changes one thing only. Every `checkpoint_every` steps the loop
writes `OUT/train_state.pt` (weights, optimizer, momentum encoder and queue, loss history) and the
consumer-facing checkpoint (`encoder.pt`, `config.json`, `tokenizer.json`), each by an atomic
rename; a rerun with the same OUT continues from the saved step. Batches are drawn from a
generator seeded by (seed, step), so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmrank.encoders.model import EncoderConfig, ItemEncoder, save_encoder
from mmrank.encoders.scl import MomentumQueue, clip_loss, momentum_copy, momentum_update, scl_loss
from mmrank.encoders.tokenizer import WordTokenizer, load_tokenizer

OBJECTIVES = ("scl", "clip")
STATE_FILE = "train_state.pt"


@dataclasses.dataclass
class TrainConfig:
    objective: str = "scl"
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 30
    temperature: float = 0.07
    queue_size: int = 1024
    momentum: float = 0.99
    triplet_weight: float = 0.5
    margin: float = 0.2
    hard_negatives: int = 2
    checkpoint_every: int = 100
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")


@dataclasses.dataclass
class TrainingData:
    """The shop as arrays, tokenized once. Search rows are the `train` split only."""

    images: np.ndarray  # uint8 [n_items, H, W, 3]
    title_ids: np.ndarray  # int64 [n_items, L]
    pretrain_items: np.ndarray  # int64 [P]
    query_ids: np.ndarray  # int64 [S, L]
    query_image: np.ndarray  # int64 [S], -1: text-only query
    bought: np.ndarray  # int64 [S]
    clicked: np.ndarray  # int64 [S, H], -1 padded


def pad_lists(lists: list[Any], width: int, fill: int = -1) -> np.ndarray:
    out = np.full((len(lists), width), fill, dtype=np.int64)
    for row, values in enumerate(lists):
        values = list(values)[:width]
        out[row, : len(values)] = values
    return out


def build_tokenizer(shop: Any, vocab_size: int = 4096, max_length: int = 32) -> WordTokenizer:
    """Vocabulary from the pre-training items' titles and the training queries (never held-out text)."""
    pretrain = np.asarray(shop.splits["pretrain_items"], dtype=np.int64)
    titles = shop.items.set_index("item_id").loc[pretrain, "title"].tolist()
    queries = shop.searches.loc[shop.searches["split"] == "train", "query_text"].tolist()
    return WordTokenizer.build([*titles, *queries], vocab_size, max_length)


def prepare_data(shop: Any, tokenizer: Any, hard_negatives: int) -> TrainingData:
    items = shop.items.sort_values("item_id")
    searches = shop.searches[shop.searches["split"] == "train"]
    return TrainingData(
        images=shop.images,
        title_ids=tokenizer.encode(items["title"].tolist()),
        pretrain_items=np.asarray(shop.splits["pretrain_items"], dtype=np.int64),
        query_ids=tokenizer.encode(searches["query_text"].tolist()),
        query_image=searches["query_image_item"].to_numpy(np.int64),
        bought=searches["bought_item"].to_numpy(np.int64),
        clicked=pad_lists(searches["clicked_items"].tolist(), hard_negatives),
    )


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_rows(step: int, n_rows: int, config: TrainConfig) -> np.ndarray:
    """The rows of step `step`: a function of (seed, step) only, so resuming repeats them."""
    rng = np.random.default_rng([config.seed, step])
    return rng.choice(n_rows, size=min(config.batch_size, n_rows), replace=False)


def _items(encoder: ItemEncoder, data: TrainingData, item_ids: np.ndarray) -> torch.Tensor:
    return encoder(torch.from_numpy(data.images[item_ids]), torch.from_numpy(data.title_ids[item_ids]))


def _queries(encoder: ItemEncoder, data: TrainingData, rows: np.ndarray) -> torch.Tensor:
    """Text queries → text vectors; queries with an image → the fused vector of (image, query text)."""
    text = encoder.encode_text(torch.from_numpy(data.query_ids[rows]))
    with_image = np.flatnonzero(data.query_image[rows] >= 0)
    if len(with_image) == 0:
        return text
    image = encoder.encode_image(torch.from_numpy(data.images[data.query_image[rows][with_image]]))
    fused = encoder.fuse(image, text[with_image])
    index = torch.from_numpy(with_image)
    return text.index_copy(0, index, fused)


def scl_step(
    encoder: ItemEncoder,
    twin: ItemEncoder,
    queue: MomentumQueue,
    data: TrainingData,
    rows: np.ndarray,
    config: TrainConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    queries = _queries(encoder, data, rows)
    bought = data.bought[rows]
    positives = _items(encoder, data, bought)
    clicked = data.clicked[rows]
    mask = clicked >= 0
    hard = torch.zeros(len(rows), clicked.shape[1], positives.shape[1])
    if mask.any():
        hard[torch.from_numpy(mask)] = _items(encoder, data, clicked[mask])
    queue_vectors, queue_ids = queue.entries()
    bought_t = torch.from_numpy(bought)
    loss, parts = scl_loss(
        queries,
        positives,
        hard,
        torch.from_numpy(mask),
        bought_t,
        queue_vectors,
        queue_ids,
        config.temperature,
        config.triplet_weight,
        config.margin,
    )
    with torch.no_grad():
        queue.push(_items(twin, data, bought), bought_t)
    return loss, parts


def clip_step(
    encoder: ItemEncoder, data: TrainingData, rows: np.ndarray, config: TrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    items = data.pretrain_items[rows]
    image = encoder.encode_image(torch.from_numpy(data.images[items]))
    text = encoder.encode_text(torch.from_numpy(data.title_ids[items]))
    return clip_loss(image, text, config.temperature, torch.from_numpy(items))


def plot_losses(history: list[dict[str, float]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "infonce", "triplet"):
        values = [h[key] for h in history]
        if any(values):
            ax.plot(steps, values, label=key, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def save_checkpoint(
    out: Path,
    step: int,
    encoder: ItemEncoder,
    twin: ItemEncoder | None,
    queue: MomentumQueue | None,
    optimizer: torch.optim.Optimizer,
    history: list[dict[str, float]],
    config: TrainConfig,
    data_dir: str,
) -> None:
    extra = {"train": dataclasses.asdict(config), "step": step, "data": data_dir}
    save_encoder(encoder, out, extra)
    state = {
        "step": step,
        "model": encoder.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": history,
        "twin": twin.state_dict() if twin is not None else None,
        "queue": queue.state_dict() if queue is not None else None,
        "train": dataclasses.asdict(config),
        "encoder": encoder.config.to_dict(),
    }
    _atomic_save(state, out / STATE_FILE)
    if history:
        plot_losses(history, out / "loss.png", f"{config.objective.upper()} pre-training")


def restore_or_build(
    shop: Any, out: Path, config: TrainConfig, encoder_config: EncoderConfig | None
) -> tuple[ItemEncoder, dict[str, Any] | None]:
    """The encoder of the run saved in `out` with its training state, or a new one (state None)."""
    state_path = out / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["train"]["objective"] != config.objective:
            saved = state["train"]["objective"]
            raise ValueError(f"{out} holds a {saved} run; use another --out for {config.objective}")
        return ItemEncoder(EncoderConfig.from_dict(state["encoder"]), load_tokenizer(out), pretrained=False), state
    encoder_config = encoder_config or EncoderConfig()
    tokenizer = None
    if encoder_config.text_tower == "transformer":
        tokenizer = build_tokenizer(shop, encoder_config.vocab_size, encoder_config.token_length)
    return ItemEncoder(encoder_config, tokenizer), None


def train(
    data_dir: str | Path,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    encoder_config: EncoderConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume) into `out_dir`; returns a summary (steps, seconds, final loss)."""
    from tqdm import tqdm

    from mmrank import shop as shop_module

    config = config or TrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    shop = shop_module.load(data_dir)
    encoder, state = restore_or_build(shop, out, config, encoder_config)
    data = prepare_data(shop, encoder.tokenizer, config.hard_negatives)
    encoder.train()
    optimizer = torch.optim.AdamW(
        [p for p in encoder.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    twin = queue = None
    if config.objective == "scl":
        twin = momentum_copy(encoder)
        queue = MomentumQueue(config.queue_size, encoder.config.dim)
    start, history = 0, []
    if state is not None:
        encoder.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if twin is not None and state["twin"] is not None:
            twin.load_state_dict(state["twin"])
            queue.load_state_dict(state["queue"])  # type: ignore[union-attr]  # a twin comes with a queue
        start, history = int(state["step"]), list(state["history"])
    n_rows = len(data.bought) if config.objective == "scl" else len(data.pretrain_items)
    began = time.monotonic()
    bar = tqdm(
        total=config.steps,
        initial=start,
        desc=f"{config.objective} pre-training",
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
    )
    for step in range(start, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        rows = batch_rows(step, n_rows, config)
        if config.objective == "scl":
            loss, parts = scl_step(encoder, twin, queue, data, rows, config)  # type: ignore[arg-type]  # scl: twin and queue are set
        else:
            loss, parts = clip_step(encoder, data, rows, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        optimizer.step()
        if twin is not None:
            momentum_update(encoder, twin, config.momentum)
        history.append({"step": step + 1, "loss": float(loss.detach()), **parts})
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            save_checkpoint(out, step + 1, encoder, twin, queue, optimizer, history, config, str(data_dir))
    bar.close()
    if start >= config.steps and not (out / "encoder.pt").exists():
        save_checkpoint(out, start, encoder, twin, queue, optimizer, history, config, str(data_dir))
    return {
        "objective": config.objective,
        "steps": config.steps,
        "resumed_from": start,
        "seconds": round(time.monotonic() - began, 1),
        "final_loss": history[-1]["loss"] if history else None,
    }
