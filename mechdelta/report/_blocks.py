"""Blocks of a transition report (text, tables, figures, code, sections) and their rendering
to Markdown and to one self-contained HTML page (plotly.js inlined once)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mechdelta.runs.rundir import StoredRun

__all__ = [
    "Block",
    "Code",
    "Figure",
    "Link",
    "Section",
    "Table",
    "Text",
    "render_html",
    "render_md",
]

# --- blocks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    """A paragraph of plain text."""

    text: str


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""

    def text(self) -> str:
        """Plain-text rendering with aligned columns (for terminals)."""
        cells = [self.headers, *self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.headers))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


@dataclass(frozen=True)
class Figure:
    """The figure of one analysis (linked in Markdown, embedded in HTML)."""

    analysis_id: str
    caption: str = ""


@dataclass(frozen=True)
class Link:
    """A link to a file next to the report (``href`` relative to it)."""

    text: str
    href: str


@dataclass(frozen=True)
class Code:
    text: str
    lang: str = ""


Block = Text | Table | Figure | Link | Code


@dataclass(frozen=True)
class Section:
    title: str
    blocks: tuple[Block, ...]
    anchor: str = ""


# --- rendering ---------------------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_figure(run: StoredRun, fig: Figure) -> str:
    stem = run.figure_stem(fig.analysis_id)
    caption = fig.caption or fig.analysis_id
    links = []
    for fmt in ("png", "svg"):
        if stem.with_name(f"{stem.name}.{fmt}").is_file():
            links.append(f"![{caption}](figures/{fig.analysis_id}.{fmt})")
            break
    if stem.with_name(f"{stem.name}.html").is_file():
        links.append(f"[interactive figure](figures/{fig.analysis_id}.html)")
    if links:
        return "\n\n".join(links)
    if stem.with_name(f"{stem.name}.json").is_file():
        return f"(figure data: figures/{fig.analysis_id}.json)"
    return f"(figure not written: `mechdelta figures {run.path}` writes it)"


def render_md(
    run: StoredRun, title: str, intro: Sequence[Block], sections: Sequence[Section]
) -> str:
    out = [f"# {title}", ""]

    def block(b: Block) -> list[str]:
        if isinstance(b, Text):
            return [b.text, ""]
        if isinstance(b, Table):
            lines = [f"*{b.caption}*", ""] if b.caption else []
            lines.append("| " + " | ".join(_md_escape(h) for h in b.headers) + " |")
            lines.append("|" + "|".join("---" for _ in b.headers) + "|")
            lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in b.rows]
            return [*lines, ""]
        if isinstance(b, Figure):
            return [_md_figure(run, b), ""]
        if isinstance(b, Link):
            return [f"[{_md_escape(b.text)}]({b.href})", ""]
        return [f"```{b.lang}", b.text, "```", ""]

    for b in intro:
        out += block(b)
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            out += block(b)
    return "\n".join(out).rstrip() + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.5em 0 1.2em}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:left;font-variant-numeric:tabular-nums}th{background:#f3f3f3}caption{text-align:left;
font-style:italic;color:#555;padding-bottom:.3em}pre{background:#f6f6f6;padding:1em;overflow:auto;
font-size:85%}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.figure{margin:1em 0}
"""


def render_html(
    run: StoredRun,
    title: str,
    intro: Sequence[Block],
    sections: Sequence[Section],
    figures: dict[str, Any],
) -> str:
    from plotly.offline import get_plotlyjs

    esc = html.escape
    body: list[str] = [f"<h1>{esc(title)}</h1>"]

    def block(b: Block) -> str:
        if isinstance(b, Text):
            return f"<p>{esc(b.text)}</p>"
        if isinstance(b, Table):
            cap = f"<caption>{esc(b.caption)}</caption>" if b.caption else ""
            head = "".join(f"<th>{esc(h)}</th>" for h in b.headers)
            rows = "".join(
                "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in b.rows
            )
            return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
        if isinstance(b, Figure):
            fig = figures[b.analysis_id]
            div = fig.to_html(
                full_html=False,
                include_plotlyjs=False,
                div_id=f"figure-{b.analysis_id}",
                config={"displaylogo": False, "responsive": True},
            )
            return f'<div class="figure">{div}</div>'
        if isinstance(b, Link):
            return f'<p><a href="{esc(b.href)}">{esc(b.text)}</a></p>'
        return f"<pre><code>{esc(b.text)}</code></pre>"

    body += [block(b) for b in intro]
    for s in sections:
        body.append(f'<h2 id="{esc(s.anchor)}">{esc(s.title)}</h2>')
        body += [block(b) for b in s.blocks]
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{_CSS}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head>\n<body>\n'
        + "\n".join(body)
        + "\n</body></html>\n"
    )
