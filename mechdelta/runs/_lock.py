"""An exclusive lock on a run directory: one process at a time writes it.

``run_lock(run_dir, command)`` holds an exclusive ``fcntl.flock`` on ``RUN/.mechdelta.lock`` for
the duration of a ``with`` block; a second process gets :class:`~mechdelta.errors.RunLockedError`
at once (no waiting), naming the holder's pid, host, command and start time, which the holder
writes into the lock file.

Why ``flock`` rather than a pid file created with ``O_CREAT | O_EXCL``: the kernel releases a
flock when its process ends for *any* reason (an exception, Ctrl-C, SIGKILL, the OOM killer, a
crash), so a lock can never go stale and there is nothing to take over by guesswork. A pid file
left behind by a killed process has to be judged dead by checking its pid, which is wrong once
the pid is reused and impossible for a process on another host sharing the filesystem. A lock
file that a killed holder leaves on disk is simply locked again by the next process.

The holder unlinks the lock file *while still holding it*, and an acquirer checks that the file
it locked is still the one at the path (else it retries), so two processes can never both believe
they hold the lock. The lock is reentrant within one thread (``mechdelta run`` holds it around
:func:`~mechdelta.runs.run.run_experiment`, which takes it again); another thread of the same
process is refused like another process. On network filesystems a flock is as good as the
server's lock support (Linux NFS clients map it to POSIX byte-range locks). On Windows the lock
is an ``msvcrt`` byte-range lock, also released by the OS when the process ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mechdelta.errors import RunError, RunLockedError

__all__ = ["LOCK_FILE", "run_lock"]

LOCK_FILE = ".mechdelta.lock"

_HELD: dict[tuple[str, int], int] = {}  # (run dir, thread id) -> depth of nested run_lock
_HELD_GUARD = threading.Lock()

if sys.platform == "win32":  # pragma: no cover - not exercised on the Linux CI
    import msvcrt

    _WIN_OFFSET = 1 << 30  # lock a byte past the holder text, so others can still read it

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, _WIN_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock_and_close(fd: int, path: Path) -> None:
        try:
            os.lseek(fd, _WIN_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):  # fails while another process has it open: fine
            path.unlink()

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock_and_close(fd: int, path: Path) -> None:
        try:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # while still held: see the module docstring
        finally:
            os.close(fd)  # releases the flock


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _locked_error(run_dir: Path, path: Path) -> RunLockedError:
    holder = _read_holder(path)
    pid = holder.get("pid") if isinstance(holder.get("pid"), int) else None
    host = holder.get("host") if isinstance(holder.get("host"), str) else None
    if pid is None:
        who = "another process"
        stop = "stop it"
    else:
        here = host is None or host == socket.gethostname()
        who = f"process {pid}" + ("" if here else f" on host {host}")
        if holder.get("command"):
            who += f" (`{holder['command']}`"
            who += f", since {holder['started']})" if holder.get("started") else ")"
        stop = f"stop it (kill {pid}{'' if here else f' on {host}'})"
    return RunLockedError(
        f"run directory {os.fspath(run_dir)!r} is in use by {who}, which is writing there now. "
        f"Wait for it to finish, or {stop}, then re-run this command (an interrupted run resumes "
        "where it stopped). The lock is released when that process exits.",
        pid=pid,
        host=host,
    )


def _acquire(run_dir: Path, command: str) -> int:
    path = run_dir / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunError(
                f"cannot create the lock file {os.fspath(path)!r} ({exc.strerror}): the run "
                "directory must be writable"
            ) from None
        try:
            if not _try_lock(fd):
                raise _locked_error(run_dir, path)
            try:
                same = os.path.samestat(os.stat(path), os.fstat(fd))
            except FileNotFoundError:
                same = False
            if not same:  # the holder we waited on unlinked it: lock the new file instead
                os.close(fd)
                continue
            started = datetime.now(UTC).isoformat(timespec="seconds")
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": started,
                "command": command,
            }
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise


@contextlib.contextmanager
def run_lock(
    run_dir: str | os.PathLike[str], command: str, *, create: bool = False
) -> Iterator[Path]:
    """Hold the run directory's exclusive lock for the ``with`` block (see the module docstring).

    ``create`` makes the directory (and its parents) first; otherwise a missing directory raises
    :class:`~mechdelta.errors.RunError`. A lock held elsewhere raises
    :class:`~mechdelta.errors.RunLockedError` at once. Released on every exit path.
    """
    root = Path(run_dir)
    if root.exists() and not root.is_dir():
        raise RunError(f"{os.fspath(root)!r} exists and is not a directory")
    if not root.is_dir():
        if not create:
            raise RunError(f"{os.fspath(root)!r} is not a directory: no run there")
        root.mkdir(parents=True, exist_ok=True)
    key = (os.path.realpath(root), threading.get_ident())
    with _HELD_GUARD:
        depth = _HELD.get(key, 0)
        if depth:
            _HELD[key] = depth + 1
    if depth:  # reentrant: this thread holds it already
        try:
            yield root
        finally:
            with _HELD_GUARD:
                _HELD[key] -= 1
        return
    fd = _acquire(root, command)
    with _HELD_GUARD:
        _HELD[key] = 1
    try:
        yield root
    finally:
        with _HELD_GUARD:
            del _HELD[key]
        _unlock_and_close(fd, root / LOCK_FILE)
