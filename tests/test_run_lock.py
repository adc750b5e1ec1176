"""The run directory's lock, with real processes: a second writer (another `mechdelta run` process
of another experiment or of the same one; `figures`, `report`) is refused while a run holds the
directory, with a one-line error naming the holder; a lock left by a killed process is taken over; the lock is
reentrant in one thread and exclusive across threads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mechdelta.cli import app
from mechdelta.errors import RunLockedError
from mechdelta.report._build import write_report
from mechdelta.runs._lock import LOCK_FILE, run_lock
from mechdelta.runs.run import regenerate_figures, run_experiment
from tests._tiny_run import TOML, copy_run, tiny_config

EXE = Path(sys.executable).with_name("mechdelta")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
runner = CliRunner()

# `mechdelta run ARGS...` whose first analysis waits (inside the run) until a file appears.
SLOW_RUN = r"""
import sys, time
from pathlib import Path
import mechdelta.runs.run as runs
started, release = Path(sys.argv[1]), Path(sys.argv[2])
real = runs.EXECUTORS["shift"]

def slow(ctx, spec):
    started.write_text("in the first analysis")
    deadline = time.monotonic() + 300
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return real(ctx, spec)

runs.EXECUTORS["shift"] = slow
from mechdelta.cli import main
sys.argv = ["mechdelta", "run", *sys.argv[3:]]
main()
"""

# Holds the lock of a directory until killed.
HOLDER = r"""
import sys, time
from mechdelta.runs._lock import run_lock
with run_lock(sys.argv[1], "test holder"):
    print("locked", flush=True)
    time.sleep(300)
"""

OTHER_TOML = """name = "other"
[pair]
builtin = "tiny"
[run]
n_boot = 100
[output]
figures = ["html"]
[[analyses]]
kind = "weight_diff"
[[analyses]]
kind = "factorial"
"""


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the first run ended early (rc {proc.returncode}): {out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail("the first run did not reach its first analysis")
        time.sleep(0.05)


@pytest.mark.slow
def test_second_writers_are_refused_while_a_run_holds_the_directory(tmp_path):
    assert EXE.is_file(), f"{EXE} missing: install the package (bash scripts/setup.sh)"
    (tmp_path / "tiny.toml").write_text(TOML)
    (tmp_path / "other.toml").write_text(OTHER_TOML)
    out = tmp_path / "run"
    done: dict[str, tuple[tuple[str, str], int]] = {}
    started, release = tmp_path / "started", tmp_path / "release"
    args = ["tiny.toml", "--out", str(out), "-q"]
    first = subprocess.Popen(
        [sys.executable, "-c", SLOW_RUN, str(started), str(release), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=tmp_path,
    )
    try:
        _wait_for(started, first)
        # the first run is inside its first analysis, holding the directory: two more runs, each
        # a real process, started together
        commands = {
            "another experiment": ["run", "other.toml", "--out", str(out), "-q"],
            "the same experiment": ["run", "tiny.toml", "--out", str(out), "-q"],
        }
        procs = {
            name: subprocess.Popen(
                [str(EXE), *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=ENV,
                cwd=tmp_path,
            )
            for name, args in commands.items()
        }
        # meanwhile, in this process: figures and report are writers too
        for cli_args in (["figures", str(out), "-q"], ["report", str(out)]):
            res = runner.invoke(app, cli_args)
            done[cli_args[0]] = ((res.stdout, res.stderr), res.exit_code)
        done |= {name: (p.communicate(timeout=300), p.returncode) for name, p in procs.items()}
        assert len(done) == 4
        for name, ((stdout, stderr), rc) in done.items():
            assert rc == 1, f"{name}: exit {rc}\n{stdout}\n{stderr}"
            lines = [ln for ln in stderr.splitlines() if ln.strip()]
            assert len(lines) == 1, f"{name}: {stderr}"
            assert lines[0].startswith(f"error: run directory '{out}' is in use by process ")
            assert f"process {first.pid} (`mechdelta run tiny.toml --out {out}`, since " in lines[0]
            assert f"kill {first.pid}" in lines[0] and "re-run this command" in lines[0]
            assert stdout == "", name
        # the Python API: the typed error, naming the holder
        needle = rf"is in use by process {first.pid} \(`mechdelta run tiny.toml --out "
        with pytest.raises(RunLockedError, match=needle) as info:
            write_report(out)
        assert info.value.pid == first.pid and info.value.host == socket.gethostname()
        with pytest.raises(RunLockedError, match=needle):
            run_experiment(tiny_config(), out, quiet=True)
    finally:
        release.touch()
    assert not (out / "report.md").exists()

    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    # the first run's results, all of them and nothing else, under its own manifest
    ids = ["shift", "sweep-head_out-both"]
    assert sorted(p.name for p in (out / "results").iterdir()) == ids
    m = json.loads((out / "manifest.json").read_text())
    assert [a["id"] for a in m["analyses"]] == ids and m["status"] == "complete"
    assert [s["computed"] for s in m["sessions"]] == [ids]  # nobody else computed anything
    assert m["experiment"]["name"] == "tiny-test"
    assert "Top sites of sweep-head_out-both" in stdout and "weight_diff" not in stdout
    assert "(2 analyses computed, 0 already complete)" in stdout
    assert not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    out = copy_run(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        needle = rf"is in use by process {holder.pid} \(`test holder`, since "
        with pytest.raises(RunLockedError, match=needle) as info:
            regenerate_figures(out, quiet=True)
        assert info.value.pid == holder.pid and info.value.host == socket.gethostname()
        with pytest.raises(RunLockedError, match=needle):
            write_report(out)
        with pytest.raises(RunLockedError, match=needle):
            run_experiment(tiny_config(), out, quiet=True)
        assert not (out / "report.md").exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the lock file stays behind
        holder.communicate()
    lock = out / LOCK_FILE
    assert json.loads(lock.read_text())["pid"] == holder.pid
    result = run_experiment(tiny_config(), out, quiet=True)  # the dead holder's lock is free
    assert result.computed == () and len(result.skipped) == 5
    assert not lock.exists()
    write_report(out)
    assert (out / "report.md").is_file() and not lock.exists()


def test_the_lock_is_reentrant_in_a_thread_and_exclusive_across_threads(tmp_path):
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with run_lock(tmp_path, "thread"), run_lock(tmp_path, "nested"):  # reentrant
            held.set()
            done.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(60)
        with (
            pytest.raises(RunLockedError, match=rf"process {os.getpid()} \(`thread`"),
            run_lock(tmp_path, "main"),
        ):
            pass
    finally:
        done.set()
        thread.join()
    assert not (tmp_path / LOCK_FILE).exists()
    with run_lock(tmp_path, "main"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["command"] == "main"
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_needs_a_directory(tmp_path):
    from mechdelta.errors import RunError

    with (
        pytest.raises(RunError, match="is not a directory: no run there"),
        run_lock(tmp_path / "absent", "x"),
    ):
        pass
    (tmp_path / "file").write_text("")
    with (
        pytest.raises(RunError, match="exists and is not a directory"),
        run_lock(tmp_path / "file", "x", create=True),
    ):
        pass
    with run_lock(tmp_path / "new" / "run", "x", create=True) as root:
        assert root.is_dir()
