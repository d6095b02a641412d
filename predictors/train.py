"""Training and evaluation of the CTR ranker on the shop's impressions.

The recipe is the paper's: id parameters see the training impressions once (one epoch: id
embeddings overfit after it), MAKE's multimodal module first trains alone on the click task for
several epochs — how many is chosen on the last training day as validation, never on the test
day (`select_make_epochs`) — then stays frozen while the ID model trains its one epoch (or keeps
training at `make_finetune_lr`, an option measured in docs/results.md). Training impressions are shuffled
once per epoch with the run's seed (the seed also fixes the initialisation): that is what makes
the table's three seeds differ.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from mmrank.predictors.metrics import overall_and_cold
from mmrank.predictors.model import Ranker, RankerConfig, RankerInputs


@dataclasses.dataclass
class Impressions:
    """One row per impression, with the user's history before it (item ids, newest last)."""

    user: np.ndarray  # [N] int64
    item: np.ndarray  # [N] int64
    label: np.ndarray  # [N] float32 (clicked)
    cold: np.ndarray  # [N] bool (item never impressed in training days)
    history: np.ndarray  # [N, L] int64
    history_mask: np.ndarray  # [N, L] bool
    day: np.ndarray | None = None  # [N] int (shop day), where known: the validation split needs it

    def __len__(self) -> int:
        return len(self.user)

    def take(self, rows: np.ndarray) -> Impressions:
        return Impressions(
            *(None if getattr(self, f.name) is None else getattr(self, f.name)[rows] for f in dataclasses.fields(self))
        )

    def split_last_day(self) -> tuple[Impressions, Impressions]:
        """(all days but the last, the last day): the validation split for MAKE's epoch count."""
        if self.day is None or len(np.unique(self.day)) < 2:
            raise ValueError("choosing MAKE's epochs needs impressions of at least two training days")
        last = self.day == self.day.max()
        return self.take(np.flatnonzero(~last)), self.take(np.flatnonzero(last))


@dataclasses.dataclass
class Catalogue:
    """Per item id: category, brand and the embedding of one space."""

    category: np.ndarray  # [n_items] int64
    brand: np.ndarray  # [n_items] int64
    vectors: np.ndarray  # [n_items, D] float32
    present: np.ndarray  # [n_items] bool: the space holds this item's embedding
    encoder_version: str

    @property
    def item_features(self) -> np.ndarray:
        return np.stack([self.category, self.brand], axis=1).astype(np.int64)

    @functools.cached_property
    def neutral_vectors(self) -> np.ndarray:
        """[n_items + 1, D]: the vectors with absent items zeroed and one zero row at the end, so
        one gather gives the model its neutral vectors (`RankerInputs.embeddings_zeroed`)."""
        zero = np.zeros((1, self.vectors.shape[1]), np.float32)
        return np.concatenate([np.where(self.present[:, None], self.vectors, np.float32(0)), zero]).astype(np.float32)


@dataclasses.dataclass
class TrainSettings:
    seed: int = 0
    batch_size: int = 256
    lr_sparse: float = 0.02
    lr_dense: float = 0.002
    make_epochs: int = 0  # 0: chosen on the validation day (`select_make_epochs`)
    max_make_epochs: int = 4  # the most the choice may pick
    make_lr: float = 0.002
    make_finetune_lr: float = 0.0  # 0: MAKE frozen during the ID epoch; else Adam at this rate


def load_data(
    data_dir: str,
    history_length: int,
    space_dir: str | None = None,
) -> tuple[Impressions, Impressions, Catalogue, dict[str, int]]:
    """Shop directory (+ a space directory, else the oracle concept space) -> train, test,
    catalogue, vocabulary sizes."""
    from mmrank import shop as shop_module
    from mmrank.space import load_space

    shop = shop_module.load(data_dir)
    if space_dir is None:
        vectors = shop_module.concept_vectors(shop)
        return from_shop(shop, vectors, np.ones(len(vectors), dtype=bool), "oracle-concepts", history_length)
    space = load_space(space_dir)
    return from_shop(shop, space.vectors, space.present, space.version, history_length)


def from_shop(
    shop: Any,
    vectors: np.ndarray,
    present: np.ndarray,
    encoder_version: str,
    history_length: int,
) -> tuple[Impressions, Impressions, Catalogue, dict[str, int]]:
    """A loaded `mmrank.shop.Shop` and one space's vectors -> train, test, catalogue, vocab."""
    items = shop.items.sort_values("item_id")
    n_items = int(items["item_id"].max()) + 1
    category = np.full(n_items, -1, np.int64)
    brand = np.full(n_items, -1, np.int64)
    category[items["item_id"].to_numpy()] = items["category"].to_numpy()
    brand[items["item_id"].to_numpy()] = items["brand"].to_numpy()
    catalogue = Catalogue(
        category,
        brand,
        _rows(np.asarray(vectors, np.float32), n_items),
        _rows(np.asarray(present, bool), n_items),
        encoder_version,
    )
    imp = shop.impressions.sort_values("ts", kind="stable")
    history, mask = shop.history(imp["user_id"].to_numpy(), imp["ts"].to_numpy(), history_length)
    everything = Impressions(
        imp["user_id"].to_numpy(np.int64),
        imp["item_id"].to_numpy(np.int64),
        imp["clicked"].to_numpy(np.float32),
        imp["cold"].to_numpy(bool),
        np.asarray(history, np.int64),
        np.asarray(mask, bool),
        imp["day"].to_numpy(np.int64),
    )
    is_train = (imp["split"] == "train").to_numpy()
    users = max(int(shop.impressions["user_id"].max()), int(shop.behaviours["user_id"].max())) + 1
    vocab = {
        "n_users": users,
        "n_items": n_items,
        "n_categories": int(category.max()) + 1,
        "n_brands": int(brand.max()) + 1,
    }
    return everything.take(np.flatnonzero(is_train)), everything.take(np.flatnonzero(~is_train)), catalogue, vocab


def _rows(array: np.ndarray, n: int) -> np.ndarray:
    """The space may cover fewer or more ids than the catalogue: pad with absent rows."""
    if len(array) >= n:
        return array[:n]
    pad = np.zeros((n - len(array), *array.shape[1:]), dtype=array.dtype)
    return np.concatenate([array, pad])


def to_inputs(data: Impressions, rows: np.ndarray, catalogue: Catalogue, embeddings: bool = True) -> RankerInputs:
    """A batch of impressions (one candidate each, C = 1) as model inputs. Without
    `embeddings` (the ID model) the vectors are left out (width 0): gathering [B, L, D] floats
    per batch is most of an ID model's input cost."""
    history, mask, item = data.history[rows], data.history_mask[rows], data.item[rows]
    n = len(catalogue.category)
    hist_safe, item_safe = np.clip(history, 0, n - 1), np.clip(item, 0, n - 1)
    hist_known, item_known = (history >= 0) & (history < n), (item >= 0) & (item < n)
    hist_found, item_found = catalogue.present[hist_safe] & hist_known & mask, catalogue.present[item_safe] & item_known
    t = torch.from_numpy
    vectors = catalogue.neutral_vectors if embeddings else np.empty((n + 1, 0), np.float32)
    return RankerInputs(
        user=t(data.user[rows]),
        hist_item=t(history),
        hist_category=t(np.where(hist_known, catalogue.category[hist_safe], -1)),
        hist_brand=t(np.where(hist_known, catalogue.brand[hist_safe], -1)),
        hist_mask=t(mask),
        hist_emb=t(np.take(vectors, np.where(hist_found, hist_safe, n), axis=0)),
        hist_found=t(hist_found),
        cand_item=t(item[:, None]),
        cand_category=t(np.where(item_known, catalogue.category[item_safe], -1)[:, None]),
        cand_brand=t(np.where(item_known, catalogue.brand[item_safe], -1)[:, None]),
        cand_emb=t(np.take(vectors, np.where(item_found, item_safe, n), axis=0)[:, None]),
        cand_found=t(item_found[:, None]),
        embeddings_zeroed=embeddings,
    )


def batches(n: int, batch_size: int, rng: np.random.Generator | None) -> Iterator[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def adam(params: Any, lr: float) -> torch.optim.Adam:
    """Adam for the dense parameters, fused: one kernel per step instead of a dozen small ops per
    parameter (a quarter of the step's time on CPU; the same update up to float rounding). Used
    by every variant's dense parameters alike."""
    return torch.optim.Adam(params, lr=lr, fused=True)


def _epoch(
    data: Impressions,
    catalogue: Catalogue,
    logits_fn: Callable[[RankerInputs], torch.Tensor],
    optimizer: Any,
    batch_size: int,
    rng: np.random.Generator,
    embeddings: bool = True,
) -> float:
    total, seen = 0.0, 0
    for rows in batches(len(data), batch_size, rng):
        logits = logits_fn(to_inputs(data, rows, catalogue, embeddings))[:, 0]
        loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(data.label[rows]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, seen = total + float(loss.detach()) * len(rows), seen + len(rows)
    return total / max(seen, 1)


def pretrain_make(
    model: Ranker, data: Impressions, catalogue: Catalogue, settings: TrainSettings, snapshots: tuple[int, ...] = ()
) -> dict[int, dict[str, torch.Tensor]]:
    """MAKE alone on the click task for `settings.make_epochs` epochs. Returns MAKE's state after
    each epoch named in `snapshots`, so one pre-training serves the 1/2/4-epoch comparison."""
    rng = np.random.default_rng(settings.seed + 1000)
    optimizer = adam(model.make.parameters(), settings.make_lr)
    model.train()
    saved = {}
    for epoch in range(1, settings.make_epochs + 1):
        _epoch(data, catalogue, model.make_logits, optimizer, settings.batch_size, rng)
        if epoch in snapshots:
            saved[epoch] = {k: v.detach().clone() for k, v in model.make.state_dict().items()}
    return saved


def choose_epochs(curve: dict[int, float]) -> int:
    """The epoch count with the best validation score; the fewest epochs among equals (NaN loses)."""
    scored = {e: v for e, v in curve.items() if v == v}
    if not scored:
        return min(curve)
    best = max(scored.values())
    return min(e for e, v in scored.items() if v >= best - 1e-12)


def select_make_epochs(
    model: Ranker,
    data: Impressions,
    catalogue: Catalogue,
    settings: TrainSettings,
) -> tuple[int, dict[int, float]]:
    """MAKE's number of pre-training epochs, chosen on a validation day, never the test day: MAKE
    alone trains on every training day but the last, its own click logit is scored (GAUC) on the
    last after each epoch, and the best count wins. `model` is a scratch copy: its MAKE is
    overwritten. -> (epochs, {epoch: validation GAUC})."""
    from mmrank.predictors.metrics import gauc

    fit, validation = data.split_last_day()
    rng = np.random.default_rng(settings.seed + 2000)
    optimizer = adam(model.make.parameters(), settings.make_lr)
    curve: dict[int, float] = {}
    for epoch in range(1, settings.max_make_epochs + 1):
        model.train()
        _epoch(fit, catalogue, model.make_logits, optimizer, settings.batch_size, rng)
        model.eval()
        with torch.no_grad():
            logits = np.concatenate(
                [
                    model.make_logits(to_inputs(validation, rows, catalogue))[:, 0].numpy()
                    for rows in batches(len(validation), 1024, None)
                ]
            )
        curve[epoch] = round(gauc(validation.user, validation.label, logits), 5)
    return choose_epochs(curve), curve


def train_id_epoch(model: Ranker, data: Impressions, catalogue: Catalogue, settings: TrainSettings) -> float:
    """One epoch over the training impressions for every parameter but MAKE's."""
    tables = [model.user_emb.weight, model.item_emb.weight, model.category_emb.weight, model.brand_emb.weight]
    dense = [p for p in model.id_parameters() if all(p is not t for t in tables)]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.SparseAdam(tables, lr=settings.lr_sparse),
        adam(dense, settings.lr_dense),
    ]
    model.make_trainable = model.config.uses_make and settings.make_finetune_lr > 0
    if model.make_trainable:
        optimizers.append(adam(model.make.parameters(), settings.make_finetune_lr))
    optimizer = _Both(*optimizers)
    model.train()
    loss = _epoch(
        data,
        catalogue,
        model,
        optimizer,
        settings.batch_size,
        np.random.default_rng(settings.seed),
        embeddings=model.config.uses_embeddings,
    )
    model.make_trainable = False
    forget_unseen(model, data)
    model.eval()
    return loss


class _Both:
    """SparseAdam for the id tables (sparse gradients), Adam for the rest, stepped together."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def forget_unseen(model: Ranker, data: Impressions) -> None:
    """Rows of users and items that no training impression or history touched are set to the
    unknown row (zeros): a production id table only holds ids seen in training, and a random
    untrained row would make a cold item look like some arbitrary other item."""
    seen_items = np.zeros(model.config.n_items, dtype=bool)
    for ids in (data.item, data.history[data.history_mask]):
        ids = ids[(ids >= 0) & (ids < len(seen_items))]
        seen_items[ids] = True
    seen_users = np.zeros(model.config.n_users, dtype=bool)
    seen_users[data.user[(data.user >= 0) & (data.user < len(seen_users))]] = True
    with torch.no_grad():
        for table, seen in ((model.item_emb, seen_items), (model.user_emb, seen_users)):
            unseen = torch.from_numpy(np.r_[True, ~seen])  # row 0 is the unknown row itself
            table.weight[unseen] = 0.0


def train_ranker(
    train: Impressions,
    catalogue: Catalogue,
    config: RankerConfig,
    settings: TrainSettings,
    make_state: dict[str, torch.Tensor] | None = None,
) -> tuple[Ranker, dict[str, Any]]:
    """The whole recipe for one variant: (MAKE pre-training,) one ID epoch."""
    torch.manual_seed(settings.seed)
    model = Ranker(config)
    report: dict[str, Any] = {"seed": settings.seed, "impressions": len(train)}
    started = time.perf_counter()
    if config.uses_make:
        if make_state is None:
            if settings.make_epochs == 0:
                scratch = Ranker(config)
                chosen, curve = select_make_epochs(scratch, train, catalogue, settings)
                settings = dataclasses.replace(settings, make_epochs=chosen)
                report["make_validation_gauc"] = curve
                report["make_selection_seconds"] = round(time.perf_counter() - started, 2)
                started = time.perf_counter()
            pretrain_make(model, train, catalogue, settings)
        else:
            model.make.load_state_dict(make_state)
        report["make_epochs"] = settings.make_epochs
        report["make_seconds"] = round(time.perf_counter() - started, 2)
    id_started = time.perf_counter()
    report["train_loss"] = round(train_id_epoch(model, train, catalogue, settings), 5)
    report["id_seconds"] = round(time.perf_counter() - id_started, 2)
    return model, report


@torch.inference_mode()
def predict(model: Ranker, data: Impressions, catalogue: Catalogue, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    out = [
        model(to_inputs(data, rows, catalogue, model.config.uses_embeddings))[:, 0].numpy()
        for rows in batches(len(data), batch_size, None)
    ]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def evaluate(model: Ranker, data: Impressions, catalogue: Catalogue) -> dict[str, dict[str, float]]:
    """AUC, GAUC, log-loss on all test impressions and on cold items'."""
    return overall_and_cold(data.user, data.label, predict(model, data, catalogue), data.cold)
