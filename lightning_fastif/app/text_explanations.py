"""Text examples explained in words: a test text, its true and predicted labels, and its most helpful and most
harmful training texts, as Markdown or as :mod:`lightning_fastif.app.report` blocks. **Positive score = helpful.**

Texts are data: they are cleaned (HTML entities and ``<br />`` tags of review corpora), cut at a word boundary and
escaped, so a ``|`` or ``*`` in a review can neither break a table nor turn into formatting.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from lightning_fastif.app.plots.figure import format_score
from lightning_fastif.app.report import Block, Heading, Paragraph, Quote, Table, escape_markdown, render_markdown
from lightning_fastif.errors import ArgumentError, check_int

__all__ = ["format_text_explanation", "shorten_text", "text_explanation_blocks"]


_TAG = re.compile(r"<\s*br\s*/?\s*>|<\s*/?\s*(p|i|b|em|strong)\s*>", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def shorten_text(text: Any, max_chars: int = 300) -> str:
    """Clean a text for display (HTML entities decoded, ``<br />`` tags and runs of whitespace collapsed) and cut
    it at a word boundary to at most ``max_chars`` characters, ending with ``…`` when cut.

    Example::

        >>> shorten_text("A &quot;great&quot; film.<br /><br />Truly   great, and long.", 30)
        'A "great" film. Truly great…'
    """
    max_chars = check_int("max_chars", max_chars)
    clean = _SPACE.sub(" ", _TAG.sub(" ", html.unescape(str(text)))).strip()
    if len(clean) <= max_chars:
        return clean
    cut = clean[: max_chars - 1]
    space = cut.rfind(" ")
    if space >= max_chars // 2:  # a word boundary not too far back; otherwise cut inside the (very long) word
        cut = cut[:space]
    return cut.rstrip(" ,;:-") + "…"


def _examples(value: Any, name: str) -> list[tuple[str, Any, float, int | None]]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ArgumentError(f"{name}: expected a list of (text, label, score) or (text, label, score, index) tuples")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) not in (3, 4):
            raise ArgumentError(
                f"{name}[{i}]: expected (text, label, score) or (text, label, score, index), got {item!r:.80}"
            )
        score = item[2].item() if isinstance(item[2], Tensor) else item[2]
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            raise ArgumentError(f"{name}[{i}]: the score (third entry) must be a number, got {score!r}")
        index = item[3] if len(item) == 4 else None
        index = int(index.item() if isinstance(index, Tensor) else index) if index is not None else None
        out.append((str(item[0]), item[1], float(score), index))
    return out


def _label_text(label: Any) -> str:
    return str(label.item() if isinstance(label, Tensor) and label.numel() == 1 else label)


def text_explanation_blocks(
    test_text: str,
    test_label: Any,
    predicted: Any,
    helpful: Sequence[Sequence[Any]],
    harmful: Sequence[Sequence[Any]],
    *,
    heading: str | None = None,
    level: int = 3,
    max_chars: int = 300,
) -> list[Block]:
    """The blocks of :func:`format_text_explanation`, to add to a :class:`~lightning_fastif.app.report.Report`.

    Example::

        >>> from lightning_fastif.app.report import Report
        >>> import tempfile
        >>> blocks = text_explanation_blocks("Dull.", "neg", "pos", [("Dull plot.", "neg", 0.4)], [])
        >>> Report(tempfile.mkdtemp(), "Text").add_blocks(blocks).write().name
        'report.md'
    """
    helpful_rows, harmful_rows = _examples(helpful, "helpful"), _examples(harmful, "harmful")
    max_chars = check_int("max_chars", max_chars)
    verdict = "correct" if _label_text(test_label) == _label_text(predicted) else "misclassified"
    blocks: list[Block] = [
        Heading(heading or "Test example", level),
        # The labels are data (class names may hold * or _), the sentence around them is the report's prose.
        Paragraph(
            f"True label: {escape_markdown(_label_text(test_label))}; "
            f"predicted: {escape_markdown(_label_text(predicted))} ({verdict})."
        ),
        # The test text is what the reader judges, so it may run twice as long as a training example.
        Quote(shorten_text(test_text, 2 * max_chars)),
    ]
    for kind, rows, meaning in (
        ("helpful", helpful_rows, "positive score: they lowered this example's loss"),
        ("harmful", harmful_rows, "negative score: they raised this example's loss"),
    ):
        blocks.append(Paragraph(f"Most {kind} training examples ({meaning}):"))
        if not rows:
            blocks.append(Paragraph(f"No {kind} training example among the candidates."))
            continue
        with_index = any(index is not None for *_, index in rows)
        columns = ["rank", "influence", "label", *(["train index"] if with_index else []), "text"]
        table = [
            [
                rank,
                format_score(score),
                _label_text(label),
                *([index] if with_index else []),
                shorten_text(text, max_chars),
            ]
            for rank, (text, label, score, index) in enumerate(rows, start=1)
        ]
        blocks.append(Table(columns, table))
    return blocks


def format_text_explanation(
    test_text: str,
    test_label: Any,
    predicted: Any,
    helpful: Sequence[Sequence[Any]],
    harmful: Sequence[Sequence[Any]],
    *,
    heading: str | None = None,
    level: int = 3,
    max_chars: int = 300,
) -> str:
    """A text example and its most helpful and harmful training examples, as Markdown.

    Texts are cleaned and cut to ``max_chars`` at a word boundary (the test text to twice that), and escaped so
    a ``|`` or ``*`` in a review cannot break the tables.

    Args:
        test_text: the test example's text.
        test_label: its true label (shown as given, e.g. a class name).
        predicted: the model's prediction.
        helpful: ``(text, label, score)`` or ``(text, label, score, train_index)`` tuples, most helpful first.
        harmful: the same for the most harmful, most harmful first.
        heading: the section heading (default ``"Test example"``).
        level: the heading level (1 to 6).
        max_chars: the longest training text shown.

    Returns:
        Markdown: a heading, the labels, the test text quoted, and one table per kind.

    Raises:
        ArgumentError: if an entry is not a 3- or 4-tuple with a numeric score, or ``max_chars`` is not positive.

    Example::

        >>> md = format_text_explanation("A | dull film", "negative", "positive",
        ...                              [("Dull, slow.", "negative", 0.42, 17)], [("Loved it!", "positive", -0.3)])
        >>> print(md.splitlines()[8])
        | rank | influence | label | train index | text |
        >>> "A \\\\| dull film" in md
        True
    """
    blocks = text_explanation_blocks(
        test_text, test_label, predicted, helpful, harmful, heading=heading, level=level, max_chars=max_chars
    )
    return render_markdown(blocks)
