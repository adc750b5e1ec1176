"""Figure export: self-contained HTML (no browser needed) and static PNG/SVG/PDF through kaleido.

Static export drives a headless Chromium through kaleido. Kaleido's own Chrome download cannot
work offline, so the browser is the system one (``bash scripts/setup.sh`` installs Debian's
``chromium``) or whatever ``BROWSER_PATH`` names. Starting the browser costs ~2 s per image; a
:class:`FigureWriter` keeps one browser open so later images take ~0.25 s::

    with FigureWriter() as writer:
        for name, fig in figures.items():
            writer.write(fig, out / name)  # or write_figure(...): it uses the open writer

Every file is written atomically (temporary file in the same directory, then renamed).

In a notebook, :class:`StaticFallbackRenderer` adds a PNG of each figure to what the notebook
shows, for viewers that cannot run plotly.js (GitHub, nbviewer); the notebook registers it
itself, mechdelta never changes plotly's renderers.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import shutil
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from plotly.io.base_renderers import MimetypeRenderer

from mechdelta.core._io import atomic_write_bytes, atomic_write_text
from mechdelta.errors import ExportError, MissingDependencyError

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = [
    "STATIC_FORMATS",
    "TEXT_FORMATS",
    "FigureWriter",
    "StaticFallbackRenderer",
    "find_browser",
    "write_figure",
]

TEXT_FORMATS = ("html", "json")
STATIC_FORMATS = ("png", "svg", "pdf", "jpeg", "webp")
_BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_DEFAULT_WIDTH, _DEFAULT_HEIGHT = 900, 600
_RENDER_TIMEOUT_S = 120.0

_FIX = (
    "Fix: run `bash scripts/setup.sh` (installs Debian's chromium via apt), or `apt install "
    "chromium`, or set BROWSER_PATH to a Chrome/Chromium executable. HTML export needs no "
    "browser: formats=('html',)."
)


def find_browser() -> str:
    """The Chrome/Chromium executable for static export: ``BROWSER_PATH``, else one on ``PATH``.

    Raises :class:`~mechdelta.errors.ExportError` naming the fix when there is none.
    """
    env = os.environ.get("BROWSER_PATH")
    if env:
        if Path(env).is_file() and os.access(env, os.X_OK):
            return env
        raise ExportError(
            f"BROWSER_PATH={env!r} is not an executable file, so static figures (PNG/SVG/PDF) "
            f"cannot be rendered. {_FIX}"
        )
    for name in _BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise ExportError(
        "static figure export (PNG/SVG/PDF) needs a Chrome/Chromium browser and none was found "
        f"(BROWSER_PATH is unset; none of {', '.join(_BROWSER_NAMES)} is on PATH). {_FIX}"
    )


class _DropIgnoredBrowserNoise(logging.Filter):
    """choreographer logs a full traceback for a browser message it cannot decode and then
    ignores (\"JSONError decoding message. Ignoring\"); harmless, but it lands in the middle of
    the demo's output. Only that record is dropped; every other choreographer log passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "decoding message. Ignoring" not in record.getMessage()


def _kaleido() -> Any:
    try:
        import kaleido
    except ImportError as exc:  # a hard dependency, but say what to do if it went missing
        raise MissingDependencyError(
            "static figure export needs kaleido>=1.0: pip install 'kaleido>=1.0'"
        ) from exc
    # After the import: choreographer's loggers must be created by its own logger class
    # (logistro's, with extra levels), not by a first plain logging.getLogger here.
    logger = logging.getLogger("choreographer.channels.pipe")
    if not any(isinstance(f, _DropIgnoredBrowserNoise) for f in logger.filters):
        logger.addFilter(_DropIgnoredBrowserNoise())
    return kaleido


class _Renderer:
    """One headless browser, opened once, rendering figures on a private event loop thread.

    Kaleido's global sync server would do the same, but a browser that fails to start leaves
    its calls blocked forever; here every failure (at start or per figure) surfaces as an
    :class:`ExportError` and every wait is bounded.
    """

    def __init__(self, browser: str) -> None:
        self.browser = browser
        self._kaleido: Any = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="mechdelta-kaleido", daemon=True
        )
        self._thread.start()
        try:
            self._call(self._open(), "start the browser")
        except BaseException:
            self._stop_loop()
            raise

    async def _open(self) -> None:
        k = _kaleido().Kaleido(path=self.browser, mathjax=False)
        await k.__aenter__()
        self._kaleido = k

    def _call(self, coro: Any, what: str) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=_RENDER_TIMEOUT_S)
        except TimeoutError:
            future.cancel()
            raise ExportError(
                f"kaleido did not {what} within {_RENDER_TIMEOUT_S:.0f} s (browser "
                f"{self.browser!r}). {_FIX}"
            ) from None
        except ExportError:
            raise
        except Exception as exc:
            why = exc.args[0] if exc.args else exc  # kaleido's later args suggest a download
            raise ExportError(
                f"kaleido could not {what} with the browser {self.browser!r}: "
                f"{type(exc).__name__}: {why} {_FIX}"
            ) from exc

    def render(self, fig_dict: dict[str, Any], fmt: str, width: int, height: int, scale: float):
        opts = {"format": fmt, "width": width, "height": height, "scale": scale}
        data = self._call(self._kaleido.calc_fig(fig_dict, opts=opts), f"render a {fmt} image")
        if not isinstance(data, bytes) or not data:
            raise ExportError(f"kaleido returned no {fmt} image data")
        return data

    def close(self) -> None:
        try:
            if self._kaleido is not None and self._thread.is_alive():
                k, self._kaleido = self._kaleido, None
                self._call(k.__aexit__(None, None, None), "close the browser")
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        if not self._loop.is_running():
            self._loop.close()


_ACTIVE: list[FigureWriter] = []
_ACTIVE_LOCK = threading.Lock()


class FigureWriter:
    """Writes many figures with one browser kept open (opened on the first static image).

    Use as a context manager; inside it, :func:`write_figure` uses this writer too. HTML/JSON
    writing never starts the browser, so a writer works without one as long as only those
    formats are asked for.
    """

    def __init__(self, *, scale: float = 1.0) -> None:
        self.scale = scale
        self._renderer: _Renderer | None = None

    def __enter__(self) -> FigureWriter:
        with _ACTIVE_LOCK:
            _ACTIVE.append(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with _ACTIVE_LOCK:
            if self in _ACTIVE:
                _ACTIVE.remove(self)
        self.close()

    @property
    def started(self) -> bool:
        """Whether the browser is open."""
        return self._renderer is not None

    def close(self) -> None:
        """Close the browser (a later static image opens a new one)."""
        renderer, self._renderer = self._renderer, None
        if renderer is not None:
            renderer.close()

    def image_bytes(
        self,
        fig: go.Figure | dict[str, Any],
        fmt: str = "png",
        *,
        width: int | None = None,
        height: int | None = None,
    ) -> bytes:
        """Render ``fig`` (a figure or its dict) as a static image (``png``, ``svg``, ``pdf``,
        ``jpeg``, ``webp``)."""
        fmt = _format(fmt)
        if fmt not in STATIC_FORMATS:
            raise ExportError(f"{fmt!r} is not a static image format ({', '.join(STATIC_FORMATS)})")
        if self._renderer is None:
            self._renderer = _Renderer(find_browser())
        w, h = figure_size(fig, width, height)
        fig_dict = fig if isinstance(fig, dict) else fig.to_plotly_json()
        return self._renderer.render(fig_dict, fmt, w, h, self.scale)

    def write(
        self,
        fig: go.Figure,
        path: str | os.PathLike[str],
        formats: tuple[str, ...] | list[str] = ("html", "png"),
        *,
        width: int | None = None,
        height: int | None = None,
    ) -> dict[str, Path]:
        """Write ``<path>.<format>`` for each format; returns format -> written path.

        Text formats are written first, so with no browser the HTML is on disk before the
        :class:`ExportError` for the static formats is raised.
        """
        fmts = [_format(f) for f in formats]
        unknown = [f for f in fmts if f not in TEXT_FORMATS + STATIC_FORMATS]
        if unknown:
            raise ExportError(
                f"unknown figure format(s) {unknown}; choose from "
                f"{', '.join(TEXT_FORMATS + STATIC_FORMATS)}"
            )
        stem = _stem(Path(path))
        written: dict[str, Path] = {}
        for fmt in sorted(dict.fromkeys(fmts), key=lambda f: f not in TEXT_FORMATS):
            out = stem.with_name(f"{stem.name}.{fmt}")
            if fmt == "html":
                atomic_write_text(out, to_html(fig, div_id=stem.name))
            elif fmt == "json":
                atomic_write_text(out, fig.to_json() + "\n")
            else:
                atomic_write_bytes(out, self.image_bytes(fig, fmt, width=width, height=height))
            written[fmt] = out
        return written


def write_figure(
    fig: go.Figure,
    path: str | os.PathLike[str],
    formats: tuple[str, ...] | list[str] = ("html", "png"),
    *,
    width: int | None = None,
    height: int | None = None,
    scale: float = 1.0,
) -> dict[str, Path]:
    """Write ``fig`` to ``<path>.html`` (self-contained, works offline), ``<path>.png``, ....

    Formats: ``html``, ``json`` (the figure JSON), and through kaleido + Chromium ``png``,
    ``svg``, ``pdf``, ``jpeg``, ``webp``. Size defaults to the figure's own (layout height and
    its suggested export width). Inside ``with FigureWriter():`` the writer's open browser is
    reused; otherwise each call starts one (~2 s). Returns format -> written path.
    """
    with _ACTIVE_LOCK:
        active = _ACTIVE[-1] if _ACTIVE else None
    if active is not None and scale == active.scale:
        return active.write(fig, path, formats, width=width, height=height)
    with FigureWriter(scale=scale) as writer:
        return writer.write(fig, path, formats, width=width, height=height)


def to_html(fig: go.Figure, div_id: str = "figure") -> str:
    """Self-contained HTML (plotly.js inlined, ~5 MB) with a fixed div id: same figure, same bytes."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "-", div_id) or "figure"
    html: str = fig.to_html(
        include_plotlyjs=True,
        full_html=True,
        div_id=f"mechdelta-{safe}",
        config={"displaylogo": False, "responsive": True},
    )
    return html


def figure_size(
    fig: go.Figure | dict[str, Any], width: int | None = None, height: int | None = None
) -> tuple[int, int]:
    """Export size in pixels: explicit, else the figure's layout, else its suggestion, else 900x600.

    ``fig`` may be a figure or its dict (``fig.to_plotly_json()``, what plotly renderers get).
    """
    layout = fig.get("layout", {}) if isinstance(fig, dict) else fig.layout.to_plotly_json()
    meta = layout.get("meta") if isinstance(layout.get("meta"), dict) else {}
    w = width or layout.get("width") or meta.get("export_width") or _DEFAULT_WIDTH
    h = height or layout.get("height") or meta.get("export_height") or _DEFAULT_HEIGHT
    return int(w), int(h)


class StaticFallbackRenderer(MimetypeRenderer):
    """A plotly renderer adding a PNG of each figure, at its export size (:func:`figure_size`),
    to what a notebook shows: JupyterLab and VS Code draw the interactive figure, viewers that
    cannot run plotly.js (GitHub, nbviewer, nbconvert) show the PNG. A notebook registers it for
    itself (mechdelta changes no plotly setting)::

        import plotly.io as pio
        from mechdelta.plotting import StaticFallbackRenderer

        pio.renderers["mechdelta_png"] = StaticFallbackRenderer()
        pio.renderers.default = "plotly_mimetype+mechdelta_png"

    Each image starts the browser (~2 s). With no Chrome/Chromium, or when an image fails, the
    figure is shown without its PNG and a one-line note on stderr says why (once): displaying a
    figure never fails because of the fallback.
    """

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self._unavailable: str | None = None

    def to_mimebundle(self, fig_dict: dict[str, Any]) -> dict[str, str]:
        if self._unavailable is not None:
            return {}
        try:
            find_browser()
            with FigureWriter(scale=self.scale) as writer:
                data = writer.image_bytes(fig_dict, "png")
        except (ExportError, MissingDependencyError) as exc:
            self._unavailable = str(exc)
            print(
                f"note: figures are shown without a static PNG copy (viewers without plotly.js, "
                f"e.g. GitHub, will not see them): {exc}",
                file=sys.stderr,
            )
            return {}
        return {"image/png": base64.b64encode(data).decode("ascii")}


def _format(fmt: str) -> str:
    f = str(fmt).lower().lstrip(".")
    return "jpeg" if f == "jpg" else f


def _stem(path: Path) -> Path:
    """``out/fig.png`` -> ``out/fig``; ``out/L1H2.head_out`` stays (not a format suffix)."""
    if _format(path.suffix) in TEXT_FORMATS + STATIC_FORMATS:
        return path.with_suffix("")
    return path
