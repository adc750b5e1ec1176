"""Progress of long loops (sweeps, figure export), shown where a person will see it.

:func:`progress` wraps an iterable and picks the display from where the output goes:

* in Jupyter (an IPython kernel with ipywidgets): tqdm's notebook bar;
* on a terminal (``sys.stderr`` is a TTY): a tqdm bar on stderr, removed when done;
* anywhere else (stderr redirected to a log file, CI, a pipe): plain lines on stderr, e.g.
  ``[mechdelta] head_out reference_to_intervened: 72/144 (50%), 21 s elapsed, ~21 s left``.

Plain lines, not :mod:`logging` records: progress is for the person watching the output, and it
goes where tqdm's bar would have gone. Python's logging drops INFO records until an application
configures it, so logging would leave scripts and CI logs as silent as before; a line on stderr
is seen everywhere and silenced the same way as the bar (``enabled=False``). A carriage-return
bar written to a file is one line of hundreds of redraws; instead a line is written at each
further tenth of the work at most every :data:`MIN_SECONDS` (so a loop of a few seconds writes
nothing), at least every :data:`MAX_SECONDS` while it runs, and once when a loop that wrote
anything finishes.

The notebook bar is imported from ``tqdm.notebook`` directly, not ``tqdm.auto``: the automatic
choice warns (``TqdmExperimentalWarning`` / ``TqdmWarning`` without ipywidgets), and warnings
are errors in this package's tests. Nothing global is changed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["AUTO_MIN_ITEMS", "MAX_SECONDS", "MIN_SECONDS", "progress"]

T = TypeVar("T")

AUTO_MIN_ITEMS = 5  # enabled=None shows progress from this many items on (the engine's "> 4 jobs")
STEP = 0.1  # plain lines: one per further tenth of the work ...
MIN_SECONDS = 2.0  # ... but at most one per this many seconds (and none in a loop this short)
MAX_SECONDS = 30.0  # ... and at least one per this many seconds while the loop runs
PREFIX = "[mechdelta]"
_clock = time.monotonic  # tests replace it with a fake clock


def progress(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    enabled: bool | None = None,
) -> Iterator[T]:
    """Iterate over ``iterable`` unchanged while showing progress (see the module docstring).

    Args:
        iterable: any iterable; its items are yielded as they are, in order.
        total: the number of items (default ``len(iterable)`` where it has one).
        desc: what is being done, e.g. ``"head_out reference_to_intervened"``.
        enabled: ``True`` show progress, ``False`` show nothing, ``None`` (auto) show it when there
            are at least :data:`AUTO_MIN_ITEMS` items (or their number is unknown).
    """
    if total is None:
        total = _length(iterable)
    if enabled is None:
        enabled = total is None or total >= AUTO_MIN_ITEMS
    if not enabled:
        return iter(iterable)
    if _in_notebook():
        bar = _notebook_bar()
        if bar is not None:
            return _tqdm(bar, iterable, total, desc, None)
    stream = sys.stderr
    if stream is not None and _isatty(stream):
        from tqdm import tqdm

        return _tqdm(tqdm, iterable, total, desc, stream)
    return _lines(iterable, total, desc, stream)


def _length(iterable: Iterable[Any]) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _in_notebook() -> bool:
    """An IPython *kernel* (Jupyter, VS Code, nbclient), not a terminal IPython shell."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
        return shell is not None and "IPKernelApp" in shell.config
    except Exception:  # an unusual or half-initialised IPython: treat as no notebook
        return False


def _notebook_bar() -> Any:
    """tqdm's widget bar, or None without ipywidgets (then the stderr display is used)."""
    try:
        from tqdm import notebook
    except Exception:
        return None
    return notebook.tqdm if getattr(notebook, "IProgress", None) is not None else None


def _tqdm(cls: Any, iterable: Iterable[T], total: int | None, desc: str, file: Any) -> Iterator[T]:
    kwargs: dict[str, Any] = {"total": total, "desc": desc or None, "leave": False}
    if file is not None:
        kwargs["file"] = file
    bar = cls(iterable, **kwargs)
    try:
        yield from bar
    finally:
        bar.close()


def _lines(iterable: Iterable[T], total: int | None, desc: str, stream: Any) -> Iterator[T]:
    label = f"{PREFIX} {desc}: " if desc else f"{PREFIX} "
    start = last = _clock()
    done = shown = 0  # items done; items done when the last line was written
    wrote = False
    for item in iterable:
        yield item
        done += 1
        if total is not None and done >= total:
            continue  # the end has a line of its own
        now = _clock()
        stepped = total is not None and done - shown >= STEP * total
        if (stepped and now - last >= MIN_SECONDS) or now - last >= MAX_SECONDS:
            _write(stream, label + _status(done, total, now - start))
            last, shown, wrote = now, done, True
    elapsed = _clock() - start
    if wrote or elapsed >= MIN_SECONDS:
        _write(stream, label + _status(done, total, elapsed, final=True))


def _status(done: int, total: int | None, elapsed: float, final: bool = False) -> str:
    if final:
        of = f"/{total}" if total is not None and total != done else ""
        return f"{done}{of} done in {_seconds(elapsed)}"
    if not total:
        return f"{done} done, {_seconds(elapsed)} elapsed"
    left = elapsed * (total - done) / max(done, 1)
    return (
        f"{done}/{total} ({100 * done // total}%), {_seconds(elapsed)} elapsed, "
        f"~{_seconds(left)} left"
    )


def _seconds(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    m, sec = divmod(round(s), 60)
    return f"{m} min {sec:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def _write(stream: Any, line: str) -> None:
    if stream is None:  # pythonw and some embedded interpreters have no stderr
        return
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):  # a closed or broken stream must not break the computation
        pass
