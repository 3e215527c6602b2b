"""The report writes report.md and index.html from the same blocks, escaped, with relative links, atomically."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import pytest
import torch

from lightning_fastif.app.report import (
    Code,
    Heading,
    Image,
    Paragraph,
    Quote,
    Report,
    Table,
    escape_markdown,
    format_value,
)


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


# ---------------------------------------------------------------------------------------------------------------------
# Prose is Markdown, data is escaped
# ---------------------------------------------------------------------------------------------------------------------

# The opening sentence of the app's report: its own formatting must render, not show as characters.
PROSE = (
    "Scores are influence estimates `g_testᵀ (H + λI)⁻¹ g_train`; **positive = helpful** (removing the training "
    "point would raise the test loss by about score/n), negative = harmful."
)
DATA = "a*b_c|d<e> **x** `y` &amp; 1. _z_"


def _mixed_report(directory):
    return (
        Report(directory, "Run of model_v2 | *digits*")
        .add_paragraph(PROSE)
        .add_paragraph(f"Test point *7*, label {escape_markdown(DATA)}: see [the graph](graph.png) and `label_noise`.")
        .add_paragraph(DATA, markdown=False)
        .add_heading(f"Class {DATA}", 3)
        .add_table(["label", "score"], [[DATA, 0.5], ["plain", -1]])
        .add_blocks([Quote(DATA)])
    )


def test_prose_keeps_its_formatting_in_markdown(tmp_path):
    _mixed_report(tmp_path).write()
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    prose = [line for line in md.splitlines() if line.startswith(("Scores are", "Test point"))]
    assert prose[0] == PROSE
    for line in prose:
        own = line.replace(escape_markdown(DATA), "")  # the report's own words, without the data placed in them
        assert "\\*" not in own
        assert "\\`" not in own
    assert prose[1].startswith("Test point *7*, label a\\*b\\_c\\|d\\<e\\> \\*\\*x\\*\\* \\`y\\` \\&amp; 1. \\_z\\_:")
    # Data is escaped wherever it stands on its own: the plain paragraph, the heading, the table cell, the quote.
    escaped = escape_markdown(DATA)
    assert f"\n{escaped}\n" in md
    assert f"### Class {escaped}" in md
    assert f"| {escaped} | 0.5 |" in md
    assert f"> {escaped}" in md
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "<strong>positive = helpful</strong>" in page
    assert "<code>g_testᵀ (H + λI)⁻¹ g_train</code>" in page
    assert "**" not in page.split("<body>")[1].replace(html.escape(DATA, quote=False), "")


def test_prose_lines_that_would_change_the_block_stay_a_paragraph():
    md = Paragraph("# not a heading\n> not a quote\n* not a list\n2. not a list\n---\n    not code").to_markdown()
    assert md.split("  \n") == [
        "\\# not a heading",
        "\\> not a quote",
        "\\* not a list",
        "2\\. not a list",
        "\\---",
        "not code",
    ]
    assert Paragraph("a <b>tag</b> &copy; `<i>`").to_markdown() == "a \\<b>tag\\</b> \\&copy; `<i>`"


class _Canonical(HTMLParser):
    """The structure and text of an HTML body: tags without attributes (links keep their target), text as
    characters (entities resolved, then escaped once), whitespace collapsed."""

    KEEP = {"h1", "h2", "h3", "p", "strong", "em", "code", "a", "br", "table", "tr", "th", "td", "blockquote"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts = []

    def handle_starttag(self, tag, attrs):
        if tag in self.KEEP:
            self.parts.append(f"<a {dict(attrs)['href']}>" if tag == "a" else f"<{tag}>")

    def handle_endtag(self, tag):
        if tag in self.KEEP and tag != "br":
            self.parts.append(f"</{tag}>")

    def handle_data(self, data):
        self.parts.append(html.escape(data, quote=False))

    @classmethod
    def of(cls, markup):
        parser = cls()
        parser.feed(markup)
        text = re.sub(r"\s+", " ", "".join(parser.parts))
        return re.sub(r"\s*(<[^>]*>)\s*", r"\1", text).strip()


def test_markdown_renders_like_the_html_page(tmp_path):
    markdown_it = pytest.importorskip("markdown_it")
    _mixed_report(tmp_path).write()
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    rendered = markdown_it.MarkdownIt("commonmark").enable("table").render(md)
    from_markdown = _Canonical.of(rendered)
    from_page = _Canonical.of(page.split("<body>")[1].split("</body>")[0])
    assert from_markdown == from_page
    # The prose's formatting became elements; the data shows literally, character for character.
    assert "<strong>positive = helpful</strong>" in from_page
    assert "<code>g_testᵀ (H + λI)⁻¹ g_train</code>" in from_page
    assert "<em>7</em>" in from_page
    assert "<a graph.png>the graph</a>" in from_page
    assert "<code>label_noise</code>" in from_page
    data = html.escape(DATA, quote=False)
    assert f"<td>{data}</td>" in from_page
    assert f"<p>{data}</p>" in from_page
    assert f"<h3>Class {data}</h3>" in from_page
    assert f"<blockquote><p>{data}</p></blockquote>" in from_page
    assert "<h1>Run of model_v2 | *digits*</h1>" in from_page


@pytest.mark.parametrize(
    "prose",
    [
        "a **b** c *d* e _f_ g `h` i",
        "snake_case_name and **bold_with_underscores**",
        "2 * 3 * 4 = 24",
        "**bold *nested* text** and ***both***",
        "use `a*b` and ``x ` y``",
        "escaped \\*not em\\* and \\`not code\\`",
        "a < b > c & d &copy; <b>x</b> <!-- c --> <http://x.y>",
        "[link](http://a.b/c?d=1&e=2) and [not a link] (x)",
        "line one\nline two with **bold**\n- dash line\n1) item\n#tag\n# heading\n* * *\ntext\n===",
    ],
)
def test_prose_renders_the_same_in_both_files(prose):
    markdown_it = pytest.importorskip("markdown_it")
    block = Paragraph(prose)
    rendered = markdown_it.MarkdownIt("commonmark").render(block.to_markdown())
    assert _Canonical.of(rendered) == _Canonical.of(block.to_html())
