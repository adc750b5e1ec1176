"""mechdelta.core.progress: plain lines when stderr is not a terminal, a tqdm bar on a terminal,
nothing when disabled, and the iterable passed through unchanged in every mode."""

from __future__ import annotations

import io
import sys
from typing import Any

import pytest

from mechdelta.core import progress as P


class FakeClock:
    """Each call advances time by ``step`` seconds."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class Log(io.StringIO):
    """A redirected stderr (a log file, CI): not a terminal."""

    def isatty(self) -> bool:
        return False


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def redirect(monkeypatch: pytest.MonkeyPatch, stream: io.StringIO) -> io.StringIO:
    """Replace sys.stderr for the rest of the test (inside the test: pytest's capture re-installs
    its own stderr after fixtures run)."""
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_redirected_stderr_gets_plain_lines_at_most_every_tenth(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = redirect(monkeypatch, Log())
    monkeypatch.setattr(P, "_clock", FakeClock(1.0))  # one second per item: 100 s in all
    items = list(range(100))
    out = list(P.progress(items, desc="head_out reference_to_intervened"))
    assert out == items
    text = lines(log)
    assert "\r" not in log.getvalue()  # no carriage-return bar in a log
    assert all(t.startswith("[mechdelta] head_out reference_to_intervened: ") for t in text)
    assert len(text) == 10  # 9 intermediate lines (10%, ..., 90%) and the final one
    assert text[0].endswith("10/100 (10%), 10 s elapsed, ~1 min 30 s left")
    assert "50/100 (50%)" in text[4]
    assert text[-1].endswith(": 100 done in 1 min 40 s")


def test_lines_are_rate_limited_in_time_too(monkeypatch: pytest.MonkeyPatch) -> None:
    log = redirect(monkeypatch, Log())
    monkeypatch.setattr(P, "_clock", FakeClock(0.125))  # 10% per 0.25 s: too fast for a line each
    list(P.progress(range(20), desc="fast", enabled=True))
    assert lines(log) == [  # at most one line per MIN_SECONDS (2 s), then the final one
        "[mechdelta] fast: 16/20 (80%), 2.0 s elapsed, ~0.5 s left",
        "[mechdelta] fast: 20 done in 2.5 s",
    ]


def test_a_short_loop_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    log = redirect(monkeypatch, Log())
    monkeypatch.setattr(P, "_clock", FakeClock(0.01))
    assert list(P.progress(range(50), desc="quick", enabled=True)) == list(range(50))
    assert log.getvalue() == ""


def test_slow_items_get_a_line_at_least_every_max_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    log = redirect(monkeypatch, Log())
    monkeypatch.setattr(P, "_clock", FakeClock(P.MAX_SECONDS / 3))
    gen = (i for i in range(7))  # no len(): total unknown
    assert list(P.progress(gen, desc="slow")) == list(range(7))
    text = lines(log)
    assert text[0] == "[mechdelta] slow: 3 done, 30 s elapsed"
    assert text[-1] == "[mechdelta] slow: 7 done in 1 min 20 s"


def test_disabled_writes_nothing_and_passes_through(monkeypatch: pytest.MonkeyPatch) -> None:
    log = redirect(monkeypatch, Log())
    monkeypatch.setattr(P, "_clock", FakeClock(100.0))  # slow enough for lines, were it enabled
    items = [object(), None, "x", 3]
    it = P.progress(items, desc="off", enabled=False)
    assert list(it) == items and all(a is b for a, b in zip(items, items, strict=True))
    assert log.getvalue() == ""


def test_auto_is_on_from_five_items(monkeypatch: pytest.MonkeyPatch) -> None:
    log = redirect(monkeypatch, Log())
    monkeypatch.setattr(P, "_clock", FakeClock(100.0))
    assert list(P.progress(range(4), desc="four")) == [0, 1, 2, 3]
    assert log.getvalue() == ""  # the engine's rule: no bar for 4 jobs or fewer
    assert list(P.progress(range(5), desc="five")) == [0, 1, 2, 3, 4]
    assert lines(log)[-1] == "[mechdelta] five: 5 done in 8 min 20 s"
    log.truncate(0)
    log.seek(0)
    list(P.progress(range(4), desc="forced", enabled=True))
    assert lines(log)[-1].startswith("[mechdelta] forced: 4 done")


def test_items_are_passed_through_unchanged_and_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    log = redirect(monkeypatch, Log())
    monkeypatch.setattr(P, "_clock", FakeClock(0.0))
    pulled: list[int] = []

    def source() -> Any:
        for i in range(10):
            pulled.append(i)
            yield (i, [i])

    it = P.progress(source(), total=10, desc="lazy")
    first = next(it)
    assert first == (0, [0]) and pulled == [0]  # one item at a time, not read ahead
    assert [*map(lambda t: t[0], it)] == list(range(1, 10))
    assert log.getvalue() == ""


def test_total_may_differ_from_the_items(monkeypatch: pytest.MonkeyPatch) -> None:
    log = redirect(monkeypatch, Log())
    monkeypatch.setattr(P, "_clock", FakeClock(10.0))
    assert list(P.progress(range(3), total=5, desc="short")) == [0, 1, 2]
    assert lines(log)[-1] == "[mechdelta] short: 3/5 done in 40 s"


def test_a_terminal_gets_a_tqdm_bar_on_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    term = redirect(monkeypatch, Terminal())
    items = list(range(8))
    assert list(P.progress(items, desc="bar")) == items
    text = term.getvalue()
    assert "\r" in text and "bar" in text and "0/8" in text  # tqdm redraws in place
    assert "[mechdelta]" not in text
    silent = redirect(monkeypatch, Terminal())
    assert list(P.progress(items, desc="bar", enabled=False)) == items
    assert silent.getvalue() == ""


def test_no_stderr_at_all_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", None)
    monkeypatch.setattr(P, "_clock", FakeClock(100.0))
    assert list(P.progress(range(6), desc="nowhere")) == list(range(6))


def test_not_a_notebook_outside_a_kernel() -> None:
    assert P._in_notebook() is False


def test_notebook_bar_is_tqdm_notebook_when_in_a_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a kernel the widget bar is chosen, through tqdm.notebook (never tqdm.auto's warning)."""
    made: list[dict[str, Any]] = []

    class FakeBar:
        def __init__(self, iterable: Any, **kwargs: Any) -> None:
            self.iterable = iterable
            made.append(kwargs)

        def __iter__(self) -> Any:
            return iter(self.iterable)

        def close(self) -> None:
            made.append({"closed": True})

    monkeypatch.setattr(P, "_in_notebook", lambda: True)
    monkeypatch.setattr(P, "_notebook_bar", lambda: FakeBar)
    assert list(P.progress(range(6), desc="widget")) == list(range(6))
    assert made == [{"total": 6, "desc": "widget", "leave": False}, {"closed": True}]


def test_the_real_notebook_bar_import_emits_no_warning() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls = P._notebook_bar()
    from tqdm import notebook

    assert cls is notebook.tqdm  # ipywidgets is a dev dependency
