"""The report writes report.md and index.html from the same blocks, escaped, with relative links, atomically."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_fastif.app.report import Code, Heading, Image, Paragraph, Report, Table, escape_markdown, format_value


def _files(directory):
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def test_writes_both_files_with_the_same_content(tmp_path):
    out = tmp_path / "report"
    plots = out / "plots"
    plots.mkdir(parents=True)
    (plots / "graph.png").write_bytes(b"png")
    (out / "result.safetensors").write_bytes(b"data")
    report = (
        Report(out, "Digits: influence report")
        .add_heading("Summary")
        .add_paragraph("Trained an MLP.\nTwo lines.")
        .add_metrics({"accuracy": 0.97222, "test": {"misclassified": 12}}, title="Metrics")
        .add_image(plots / "graph.png", "Influence graph")
        .add_files({out / "result.safetensors": "influence scores"}, title="Result files")
        .add_code("ihvp: lissa\nknn: {k: 100}", "yaml")
    )
    assert report.files == []
    written = report.write()
    assert written == out / "report.md"
    assert [p.name for p in report.files] == ["report.md", "index.html", "graph.png", "result.safetensors"]
    assert _files(out) == ["index.html", "plots/graph.png", "report.md", "result.safetensors"]

    md = written.read_text(encoding="utf-8")
    assert md.startswith("# Digits: influence report\n\n## Summary\n\nTrained an MLP.  \nTwo lines.\n")
    assert "| accuracy | 0.9722 |" in md
    assert "| test.misclassified | 12 |" in md
    assert "![Influence graph](plots/graph.png)" in md
    assert "- [result.safetensors](result.safetensors): influence scores" in md
    assert "```yaml\nihvp: lissa\nknn: {k: 100}\n```" in md

    page = (out / "index.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>Digits: influence report</title>" in page
    assert '<img src="plots/graph.png" alt="Influence graph">' in page
    assert '<a href="result.safetensors">' in page
    assert "<td>test.misclassified</td>" in page
    assert "Trained an MLP.<br>\nTwo lines." in page
    # Self-contained: no external stylesheet, script or image.
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "<script" not in page


def test_table_cells_are_escaped(tmp_path):
    report = Report(tmp_path, "T").add_table(
        ["name | kind", "score"], [["a|b", 0.5], ["*bold* _x_ <b>", torch.tensor(2)], ["line\nbreak", None]]
    )
    report.write()
    md = (tmp_path / "report.md").read_text()
    assert "| name \\| kind | score |" in md
    assert "| --- | ---: |" in md  # numbers right-aligned
    assert "| a\\|b | 0.5 |" in md
    assert "| \\*bold\\* \\_x\\_ \\<b\\> | 2 |" in md
    assert "| line break |  |" in md
    for line in md.splitlines():
        if line.startswith("|"):
            assert line.replace("\\|", "").count("|") == 3
    page = (tmp_path / "index.html").read_text()
    assert "<td>a|b</td>" in page
    assert "&lt;b&gt;" in page
    assert '<td class="num">0.5</td>' in page


def test_image_links_are_relative(tmp_path, monkeypatch):
    out = tmp_path / "run" / "report"
    out.mkdir(parents=True)
    (out / "inside.png").write_bytes(b"x")
    (tmp_path / "run" / "outside.png").write_bytes(b"x")
    (out / "with space.png").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    report = Report("run/report", "Links")
    report.add_image("inside.png", "by name, inside the report directory")
    report.add_image("run/report/inside.png", "relative to the working directory")
    report.add_image(tmp_path / "run" / "outside.png", "outside")
    report.add_image(out / "with space.png", "a space")
    md = report.to_markdown()
    assert md.count("](inside.png)") == 2
    assert "](../outside.png)" in md
    assert "](with%20space.png)" in md
    assert str(tmp_path) not in md
    assert str(tmp_path) not in report.to_html()
    with pytest.raises(FileNotFoundError, match="path"):
        report.add_image("missing.png", "missing")
    with pytest.raises(FileNotFoundError, match=r"files\[0\]"):
        report.add_files(["missing.json"])


def test_no_temporary_files_and_overwrite(tmp_path):
    report = Report(tmp_path / "r", "Title").add_paragraph("first")
    report.write()
    report.add_paragraph("second")
    report.write()
    assert _files(tmp_path / "r") == ["index.html", "report.md"]
    assert "second" in (tmp_path / "r" / "report.md").read_text()


def test_html_escapes_text(tmp_path):
    report = Report(tmp_path, "<script>alert(1)</script>").add_paragraph("a < b & c").add_heading("x <y>", 3)
    page = report.to_html()
    assert "<script>" not in page
    assert "a &lt; b &amp; c" in page
    assert "<h3>x &lt;y&gt;</h3>" in page
    assert report.to_markdown().startswith("# \\<script\\>alert(1)\\</script\\>")


def test_blocks_and_errors(tmp_path):
    report = Report(tmp_path, "B").add_blocks([Heading("Part", 2), Paragraph("- not a list"), Table(["a"], [[1]])])
    md = report.to_markdown()
    assert "\\- not a list" in md
    with pytest.raises(TypeError, match=r"blocks\[0\]"):
        report.add_blocks(["text"])
    with pytest.raises(TypeError, match=r"blocks\[0\]"):
        report.add_blocks([Image("x.png")])
    with pytest.raises(ValueError, match=r"rows\[1\]"):
        report.add_table(["a", "b"], [[1, 2], [3]])
    with pytest.raises(ValueError, match="columns"):
        report.add_table([], [])
    with pytest.raises(ValueError, match="level"):
        report.add_heading("x", 7)
    with pytest.raises(ValueError, match="title"):
        Report(tmp_path, " ")
    with pytest.raises(TypeError, match="metrics"):
        report.add_metrics([("a", 1)])


def test_code_fence_outlasts_backticks_inside():
    md = Code("a ``` b").to_markdown()
    assert md.startswith("````\n")
    assert md.endswith("\n````")


def test_escape_and_format_helpers():
    assert escape_markdown("1. not a list") == "1\\. not a list"
    assert escape_markdown("a_b|c") == "a\\_b\\|c"
    assert format_value(1 / 3) == "0.3333"
    assert format_value(True) == "true"
    assert format_value([1, 2.5]) == "1, 2.5"
    assert format_value(float("inf")) == "inf"
