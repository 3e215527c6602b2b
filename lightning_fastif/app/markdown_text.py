"""Markdown text of the report: data escaped so that it shows literally, prose rendered the same in both files.

* :func:`escape_markdown`: data (labels, file names, texts of examples, table cells) to Markdown that shows it as
  typed.
* :func:`prose_to_markdown`, :func:`prose_to_html`: the report's own prose, written in Markdown (``**strong**``,
  ``*emphasis*``, code spans, links), as a Markdown paragraph and as the inside of an HTML ``<p>``. Only the inline
  Markdown that :func:`prose_to_html` understands is left active, so ``report.md`` read by any CommonMark renderer
  and ``index.html`` show the same thing; no Markdown package is needed.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from typing import Any

__all__ = ["escape_markdown", "prose_to_html", "prose_to_markdown"]

# Characters with a meaning in inline Markdown (CommonMark and GitHub tables); a backslash makes each literal.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~])")
# "&copy;" or "&#169;" would be read as the character it names.
_ENTITY = re.compile(r"&(?=#?\w+;)")
# A line starting like a list item, a setext underline or an ordered item would change the block's kind.
_LINE_START = re.compile(r"^(\s*)([-+=]|\d+[.)])(?=\s|$)")
_NEWLINES = re.compile(r"\r\n|\r|\n")

# -- prose: the inline Markdown that both renderings understand --------------------------------------------------
# A backslash escape of ASCII punctuation, or a code span (its backticks matched by a run of the same length).
_ESCAPE_OR_CODE = re.compile(r"\\([!-/:-@\[-`{-~])|(`+)(.+?)(?<!`)\2(?!`)", re.DOTALL)
# What would start raw HTML (a tag, a comment, an autolink) in Markdown; the HTML rendering shows it literally.
_RAW_HTML = re.compile(r"<(?=[A-Za-z/!?])")
# Line starts that would turn a paragraph line into another block: heading, quote, list item, fence.
_PROSE_BLOCK_START = re.compile(r"^(#{1,6}(?=\s|$)|>|[-+*](?=\s|$)|\d{1,9}[.)](?=\s|$)|```|~~~)")
# A line of only -, *, _ or = (and spaces) is a thematic break or a setext underline.
_PROSE_RULE = re.compile(r"^([-*_=])(?:\s*\1)*\s*$")
_LINK = re.compile(r"\[([^\]\n]+)\]\(([^()\s]+)\)")
# Emphasis, outermost first: ***both***, **strong**, __strong__, *emphasis*, _emphasis_ (underscores not inside words).
_EMPHASIS = (
    (re.compile(r"\*\*\*(?=\S)(.+?)(?<=\S)\*\*\*", re.DOTALL), r"<em><strong>\1</strong></em>"),
    (re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*", re.DOTALL), r"<strong>\1</strong>"),
    (re.compile(r"(?<!\w)__(?=\S)(.+?)(?<=\S)__(?!\w)", re.DOTALL), r"<strong>\1</strong>"),
    (re.compile(r"\*(?=\S)(.+?)(?<=\S)\*", re.DOTALL), r"<em>\1</em>"),
    (re.compile(r"(?<!\w)_(?=\S)(.+?)(?<=\S)_(?!\w)", re.DOTALL), r"<em>\1</em>"),
)
# Stand-ins for escapes and code spans while the rest of a line is converted (private-use code points).
_HOLE = re.compile("\ue000(\\d+)\ue001")


def escape_markdown(text: Any) -> str:
    """Escape ``text`` so Markdown shows it literally, inside a paragraph or a table cell.

    Backslash-escapes ``\\ ` * _ [ ] < > # | ~`` and a line start that would begin a list.

    Example::

        >>> escape_markdown("a|b *c* <br>")
        'a\\\\|b \\\\*c\\\\* \\\\<br\\\\>'
    """
    lines = _NEWLINES.split(str(text))
    return "\n".join(
        _LINE_START.sub(_escape_marker, _ENTITY.sub(r"\\&", _MARKDOWN_SPECIAL.sub(r"\\\1", line))) for line in lines
    )


def _escape_marker(match: re.Match[str]) -> str:
    # Only punctuation can be backslash-escaped: "1." becomes "1\.", "-" becomes "\-".
    marker = match.group(2)
    return f"{match.group(1)}{marker[:-1]}\\{marker[-1]}"


def _outside_code(text: str, convert: Callable[[str], str]) -> str:
    """``convert`` applied to the parts of ``text`` that are neither backslash escapes nor code spans."""
    parts, start = [], 0
    for match in _ESCAPE_OR_CODE.finditer(text):
        parts += [convert(text[start : match.start()]), match.group(0)]
        start = match.end()
    return "".join([*parts, convert(text[start:])])


def _prose_line(line: str) -> str:
    line = line.lstrip()  # four spaces would start a code block
    if _PROSE_RULE.match(line):
        return "\\" + line
    block = _PROSE_BLOCK_START.match(line)
    if block is None:
        return line
    marker = block.group(1)
    if marker[0].isdigit():  # "1." becomes "1\.": digits cannot be escaped, the dot can
        return f"{marker[:-1]}\\{marker[-1]}{line[len(marker) :]}"
    return "\\" + line


def prose_to_markdown(text: str) -> str:
    """The report's own Markdown prose, made safe to place as one paragraph.

    The inline Markdown is kept as written (``**strong**``, ``*emphasis*``, code spans, links, backslash
    escapes); what would change the block (a line starting with ``#``, ``>``, ``-``, ``1.``, a rule) or what only
    Markdown would interpret (raw HTML tags, entities such as ``&copy;``) is escaped, so both renderings of the
    report show the same thing. Line breaks become Markdown hard breaks.

    Example::

        >>> prose_to_markdown("**positive = helpful**, see `g_test`;\\n- not a list <b>").splitlines()
        ['**positive = helpful**, see `g_test`;  ', '\\\\- not a list \\\\<b>']
    """
    inline = _outside_code(str(text), lambda part: _ENTITY.sub(r"\\&", _RAW_HTML.sub(r"\\<", part)))
    # Two trailing spaces are Markdown's hard line break; a blank line would end the paragraph.
    return "  \n".join(_prose_line(line) for line in _NEWLINES.split(inline))


def prose_to_html(text: str) -> str:
    """The HTML of the report's Markdown prose (the inside of a ``<p>``), for the inline Markdown it supports.

    Supported, as in CommonMark: backslash escapes of punctuation, code spans, ``[text](url)`` links,
    ``**strong**``/``__strong__`` and ``*emphasis*``/``_emphasis_`` (underscores only between words, so
    ``label_noise`` stays a word). Everything else is shown as typed; line breaks become ``<br>``.

    Example::

        >>> print(prose_to_html("**positive = helpful**; `g_test` and a\\\\*b < c"))
        <strong>positive = helpful</strong>; <code>g_test</code> and a*b &lt; c
    """
    holes: list[str] = []

    def hole(match: re.Match[str]) -> str:
        if match.group(1) is not None:
            holes.append(html.escape(match.group(1), quote=False))
        else:
            code = match.group(3).replace("\n", " ")
            if code.startswith(" ") and code.endswith(" ") and code.strip():
                code = code[1:-1]
            holes.append(f"<code>{html.escape(code, quote=False)}</code>")
        return f"\ue000{len(holes) - 1}\ue001"

    out = html.escape(_ESCAPE_OR_CODE.sub(hole, _NEWLINES.sub("\n", str(text))), quote=False)
    out = _LINK.sub(lambda m: f'<a href="{m.group(2).replace(chr(34), "&quot;")}">{m.group(1)}</a>', out)
    for pattern, replacement in _EMPHASIS:
        out = pattern.sub(replacement, out)
    out = _HOLE.sub(lambda m: holes[int(m.group(1))], out)
    return "<br>\n".join(line.strip() for line in out.split("\n"))
