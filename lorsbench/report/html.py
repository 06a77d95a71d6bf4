"""A self-contained HTML rendering of the report: inline CSS, every image a base64 `data:` URI, no scripts."""
from __future__ import annotations

import base64
import html
import re

from lorsbench.report.document import Document, Figure, Table

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; line-height: 1.4; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f4f4f4; padding: 0 0.2em; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; }
"""


def inline(text: str) -> str:
    """Escape, then turn `code` and **bold** into tags (the only inline markup the report uses)."""
    out = html.escape(str(text))
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def table_html(table: Table) -> str:
    head = "".join(f"<th>{inline(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>\n" for row in table.rows)
    caption = f"<caption>{inline(table.caption)}</caption>" if table.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>"


def figure_html(figure: Figure) -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    alt = html.escape(figure.caption, quote=True)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
            f"<figcaption>{inline(figure.caption)}</figcaption></figure>")


def to_html(doc: Document) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{html.escape(doc.title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
             f"<h1>{html.escape(doc.title)}</h1>"]
    for section in doc.sections:
        level = min(max(section.level, 2), 6)
        parts.append(f"<h{level}>{inline(section.title)}</h{level}>")
        for item in section.items:
            if isinstance(item, Table):
                parts.append(table_html(item))
            elif isinstance(item, Figure):
                parts.append(figure_html(item))
            else:
                parts.append(f"<p>{inline(item)}</p>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"
