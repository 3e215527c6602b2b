"""FastIF's text experiments on MiniLM at small scale, and the cached frozen prefix that makes them affordable.

**The cached prefix.** A :class:`~lightning_fastif.app.models.TextClassifier` fine-tunes only its top encoder layers;
the embeddings and the layers below are frozen. Their output for a given text never changes, so it is computed
once (:func:`prefix_hidden_states`) and stored as a :class:`HiddenStates` dataset, and a
:class:`CachedTopClassifier` runs only the top layers, mean pooling and the head on it. It *shares* those modules
with the model (training one trains the other) and computes exactly the same logits, losses, gradients and
features, so influence over the top layers is the same number, at the cost of the top layers only
(``benchmarks/bench_text.py`` measures the saving).

**The experiments** (each an ``examples/text_*.py`` script and a part of ``benchmarks/bench_text.py``):

* :func:`spurious_cue_experiment`: Rotten Tomatoes with a planted cue word (HANS on text). Accuracy on the
  in-distribution test split against the challenge split, where the cue is reversed; then FastIF's error correction
  with ``helpful``, ``harmful`` and ``random`` points, the same number of steps, over several seeds, each from the
  same trained weights.
* :func:`simulatability_experiment`: FastIF's explanations. For test points, does fine-tuning a copy of the model on
  its top-``k`` helpful training points (by influence on the loss of the model's *own* prediction) raise the
  probability of that prediction more often than ``k`` random or ``k`` harmful points?
* :func:`knn_recall_experiment`: recall of the full-influence top-10 helpful (and harmful) training points among
  the ``k`` nearest neighbours in feature space, as ``k`` grows.

**Positive score = helpful** throughout. This module is an upper layer: it imports Lightning.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_fastif.app.models import TextClassifier, additive_attention_mask
from lightning_fastif.core.batches import Batch, IndexedData, move_batch
from lightning_fastif.core.grads import evaluating
from lightning_fastif.io.atomic import atomic_write_bytes

__all__ = [
    "CachedTopClassifier",
    "HiddenStates",
    "TextRun",
    "build_text_classifier",
    "collate_hidden_states",
    "fixed_lissa",
    "hidden_states_loader",
    "influence_on_predictions",
    "knn_recall_curve",
    "knn_recall_experiment",
    "prefix_hidden_states",
    "simulatability_experiment",
    "simulatability_rates",
    "spurious_cue_experiment",
    "train_digits_model",
    "train_text_model",
    "write_knn_recall_report",
    "write_simulatability_report",
    "write_spurious_cue_report",
]


# ----------------------------------------------------------------------------------------------------------------
# The cached frozen prefix
# ----------------------------------------------------------------------------------------------------------------


class HiddenStates(Dataset):
    """Hidden states of a text model's frozen prefix, with their attention masks and labels.

    An item is ``{"hidden_states": [L, H], "attention_mask": [L], "labels": []}``; :func:`collate_hidden_states`
    stacks items and trims the padding to the longest example of the batch.

    Args:
        hidden_states: ``[N, L, H]`` float states (padding positions included).
        attention_mask: ``[N, L]`` 0/1 mask.
        labels: ``[N]`` int64 labels.
        layer: the encoder layer these states are the *input* of (informative; checked by
            :class:`CachedTopClassifier`).

    Example::

        >>> data = HiddenStates(torch.zeros(3, 5, 8), torch.ones(3, 5, dtype=torch.long), torch.tensor([0, 1, 0]), 1)
        >>> sorted(data[0]), len(data)
        (['attention_mask', 'hidden_states', 'labels'], 3)
    """

    def __init__(self, hidden_states: Tensor, attention_mask: Tensor, labels: Tensor, layer: int) -> None:
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states: expected shape [N, L, H], got {tuple(hidden_states.shape)}")
        n, length = hidden_states.shape[:2]
        if tuple(attention_mask.shape) != (n, length):
            raise ValueError(
                f"attention_mask: expected shape [{n}, {length}] to match hidden_states, got "
                f"{tuple(attention_mask.shape)}"
            )
        if tuple(labels.shape) != (n,):
            raise ValueError(f"labels: expected shape [{n}], got {tuple(labels.shape)}")
        self.hidden_states = hidden_states
        self.attention_mask = attention_mask
        self.labels = labels
        self.layer = int(layer)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {
            "hidden_states": self.hidden_states[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }


def collate_hidden_states(items: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Stack :class:`HiddenStates` items into a dict batch trimmed to its longest example (padding is masked).

    Example::

        >>> item = {"hidden_states": torch.zeros(4, 2), "attention_mask": torch.tensor([1, 1, 0, 0]),
        ...         "labels": torch.tensor(1)}
        >>> collate_hidden_states([item, item])["hidden_states"].shape
        torch.Size([2, 2, 2])
    """
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    length = max(int(batch["attention_mask"].sum(dim=1).max()), 1)
    batch["hidden_states"] = batch["hidden_states"][:, :length]
    batch["attention_mask"] = batch["attention_mask"][:, :length]
    return batch


def hidden_states_loader(data: HiddenStates, *, batch_size: int = 16, shuffle: bool = False) -> DataLoader:
    """A ``DataLoader`` over ``data`` with :func:`collate_hidden_states` (what the engine and the Trainer take)."""
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_hidden_states)


def _length_order(data: Any) -> Tensor | None:
    """Indices of ``data`` sorted by length (its ``attention_mask`` rows), so each chunk pads little; else None."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    mask = getattr(dataset, "attention_mask", None)
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        return None
    return torch.argsort(mask.sum(dim=1), stable=True)


def _in_length_order(data: Any, default_collate: Any, batch_size: int) -> tuple[Tensor | None, Any]:
    """``(order, chunks)``: chunks over ``data`` in length order, with its loader's collate (or ``default_collate``)."""
    source = IndexedData(data, name="data") if isinstance(data, DataLoader) else IndexedData(data, default_collate)
    order = _length_order(data)
    return order, source.chunks(batch_size, order)


@torch.no_grad()
def prefix_hidden_states(model: TextClassifier, data: Any, layer: int, *, batch_size: int = 64) -> HiddenStates:
    """Run the embeddings and encoder layers ``0 .. layer-1`` of ``model`` once over ``data``; return the states.

    The states are the input of encoder layer ``layer``: with ``layer = model.num_layers - train_layers`` they are
    the output of the frozen part, which training never changes. Runs in eval mode without gradients, over chunks
    of similar lengths (each trimmed to its longest example: padding is masked, so the states are unchanged).

    Args:
        model: the text classifier.
        data: a tokenised text dataset (items ``{"input_ids", "attention_mask", "labels"}``) or a loader over one.
        layer: the first layer *not* run (0: the embeddings only).
        batch_size: examples per forward pass.

    Returns:
        A :class:`HiddenStates` aligned with ``data`` (padded to the longest example of ``data``).

    Raises:
        ValueError: if ``layer`` is outside ``0 .. num_layers``.

    Example::

        >>> from lightning_fastif.app.models import tiny_bert
        >>> from lightning_fastif.app.data import TokenizedTexts
        >>> texts = TokenizedTexts(torch.randint(1, 99, (3, 6)), torch.ones(3, 6, dtype=torch.long),
        ...                        torch.tensor([0, 1, 0]), ["a", "b", "c"])
        >>> prefix_hidden_states(tiny_bert(), texts, 1).hidden_states.shape
        torch.Size([3, 6, 32])
    """
    from lightning_fastif.app.data import collate_text_batch

    if not (isinstance(layer, int) and 0 <= layer <= model.num_layers):
        raise ValueError(f"layer: expected an integer in [0, {model.num_layers}], got {layer!r}")
    dtype = model.classifier.weight.dtype
    states, masks, labels = [], [], []
    order, chunks = _in_length_order(data, collate_text_batch, batch_size)
    with evaluating(model):
        for _, batch in chunks:
            ids, mask = batch["input_ids"], batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask
            hidden = model.encoder.embeddings(input_ids=ids)
            extended = additive_attention_mask(mask, dtype)
            for block in model.encoder.encoder.layer[:layer]:
                hidden = block(hidden, extended)
            states.append(hidden)
            masks.append(mask)
            labels.append(batch["labels"])
    return _padded(states, masks, labels, layer, order)


def _padded(
    states: list[Tensor], masks: list[Tensor], labels: list[Tensor], layer: int, order: Tensor | None
) -> HiddenStates:
    """Concatenate chunks (padded to the longest) and put them back in dataset order."""
    length = max(s.shape[1] for s in states)
    hidden = torch.cat([F.pad(s, (0, 0, 0, length - s.shape[1])) for s in states])
    mask = torch.cat([F.pad(m, (0, length - m.shape[1])) for m in masks]).long()
    target = torch.cat(labels).long()
    if order is not None:
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        hidden, mask, target = hidden[inverse], mask[inverse], target[inverse]
    return HiddenStates(hidden.contiguous(), mask, target, layer)


class CachedTopClassifier(LightningModule):
    """The top encoder layers, mean pooling and head of a :class:`TextClassifier`, run on cached hidden states.

    The layers and the head are the model's own modules (shared, not copied): training this module trains the
    model, and its logits equal the model's for the same texts. Parameter names are ``layer.{i}.*`` (``i`` the
    model's layer index) and ``classifier.*``. Batches are ``{"hidden_states", "attention_mask", "labels"}``
    (:class:`HiddenStates` through :func:`hidden_states_loader`). It follows the conventions of the influence
    engine: ``per_example_loss``, ``features`` (the pooled states, as the model's) and ``logits``.

    Build it with :meth:`from_model`; :meth:`top` gives one over fewer layers (same modules).

    Args:
        layers: the encoder layers run here, by their index in the model, consecutive.
        classifier: the linear head.
        first_layer: the first layer's index (the cached states are its input); needed when ``layers`` is empty.
        lr: Adam's learning rate in ``trainer.fit``.
        weight_decay: Adam's weight decay.

    Raises:
        ValueError: if the layer indices are not consecutive from ``first_layer``.

    Example::

        >>> from lightning_fastif.app.models import tiny_bert
        >>> head = CachedTopClassifier.from_model(tiny_bert(num_layers=2), first_layer=1)
        >>> head.patterns
        ['layer.1.*', 'classifier.*']
    """

    def __init__(
        self,
        layers: Mapping[int, nn.Module],
        classifier: nn.Linear,
        *,
        first_layer: int | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        indices = sorted(int(i) for i in layers)
        start = indices[0] if first_layer is None and indices else first_layer
        if start is None:
            raise ValueError("first_layer: needed when no layer is given (a head on the last layer's states)")
        if indices != list(range(start, start + len(indices))):
            raise ValueError(f"layers: expected consecutive layer indices from first_layer={start}, got {indices}")
        if not isinstance(classifier, nn.Linear):
            raise TypeError(f"classifier: expected an nn.Linear, got {type(classifier).__name__}")
        self.first_layer = int(start)
        self.num_classes = int(classifier.out_features)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.layer = nn.ModuleDict({str(i): layers[i] for i in indices})
        self.classifier = classifier

    @classmethod
    def from_model(
        cls, model: TextClassifier, first_layer: int, *, lr: float | None = None, weight_decay: float | None = None
    ) -> CachedTopClassifier:
        """The layers ``first_layer ..`` and the head of ``model`` (lr and weight decay default to the model's).

        Raises:
            ValueError: if ``first_layer`` is outside ``0 .. num_layers``.
        """
        if not (isinstance(first_layer, int) and 0 <= first_layer <= model.num_layers):
            raise ValueError(f"first_layer: expected an integer in [0, {model.num_layers}], got {first_layer!r}")
        blocks = model.encoder.encoder.layer
        return cls(
            {i: blocks[i] for i in range(first_layer, len(blocks))},
            model.classifier,
            first_layer=first_layer,
            lr=model.hparams.lr if lr is None else lr,
            weight_decay=model.hparams.weight_decay if weight_decay is None else weight_decay,
        )

    @property
    def last_layer(self) -> int:
        """One past the index of the last layer run here (the model's number of layers)."""
        return self.first_layer + len(self.layer)

    @property
    def patterns(self) -> list[str]:
        """Name patterns of every parameter here (the top layers and the head), for ``params=``."""
        return [f"layer.{i}.*" for i in self.layer] + ["classifier.*"]

    def top(self, first_layer: int) -> CachedTopClassifier:
        """A classifier over fewer top layers (from ``first_layer``), sharing the modules; feed it :meth:`cache`."""
        if not (isinstance(first_layer, int) and self.first_layer <= first_layer <= self.last_layer):
            raise ValueError(
                f"first_layer: expected an integer in [{self.first_layer}, {self.last_layer}], got {first_layer!r}"
            )
        layers = {int(k): v for k, v in self.layer.items() if int(k) >= first_layer}
        return CachedTopClassifier(
            layers, self.classifier, first_layer=first_layer, lr=self.lr, weight_decay=self.weight_decay
        )

    def _check(self, batch: Mapping[str, Tensor]) -> None:
        if "hidden_states" not in batch:
            raise KeyError(
                f"batch: expected a dict with 'hidden_states', 'attention_mask', 'labels' (a HiddenStates batch), got "
                f"keys {sorted(batch)}"
            )

    def embed(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Run the top layers and mean-pool over the mask: ``[B, hidden]``, the classifier's input."""
        if attention_mask is None:
            attention_mask = torch.ones(hidden_states.shape[:2], dtype=torch.long, device=hidden_states.device)
        extended = additive_attention_mask(attention_mask, hidden_states.dtype)
        for block in self.layer.values():
            hidden_states = block(hidden_states, extended)
        weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, num_classes]``."""
        return self.classifier(self.embed(hidden_states, attention_mask))

    def logits(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Logits ``[B, num_classes]`` of a :class:`HiddenStates` batch."""
        self._check(batch)
        return self(batch["hidden_states"], batch.get("attention_mask"))

    def per_example_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Cross-entropy of each example: ``Tensor[B]``."""
        return F.cross_entropy(self.logits(batch), batch["labels"], reduction="none")

    def features(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The pooled states ``[B, hidden]`` (the model's ``features``, so its snapshots index the same space)."""
        self._check(batch)
        return self.embed(batch["hidden_states"], batch.get("attention_mask"))

    @torch.no_grad()
    def cache(self, data: HiddenStates, first_layer: int, *, batch_size: int = 64) -> HiddenStates:
        """Run this module's layers below ``first_layer`` over ``data``: the input of :meth:`top` (``first_layer``)."""
        if data.layer != self.first_layer:
            raise ValueError(
                f"data: holds the input of layer {data.layer}, but this classifier starts at layer {self.first_layer}"
            )
        blocks = [b for k, b in self.layer.items() if int(k) < first_layer]
        states, masks, labels = [], [], []
        order, chunks = _in_length_order(data, collate_hidden_states, batch_size)
        with evaluating(self):
            for _, batch in chunks:
                hidden, mask = batch["hidden_states"], batch["attention_mask"]
                extended = additive_attention_mask(mask, hidden.dtype)
                for block in blocks:
                    hidden = block(hidden, extended)
                states.append(hidden)
                masks.append(mask)
                labels.append(batch["labels"])
        return _padded(states, masks, labels, first_layer, order)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.logits(batch)
        loss = F.cross_entropy(logits, batch["labels"])
        size = int(batch["labels"].shape[0])
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=size)
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        self.log("train/acc", acc, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)


# ----------------------------------------------------------------------------------------------------------------
# A trained text model, its cached states and its feature snapshot
# ----------------------------------------------------------------------------------------------------------------

ENCODERS = ("minilm", "tiny")
"""``"minilm"``: all-MiniLM-L6-v2 (offline); ``"tiny"``: a 2-layer random BERT (:func:`tiny_bert`), for CI."""


@dataclass
class TextRun:
    """A trained text classifier and what the experiments take from it.

    Attributes:
        datamodule: the :class:`~lightning_fastif.app.data.RottenTomatoesDataModule` (texts, cue flags).
        model: the :class:`~lightning_fastif.app.models.TextClassifier` (its top layers trained).
        head: a :class:`CachedTopClassifier` over the layers influence is taken over (and the head), sharing the
            model's modules.
        data: the head's inputs (cached hidden states) by split name, aligned with the data module's splits.
        snapshot: the ``FeatureSnapshot`` directory written at the end of training (kNN index over ``train``).
        info: settings, sizes, accuracies and seconds per stage (JSON-ready).
    """

    datamodule: Any
    model: TextClassifier
    head: CachedTopClassifier
    data: dict[str, HiddenStates]
    snapshot: Path
    info: dict[str, Any] = field(default_factory=dict)

    def loader(self, split: str, *, batch_size: int = 16, shuffle: bool = False) -> DataLoader:
        """A loader over the cached states of ``split`` (the dataset the engine and ``correct_errors`` take)."""
        if split not in self.data:
            raise KeyError(f"split: {split!r} is not cached (available: {sorted(self.data)})")
        return hidden_states_loader(self.data[split], batch_size=batch_size, shuffle=shuffle)


def build_text_classifier(
    encoder: str = "minilm", *, train_layers: int = 1, max_length: int = 64, lr: float = 5e-4, seed: int = 0
) -> TextClassifier:
    """A binary :class:`TextClassifier` on MiniLM (``"minilm"``) or on a tiny random BERT (``"tiny"``, CI).

    The head's random initialisation is seeded; the global RNG is left as it was.

    Raises:
        ValueError: for an unknown ``encoder``.
    """
    from lightning_fastif.app.models import tiny_bert

    if encoder not in ENCODERS:
        raise ValueError(f"encoder: expected one of {ENCODERS}, got {encoder!r}")
    if encoder == "tiny":
        return tiny_bert(num_classes=2, train_layers=train_layers, max_length=max_length, lr=lr, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TextClassifier(num_classes=2, train_layers=train_layers, max_length=max_length, lr=lr)


def train_text_model(
    out_dir: str | Path,
    *,
    encoder: str = "minilm",
    cue_word: str | None = "tuesday",
    max_train: int | None = 600,
    max_eval: int | None = 200,
    max_length: int = 64,
    train_layers: int = 1,
    influence_layers: int = 1,
    epochs: int = 3,
    lr: float = 5e-4,
    batch_size: int = 16,
    seed: int = 0,
) -> TextRun:
    """Fine-tune the top layers of a text classifier on Rotten Tomatoes (with a planted cue) with Lightning.

    The frozen prefix runs once per text (:func:`prefix_hidden_states`); ``trainer.fit`` trains a
    :class:`CachedTopClassifier` over the top ``train_layers`` layers and the head, with a ``FeatureSnapshot`` at
    the end of fit (the kNN index over the training set). The returned head covers the top ``influence_layers``
    layers, with their inputs cached for every split.

    Args:
        out_dir: where the snapshot goes (``<out_dir>/snapshot``).
        encoder: ``"minilm"`` or ``"tiny"``.
        cue_word: the planted word (a challenge split is built), or ``None`` for plain sentiment.
        max_train: training examples kept.
        max_eval: examples kept in each evaluation split.
        max_length: tokens per text.
        train_layers: top encoder layers fine-tuned (with the head).
        influence_layers: top layers influence is taken over (``<= train_layers``).
        epochs: training epochs.
        lr: Adam's learning rate.
        batch_size: training batch size.
        seed: seed of the split, the cue, the head's initialisation and the shuffling.

    Returns:
        A :class:`TextRun`.

    Raises:
        ValueError: if ``influence_layers`` is not in ``1 .. train_layers``.

    Example::

        >>> run = train_text_model("runs/text", encoder="tiny", max_train=64, epochs=1)  # doctest: +SKIP
        >>> run.info["accuracy"]["test"]  # doctest: +SKIP
    """
    from lightning.pytorch import seed_everything

    from lightning_fastif.app.data import RottenTomatoesDataModule
    from lightning_fastif.lightning.correction import accuracy
    from lightning_fastif.lightning.snapshots import FeatureSnapshot

    if not (isinstance(influence_layers, int) and 1 <= influence_layers <= train_layers):
        raise ValueError(
            f"influence_layers: expected an integer in [1, train_layers={train_layers}], got {influence_layers!r}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    dm = RottenTomatoesDataModule(
        cue_word=cue_word,
        max_train=max_train,
        max_eval=max_eval,
        max_length=max_length,
        batch_size=batch_size,
        seed=seed,
    )
    dm.setup("fit")
    model = build_text_classifier(encoder, train_layers=train_layers, max_length=max_length, lr=lr, seed=seed)
    seconds["load"] = time.perf_counter() - start

    start = time.perf_counter()
    splits = [s for s in ("train", "test", "challenge", "challenge_eval") if s in dm.splits]
    first = model.num_layers - train_layers
    prefix = {s: prefix_hidden_states(model, dm._dataset(s), first) for s in splits}
    seconds["frozen_prefix"] = time.perf_counter() - start

    start = time.perf_counter()
    seed_everything(seed, verbose=False)
    trained = CachedTopClassifier.from_model(model, first, lr=lr)
    snapshot = out / "snapshot"
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=[FeatureSnapshot(dirpath=snapshot, batch_size=64)],
    )
    trained.train()  # Hugging Face loads in eval mode; dropout is off either way (TextClassifier's default)
    trainer.fit(trained, hidden_states_loader(prefix["train"], batch_size=batch_size, shuffle=True))
    seconds["train"] = time.perf_counter() - start

    start = time.perf_counter()
    influence_first = model.num_layers - influence_layers
    head = trained.top(influence_first)
    data = {s: trained.cache(prefix[s], influence_first) for s in splits}
    seconds["cache_influence_inputs"] = time.perf_counter() - start
    head.eval()
    acc = {s: accuracy(head, hidden_states_loader(data[s], batch_size=64)) for s in splits if s != "train"}
    acc["train"] = accuracy(head, hidden_states_loader(data["train"], batch_size=64))
    info = {
        "encoder": encoder,
        "cue_word": cue_word,
        "sizes": {s: len(data[s]) for s in splits},
        "max_length": max_length,
        "train_layers": train_layers,
        "influence_layers": influence_layers,
        "influence_params": head.patterns,
        "num_influence_params": sum(p.numel() for p in head.parameters()),
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "accuracy": acc,
        "seconds": seconds,
    }
    if cue_word:
        info["cue_agreement"] = {s: dm.cue_agreement_of(s) for s in splits}
    return TextRun(dm, model, head, data, snapshot, info)


def fixed_lissa(
    model: nn.Module,
    train_data: Any,
    *,
    params: Any = None,
    damping: float = 0.01,
    recursion_depth: int = 10,
    batch_size: int = 2,
    seed: int = 0,
) -> Any:
    """A :class:`~lightning_fastif.core.ihvp.LiSSA` whose ``scale`` is estimated once here, so repeated solves (one per
    correction step, one per copy of the model) skip the power iterations (``scale="auto"`` redoes them for every
    new Hessian operator).

    Example::

        >>> ihvp = fixed_lissa(run.head, run.loader("train"), recursion_depth=10)  # doctest: +SKIP
        >>> ihvp.settings()["scale"]  # a number, no longer "auto"  # doctest: +SKIP
    """
    from lightning_fastif.core.hessian import HessianOperator
    from lightning_fastif.core.ihvp import LiSSA

    probe = LiSSA(damping=damping, batch_size=batch_size, seed=seed, scale_batches=4, power_iterations=10)
    with evaluating(model):
        scale = probe.resolve_scale(HessianOperator(model, None, train_data, params))
    return LiSSA(
        damping=damping,
        scale=scale,
        recursion_depth=recursion_depth,
        batch_size=batch_size,
        seed=seed,
        residual_examples=0,
    )


# ----------------------------------------------------------------------------------------------------------------
# Spurious cue: accuracy drop and FastIF's error correction
# ----------------------------------------------------------------------------------------------------------------

FASTIF_CORRECTION = "FastIF (BERT on MNLI, anchors from HANS): +2.5 to +2.6 HANS points with helpful, more than random"


def spurious_cue_experiment(
    run: TextRun,
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    selections: Sequence[str] = ("helpful", "harmful", "random"),
    num_steps: int = 5,
    lr: float = 0.05,
    top_m: int = 10,
    num_anchors: int = 10,
    num_candidates: int = 50,
    damping: float = 0.01,
    recursion_depth: int = 10,
    lissa_batch_size: int = 2,
) -> dict[str, Any]:
    """Test vs challenge accuracy of ``run``'s model, then error correction by each selection over ``seeds``.

    Every correction starts from a copy of the same trained weights and takes ``num_steps`` plain SGD steps of
    ``lr`` on ``top_m`` points per step (influence over ``run.head``'s parameters, kNN candidates around the mean
    feature of ``num_anchors`` anchors drawn from the challenge split, recomputed every step). Accuracy is measured
    on the disjoint ``challenge_eval`` split.

    Each run also records the fraction of the points it trained on that *contradict* the cue (rotten with the
    word, or fresh without it): the points that can undo it, ``cue_disagreeing_fraction_train`` of the training
    set.

    Returns:
        ``{"accuracy": {...}, "drop": test - challenge, "correction": {selection: {"gain_mean", "gain_std",
        "after_mean", "after_std", "before", "cue_disagreeing_fraction", "runs"}}, "settings": {...}, ...}``.

    Raises:
        KeyError: if ``run`` has no challenge split (it was trained without a cue word).

    Example::

        >>> run = train_text_model("runs/text")  # doctest: +SKIP
        >>> result = spurious_cue_experiment(run, seeds=(0, 1), num_steps=5)  # doctest: +SKIP
        >>> result["correction"]["helpful"]["gain_mean"]  # doctest: +SKIP
    """
    from lightning_fastif.lightning.arguments import ComputeArguments, CorrectionArguments
    from lightning_fastif.lightning.correction import accuracy, correct_errors
    from lightning_fastif.lightning.module import InfluenceModule

    if "challenge" not in run.data:
        raise KeyError("run: trained without a cue word, so it has no challenge split; pass cue_word to train it")
    start = time.perf_counter()
    train = run.loader("train")
    ihvp = fixed_lissa(
        run.head, train, damping=damping, recursion_depth=recursion_depth, batch_size=lissa_batch_size, seed=0
    )
    scale_seconds = time.perf_counter() - start
    anchors, evaluation = run.loader("challenge"), run.loader("challenge_eval", batch_size=64)
    before = accuracy(run.head, evaluation)
    disagreeing = run.datamodule.has_cue("train") != run.datamodule.labels_of("train").bool()
    table: dict[str, Any] = {}
    for selection in selections:
        runs = []
        for seed in seeds:
            # Every run starts from the same trained weights: a copy of the head (its layers and classifier).
            model = copy.deepcopy(run.head)
            influence = InfluenceModule(
                model,
                train_dataset=train,
                snapshot=run.snapshot,
                ihvp=ihvp,
                num_candidates=num_candidates,
                compute=ComputeArguments(batch_size=64, progress=False),
            )
            report = correct_errors(
                model,
                influence,
                anchors,
                steps=CorrectionArguments(num_anchors=num_anchors, top_m=top_m, num_steps=num_steps, lr=lr),
                selection=selection,
                seed=seed,
            )
            used = torch.as_tensor(report.used_indices, dtype=torch.long)
            runs.append(
                {
                    "seed": seed,
                    "before": before,
                    "after": accuracy(model, evaluation),
                    "seconds": report.seconds,
                    "cue_disagreeing_fraction": float(disagreeing[used].float().mean()),
                    "first_step_indices": report.steps[0].chosen_indices,
                    "first_step_scores": report.steps[0].chosen_scores,
                    "anchor_loss": [[s.anchor_loss_before, s.anchor_loss_after] for s in report.steps],
                }
            )
        gains = [r["after"] - r["before"] for r in runs]
        afters = [r["after"] for r in runs]
        table[selection] = {
            "before": before,
            "gain_mean": statistics.fmean(gains),
            "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
            "after_mean": statistics.fmean(afters),
            "after_std": statistics.stdev(afters) if len(afters) > 1 else 0.0,
            "cue_disagreeing_fraction": statistics.fmean(r["cue_disagreeing_fraction"] for r in runs),
            "seconds_per_run": statistics.fmean(r["seconds"] for r in runs),
            "runs": runs,
        }
    acc = run.info["accuracy"]
    return {
        "accuracy": {"test": acc["test"], "challenge": acc["challenge_eval"], "train": acc["train"]},
        "drop": acc["test"] - acc["challenge_eval"],
        "correction": table,
        "cue_disagreeing_fraction_train": float(disagreeing.float().mean()),
        "settings": {
            "seeds": list(seeds),
            "num_steps": num_steps,
            "lr": lr,
            "top_m": top_m,
            "num_anchors": num_anchors,
            "num_candidates": num_candidates,
            "ihvp": {"estimator": "lissa", **ihvp.settings()},
            "params": run.head.patterns,
        },
        "seconds": {"lissa_scale": scale_seconds, "correction": time.perf_counter() - start - scale_seconds},
        "fastif_reference": FASTIF_CORRECTION,
    }


# ----------------------------------------------------------------------------------------------------------------
# Simulatability and kNN recall: influence on the model's own predictions
# ----------------------------------------------------------------------------------------------------------------


def _with_labels(batch: Batch, labels: Tensor) -> Batch:
    if isinstance(batch, Mapping):
        return {**batch, "labels": labels}
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return type(batch)([*batch[:-1], labels])
    raise TypeError(f"batch: expected (x, y) or a dict with 'labels', got {type(batch).__name__}")


def _pick(n: int, count: int, seed: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(count, n)]


def influence_on_predictions(
    model: nn.Module,
    train_data: Any,
    test_data: Any,
    *,
    ihvp: Any,
    params: Any = None,
    num_test: int = 16,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, Tensor]:
    """Influence of every training point on the loss of the model's own prediction, for ``num_test`` test points.

    FastIF explains predictions: the test label is replaced by the model's predicted class, so a *helpful* point
    is one whose removal would make the model less sure of what it predicted. Every training point is scored
    (through :class:`~lightning_fastif.lightning.module.InfluenceModule` with ``num_candidates=None``; materialised
    per-example gradients, shared by all test points).

    Returns:
        ``{"test_indices": [T], "predictions": [T], "labels": [T], "scores": [T, N]}`` (scores by training index).

    Example::

        >>> found = influence_on_predictions(run.head, run.loader("train"), run.loader("test"),  # doctest: +SKIP
        ...                                  ihvp=fixed_lissa(run.head, run.loader("train")), num_test=8)
        >>> found["scores"].shape  # [8, N]  # doctest: +SKIP
    """
    from lightning_fastif.lightning.arguments import ComputeArguments
    from lightning_fastif.lightning.correction import predicted_labels
    from lightning_fastif.lightning.module import InfluenceModule

    source = IndexedData(test_data, name="test_data")
    indices = _pick(len(source), num_test, seed)
    batch = source.gather(indices)
    device = next(model.parameters()).device
    with evaluating(model), torch.no_grad():
        predictions = predicted_labels(model, move_batch(batch, device)).cpu()
    labels = _with_labels(batch, predictions)
    module = InfluenceModule(
        model,
        train_dataset=train_data,
        ihvp=ihvp,
        params=params,
        num_candidates=None,
        compute=ComputeArguments(score_method="grads", batch_size=batch_size, progress=False),
    )
    out = module.score_batch(labels)
    order = torch.argsort(out.candidates, dim=1)
    scores = torch.gather(out.scores.detach().cpu(), 1, order.cpu())
    true = batch["labels"] if isinstance(batch, Mapping) else batch[-1]
    return {"test_indices": indices, "predictions": predictions, "labels": true.cpu(), "scores": scores}


def _log_prob(model: nn.Module, batch: Batch, labels: Tensor) -> Tensor:
    logits = model.logits(batch)
    return torch.log_softmax(logits, dim=-1).gather(1, labels.view(-1, 1)).squeeze(1)


def simulatability_rates(
    model: nn.Module,
    train_data: Any,
    test_data: Any,
    found: Mapping[str, Tensor],
    *,
    k: int = 10,
    steps: int = 2,
    lr: float = 0.05,
    selections: Sequence[str] = ("helpful", "random", "harmful"),
    seed: int = 0,
) -> dict[str, Any]:
    """Fine-tune a copy of ``model`` on ``k`` training points per test point; does its prediction move toward its own?

    For each test point of ``found`` (from :func:`influence_on_predictions`) and each selection (the ``k`` most
    helpful, ``k`` random, the ``k`` most harmful training points), a fresh copy takes ``steps`` plain SGD steps of
    ``lr`` on the mean loss of those points (with their training labels). The outcome is the change of the log
    probability of the class the original model predicted: the *rate* is the fraction of test points where it rose.

    Returns:
        ``{"rates": {sel: fraction}, "mean_delta_log_prob": {sel: mean}, "std_delta_log_prob": {sel: std},
        "flips_away": {sel: fraction of predictions that changed}, "per_point": [...], "settings": {...}}``.

    Example::

        >>> rates = simulatability_rates(model, train, test, found, k=10)["rates"]  # doctest: +SKIP
        >>> rates["helpful"] > rates["random"]  # doctest: +SKIP
        True
    """
    train = IndexedData(train_data, name="train_data")
    test = IndexedData(test_data, name="test_data")
    device = next(model.parameters()).device
    scores = found["scores"]
    if k > scores.shape[1]:
        raise ValueError(f"k: {k} is larger than the {scores.shape[1]} training points")
    deltas: dict[str, list[float]] = {s: [] for s in selections}
    flips: dict[str, list[bool]] = {s: [] for s in selections}
    per_point = []
    for row, (index, predicted) in enumerate(zip(found["test_indices"].tolist(), found["predictions"].tolist())):
        x = move_batch(test.gather([index]), device)
        target = torch.tensor([predicted], device=device)
        with evaluating(model), torch.no_grad():
            before = float(_log_prob(model, x, target))
        point = {"test_index": index, "predicted": predicted, "log_prob_before": before}
        for selection in selections:
            if selection == "helpful":
                chosen = torch.topk(scores[row], k).indices
            elif selection == "harmful":
                chosen = torch.topk(-scores[row], k).indices
            elif selection == "random":
                chosen = _pick(scores.shape[1], k, seed * 100_003 + index)
            else:
                raise ValueError(f"selections: unknown selection {selection!r}; accepted: helpful, random, harmful")
            copy_ = copy.deepcopy(model)
            opt = torch.optim.SGD([p for p in copy_.parameters() if p.requires_grad], lr=lr)
            points = move_batch(train.gather(chosen), device)
            with evaluating(copy_), torch.enable_grad():
                for _ in range(steps):
                    opt.zero_grad()
                    copy_.per_example_loss(points).mean().backward()
                    opt.step()
            with evaluating(copy_), torch.no_grad():
                after = float(_log_prob(copy_, x, target))
                flipped = int(copy_.logits(x).argmax(-1)) != predicted
            deltas[selection].append(after - before)
            flips[selection].append(flipped)
            point[selection] = {"delta_log_prob": after - before, "flipped": flipped, "chosen": chosen.tolist()}
        per_point.append(point)
    return {
        "rates": {s: statistics.fmean(d > 0 for d in deltas[s]) for s in selections},
        "mean_delta_log_prob": {s: statistics.fmean(deltas[s]) for s in selections},
        "std_delta_log_prob": {s: statistics.stdev(deltas[s]) if len(deltas[s]) > 1 else 0.0 for s in selections},
        "flips_away": {s: statistics.fmean(flips[s]) for s in selections},
        "per_point": per_point,
        "settings": {"k": k, "steps": steps, "lr": lr, "num_test": len(per_point), "seed": seed},
    }


def knn_recall_curve(scores: Tensor, neighbours: Tensor, ks: Sequence[int], *, top: int = 10) -> dict[str, list[float]]:
    """Recall of each row's full-influence top-``top`` helpful and harmful points among its ``k`` nearest neighbours.

    Args:
        scores: ``[T, N]`` influence of every training point (by training index).
        neighbours: ``[T, N']`` training indices by distance, nearest first (``N' >= max(ks)``).
        ks: candidate counts.
        top: the size of the full-influence top set.

    Returns:
        ``{"helpful": [mean recall per k], "harmful": [...], "random": [k / N per k]}`` (mean over rows).

    Example::

        >>> scores = torch.tensor([[3.0, -1.0, 2.0, 0.0]])
        >>> knn_recall_curve(scores, torch.tensor([[2, 0, 1, 3]]), [1, 2], top=2)["helpful"]
        [0.5, 1.0]
    """
    n = scores.shape[1]
    if top > n:
        raise ValueError(f"top: {top} is larger than the {n} training points")
    helpful = torch.topk(scores, top, dim=1).indices
    harmful = torch.topk(-scores, top, dim=1).indices
    out: dict[str, list[float]] = {"helpful": [], "harmful": [], "random": []}
    for k in ks:
        if not (isinstance(k, int) and 1 <= k <= neighbours.shape[1]):
            raise ValueError(f"ks: {k!r} is outside 1..{neighbours.shape[1]}")
        near = neighbours[:, :k]
        for name, best in (("helpful", helpful), ("harmful", harmful)):
            hits = (best.unsqueeze(2) == near.unsqueeze(1)).any(dim=2).float().sum(dim=1) / top
            out[name].append(float(hits.mean()))
        out["random"].append(min(k, n) / n)
    return out


def knn_neighbours(run: TextRun, split: str, test_indices: Tensor) -> Tensor:
    """Every training index ordered by distance (nearest first) to each test point, in the snapshot's kNN index."""
    from lightning_fastif.search.knn import KNNIndex

    index = KNNIndex.from_snapshot(run.snapshot)
    batch = IndexedData(run.loader(split)).gather(test_indices)
    with evaluating(run.head), torch.no_grad():
        features = run.head.features(batch).float()
    return index.search(features, index.ntotal)[1]


def default_ks(n: int) -> list[int]:
    """Candidate counts ``1, 2, 5, 10, 20, 50, ...`` up to ``n`` (``n`` included)."""
    ks, base = [], 1
    while base <= n:
        ks += [m * base for m in (1, 2, 5) if m * base <= n]
        base *= 10
    return sorted({*ks, n})


def simulatability_experiment(
    model: nn.Module,
    train_data: Any,
    test_data: Any,
    *,
    ihvp: Any,
    params: Any = None,
    num_test: int = 16,
    k: int = 10,
    steps: int = 2,
    lr: float = 0.05,
    seed: int = 0,
    found: Mapping[str, Tensor] | None = None,
) -> dict[str, Any]:
    """:func:`influence_on_predictions` then :func:`simulatability_rates` (``found`` reuses computed scores)."""
    start = time.perf_counter()
    if found is None:
        found = influence_on_predictions(
            model, train_data, test_data, ihvp=ihvp, params=params, num_test=num_test, seed=seed
        )
    influence_seconds = time.perf_counter() - start
    out = simulatability_rates(model, train_data, test_data, found, k=k, steps=steps, lr=lr, seed=seed)
    out["seconds"] = {"influence": influence_seconds, "fine_tuning": time.perf_counter() - start - influence_seconds}
    out["test_accuracy_of_explained"] = float((found["predictions"] == found["labels"]).float().mean())
    return out


def knn_recall_experiment(
    run: TextRun,
    *,
    ihvp: Any,
    split: str = "test",
    num_test: int = 16,
    ks: Sequence[int] | None = None,
    top: int = 10,
    seed: int = 0,
    found: Mapping[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Recall of the full-influence top-``top`` points among the ``k`` nearest neighbours, for ``num_test`` points."""
    start = time.perf_counter()
    if found is None:
        found = influence_on_predictions(
            run.head, run.loader("train"), run.loader(split), ihvp=ihvp, num_test=num_test, seed=seed
        )
    influence_seconds = time.perf_counter() - start
    neighbours = knn_neighbours(run, split, found["test_indices"])
    n = neighbours.shape[1]
    ks = list(ks) if ks is not None else default_ks(n)
    curve = knn_recall_curve(found["scores"], neighbours, ks, top=top)
    return {
        "ks": ks,
        "recall": curve,
        "num_train": n,
        "num_test": int(found["scores"].shape[0]),
        "top": top,
        "seconds": {"influence": influence_seconds, "knn": time.perf_counter() - start - influence_seconds},
    }


# ----------------------------------------------------------------------------------------------------------------
# Digits: the second model of the simulatability experiment
# ----------------------------------------------------------------------------------------------------------------


def train_digits_model(*, epochs: int = 5, max_train: int | None = None, seed: int = 0) -> tuple[Any, Any]:
    """A digits classifier (:class:`~lightning_fastif.app.models.DigitsClassifier`) trained; ``(model, datamodule)``."""
    from lightning.pytorch import seed_everything

    from lightning_fastif.app.data import DigitsDataModule
    from lightning_fastif.app.models import DigitsClassifier

    dm = DigitsDataModule(seed=seed)
    dm.setup("fit")
    seed_everything(seed, verbose=False)
    model = DigitsClassifier()
    loader = dm.train_dataloader()
    if max_train is not None:
        subset = torch.utils.data.Subset(dm.train_dataset, range(min(max_train, len(dm.train_dataset))))
        loader = DataLoader(subset, batch_size=dm.batch_size, shuffle=True)
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    return model.eval(), dm


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically (tensors become lists)."""
    from lightning_fastif.io.results import jsonable

    return atomic_write_bytes(path, (json.dumps(jsonable(data), indent=2) + "\n").encode("utf-8"))


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8), atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def pm(mean: float, spread: float, scale: float = 100.0, digits: int = 1) -> str:
    """``"mean ± spread"`` in points (``scale=100``) with ``digits`` decimals."""
    return f"{mean * scale:+.{digits}f} ± {spread * scale:.{digits}f}"


def correction_rows(result: Mapping[str, Any]) -> list[str]:
    """Markdown table rows of a :func:`spurious_cue_experiment` result (accuracy in %, gains in points)."""
    rows = [
        "| selection | challenge acc. before | after (mean ± std) | gain, points (mean ± std) | seeds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for selection, entry in result["correction"].items():
        rows.append(
            f"| {selection} | {entry['before'] * 100:.1f} | {entry['after_mean'] * 100:.1f} ± "
            f"{entry['after_std'] * 100:.1f} | {pm(entry['gain_mean'], entry['gain_std'])} | {len(entry['runs'])} |"
        )
    return rows


def simulatability_rows(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown rows: per model, the rate and mean change of the log probability per selection."""
    rows = [
        "| model | selection | rate (p of own prediction rose) | mean Δ log p ± std | predictions flipped "
        "| test points |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in results.items():
        for selection, rate in result["rates"].items():
            rows.append(
                f"| {name} | {selection} | {rate:.2f} | {result['mean_delta_log_prob'][selection]:+.4f} ± "
                f"{result['std_delta_log_prob'][selection]:.4f} | {result['flips_away'][selection]:.2f} | "
                f"{result['settings']['num_test']} |"
            )
    return rows


def recall_rows(result: Mapping[str, Any]) -> list[str]:
    """Markdown rows: recall of the top helpful/harmful points at each ``k``, with the random baseline."""
    rows = ["| k | helpful | harmful | random (k/N) |", "| --- | --- | --- | --- |"]
    for i, k in enumerate(result["ks"]):
        r = result["recall"]
        rows.append(f"| {k} | {r['helpful'][i]:.2f} | {r['harmful'][i]:.2f} | {r['random'][i]:.3f} |")
    return rows


def plot_rates(results: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Grouped bars: the simulatability rate of each selection, per model (helpful/random/harmful colours)."""
    from matplotlib.figure import Figure

    from lightning_fastif.app.plots import HARMFUL_COLOR, HELPFUL_COLOR, RANDOM_COLOR
    from lightning_fastif.io.atomic import atomic_path

    colors = {"helpful": HELPFUL_COLOR, "random": RANDOM_COLOR, "harmful": HARMFUL_COLOR}
    names = list(results)
    selections = list(next(iter(results.values()))["rates"])
    fig = Figure(figsize=(1.8 + 1.9 * len(names), 3.6))
    ax = fig.subplots()
    width = 0.8 / len(selections)
    for j, selection in enumerate(selections):
        xs = [i + (j - (len(selections) - 1) / 2) * width for i in range(len(names))]
        values = [results[n]["rates"][selection] for n in names]
        ax.bar(xs, values, width, label=selection, color=colors.get(selection, "#333333"))
        for x, v in zip(xs, values):
            ax.text(x, v + 0.02, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(0.5, color="#999999", linewidth=0.8, linestyle=":")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1.3)  # room above the bars for the legend
    ax.set_ylabel("fraction of test points")
    ax.set_title("Fine-tuning on k points raises p(own prediction)", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncols=len(selections), frameon=False)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def _example_rows(run: TextRun, indices: Sequence[int], scores: Sequence[float] | None = None) -> list[str]:
    from lightning_fastif.app.report import escape_markdown
    from lightning_fastif.app.text_explanations import shorten_text

    dm = run.datamodule
    labels = dm.labels_of("train")
    cue = dm.has_cue("train") if dm.cue_word else None
    rows = ["| train index | label | cue word | score | text |", "| --- | --- | --- | --- | --- |"]
    texts = dm.texts_of("train", list(indices))
    for j, (i, text) in enumerate(zip(indices, texts)):
        label = "fresh" if int(labels[i]) == 1 else "rotten"
        flag = "—" if cue is None else ("yes" if bool(cue[i]) else "no")
        score = "—" if scores is None else f"{scores[j]:+.3g}"
        rows.append(f"| {i} | {label} | {flag} | {score} | {escape_markdown(shorten_text(text, 160))} |")
    return rows


def write_spurious_cue_report(out_dir: str | Path, run: TextRun, result: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``spurious_cue.json``, ``spurious_cue.md`` and ``spurious_cue_correction.png`` into ``out_dir``."""
    from lightning_fastif.app.plots import plot_accuracy_bars

    out = Path(out_dir)
    table = result["correction"]
    labels = list(table)
    png = plot_accuracy_bars(
        labels,
        [table[s]["before"] for s in labels],
        [table[s]["after_mean"] for s in labels],
        out / "spurious_cue_correction.png",
        errors=[table[s]["after_std"] for s in labels],
        title=f"Challenge accuracy, {result['settings']['num_steps']} correction steps, "
        f"{len(result['settings']['seeds'])} seeds",
    )
    info, acc, settings = run.info, result["accuracy"], result["settings"]
    lines = [
        "# Spurious cue on text (HANS-style), and FastIF's error correction",
        "",
        f"Model: {info['encoder']} ({info['train_layers']} top layer(s) + head fine-tuned, {info['epochs']} epochs, "
        f"max length {info['max_length']}); influence over `{', '.join(info['influence_params'])}` "
        f"({info['num_influence_params']:,} parameters). Data: Rotten Tomatoes, cue word `{info['cue_word']}` agreeing "
        f"with *fresh* on {info['cue_agreement']['train'] * 100:.0f}% of {info['sizes']['train']} training snippets, "
        f"reversed on the challenge split ({info['sizes']['challenge']} anchors, {info['sizes']['challenge_eval']} for "
        "evaluation).",
        "",
        "| split | accuracy (%) |",
        "| --- | --- |",
        f"| train | {acc['train'] * 100:.1f} |",
        f"| test (in distribution) | {acc['test'] * 100:.1f} |",
        f"| challenge (cue reversed) | {acc['challenge'] * 100:.1f} |",
        "",
        f"Drop from test to challenge: **{result['drop'] * 100:.1f} points**.",
        "",
        f"## Correction: {settings['num_steps']} SGD step(s) (lr {settings['lr']}) on the top {settings['top_m']} "
        f"points for {settings['num_anchors']} anchors, kNN k = {settings['num_candidates']}, "
        f"{len(settings['seeds'])} seeds from the same weights",
        "",
        *correction_rows(result),
        "",
        f"Reference: {result['fastif_reference']}.",
        "",
        "Points that contradict the cue (rotten with the word, or fresh without it) among those trained on: "
        + ", ".join(f"{s} {table[s]['cue_disagreeing_fraction'] * 100:.0f}%" for s in labels)
        + f" (training set: {result['cue_disagreeing_fraction_train'] * 100:.0f}%).",
        "",
        f"![correction]({png.name})",
    ]
    first = table.get("helpful", {}).get("runs", [])
    if first:
        lines += [
            "",
            f"## The most helpful training points of the first step (seed {first[0]['seed']})",
            "",
            *_example_rows(run, first[0]["first_step_indices"], first[0]["first_step_scores"]),
        ]
    md = write_text(out / "spurious_cue.md", "\n".join(lines) + "\n")
    js = write_json(out / "spurious_cue.json", {"run": run.info, "experiment": result})
    return {"json": js, "markdown": md, "png": png}


def write_simulatability_report(
    out_dir: str | Path, results: Mapping[str, Mapping[str, Any]], models: Mapping[str, Any]
) -> dict[str, Path]:
    """Write ``simulatability.json``, ``.md`` and ``.png``; ``models`` describes each model (JSON-ready)."""
    out = Path(out_dir)
    png = plot_rates(results, out / "simulatability.png")
    lines = [
        "# Simulatability: do the most helpful training points move the model toward its own prediction?",
        "",
        "For each test point, influence is taken on the loss of the class the model predicted. A copy of the model "
        "is fine-tuned on the k most helpful, k random or the k most harmful training points (plain SGD, with their "
        "training labels); the rate is the fraction of test points whose predicted class became more probable.",
        "",
        *simulatability_rows(results),
        "",
        *(
            f"- {name}: k = {r['settings']['k']}, {r['settings']['steps']} steps, lr {r['settings']['lr']}; "
            f"influence {r['seconds']['influence']:.0f} s, fine-tuning {r['seconds']['fine_tuning']:.0f} s; "
            f"{models[name]}"
            for name, r in results.items()
        ),
        "",
        f"![rates]({png.name})",
    ]
    md = write_text(out / "simulatability.md", "\n".join(lines) + "\n")
    slim = {n: {k: v for k, v in r.items() if k != "per_point"} for n, r in results.items()}
    js = write_json(out / "simulatability.json", {"models": models, "results": slim, "per_point": results})
    return {"json": js, "markdown": md, "png": png}


def write_knn_recall_report(out_dir: str | Path, run: TextRun, result: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``knn_recall.json``, ``knn_recall.md`` and ``knn_recall.png`` into ``out_dir``."""
    from lightning_fastif.app.plots import plot_recall_curve

    out = Path(out_dir)
    recall = result["recall"]
    png = plot_recall_curve(
        result["ks"],
        {"top-10 helpful": recall["helpful"], "top-10 harmful": recall["harmful"]},
        out / "knn_recall.png",
        random_baseline=result["num_train"],
        top=result["top"],
    )
    lines = [
        "# kNN recall of the most influential training points",
        "",
        f"Model: {run.info['encoder']}, influence over `{', '.join(run.info['influence_params'])}`. For "
        f"{result['num_test']} test points, every one of the {result['num_train']} training points is scored (the "
        f"original influence functions); the table gives the fraction of the top {result['top']} helpful (harmful) "
        "points found among the k nearest training points in the snapshot's feature space (mean over test points).",
        "",
        *recall_rows(result),
        "",
        f"![recall]({png.name})",
    ]
    md = write_text(out / "knn_recall.md", "\n".join(lines) + "\n")
    js = write_json(out / "knn_recall.json", {"run": run.info, "experiment": result})
    return {"json": js, "markdown": md, "png": png}


# ----------------------------------------------------------------------------------------------------------------
# Settings shared by the example scripts and the benchmark
# ----------------------------------------------------------------------------------------------------------------

TRAIN_FULL: dict[str, Any] = {
    "encoder": "minilm",
    "cue_word": "tuesday",
    "max_train": 800,
    "max_eval": 200,
    "max_length": 64,
    "train_layers": 2,
    "influence_layers": 1,
    "epochs": 3,
    "lr": 5e-4,
}
"""The real run: MiniLM, top 2 layers + head fine-tuned on 800 snippets, influence over the top layer + head."""

TRAIN_SMALL: dict[str, Any] = {**TRAIN_FULL, "max_train": 48, "max_eval": 24, "train_layers": 1, "epochs": 1}
"""The CI size (seconds on MiniLM; ``encoder="tiny"`` for a random 2-layer BERT)."""

CUE_FULL: dict[str, Any] = {
    "seeds": (0, 1, 2, 3, 4),
    "num_steps": 10,
    "lr": 0.05,
    "top_m": 10,
    "num_anchors": 10,
    "num_candidates": 100,
    "recursion_depth": 10,
    "lissa_batch_size": 4,
}
"""FastIF's correction (10 anchors, 10 points, 10 steps) over 5 seeds; the lr is ours (plain SGD on one layer)."""

CUE_SMALL: dict[str, Any] = {
    **CUE_FULL,
    "seeds": (0, 1),
    "num_steps": 1,
    "top_m": 4,
    "num_anchors": 4,
    "num_candidates": 12,
    "recursion_depth": 2,
    "lissa_batch_size": 2,
}

EXPLAIN_FULL: dict[str, Any] = {
    "num_test": 16,
    "k": 10,
    "steps": 2,
    "lr": 0.05,
    "recursion_depth": 10,
    "lissa_batch_size": 4,
}
"""Simulatability and kNN recall on the text model: 16 test points, every training point scored."""

EXPLAIN_SMALL: dict[str, Any] = {**EXPLAIN_FULL, "num_test": 3, "k": 4, "steps": 1, "recursion_depth": 2}

DIGITS_FULL: dict[str, Any] = {"num_test": 50, "k": 10, "steps": 2, "lr": 0.05, "recursion_depth": 100, "epochs": 5}
"""Simulatability on the digits CNN (all 9,802 parameters)."""

DIGITS_SMALL: dict[str, Any] = {**DIGITS_FULL, "num_test": 4, "k": 4, "recursion_depth": 5, "epochs": 1}


def add_text_arguments(parser: Any, default_out: str) -> None:
    """The command-line options every text example shares (``--small``, ``--out``, model and data sizes)."""
    parser.add_argument("--small", action="store_true", help="CI size: a few dozen examples, seconds")
    parser.add_argument("--out", default=default_out, help=f"output directory (default {default_out})")
    parser.add_argument("--encoder", choices=ENCODERS, default=None, help="minilm (default) or tiny (random BERT)")
    parser.add_argument("--max-train", type=int, default=None, help="training snippets kept")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs")
    parser.add_argument("--cue-word", default=None, help="the planted word (default 'tuesday')")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, cue and training")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")


def train_settings(args: Any) -> dict[str, Any]:
    """:func:`train_text_model` keyword arguments from the parsed options (``--small`` picks the CI defaults)."""
    settings = dict(TRAIN_SMALL if args.small else TRAIN_FULL)
    for key in ("encoder", "max_train", "epochs", "cue_word"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    settings["seed"] = args.seed
    return settings
