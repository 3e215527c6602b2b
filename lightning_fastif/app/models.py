"""Classifiers for the demonstrations: a small CNN on digits, a logistic regression, and MiniLM with a linear head.

Every model here follows the conventions the influence engine relies on:

* ``forward`` returns logits ``[B, C]``;
* ``per_example_loss(batch) -> Tensor[B]`` is the cross-entropy of each example (no reduction, no regulariser);
* ``features(batch) -> Tensor[B, D]`` is the input of the final layer (the default kNN features);
* the final layer is a ``nn.Linear`` named ``classifier``, so ``"classifier.*"`` selects it;
* batches are ``(x, y)`` tuples (digits, logistic regression) or dicts ``{"input_ids", "attention_mask",
  "labels"}`` (text);
* ``training_step``/``validation_step``/``test_step`` log ``<stage>/loss`` and ``<stage>/acc`` (torchmetrics).

Dropout is off by default everywhere: influence treats the loss as a deterministic function of the parameters.
``transformers`` is optional, imported by :class:`TextClassifier` only.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_fastif.app.data.labels import labels_of
from lightning_fastif.errors import ArgumentError, check_choice, check_int, check_number

Batch = Any

_OPTIMIZERS = ("adam", "sgd", "lbfgs")


class _Classifier(LightningModule):
    """Steps, metrics and the per-example loss shared by the classifiers (subclasses define ``logits``)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        check_int("num_classes", num_classes, minimum=2)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    @abstractmethod
    def logits(self, batch: Batch) -> Tensor:
        """Logits ``[B, C]`` of the examples of ``batch`` (each subclass defines it)."""
        raise NotImplementedError(f"{type(self).__name__} must define logits(batch) -> Tensor[B, C]")

    def per_example_loss(self, batch: Batch) -> Tensor:
        """Cross-entropy of each example of ``batch``: ``Tensor[B]`` (no reduction, no regulariser).

        Example::

            >>> model = DigitsClassifier()
            >>> model.per_example_loss((torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2]))).shape
            torch.Size([3])
        """
        return F.cross_entropy(self.logits(batch), labels_of(batch), reduction="none")

    def regularizer(self) -> Tensor:
        """The penalty added to the mean loss in training (zero unless a subclass puts its L2 in the loss)."""
        return torch.zeros((), device=self.device)

    def _step(self, batch: Batch, stage: str) -> Tensor:
        logits = self.logits(batch)
        labels = labels_of(batch)
        loss = F.cross_entropy(logits, labels) + self.regularizer()
        metric = getattr(self, f"{stage}_acc")
        metric(logits.detach(), labels)
        size = int(labels.shape[0])
        training = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=training, on_epoch=True, batch_size=size, sync_dist=not training)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, batch_size=size, prog_bar=not training)
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self.logits(batch).argmax(dim=-1)

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self._trainable(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class DigitsClassifier(_Classifier):
    """A small CNN for 8x8 digits (9,802 parameters with the defaults): ~97% test accuracy after 5 epochs.

    ``conv`` (3x3 convolution to ``conv1_channels``, ReLU, 3x3 convolution to ``conv2_channels``, ReLU, 2x2
    max-pool) -> flatten -> ``hidden`` (linear to ``hidden_dim``, ReLU) -> [dropout] -> ``classifier`` (linear to
    ``num_classes``). The parameter names are ``conv.0.*``, ``conv.2.*``, ``hidden.*`` and ``classifier.*``;
    :meth:`features` returns the ``hidden_dim`` activations the classifier reads.

    Args:
        num_classes: number of classes.
        conv1_channels: output channels of the first convolution.
        conv2_channels: output channels of the second convolution.
        hidden_dim: width of the penultimate layer (the feature dimension).
        lr: Adam's learning rate.
        weight_decay: Adam's (coupled, L2) weight decay.
        dropout: dropout before the classifier in training (0 by default: influence is cleaner without).

    Example::

        >>> model = DigitsClassifier()
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> model(x).shape, model.features((x, y)).shape
        (torch.Size([4, 10]), torch.Size([4, 32]))
    """

    def __init__(
        self,
        num_classes: int = 10,
        conv1_channels: int = 8,
        conv2_channels: int = 16,
        hidden_dim: int = 32,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(num_classes)
        for name, value in (("conv1_channels", conv1_channels), ("conv2_channels", conv2_channels)):
            check_int(name, value)
        check_int("hidden_dim", hidden_dim)
        check_number("lr", lr, low=0.0, low_open=True)
        check_number("weight_decay", weight_decay, low=0.0)
        check_number("dropout", dropout, low=0.0, high=1.0, high_open=True)
        self.save_hyperparameters()
        self.conv = nn.Sequential(
            nn.Conv2d(1, conv1_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(conv1_channels, conv2_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.hidden = nn.Linear(conv2_channels * 4 * 4, hidden_dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """Penultimate activations ``[B, hidden_dim]`` of images ``[B, 1, 8, 8]`` (or flat ``[B, 64]``)."""
        x = x.reshape(-1, 1, 8, 8)
        return F.relu(self.hidden(self.conv(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, 1, 8, 8]``."""
        return self.classifier(self.dropout(self.embed(x)))

    def logits(self, batch: Batch) -> Tensor:
        return self(batch[0])

    def features(self, batch: Batch) -> Tensor:
        """The classifier's input for each example: ``Tensor[B, hidden_dim]``."""
        return self.embed(batch[0])


class LogisticRegression(_Classifier):
    """Multinomial logistic regression, for convex checks (exact Hessian, leave-one-out retraining).

    A single ``nn.Linear`` named ``classifier``. With ``num_classes=2`` it has *one* logit ``z`` (the usual binary
    model, strictly convex with ``weight_decay > 0``) and returns logits ``[0, z]``, whose cross-entropy equals
    the binary logistic loss. Inputs are flattened, so digits images work too.

    The training objective is ``mean(per_example_loss) + weight_decay / 2 * ||W||^2`` (bias not penalised),
    with the penalty in the loss (see :meth:`regularizer`) so every optimizer, L-BFGS included, minimises the
    same function. The Hessian of that objective is the mean per-example Hessian plus ``weight_decay`` on the
    weights.

    Args:
        in_features: input dimension.
        num_classes: number of classes (2: a single logit).
        lr: learning rate.
        weight_decay: L2 coefficient (see above).
        optimizer: ``"adam"``, ``"sgd"`` or ``"lbfgs"`` (full-batch L-BFGS with strong-Wolfe line search: use one
            batch holding the whole training set to reach the optimum in a few steps).
        bias: learn a bias.

    Example::

        >>> model = LogisticRegression(in_features=30, weight_decay=1e-2)
        >>> model(torch.randn(5, 30)).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int = 2,
        lr: float = 0.1,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        bias: bool = True,
    ) -> None:
        super().__init__(num_classes)
        check_int("in_features", in_features)
        check_number("lr", lr, low=0.0, low_open=True)
        check_number("weight_decay", weight_decay, low=0.0)
        check_choice("optimizer", optimizer, _OPTIMIZERS)
        self.save_hyperparameters()
        self.classifier = nn.Linear(in_features, 1 if num_classes == 2 else num_classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of inputs ``[B, in_features]`` (further dimensions are flattened)."""
        z = self.classifier(x.flatten(1))
        return torch.cat([torch.zeros_like(z), z], dim=-1) if self.hparams.num_classes == 2 else z

    def logits(self, batch: Batch) -> Tensor:
        return self(batch[0])

    def features(self, batch: Batch) -> Tensor:
        """The classifier's input: the flattened inputs ``[B, in_features]``."""
        return batch[0].flatten(1)

    def regularizer(self) -> Tensor:
        """``weight_decay / 2 * ||W||^2``, the L2 penalty of the training objective."""
        return 0.5 * self.hparams.weight_decay * self.classifier.weight.pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params, lr = self._trainable(), self.hparams.lr
        if self.hparams.optimizer == "lbfgs":
            # Tight tolerances: L-BFGS is used to reach the exact optimum that influence checks compare against.
            return torch.optim.LBFGS(
                params, lr=lr, max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe"
            )
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr)
        return torch.optim.Adam(params, lr=lr)


def additive_attention_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Turn a ``[B, L]`` 0/1 mask into the ``[B, 1, 1, L]`` additive float mask BERT's attention adds to scores.

    Hugging Face's BERT passes a 4-D float mask through unchanged, skipping the mask utilities whose
    data-dependent check (``padding_mask.all()``) breaks ``torch.func.vmap``.

    Example::

        >>> mask = additive_attention_mask(torch.tensor([[1, 0]]), torch.float32)
        >>> mask.shape, (mask < -1e30).flatten().tolist()
        (torch.Size([1, 1, 1, 2]), [False, True])
    """
    mask = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


class TextClassifier(_Classifier):
    """A BERT encoder (all-MiniLM-L6-v2 by default, offline) with mean pooling and a linear head.

    The embeddings and all but the top ``train_layers`` encoder layers are frozen (``requires_grad=False``). The
    encoder is loaded with ``attn_implementation="eager"``, the attention that supports forward-mode AD (JVP) and
    double backward (HVP); no pooler is built (mean pooling is used instead). Parameter names:

    * ``encoder.embeddings.*`` (frozen),
    * ``encoder.encoder.layer.{i}.*`` for ``i`` in ``0..num_layers-1`` (MiniLM: 0..5; trainable when
      ``i >= num_layers - train_layers``, e.g. ``encoder.encoder.layer.5.*`` and ``encoder.encoder.layer.4.*``
      with the default 2),
    * ``classifier.weight``, ``classifier.bias`` (trainable).

    The 2-D attention mask is turned into a 4-D additive float mask before the encoder, so ``torch.func.vmap``
    of per-example gradients works (see :func:`additive_attention_mask`).

    Args:
        num_classes: number of classes.
        model_path: a folder with a BERT ``config.json`` and weights; ``None`` for all-MiniLM-L6-v2
            (:func:`lightning_fastif.app.data.minilm_path`).
        encoder_config: keyword arguments of a ``transformers.BertConfig`` for a randomly initialised encoder
            instead of pretrained weights (see :func:`tiny_bert`); ``model_path`` is then ignored.
        train_layers: number of top encoder layers to fine-tune, from 0 (head only) to the number of layers.
        lr: Adam's learning rate.
        weight_decay: Adam's weight decay.
        dropout: dropout of the encoder's hidden states and attention probabilities (0: deterministic losses).
        max_length: the tokenised length :meth:`tokenize` truncates to.

    Raises:
        ImportError: if ``transformers`` is not installed.

    Example::

        >>> model = tiny_bert(num_classes=3)
        >>> batch = {"input_ids": torch.randint(1, 100, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long),
        ...          "labels": torch.tensor([0, 2])}
        >>> model.per_example_loss(batch).shape, model.features(batch).shape
        (torch.Size([2]), torch.Size([2, 32]))
    """

    def __init__(
        self,
        num_classes: int = 2,
        model_path: str | None = None,
        encoder_config: dict[str, Any] | None = None,
        train_layers: int = 2,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        dropout: float = 0.0,
        max_length: int = 64,
    ) -> None:
        super().__init__(num_classes)
        check_number("lr", lr, low=0.0, low_open=True)
        check_number("weight_decay", weight_decay, low=0.0)
        check_number("dropout", dropout, low=0.0, high=1.0, high_open=True)
        check_int("max_length", max_length, minimum=4)
        self.save_hyperparameters()
        self.encoder = _build_encoder(model_path, encoder_config, dropout)
        num_layers = len(self.encoder.encoder.layer)
        if check_int("train_layers", train_layers, minimum=0) > num_layers:
            raise ArgumentError(
                f"train_layers: expected an integer in [0, {num_layers}] (the encoder has {num_layers} layers), got "
                f"{train_layers!r}"
            )
        self.classifier = nn.Linear(self.encoder.config.hidden_size, num_classes)
        self.encoder.requires_grad_(False)
        for layer in self.encoder.encoder.layer[num_layers - train_layers :]:
            layer.requires_grad_(True)
        self._tokenizer: Any = None

    @property
    def num_layers(self) -> int:
        """Number of encoder layers."""
        return len(self.encoder.encoder.layer)

    @property
    def trainable_patterns(self) -> list[str]:
        """Name patterns of the trainable parameters, for ``select_parameters`` (e.g. influence over them)."""
        top = range(self.num_layers - self.hparams.train_layers, self.num_layers)
        return [f"encoder.encoder.layer.{i}.*" for i in top] + ["classifier.*"]

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Mean-pooled token states over the attention mask: ``[B, hidden]``, the classifier's input."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        dtype = self.classifier.weight.dtype
        states = self.encoder(
            input_ids=input_ids, attention_mask=additive_attention_mask(attention_mask, dtype)
        ).last_hidden_state
        weights = attention_mask.to(states.dtype).unsqueeze(-1)
        return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, num_classes]`` of token ids ``[B, L]`` and their 0/1 ``attention_mask`` ``[B, L]``."""
        return self.classifier(self.embed(input_ids, attention_mask))

    def logits(self, batch: Batch) -> Tensor:
        return self(batch["input_ids"], batch.get("attention_mask"))

    def features(self, batch: Batch) -> Tensor:
        """The pooled embedding of each example (the classifier's input): ``Tensor[B, hidden]``."""
        return self.embed(batch["input_ids"], batch.get("attention_mask"))

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Tokenise ``texts`` with the encoder's tokenizer (MiniLM's for :func:`tiny_bert`) to ``max_length``."""
        if self._tokenizer is None:
            from lightning_fastif.app.data import load_tokenizer

            path = self.hparams.model_path if self.hparams.encoder_config is None else None
            self._tokenizer = load_tokenizer(path)
        encoded = self._tokenizer(
            texts, padding=True, truncation=True, max_length=self.hparams.max_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _build_encoder(model_path: str | None, encoder_config: dict[str, Any] | None, dropout: float) -> nn.Module:
    # Nothing may reach a model hub: the offline flag must be set before huggingface_hub reads it at import.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModel, BertConfig, BertModel
        from transformers.utils import logging as hf_logging
    except ImportError as err:
        raise ImportError(
            "TextClassifier needs `transformers`: `pip install transformers` (or `pip install lightning-fastif[text]`)"
        ) from err
    overrides = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    if encoder_config is not None:
        config = BertConfig(**{**dict(encoder_config), **overrides})
        config._attn_implementation = "eager"
        return BertModel(config, add_pooling_layer=False)
    from lightning_fastif.app.data import minilm_path

    path = Path(model_path) if model_path is not None else minilm_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model_path: {str(path)!r} holds no config.json; pass a BERT model folder or None")
    # The checkpoint's pooler weights are unused (mean pooling): silence that notice and the loading bar only.
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return AutoModel.from_pretrained(str(path), attn_implementation="eager", add_pooling_layer=False, **overrides)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def tiny_bert(
    num_classes: int = 2,
    *,
    num_layers: int = 2,
    hidden_size: int = 32,
    num_heads: int = 2,
    intermediate_size: int = 64,
    vocab_size: int = 30522,
    max_position_embeddings: int = 128,
    train_layers: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> TextClassifier:
    """A :class:`TextClassifier` on a small randomly initialised BERT (no download), for fast tests.

    Same structure and parameter names as the MiniLM model (``encoder.encoder.layer.{i}.*``, ``classifier.*``);
    the default ``vocab_size`` is MiniLM's, so batches tokenised by the text data modules fit.

    Args:
        num_classes: number of classes.
        num_layers: encoder layers.
        hidden_size: hidden width (the feature dimension).
        num_heads: attention heads (must divide ``hidden_size``).
        intermediate_size: feed-forward width.
        vocab_size: vocabulary size.
        max_position_embeddings: longest sequence.
        train_layers: top layers to train (default: all of them).
        seed: seed of the random initialisation (the global RNG is left untouched).
        **kwargs: further :class:`TextClassifier` arguments (``lr``, ``dropout``, ``max_length``, ...).

    Example::

        >>> tiny_bert().trainable_patterns
        ['encoder.encoder.layer.0.*', 'encoder.encoder.layer.1.*', 'classifier.*']
    """
    config = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TextClassifier(
            num_classes=num_classes,
            encoder_config=config,
            train_layers=num_layers if train_layers is None else train_layers,
            **kwargs,
        )
