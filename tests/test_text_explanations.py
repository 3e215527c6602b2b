"""Text explanations: texts cleaned and cut, data escaped, the sentence around it kept as prose."""

from __future__ import annotations

import pytest
import torch

from lightning_fastif.app.report import Report
from lightning_fastif.app.text_explanations import format_text_explanation, shorten_text, text_explanation_blocks


def test_shorten_text():
    assert shorten_text("short", 10) == "short"
    long = "word " * 100
    cut = shorten_text(long, 50)
    assert len(cut) <= 50
    assert cut.endswith("word…")
    assert shorten_text("x" * 80, 20) == "x" * 19 + "…"  # one long token: cut inside it
    assert shorten_text("It&#039;s<br /><br />fine", 50) == "It's fine"
    with pytest.raises(ValueError, match="max_chars"):
        shorten_text("a", 0)


def test_format_text_explanation_escapes_and_truncates():
    helpful = [("Slow | dull *plot*", "negative", 0.42, 17), ("Boring.\nVery.", "negative", torch.tensor(0.1), 3)]
    harmful = [("Great <b>acting</b> " * 40, "positive", -0.25, 99)]
    md = format_text_explanation("A | bad_film", 0, 1, helpful, harmful, heading="Review 12", max_chars=60)
    lines = md.splitlines()
    assert lines[0] == "### Review 12"
    assert "> A \\| bad\\_film" in lines
    assert "| rank | influence | label | train index | text |" in lines
    assert "| 1 | +0.42 | negative | 17 | Slow \\| dull \\*plot\\* |" in lines
    assert "| 2 | +0.1 | negative | 3 | Boring. Very. |" in lines
    # Every table row has exactly the columns' cells: no unescaped | inside a cell.
    for line in lines:
        if line.startswith("|"):
            assert line.replace("\\|", "").count("|") == 6
    harmful_row = next(line for line in lines if "| -0.25 |" in line)
    assert "…" in harmful_row
    assert len(harmful_row) < 120
    assert "(misclassified)" in md


def test_text_explanation_without_candidates_and_bad_entries():
    md = format_text_explanation("fine", "pos", "pos", [], [])
    assert "No helpful training example" in md
    assert "(correct)" in md
    with pytest.raises(ValueError, match=r"helpful\[0\]"):
        format_text_explanation("t", 0, 0, [("text", 0)], [])
    with pytest.raises(ValueError, match=r"harmful\[1\]"):
        format_text_explanation("t", 0, 0, [], [("a", 0, -1.0), ("b", 0, "high")])


def test_labels_are_data_and_the_sentence_is_prose(tmp_path):
    blocks = text_explanation_blocks("ok", "very_bad*", "good", [], [], heading="Review 1")
    report = Report(tmp_path, "Text").add_blocks(blocks)
    md = report.to_markdown()
    assert "True label: very\\_bad\\*; predicted: good (misclassified)." in md
    assert "<p>True label: very_bad*; predicted: good (misclassified).</p>" in report.to_html()
