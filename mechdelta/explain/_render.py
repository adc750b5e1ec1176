"""Rendering of the audit report: Markdown, self-contained HTML, a print HTML and PDF.

- ``report.md``: figures linked from ``figures/`` (PNG when a browser wrote one, else the HTML).
- ``report.html``: one self-contained file (plotly.js inlined once, interactive figures).
- ``report.pdf``: a print edition (the same text, figures as embedded PNGs, A4 pages) printed
  by headless Chromium (the one the set-up installs, or ``BROWSER_PATH``).
- :func:`screenshots`: PNG captures of the HTML page and of each PDF page (PDF pages rendered
  with ``pypdfium2``, the dev extra), so a person or a test can look at what a reader sees.
"""

from __future__ import annotations

import base64
import html
import os
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechdelta.core._io import atomic_write_bytes, atomic_write_text
from mechdelta.errors import ExportError
from mechdelta.report._blocks import Code, Section, Table, Text

__all__ = ["Fig", "print_pdf", "render_html", "render_md", "screenshots"]


@dataclass(frozen=True)
class Fig:
    """A figure of the report, by name (``figures/<name>.*``)."""

    name: str
    caption: str = ""


Block = Text | Table | Fig | Code

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#1a1a1a;line-height:1.45}
h1{font-size:1.7em;border-bottom:2px solid #333;padding-bottom:.2em}
h2{font-size:1.3em;margin-top:1.6em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f2f2f2}caption{caption-side:top;text-align:left;font-style:italic;padding:.2em 0}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
.figure{margin:1em 0}.caption{font-style:italic;font-size:.9em;color:#444}
img{max-width:100%}
@media print{body{max-width:none;margin:0}h2{page-break-after:avoid}
.figure,table{page-break-inside:avoid}}
"""


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_md(
    title: str, sections: Sequence[tuple[Section, Sequence[Block]]], figures: dict[str, Path]
) -> str:
    """Markdown with figures linked relative to the report (``figures/<name>.png|html``)."""
    out = [f"# {title}", ""]
    for section, blocks in sections:
        out += [f"## {section.title}", ""]
        for b in blocks:
            if isinstance(b, Text):
                out += [b.text, ""]
            elif isinstance(b, Table):
                if b.caption:
                    out += [f"*{b.caption}*", ""]
                out.append("| " + " | ".join(_md_escape(h) for h in b.headers) + " |")
                out.append("|" + "|".join("---" for _ in b.headers) + "|")
                out += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in b.rows]
                out.append("")
            elif isinstance(b, Fig):
                png = figures.get(f"{b.name}.png")
                page = figures.get(f"{b.name}.html")
                if png is not None:
                    out.append(f"![{b.caption or b.name}](figures/{png.name})")
                if page is not None:
                    out.append(f"[interactive figure](figures/{page.name})")
                out += [f"*{b.caption}*" if b.caption else "", ""]
            else:
                out += [f"```{b.lang}", b.text, "```", ""]
    return "\n".join(out).rstrip() + "\n"


def render_html(
    title: str,
    sections: Sequence[tuple[Section, Sequence[Block]]],
    figures: dict[str, Any],
    *,
    static: dict[str, bytes] | None = None,
) -> str:
    """One self-contained page. ``figures``: name -> plotly figure (interactive, plotly.js
    inlined once); with ``static`` (name -> PNG bytes) figures are embedded images instead
    (the print edition: no script, nothing to wait for)."""
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    toc = "".join(
        f'<li><a href="#{esc(s.anchor)}">{esc(s.title)}</a></li>' for s, _ in sections if s.anchor
    )
    body.append(f"<nav><ol>{toc}</ol></nav>")
    for section, blocks in sections:
        body.append(f'<h2 id="{esc(section.anchor)}">{esc(section.title)}</h2>')
        for b in blocks:
            if isinstance(b, Text):
                body.append(f"<p>{esc(b.text)}</p>")
            elif isinstance(b, Table):
                cap = f"<caption>{esc(b.caption)}</caption>" if b.caption else ""
                head = "".join(f"<th>{esc(h)}</th>" for h in b.headers)
                rows = "".join(
                    "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in b.rows
                )
                body.append(
                    f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
                )
            elif isinstance(b, Fig):
                cap = f'<div class="caption">{esc(b.caption)}</div>' if b.caption else ""
                if static is not None and b.name in static:
                    data = base64.b64encode(static[b.name]).decode()
                    body.append(
                        f'<div class="figure"><img alt="{esc(b.caption or b.name)}" '
                        f'src="data:image/png;base64,{data}">{cap}</div>'
                    )
                elif static is None and b.name in figures:
                    div = figures[b.name].to_html(
                        full_html=False,
                        include_plotlyjs=False,
                        div_id=f"figure-{b.name}",
                        config={"displaylogo": False, "responsive": True},
                    )
                    body.append(f'<div class="figure">{div}{cap}</div>')
                else:
                    body.append(
                        f"<p><em>(figure {esc(b.name)}: no static image; see the HTML "
                        "report)</em></p>"
                    )
            else:
                body.append(f"<pre><code>{esc(b.text)}</code></pre>")
    script = ""
    if static is None:
        from plotly.offline import get_plotlyjs

        script = f'<script type="text/javascript">{get_plotlyjs()}</script>'
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{_CSS}</style>{script}</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _chromium(args: list[str], what: str) -> None:
    from mechdelta.plotting._export import find_browser

    browser = find_browser()  # ExportError naming the fix when none is found
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ExportError(f"{what}: {browser} failed to run ({exc})") from None
    if proc.returncode != 0:
        raise ExportError(f"{what}: {browser} exited {proc.returncode}: {proc.stderr[-500:]}")


def print_pdf(html_text: str, pdf: Path) -> Path:
    """Print an HTML page (no scripts needed) to ``pdf`` with headless Chromium."""
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "print.html"
        page.write_text(html_text, "utf-8")
        target = Path(tmp) / "out.pdf"
        _chromium(
            ["--no-pdf-header-footer", f"--print-to-pdf={target}", page.as_uri()], "PDF printing"
        )
        if not target.is_file() or target.stat().st_size == 0:
            raise ExportError("PDF printing: Chromium wrote no PDF")
        atomic_write_bytes(pdf, target.read_bytes())
    return pdf


def screenshots(report_dir: str | os.PathLike[str], *, width: int = 1200) -> dict[str, Path]:
    """PNG captures of ``report.html`` (its first ``2 x width`` pixels of height, after the
    figures rendered) and of every page of ``report.pdf``, written to ``<dir>/screens/``."""
    root = Path(report_dir)
    screens = root / "screens"
    screens.mkdir(exist_ok=True)
    out: dict[str, Path] = {}
    page = root / "report.html"
    if page.is_file():
        shot = screens / "report_html.png"
        _chromium(
            [
                f"--window-size={width},{2 * width}",
                "--virtual-time-budget=10000",
                f"--screenshot={shot}",
                page.resolve().as_uri(),
            ],
            "screenshot",
        )
        out["html"] = shot
    pdf = root / "report.pdf"
    if pdf.is_file():
        try:
            import pypdfium2 as pdfium
        except ImportError:
            return out
        doc = pdfium.PdfDocument(str(pdf))
        try:
            for i in range(len(doc)):
                image = doc[i].render(scale=1.5).to_pil()
                path = screens / f"report_pdf_p{i + 1}.png"
                image.save(path)
                out[f"pdf_p{i + 1}"] = path
        finally:
            doc.close()
    return out


def write_text(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    return path
