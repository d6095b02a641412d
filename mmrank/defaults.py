"""Defaults more than one part must agree on, in one place.

Import-free on purpose: the API models, the operator (through `mmrank.encoders.triton_config`,
which must stay torch- and numpy-free) and the encoders all read it.
"""

from __future__ import annotations

# The encoder's model name inside a Triton model repository: what `mmrank encoders export` writes,
# what the embedder and the backfill call, and the spec's `encoder.modelName` unless it names another.
ENCODER_MODEL_NAME = "item_encoder"
