"""Pooling shared by the item encoder (title tokens) and the ranker (behaviour history).

Tensor methods only: torch is imported for the annotations alone, so the common package still
imports no torch (docs/architecture.md) and the parts call this with their own tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[B, L, k] averaged over the positions `keep` [B, L] marks -> [B, k]; zeros where none is kept."""
    weights = keep.to(values.dtype).unsqueeze(-1)
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
