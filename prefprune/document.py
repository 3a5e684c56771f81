"""A small document model that renders to Markdown and to self-contained HTML.

A report is a list of :class:`Section` objects (a heading, prose, a table, a figure); both
renderers escape every part of every paragraph, so text from a user's data can never inject
Markdown or HTML into a report.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Code:
    """Literal text shown as code (a path, a command)."""

    text: str


@dataclass(frozen=True)
class Bold:
    text: str


#: A paragraph: plain text, or a sequence of plain, code and bold parts. No part is markup:
#: every renderer escapes every part, so text from the data can never inject Markdown or HTML.
Paragraph = str | tuple[str | Code | Bold, ...]


@dataclass
class Section:
    """One part of the report: a heading, paragraphs, an optional table and figure."""

    title: str
    text: list[Paragraph] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    figure: str | None = None  # file stem of a PNG in figures/
    figure_png: bytes | None = field(default=None, repr=False)


#: Marks that can start emphasis, code, a link or a table cell; with ``[`` and ``]`` escaped no
#: link or image can form, so parentheses and ``!`` stay readable.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def _md_text(text: str) -> str:
    """Plain text for Markdown: HTML characters as entities, Markdown marks backslashed, line
    breaks as spaces (a user's text can neither start a tag nor a link nor a new block)."""
    escaped = html.escape(re.sub(r"\s+", " ", str(text)), quote=False)
    return _MD_SPECIAL.sub(r"\\\1", escaped)


def _md_code(text: str) -> str:
    """A code span whose fence is longer than any run of backticks inside it."""
    text = re.sub(r"\s+", " ", str(text))
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _md_paragraph(paragraph: Paragraph) -> str:
    parts = (paragraph,) if isinstance(paragraph, str) else paragraph
    return "".join(_md_code(p.text) if isinstance(p, Code)
                   else f"**{_md_text(p.text)}**" if isinstance(p, Bold)
                   else _md_text(p) for p in parts)


def render_markdown(sections: Sequence[Section]) -> str:
    lines: list[str] = []
    for i, section in enumerate(sections):
        lines += [f"{'#' if i == 0 else '##'} {_md_text(section.title)}", ""]
        for paragraph in section.text:
            if paragraph:
                lines += [_md_paragraph(paragraph), ""]
        if section.rows:
            lines.append("| " + " | ".join(_md_text(h) for h in section.header) + " |")
            lines.append("|" + "---|" * len(section.header))
            lines += ["| " + " | ".join(_md_text(c) for c in row) + " |" for row in section.rows]
            lines.append("")
        if section.figure and section.figure_png:
            lines += [f"![{_md_text(section.title)}](figures/{section.figure}.png)", ""]
    return "\n".join(lines)


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f5f5f5; padding: 1px 4px; }
"""


def _html_paragraph(paragraph: Paragraph) -> str:
    parts = (paragraph,) if isinstance(paragraph, str) else paragraph
    return "".join(f"<code>{html.escape(p.text)}</code>" if isinstance(p, Code)
                   else f"<strong>{html.escape(p.text)}</strong>" if isinstance(p, Bold)
                   else html.escape(p) for p in parts)


def render_html(sections: Sequence[Section]) -> str:
    body: list[str] = []
    for i, section in enumerate(sections):
        tag = "h1" if i == 0 else "h2"
        body.append(f"<{tag}>{html.escape(section.title)}</{tag}>")
        body += [f"<p>{_html_paragraph(p)}</p>" for p in section.text if p]
        if section.rows:
            head = "".join(f"<th>{html.escape(h)}</th>" for h in section.header)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row)
                           + "</tr>" for row in section.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        if section.figure and section.figure_png:
            data = base64.b64encode(section.figure_png).decode()
            body.append(f'<figure><img id="fig-{section.figure}" alt="{html.escape(section.title)}"'
                        f' src="data:image/png;base64,{data}"></figure>')
    title = html.escape(sections[0].title if sections else "prefprune report")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{title}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
