"""A small report builder: one list of blocks rendered twice, as ``report.md`` and as a self-contained ``index.html``.

The report of the main job (and of the text job) is a directory::

    <dirpath>/report.md     Markdown, readable as plain text and on any forge
    <dirpath>/index.html    the same content as simple HTML: inline CSS, images by relative path, no external assets
    <dirpath>/*.png         plots, linked relatively, so the directory can be moved or archived as a whole

Both files are built from the same blocks (:class:`Heading`, :class:`Paragraph`, :class:`Quote`, :class:`Table`,
:class:`Image`, :class:`Code`, :class:`FileList`), so they never disagree, and no Markdown package is needed.

Two kinds of text go into a report, and only one of them is escaped:

* **prose**, the report's own words, is Markdown: a :class:`Paragraph` keeps ``**strong**``, ``*emphasis*``,
  code spans and ``[links](url)`` as written, and renders them in both files (see :func:`prose_to_html`);
* **data** (labels, file names, texts of examples, table cells) is shown literally: table cells, headings, quotes,
  captions and ``Paragraph(text, markdown=False)`` are escaped for Markdown (``|``, ``*``, ``_``, ``<`` ...) and for
  HTML. Data inside prose goes through :func:`escape_markdown` first::

      Paragraph(f"True label: {escape_markdown(label)}; **misclassified**.")

Both files are written atomically. This module imports no Lightning and needs no Markdown package.

Example::

    >>> import tempfile
    >>> report = Report(tempfile.mkdtemp(), "Influence report")
    >>> _ = report.add_paragraph("Accuracy on digits.").add_table(["model", "accuracy"], [["mlp | 2 layers", 0.9722]])
    >>> path = report.write()
    >>> print(path.read_text().splitlines()[6])
    | mlp \\| 2 layers | 0.9722 |
    >>> [p.name for p in report.files]
    ['report.md', 'index.html']
"""

from __future__ import annotations

import html
import math
import numbers
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from torch import Tensor

from lightning_fastif.app.markdown_text import escape_markdown, prose_to_html, prose_to_markdown
from lightning_fastif.errors import check_bool
from lightning_fastif.io.atomic import PathLike, atomic_write_bytes

MARKDOWN_NAME = "report.md"
HTML_NAME = "index.html"

__all__ = [
    "HTML_NAME",
    "MARKDOWN_NAME",
    "Block",
    "Code",
    "FileList",
    "Heading",
    "Image",
    "Paragraph",
    "Quote",
    "Report",
    "Table",
    "escape_markdown",
    "format_value",
    "render_html",
    "render_markdown",
]

_NEWLINES = re.compile(r"\r\n|\r|\n")

_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:62em;margin:2em auto;padding:0 1em;"
    "line-height:1.45;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}"
    "th{background:#f3f3f3}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}"
    "figure{margin:1.5em 0}img{max-width:100%;height:auto}figcaption{color:#555;font-style:italic}"
    "blockquote{border-left:4px solid #ccc;margin:1em 0;padding:.2em 1em;color:#333}"
    "pre{background:#f6f8fa;padding:1em;overflow:auto}code{font-size:90%}"
)


def _one_line(text: Any) -> str:
    """Table cells and headings are one line in Markdown: newlines become spaces."""
    return " ".join(_NEWLINES.split(str(text)))


def format_value(value: Any) -> str:
    """Format a table cell or metric: floats with 4 significant digits, integers in full, ``None`` as empty.

    Example::

        >>> format_value(0.123456), format_value(12), format_value(float("nan")), format_value(None)
        ('0.1235', '12', 'nan', '')
    """
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        return str(value) if not math.isfinite(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


_NUMBER = re.compile(r"^\s*[-+−]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*%?\s*$")


def _is_number(value: Any) -> bool:
    """Numbers, and strings that read as one (``"+0.42"``, ``"12%"``), are right-aligned in tables."""
    if isinstance(value, str):
        return bool(_NUMBER.match(value))
    if isinstance(value, Tensor):
        return value.numel() == 1 and not value.dtype.is_complex and value.dtype != bool
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class Block(ABC):
    """One piece of a report, rendered to Markdown and to HTML."""

    @abstractmethod
    def to_markdown(self) -> str:
        """The block as Markdown (no trailing blank line)."""

    @abstractmethod
    def to_html(self) -> str:
        """The block as an HTML fragment."""


@dataclass(frozen=True)
class Heading(Block):
    """A section heading, ``level`` 1 (the title) to 6."""

    text: str
    level: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.level, int) or isinstance(self.level, bool) or not 1 <= self.level <= 6:
            raise ValueError(f"level: expected an integer from 1 to 6, got {self.level!r}")

    def to_markdown(self) -> str:
        return f"{'#' * self.level} {escape_markdown(_one_line(self.text))}"

    def to_html(self) -> str:
        return f"<h{self.level}>{html.escape(_one_line(self.text))}</h{self.level}>"


@dataclass(frozen=True)
class Paragraph(Block):
    """A paragraph; line breaks inside it are kept.

    Args:
        text: the report's own prose, in Markdown (``**strong**``, ``*emphasis*``, code spans, links) rendered in
            both files; data placed inside it goes through :func:`escape_markdown` first. With
            ``markdown=False``, plain text shown literally (for a paragraph that is data as a whole).
        markdown: whether ``text`` is Markdown prose (default) or plain text.

    Example::

        >>> Paragraph("**positive** = helpful").to_html()
        '<p><strong>positive</strong> = helpful</p>'
        >>> print(Paragraph("**not bold**", markdown=False).to_markdown())
        \\*\\*not bold\\*\\*
    """

    text: str
    markdown: bool = True

    def to_markdown(self) -> str:
        if self.markdown:
            return prose_to_markdown(self.text)
        # Two trailing spaces are Markdown's hard line break; a blank line would end the paragraph.
        return "  \n".join(escape_markdown(self.text).split("\n"))

    def to_html(self) -> str:
        if self.markdown:
            return f"<p>{prose_to_html(self.text)}</p>"
        return "<p>" + "<br>\n".join(html.escape(line) for line in _NEWLINES.split(str(self.text))) + "</p>"


@dataclass(frozen=True)
class Quote(Block):
    """A quoted passage, e.g. a review the model classified."""

    text: str

    def to_markdown(self) -> str:
        return "\n>\n".join(f"> {line}" if line else ">" for line in escape_markdown(self.text).split("\n"))

    def to_html(self) -> str:
        lines = "<br>\n".join(html.escape(line) for line in _NEWLINES.split(str(self.text)))
        return f"<blockquote><p>{lines}</p></blockquote>"


@dataclass(frozen=True)
class Table(Block):
    """A table: ``columns`` names and ``rows`` of cells (numbers formatted by :func:`format_value`).

    Columns whose cells are all numbers are right-aligned.
    """

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    def __init__(self, columns: Sequence[Any], rows: Iterable[Sequence[Any]]) -> None:
        if isinstance(columns, (str, bytes)) or not isinstance(columns, Sequence) or len(columns) == 0:
            raise ValueError(f"columns: expected a non-empty sequence of column names, got {columns!r}")
        cols = tuple(str(c) for c in columns)
        table_rows = []
        for i, row in enumerate(rows):
            if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
                raise ValueError(f"rows[{i}]: expected a sequence of {len(cols)} cells, got {type(row).__name__}")
            if len(row) != len(cols):
                raise ValueError(f"rows[{i}]: expected {len(cols)} cells (one per column {list(cols)}), got {len(row)}")
            table_rows.append(tuple(row))
        object.__setattr__(self, "columns", cols)
        object.__setattr__(self, "rows", tuple(table_rows))

    def _numeric(self) -> list[bool]:
        return [
            bool(self.rows) and all(_is_number(r[j]) or r[j] is None for r in self.rows)
            for j in range(len(self.columns))
        ]

    def to_markdown(self) -> str:
        def cells(values: Iterable[str]) -> str:
            return "| " + " | ".join(values) + " |"

        numeric = self._numeric()
        lines = [
            cells(escape_markdown(_one_line(c)) for c in self.columns),
            cells("---:" if n else "---" for n in numeric),
        ]
        lines += [cells(escape_markdown(_one_line(format_value(v))) for v in row) for row in self.rows]
        return "\n".join(lines)

    def to_html(self) -> str:
        numeric = self._numeric()

        def cls(j: int) -> str:
            return ' class="num"' if numeric[j] else ""

        head = "".join(f"<th{cls(j)}>{html.escape(c)}</th>" for j, c in enumerate(self.columns))
        body = "\n".join(
            "<tr>" + "".join(f"<td{cls(j)}>{html.escape(format_value(v))}</td>" for j, v in enumerate(row)) + "</tr>"
            for row in self.rows
        )
        return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


@dataclass(frozen=True)
class Image(Block):
    """An image by relative ``link`` (a POSIX path relative to the report directory), with an optional caption."""

    link: str
    caption: str = ""
    width: int | None = None

    def _url(self) -> str:
        # Percent-encode spaces, brackets and the like so the same URL works in Markdown and in HTML.
        return quote(self.link, safe="/:")

    def to_markdown(self) -> str:
        alt = escape_markdown(_one_line(self.caption or Path(self.link).name))
        image = f"![{alt}]({self._url()})"
        return f"{image}\n\n*{escape_markdown(_one_line(self.caption))}*" if self.caption else image

    def to_html(self) -> str:
        alt = html.escape(_one_line(self.caption or Path(self.link).name), quote=True)
        width = f' width="{int(self.width)}"' if self.width else ""
        caption = f"<figcaption>{html.escape(self.caption)}</figcaption>" if self.caption else ""
        return f'<figure><img src="{html.escape(self._url(), quote=True)}" alt="{alt}"{width}>{caption}</figure>'


@dataclass(frozen=True)
class Code(Block):
    """Preformatted text (a config, a log excerpt), shown verbatim."""

    text: str
    language: str = ""

    def to_markdown(self) -> str:
        # The fence must be longer than any run of backticks inside the text, or the text would close it.
        longest = max((len(m) for m in re.findall(r"`+", self.text)), default=0)
        fence = "`" * max(3, longest + 1)
        return f"{fence}{self.language}\n{self.text.rstrip(chr(10))}\n{fence}"

    def to_html(self) -> str:
        return f"<pre><code>{html.escape(self.text.rstrip(chr(10)))}</code></pre>"


@dataclass(frozen=True)
class FileList(Block):
    """A list of links to files of the report (result files, JSON), each with a description."""

    items: tuple[tuple[str, str], ...]

    def to_markdown(self) -> str:
        def item(link: str, description: str) -> str:
            text = f"[{escape_markdown(link)}]({quote(link, safe='/:')})"
            return f"- {text}: {escape_markdown(_one_line(description))}" if description else f"- {text}"

        return "\n".join(item(link, description) for link, description in self.items)

    def to_html(self) -> str:
        def item(link: str, description: str) -> str:
            anchor = f'<a href="{html.escape(quote(link, safe="/:"), quote=True)}">{html.escape(link)}</a>'
            return f"<li>{anchor}: {html.escape(description)}</li>" if description else f"<li>{anchor}</li>"

        return "<ul>\n" + "\n".join(item(link, description) for link, description in self.items) + "\n</ul>"


def render_markdown(blocks: Iterable[Block]) -> str:
    """Join blocks into one Markdown document (blocks separated by a blank line).

    Example::

        >>> print(render_markdown([Heading("a_b", 3), Paragraph("**a_b**")]))
        ### a\\_b
        <BLANKLINE>
        **a_b**
        <BLANKLINE>
    """
    return "\n\n".join(b.to_markdown() for b in blocks) + "\n"


def render_html(blocks: Iterable[Block], title: str) -> str:
    """A complete, self-contained HTML page (inline CSS, no scripts, no external assets) holding ``blocks``."""
    body = "\n".join(b.to_html() for b in blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(_one_line(title))}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"{body}\n</body>\n</html>\n"
    )


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _flatten(value, f"{name}.")
        else:
            rows.append((name, value))
    return rows


class Report:
    """Build a report from blocks, then write ``report.md`` and ``index.html`` into ``dirpath``.

    Every ``add_*`` method returns the report, so calls chain. Images and files are linked by paths relative to
    ``dirpath``; keep them inside it so the directory stays self-contained.

    Args:
        dirpath: the report directory (created by :meth:`write` when missing).
        title: the report's title (the first heading and the HTML page title).

    Raises:
        ValueError: if ``title`` is empty.

    Example::

        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "plot.png").write_bytes(b"")
        >>> report = Report(d, "Digits").add_metrics({"accuracy": 0.97}).add_image(d / "plot.png", "Influence graph")
        >>> "![Influence graph](plot.png)" in report.to_markdown()
        True
    """

    def __init__(self, dirpath: PathLike, title: str) -> None:
        if not isinstance(title, str) or not title.strip():
            raise ValueError(f"title: expected a non-empty string, got {title!r}")
        self.dirpath = Path(dirpath)
        self.title = title
        self._blocks: list[Block] = [Heading(title, 1)]
        self._linked: list[Path] = []
        self._written: list[Path] = []

    @property
    def blocks(self) -> tuple[Block, ...]:
        """The blocks so far, the title heading first."""
        return tuple(self._blocks)

    @property
    def files(self) -> list[Path]:
        """What :meth:`write` wrote (``report.md``, ``index.html``), then every image and file the report links.

        Empty until :meth:`write` has run.
        """
        if not self._written:
            return []
        seen: dict[Path, None] = dict.fromkeys(self._written)
        seen.update(dict.fromkeys(self._linked))
        return list(seen)

    def add_blocks(self, blocks: Iterable[Block]) -> Report:
        """Append ready-made blocks, e.g. those of
        :func:`lightning_fastif.app.text_explanations.text_explanation_blocks`."""
        for i, block in enumerate(blocks):
            if not isinstance(block, Block):
                raise TypeError(f"blocks[{i}]: expected a report Block, got {type(block).__name__}")
            if isinstance(block, Image):
                raise TypeError(f"blocks[{i}]: add images with add_image(path, caption), which checks the file")
            self._blocks.append(block)
        return self

    def add_heading(self, text: str, level: int = 2) -> Report:
        """Append a heading (``level`` 2 to 6 for sections; 1 is the title)."""
        self._blocks.append(Heading(text, level))
        return self

    def add_paragraph(self, text: str, *, markdown: bool = True) -> Report:
        """Append a paragraph: the report's own prose in Markdown, or plain text with ``markdown=False``.

        Data inside prose (labels, file names) goes through :func:`escape_markdown` first; see :class:`Paragraph`.
        """
        self._blocks.append(Paragraph(text, check_bool("markdown", markdown)))
        return self

    def add_quote(self, text: str) -> Report:
        """Append a quoted passage."""
        self._blocks.append(Quote(text))
        return self

    def add_table(self, columns: Sequence[Any], rows: Iterable[Sequence[Any]]) -> Report:
        """Append a table; cells are escaped (a ``|`` in a cell stays in its cell).

        Raises:
            ValueError: if ``columns`` is empty or a row has another number of cells.
        """
        self._blocks.append(Table(columns, rows))
        return self

    def add_metrics(self, metrics: Mapping[str, Any], *, title: str | None = None) -> Report:
        """Append a two-column table ``metric | value`` (nested mappings flattened as ``outer.inner``).

        Raises:
            TypeError: if ``metrics`` is not a mapping.
        """
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics: expected a mapping of name -> value, got {type(metrics).__name__}")
        if title:
            self._blocks.append(Heading(title, 3))
        self._blocks.append(Table(["metric", "value"], _flatten(metrics)))
        return self

    def add_code(self, text: str, language: str = "") -> Report:
        """Append preformatted text (e.g. the resolved config as YAML)."""
        self._blocks.append(Code(str(text), language))
        return self

    def add_image(self, path: PathLike, caption: str = "", *, width: int | None = None) -> Report:
        """Append an image, linked by its path relative to the report directory.

        Args:
            path: an existing image file. A relative path is taken from the working directory, or, when no such
                file is there, from the report directory (so ``"graph.png"`` names ``<dirpath>/graph.png``).
            caption: shown under the image (and its alt text).
            width: optional display width in pixels (HTML only).

        Raises:
            FileNotFoundError: if the image does not exist.
        """
        self._blocks.append(Image(self._link(path, "path"), str(caption), width))
        return self

    def add_files(self, files: Mapping[PathLike, str] | Sequence[PathLike], *, title: str | None = None) -> Report:
        """Append a list of links to files (result files, JSON), as a mapping path -> description or a sequence.

        Raises:
            FileNotFoundError: if a file does not exist (paths resolved as in :meth:`add_image`).
        """
        pairs = list(files.items()) if isinstance(files, Mapping) else [(f, "") for f in files]
        items = tuple((self._link(f, f"files[{i}]"), str(d)) for i, (f, d) in enumerate(pairs))
        if title:
            self._blocks.append(Heading(title, 3))
        self._blocks.append(FileList(items))
        return self

    def _link(self, path: PathLike, name: str) -> str:
        p = Path(path)
        if not p.is_absolute() and not p.exists() and (self.dirpath / p).exists():
            p = self.dirpath / p
        if not p.exists():
            raise FileNotFoundError(
                f"{name}: {str(path)!r} does not exist (a relative path is taken from the working directory, "
                f"or from the report directory {str(self.dirpath)!r})"
            )
        target = p.resolve()
        self._linked.append(target)
        try:
            return Path(os.path.relpath(target, self.dirpath.resolve())).as_posix()
        except ValueError:  # another drive on Windows: no relative path exists
            return target.as_uri()

    def to_markdown(self) -> str:
        """The report as Markdown."""
        return render_markdown(self._blocks)

    def to_html(self) -> str:
        """The report as a self-contained HTML page."""
        return render_html(self._blocks, self.title)

    def write(self) -> Path:
        """Write ``report.md`` and ``index.html`` into the report directory, each atomically.

        Returns:
            The path of ``report.md``.
        """
        markdown = atomic_write_bytes(self.dirpath / MARKDOWN_NAME, self.to_markdown().encode("utf-8"))
        page = atomic_write_bytes(self.dirpath / HTML_NAME, self.to_html().encode("utf-8"))
        self._written = [markdown.resolve(), page.resolve()]
        return markdown
