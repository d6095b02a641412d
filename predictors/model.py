"""The CTR ranker: an ID model with DIN-style target attention, plus SimTier and MAKE.

Sheng et al., CIKM 2024, section 4. One module, `Ranker`, covers the four variants the paper
compares; a variant is a set of switches in `RankerConfig`:

| variant        | what the multimodal embeddings add                                        |
|----------------|---------------------------------------------------------------------------|
| `id`           | nothing: user, item, category, brand ids; history pooled by attention     |
| `vector`       | raw embeddings of target and behaviours concatenated to the ID vectors    |
| `simtier`      | a histogram of target-behaviour cosine similarities (`SimTier`)           |
| `simtier-make` | SimTier, and the outputs of a separately pre-trained multimodal `MAKE`    |

Shapes: B users (rows of a batch), C candidates per user (1 in training, many when serving one
user), L history positions, D embedding width, d ID embedding width. The history is shared by all
C candidates of a row, so attention scores and cosine similarities are `[B, C, L]` matrix products
and nothing is ever expanded to `[B, C, L, D]`: that is what lets the predictor score a few
hundred candidates against one history in one call.

Ids: every id table reserves row 0 for "unknown" (padding, out-of-vocabulary users and items that
arrived after training, category or brand -1). Row 0 stays zero and is never trained, so a cold
item looks like "no id information", not like a random item.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
from torch import nn

from mmrank.pooling import masked_mean

VARIANTS = ("id", "vector", "simtier", "simtier-make")


@dataclasses.dataclass
class RankerConfig:
    variant: str = "id"
    n_users: int = 1
    n_items: int = 1
    n_categories: int = 1
    n_brands: int = 1
    mm_dim: int = 128
    id_dim: int = 16
    history_length: int = 50
    hidden: tuple[int, ...] = (64, 32)
    tier_width: float = 0.1
    make_hidden: int = 32
    make_simtier: bool = True  # MAKE's own module counts the similarity tiers too
    make_vector: bool = False  # MAKE's attention-pooled vector also enters the ID model's first layer
    make_dim: int = 0  # > 0: MAKE projects the embeddings to this width before attending and pooling

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        self.hidden = tuple(int(h) for h in self.hidden)
        if len(self.hidden) < 2:
            raise ValueError("hidden needs at least two layers (MAKE joins after the first)")
        if self.make_dim < 0:
            raise ValueError(f"make_dim must be 0 (no projection) or positive, got {self.make_dim}")

    @property
    def uses_vector(self) -> bool:
        return self.variant == "vector"

    @property
    def uses_simtier(self) -> bool:
        return self.variant in ("simtier", "simtier-make")

    @property
    def uses_make(self) -> bool:
        return self.variant == "simtier-make"

    @property
    def uses_embeddings(self) -> bool:
        return self.variant != "id"

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "hidden": list(self.hidden)}


class RankerInputs(NamedTuple):
    """One batch. `*_found` is False where the store had no embedding: such a vector is zero
    (neutral) and never counted by SimTier nor attended by MAKE. A builder that already gathered
    zeros there (`train.to_inputs`) says so with `embeddings_zeroed`, which saves the model a
    pass over the [B, L, D] history vectors."""

    user: torch.Tensor  # [B] int64
    hist_item: torch.Tensor  # [B, L] int64
    hist_category: torch.Tensor  # [B, L] int64
    hist_brand: torch.Tensor  # [B, L] int64
    hist_mask: torch.Tensor  # [B, L] bool, False = padding
    hist_emb: torch.Tensor  # [B, L, D] float32
    hist_found: torch.Tensor  # [B, L] bool
    cand_item: torch.Tensor  # [B, C] int64
    cand_category: torch.Tensor  # [B, C] int64
    cand_brand: torch.Tensor  # [B, C] int64
    cand_emb: torch.Tensor  # [B, C, D] float32
    cand_found: torch.Tensor  # [B, C] bool
    embeddings_zeroed: bool = False  # cand_emb / hist_emb are already zero wherever *_found is False

    def neutral_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cand_emb, hist_emb) with every missing vector zero."""
        if self.embeddings_zeroed:
            return self.cand_emb, self.hist_emb
        return _zero_missing(self.cand_emb, self.cand_found), _zero_missing(self.hist_emb, self.hist_found)


def id_index(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Raw id -> row of an id table: 0..n-1 -> 1..n, anything else (new, -1) -> 0 (unknown)."""
    known = (ids >= 0) & (ids < vocab_size)
    return torch.where(known, ids + 1, torch.zeros_like(ids))


def cosine_matrix(cand_emb: torch.Tensor, hist_emb: torch.Tensor) -> torch.Tensor:
    """[B, C, D] x [B, L, D] -> [B, C, L] cosine similarities, as one batched matmul divided by
    the norms (a zero vector, i.e. a missing embedding, has similarity 0 with everything)."""
    dots = torch.bmm(cand_emb, hist_emb.transpose(1, 2))
    norms = cand_emb.norm(dim=-1)[:, :, None] * hist_emb.norm(dim=-1)[:, None, :]
    return dots / norms.clamp(min=1e-12)


class SimTier(nn.Module):
    """SimTier (paper 4.2.1; reference `model/base_model/simtier.py` in alimama-tech/MUSE).

    The cosine similarities of the target with each behaviour are counted into tiers of width
    `w` over [-1, 1]; each tier's count becomes `log(1 + count)` times a learned weight. The tier
    of a similarity s is `ceil(s * (1/w)) + 1/w`: with w = 0.1, s = -1 -> 0, s in (-0.1, 0] -> 10,
    s in (0.2, 0.3] -> 13, s = 1 -> 20. Like the reference there are `2/w + 2` bins (22); the
    last one would only catch s > 1 and stays empty here because s is clamped to [-1, 1] first
    (a float overshoot of identical vectors, 1 + 1e-7, must not leave tier 20).

    Float rounding is part of the definition: the product `s * (1/w)` is taken in float32, as the
    reference does, so a similarity that prints as a tier boundary (float32(0.3) =
    0.300000012, times 10 rounds to exactly 3.0) lands in the tier it closes, (0.2, 0.3].
    Padded and embedding-less positions are not counted (the count mask).
    """

    def __init__(self, width: float = 0.1) -> None:
        super().__init__()
        if not 0.0 < width <= 1.0:
            raise ValueError(f"tier width must be in (0, 1], got {width}")
        self.width = float(width)
        self.offset = int(1 / self.width)
        self.n_bins = 2 * self.offset + 2
        self.register_buffer(
            "inverse_width",
            torch.tensor(1.0, dtype=torch.float32) / torch.tensor(self.width, dtype=torch.float32),
            persistent=False,
        )
        self.weight = nn.Parameter(torch.rand(self.n_bins))  # the reference initialises U(0, 1)

    def tier_index(self, cosine: torch.Tensor) -> torch.Tensor:
        scaled = cosine.to(torch.float32).clamp(-1.0, 1.0) * self.inverse_width
        return torch.ceil(scaled).to(torch.int64) + self.offset

    def histogram(self, cosine: torch.Tensor, count_mask: torch.Tensor) -> torch.Tensor:
        """[..., L] similarities and mask -> [..., n_bins] counts (scatter, no one-hot)."""
        counts = torch.zeros(*cosine.shape[:-1], self.n_bins, dtype=torch.float32, device=cosine.device)
        return counts.scatter_add_(-1, self.tier_index(cosine), count_mask.to(torch.float32))

    def forward(self, cosine: torch.Tensor, count_mask: torch.Tensor) -> torch.Tensor:
        return torch.log1p(self.histogram(cosine, count_mask)) * self.weight


class TargetAttention(nn.Module):
    """DIN-style target attention: the candidate weighs each behaviour, the weighted sum of the
    behaviours is the user's interest in that candidate.

    DIN scores a (target, behaviour) pair with a small MLP over [t, b, t - b, t * b]; its linear
    part is a bilinear form plus terms in t or b alone, and that is what we keep:
    `score = (t Wq) . (b Wk) / sqrt(a) + b . v` ([B, C, a] @ [B, a, L]), softmax over the valid
    positions. The MLP's non-linearity would force a [B, C, L, 4d] tensor; this form lets one
    history serve hundreds of candidates. An empty history pools to zeros.

    The bilinear term is computed in whichever order does fewer multiplications (`keys_first`):
    projecting every behaviour, `(t Wq) . (b Wk)`, pays for L keys once and suits many
    candidates (serving); carrying the query back into the behaviours' space,
    `((t Wq) Wk + v) . b`, pays per candidate and suits training's one candidate per row, where
    projecting B * L behaviours (and its backward) was most of an epoch's matrix work. The two
    are the same product, equal up to float rounding (tests/test_ranker_model.py).
    """

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int = 32) -> None:
        super().__init__()
        self.query = nn.Linear(query_dim, attention_dim, bias=False)
        self.key = nn.Linear(key_dim, attention_dim, bias=False)
        self.key_bias = nn.Linear(key_dim, 1, bias=False)
        self.scale = 1.0 / math.sqrt(attention_dim)

    def keys_first(self, n_candidates: int, n_behaviours: int) -> bool:
        """Project the behaviours (True) or carry the queries back (False): the cheaper order."""
        a, k = self.key.out_features, self.key.in_features
        return (
            n_behaviours * k * a + n_candidates * n_behaviours * a
            <= n_candidates * a * k + n_candidates * n_behaviours * k
        )

    def scores(self, target: torch.Tensor, behaviours: torch.Tensor, keys_first: bool | None = None) -> torch.Tensor:
        """[B, C, L] unmasked attention scores (`keys_first`: None picks the cheaper order)."""
        query = self.query(target) * self.scale  # [B, C, a]
        if keys_first is None:
            keys_first = self.keys_first(target.shape[1], behaviours.shape[1])
        if keys_first:
            bilinear = torch.bmm(query, self.key(behaviours).transpose(1, 2))
            return bilinear + self.key_bias(behaviours).transpose(1, 2)
        # (t Wq) Wk + v is one [B, C, k] row per candidate: one pass over the behaviours
        return torch.bmm(query @ self.key.weight + self.key_bias.weight, behaviours.transpose(1, 2))

    def forward(
        self, target: torch.Tensor, behaviours: torch.Tensor, mask: torch.Tensor, keys_first: bool | None = None
    ) -> torch.Tensor:
        """target [B, C, q], behaviours [B, L, k], mask [B, L] -> pooled [B, C, k]."""
        scores = self.scores(target, behaviours, keys_first)  # [B, C, L]
        scores = scores.masked_fill(~mask[:, None, :], -1e4)
        weights = torch.softmax(scores, dim=-1) * mask.any(dim=-1)[:, None, None].to(scores.dtype)
        return torch.bmm(weights, behaviours)


class MakeOutputs(NamedTuple):
    vector: torch.Tensor  # [B, C, D] attention-pooled multimodal interest
    middle: torch.Tensor  # [B, C, make_hidden]
    logit: torch.Tensor  # [B, C]


class MAKE(nn.Module):
    """MAKE, the multimodal knowledge extractor (paper 4.2.2), and how it maps to the paper
    (docs/results.md, "MAKE: the paper and this code", has the whole table):

    - *what trains for several epochs*: every multimodal-related parameter and nothing else —
      a target attention over the behaviours' multimodal embeddings, its own SimTier weights
      over the same similarity tiers the ID model counts, and a shallow MLP. No id parameter, so
      several epochs do not hit the one-epoch overfitting of id embeddings;
    - *its pre-training task*: the downstream task itself, click / no click on the training
      impressions (`make_logits`, `train.pretrain_make`), not a contrastive one;
    - *how it enters the ID model*: its middle layer joins the ID model's MLP after the first
      layer and its logit is added to the ID model's (`Ranker.forward`); the ID model trains one
      epoch on top. Its attention-pooled vector may enter the first layer too (`make_vector`),
      which measured worse (128 inputs trained for one epoch only);
    - *during the ID epoch*: frozen by default (`train.TrainSettings.make_finetune_lr` = 0);
    - *how many epochs*: chosen on the last training day as validation (`train.select_make_epochs`).

    `project_dim` > 0 is a smaller MAKE, measured as issue 19's serving lever (docs/results.md):
    the embeddings are first projected to that width (one learned matrix), so the attention, the
    pooling and the middle layer work in it instead of the embeddings' own width.
    """

    def __init__(self, mm_dim: int, hidden: int = 32, tiers: SimTier | None = None, project_dim: int = 0) -> None:
        super().__init__()
        self.project = nn.Linear(mm_dim, project_dim, bias=False) if project_dim else None
        width = project_dim or mm_dim
        self.attention = TargetAttention(width, width)
        self.simtier = tiers
        width = 3 * width + (tiers.n_bins if tiers is not None else 0)
        self.middle = nn.Sequential(nn.Linear(width, hidden), nn.PReLU())
        self.out = nn.Linear(hidden, 1)

    def forward(
        self,
        cand_emb: torch.Tensor,
        hist_emb: torch.Tensor,
        hist_valid: torch.Tensor,
        log_counts: torch.Tensor | None = None,
    ) -> MakeOutputs:
        """`log_counts` [B, C, n_bins]: log(1 + tier counts), computed once and shared with the
        ID model's SimTier (MAKE weighs them with its own tier weights)."""
        if self.project is not None:
            cand_emb, hist_emb = self.project(cand_emb), self.project(hist_emb)
        vector = self.attention(cand_emb, hist_emb, hist_valid)  # [B, C, D or project_dim]
        parts = [cand_emb, vector, cand_emb * vector]
        if self.simtier is not None:
            assert log_counts is not None
            parts.append(log_counts * self.simtier.weight)
        middle = self.middle(torch.cat(parts, dim=-1))
        return MakeOutputs(vector, middle, self.out(middle).squeeze(-1))


class Ranker(nn.Module):
    """ID model (+ Vector | SimTier | SimTier and MAKE). `forward` gives click logits [B, C]."""

    def __init__(self, config: RankerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.id_dim
        self.user_emb = _id_table(config.n_users, d)
        self.item_emb = _id_table(config.n_items, d)
        self.category_emb = _id_table(config.n_categories, d)
        self.brand_emb = _id_table(config.n_brands, d)
        item_dim = 3 * d + (config.mm_dim if config.uses_vector else 0)
        self.attention = TargetAttention(item_dim, item_dim)
        mlp_in = d + 4 * item_dim
        if config.uses_simtier:
            self.simtier = SimTier(config.tier_width)
            mlp_in += self.simtier.n_bins
        first_out = config.hidden[0]
        if config.uses_make:
            self.make = MAKE(
                config.mm_dim,
                config.make_hidden,
                SimTier(config.tier_width) if config.make_simtier else None,
                config.make_dim,
            )
            mlp_in += (config.make_dim or config.mm_dim) if config.make_vector else 0
        self.first = nn.Sequential(nn.Linear(mlp_in, first_out), nn.PReLU())
        rest: list[nn.Module] = []
        width = first_out + (config.make_hidden if config.uses_make else 0)
        for h in config.hidden[1:]:
            rest += [nn.Linear(width, h), nn.PReLU()]
            width = h
        self.rest = nn.Sequential(*rest)
        self.out = nn.Linear(width, 1)
        # Category and brand of every known item (-1 unknown), filled by `load_ranker`, so a
        # request that only carries item ids can still be scored.
        self.register_buffer("item_features", torch.full((0, 2), -1, dtype=torch.int64), persistent=False)
        self.make_trainable = False  # set by the ID epoch when MAKE is fine-tuned rather than frozen

    def item_vectors(self, items: torch.Tensor, categories: torch.Tensor, brands: torch.Tensor) -> torch.Tensor:
        """[...] ids -> [..., 3d] concatenated item, category and brand embeddings."""
        c = self.config
        return torch.cat(
            [
                self.item_emb(id_index(items, c.n_items)),
                self.category_emb(id_index(categories, c.n_categories)),
                self.brand_emb(id_index(brands, c.n_brands)),
            ],
            dim=-1,
        )

    def forward(self, x: RankerInputs) -> torch.Tensor:
        c = self.config
        n_cand = x.cand_item.shape[1]
        if c.uses_embeddings:
            cand_emb, hist_emb = x.neutral_embeddings()
        target = self.item_vectors(x.cand_item, x.cand_category, x.cand_brand)  # [B, C, 3d]
        behaviours = self.item_vectors(x.hist_item, x.hist_category, x.hist_brand)  # [B, L, 3d]
        if c.uses_vector:
            target = torch.cat([target, cand_emb], dim=-1)
            behaviours = torch.cat([behaviours, hist_emb], dim=-1)
        interest = self.attention(target, behaviours, x.hist_mask)  # [B, C, k]
        mean_history = masked_mean(behaviours, x.hist_mask)[:, None].expand(-1, n_cand, -1)
        user = self.user_emb(id_index(x.user, c.n_users))[:, None].expand(-1, n_cand, -1)
        parts = [user, target, interest, target * interest, mean_history]
        valid_mm = x.hist_mask & x.hist_found  # [B, L]
        log_counts = None
        if c.uses_simtier:
            log_counts = self.log_tier_counts(cand_emb, hist_emb, valid_mm, x.cand_found)
            parts.append(log_counts * self.simtier.weight)
        make = None
        if c.uses_make:
            if self.make_trainable:
                make = self.make(cand_emb, hist_emb, valid_mm, log_counts)
            else:  # pre-trained, frozen in the ID epoch: no graph is recorded through it
                with torch.no_grad():
                    make = self.make(cand_emb, hist_emb, valid_mm, None if log_counts is None else log_counts.detach())
            if c.make_vector:
                parts.append(make.vector)
        hidden = self.first(torch.cat(parts, dim=-1))
        if make is not None:
            hidden = torch.cat([hidden, make.middle], dim=-1)
        logit = self.out(self.rest(hidden)).squeeze(-1)
        return logit + make.logit if make is not None else logit

    def log_tier_counts(
        self, cand_emb: torch.Tensor, hist_emb: torch.Tensor, valid_mm: torch.Tensor, cand_found: torch.Tensor
    ) -> torch.Tensor:
        """log(1 + count) per similarity tier, [B, C, n_bins] (SimTier before its weights)."""
        count_mask = valid_mm[:, None, :] & cand_found[..., None]  # [B, C, L]
        tiers = self.simtier if self.config.uses_simtier else self.make.simtier
        return torch.log1p(tiers.histogram(cosine_matrix(cand_emb, hist_emb), count_mask))

    def make_logits(self, x: RankerInputs) -> torch.Tensor:
        """MAKE alone ([B, C] logits), for its own pre-training on the click task."""
        valid_mm = x.hist_mask & x.hist_found
        cand_emb, hist_emb = x.neutral_embeddings()
        log_counts = (
            self.log_tier_counts(cand_emb, hist_emb, valid_mm, x.cand_found) if self.make.simtier is not None else None
        )
        return self.make(cand_emb, hist_emb, valid_mm, log_counts).logit

    def id_parameters(self) -> list[nn.Parameter]:
        """Everything but MAKE: what the one-epoch ID training updates."""
        return [p for name, p in self.named_parameters() if not name.startswith("make.")]

    @torch.inference_mode()
    def score_candidates(
        self,
        user_id: int,
        history_ids: torch.Tensor,
        history_mask: torch.Tensor,
        history_emb: torch.Tensor,
        history_found: torch.Tensor,
        cand_ids: torch.Tensor,
        cand_emb: torch.Tensor,
        cand_found: torch.Tensor,
        cand_category: torch.Tensor | None = None,
        cand_brand: torch.Tensor | None = None,
        history_category: torch.Tensor | None = None,
        history_brand: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One user's C candidates against one shared history of L -> logits [C].

        history_* are [L] (embeddings [L, D]), cand_* are [C] ([C, D]). Category and brand, when
        not given, come from the artifact's item feature table (-1 for items it does not know).
        """
        hist_category, hist_brand = self._features(history_ids, history_category, history_brand)
        cand_category, cand_brand = self._features(cand_ids, cand_category, cand_brand)
        x = RankerInputs(
            user=torch.as_tensor([int(user_id)], dtype=torch.int64),
            hist_item=history_ids[None].long(),
            hist_category=hist_category[None].long(),
            hist_brand=hist_brand[None].long(),
            hist_mask=history_mask[None].bool(),
            hist_emb=history_emb[None].float(),
            hist_found=history_found[None].bool(),
            cand_item=cand_ids[None].long(),
            cand_category=cand_category[None].long(),
            cand_brand=cand_brand[None].long(),
            cand_emb=cand_emb[None].float(),
            cand_found=cand_found[None].bool(),
        )
        return self(x)[0]

    def _features(
        self, ids: torch.Tensor, category: torch.Tensor | None, brand: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if category is not None and brand is not None:
            return category, brand
        table = self.item_features
        known = (ids >= 0) & (ids < len(table))
        looked_up = (
            table[torch.where(known, ids, torch.zeros_like(ids)).clamp(max=max(len(table) - 1, 0))]
            if len(table)
            else torch.full((*ids.shape, 2), -1, dtype=torch.int64)
        )
        looked_up = torch.where(known[..., None], looked_up, torch.full_like(looked_up, -1))
        return (
            category if category is not None else looked_up[..., 0],
            brand if brand is not None else looked_up[..., 1],
        )


def _zero_missing(vectors: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """A missing embedding becomes the zero vector (neutral); no copy when all are found."""
    return vectors if bool(found.all()) else vectors * found[..., None].to(vectors.dtype)


def _id_table(n: int, dim: int) -> nn.Embedding:
    """Sparse gradients: a batch touches a few hundred of the rows, not all of them."""
    table = nn.Embedding(n + 1, dim, padding_idx=0, sparse=True)
    nn.init.normal_(table.weight, std=0.05)
    with torch.no_grad():
        table.weight[0].zero_()
    return table
