"""The report as data (sections of text, tables and figures) and its Markdown rendering; `html.py` renders HTML.

Inline markup in text and cells is limited to `**bold**` and `` `code` `` so both renderings agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    file: str  # PNG file name, written next to report.md
    caption: str
    png: bytes


@dataclass
class Section:
    title: str
    items: list[str | Table | Figure] = field(default_factory=list)
    level: int = 2


@dataclass
class Document:
    title: str
    sections: list[Section] = field(default_factory=list)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table_markdown(table: Table) -> str:
    lines = [f"| {' | '.join(_cell(c) for c in table.columns)} |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(table.columns))) + "|"]
    lines += [f"| {' | '.join(_cell(c) for c in row)} |" for row in table.rows]
    if table.caption:
        lines = [f"*{table.caption}*", ""] + lines
    return "\n".join(lines)


def to_markdown(doc: Document) -> str:
    out = [f"# {doc.title}", ""]
    for section in doc.sections:
        out += [f"{'#' * section.level} {section.title}", ""]
        for item in section.items:
            if isinstance(item, Table):
                out.append(table_markdown(item))
            elif isinstance(item, Figure):
                out.append(f"![{item.caption}]({item.file})")
            else:
                out.append(item)
            out.append("")
    return "\n".join(out).rstrip() + "\n"
