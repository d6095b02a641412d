"""Contrastive objectives: SCL (semantic-aware, from search behaviour) and the CLIP baseline.

SCL (Sheng et al., CIKM 2024, section 3): a search query `q` and the item bought after it are a
positive pair. Negatives are the other items of the batch and a queue of items encoded earlier
by a momentum copy of the encoder (MoCo), so the softmax sees many more negatives than one batch
holds. Items clicked but not bought in the same search are hard negatives, pushed away by a
weighted triplet term:

    L_SCL = InfoNCE(q, k⁺; batch ∪ queue) + λ · mean max(0, m − cos(q, k⁺) + cos(q, k⁻))

CLIP: an item's image and its title are the positive pair, in-batch negatives both ways.

Shapes: unit vectors `[B, D]`; queue `[K, D]`; hard negatives `[B, H, D]` with a mask `[B, H]`.
An item appearing twice (in the batch, or the batch and the queue) is never its own negative.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def info_nce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    temperature: float,
    key_ids: torch.Tensor | None = None,
    queue: torch.Tensor | None = None,
    queue_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of row i of `queries` against key i among all keys (and the queue).

    Keys or queue entries with the same item id as key i (other than i itself) are masked out,
    since they are positives, not negatives.
    """
    batch = queries.shape[0]
    logits = queries @ keys.T / temperature
    if key_ids is not None:
        same = key_ids[:, None] == key_ids[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    if queue is not None and queue.shape[0] > 0:
        queue_logits = queries @ queue.T / temperature
        if key_ids is not None and queue_ids is not None:
            queue_logits = queue_logits.masked_fill(key_ids[:, None] == queue_ids[None, :], float("-inf"))
        logits = torch.cat([logits, queue_logits], dim=1)
    labels = torch.arange(batch, device=queries.device)
    return F.cross_entropy(logits, labels)


def triplet_loss(
    queries: torch.Tensor, positives: torch.Tensor, hard_negatives: torch.Tensor, hard_mask: torch.Tensor, margin: float
) -> torch.Tensor:
    """mean over real hard negatives of max(0, margin − cos(q, k⁺) + cos(q, k⁻)); 0 when none."""
    pos = (queries * positives).sum(dim=-1, keepdim=True)  # [B, 1]
    neg = torch.einsum("bd,bhd->bh", queries, hard_negatives)  # [B, H]
    hinge = F.relu(margin - pos + neg) * hard_mask
    return hinge.sum() / hard_mask.sum().clamp(min=1.0)


def scl_loss(
    queries: torch.Tensor,
    positives: torch.Tensor,
    hard_negatives: torch.Tensor,
    hard_mask: torch.Tensor,
    positive_ids: torch.Tensor | None = None,
    queue: torch.Tensor | None = None,
    queue_ids: torch.Tensor | None = None,
    temperature: float = 0.07,
    triplet_weight: float = 0.5,
    margin: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SCL: query→item InfoNCE over the batch and the queue, item→query over the batch, plus the
    weighted triplet term on clicked-not-bought items. Returns (loss, its parts as floats)."""
    to_items = info_nce(queries, positives, temperature, positive_ids, queue, queue_ids)
    to_queries = info_nce(positives, queries, temperature, positive_ids)
    contrastive = 0.5 * (to_items + to_queries)
    triplet = triplet_loss(queries, positives, hard_negatives, hard_mask.to(queries.dtype), margin)
    loss = contrastive + triplet_weight * triplet
    return loss, {"infonce": float(contrastive.detach()), "triplet": float(triplet.detach())}


def clip_loss(
    image_vectors: torch.Tensor,
    text_vectors: torch.Tensor,
    temperature: float = 0.07,
    item_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Symmetric image↔title InfoNCE with in-batch negatives (the CLIP baseline)."""
    loss = 0.5 * (
        info_nce(image_vectors, text_vectors, temperature, item_ids)
        + info_nce(text_vectors, image_vectors, temperature, item_ids)
    )
    return loss, {"infonce": float(loss.detach()), "triplet": 0.0}


class MomentumQueue(nn.Module):
    """A FIFO of `size` unit vectors with their item ids (buffers, so they checkpoint with the model).

    Slots never written hold id -1 and are left out of `entries()`.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("vectors", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, vectors: torch.Tensor, ids: torch.Tensor) -> None:
        size = self.vectors.shape[0]
        if size == 0:
            return
        vectors, ids = vectors[-size:], ids[-size:]
        slots = (int(self.pointer) + torch.arange(len(ids), device=ids.device)) % size
        self.vectors[slots] = vectors.detach().to(self.vectors.dtype)
        self.ids[slots] = ids
        self.pointer.fill_((int(self.pointer) + len(ids)) % size)

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        filled = self.ids >= 0
        return self.vectors[filled], self.ids[filled]


def momentum_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` that `momentum_update` moves slowly toward it."""
    twin = copy.deepcopy(model)
    for parameter in twin.parameters():
        parameter.requires_grad_(False)
    return twin


@torch.no_grad()
def momentum_update(model: nn.Module, twin: nn.Module, momentum: float) -> None:
    """twin ← momentum · twin + (1 − momentum) · model, parameter by parameter."""
    for online, slow in zip(model.parameters(), twin.parameters(), strict=True):
        slow.mul_(momentum).add_(online.detach(), alpha=1.0 - momentum)
