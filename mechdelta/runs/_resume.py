"""What :func:`~mechdelta.runs.run.run_experiment` finds in ``--out`` before it runs: a fresh
directory, a run of the same experiment to resume (or repair), or something it must refuse.

Everything here runs with the run directory's lock held (:mod:`mechdelta.runs._lock`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from mechdelta.errors import RunCorruptError, RunError
from mechdelta.runs._lock import LOCK_FILE
from mechdelta.runs.experiment import COMPUTE_KEYS, Experiment
from mechdelta.runs.rundir import (
    FIGURES,
    MANIFEST,
    RESULTS,
    StoredRun,
    read_manifest,
    run_command,
)

__all__ = ["check_identity", "damaged_analyses", "prepare_dir"]

_COMPUTE_KEYS = COMPUTE_KEYS
_RUN_NAMES = {MANIFEST, RESULTS, FIGURES, "report.md", "report.html", "shards"}


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return f"{path or 'the configuration'}: stored {a!r}, now {b!r}"


def _entries(out: Path) -> list[Path]:
    """The directory's contents, but for the lock file."""
    return [p for p in out.iterdir() if p.name != LOCK_FILE]


def _only_run_files(out: Path) -> bool:
    """Whether the directory holds a manifest and nothing a run does not write."""
    names = {p.name for p in _entries(out)}
    temporary = {n for n in names if n.startswith(".") and n.endswith(".tmp")}
    return MANIFEST in names and names - temporary <= _RUN_NAMES


def _wipe(out: Path) -> None:
    """Delete a run's contents, keeping the lock file (deleting it would let a second writer in)."""
    for p in _entries(out):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def prepare_dir(out: Path, exp: Experiment, *, overwrite: bool) -> dict[str, Any] | None:
    """The stored manifest to resume from (None: a fresh run); RunError for unusable dirs.

    ``overwrite`` wipes a run directory, never one that is not a mechdelta run: a directory
    counts as a run when its manifest reads, or when it holds a (damaged) ``manifest.json`` and
    nothing a run does not write.
    """
    if not _entries(out):
        return None
    try:
        manifest = read_manifest(out)  # RunError: not a run directory, or a corrupt one
    except RunError as exc:
        if not _only_run_files(out):
            raise
        if overwrite:  # a run whose manifest is damaged: starting over is what was asked
            _wipe(out)
            return None
        raise RunError(
            f"{exc}. Nothing vouches for its stored results, so it cannot be resumed or "
            f"repaired: start it over with `{run_command(out, None, '--overwrite')}`."
        ) from None
    if overwrite:
        _wipe(out)
        return None
    stored = {k: manifest["config"].get(k) for k in _COMPUTE_KEYS}
    if stored != exp.compute_dict():
        now = exp.to_dict()
        raise RunError(
            f"{os.fspath(out)!r} holds a run of a different experiment ("
            + _first_difference(stored, {k: now[k] for k in _COMPUTE_KEYS})
            + "). Choose a new --out for this experiment (or pass --overwrite to replace it)."
        )
    return manifest


def damaged_analyses(run: StoredRun) -> dict[str, RunCorruptError]:
    """Analyses stored as complete whose files fail their checksums (or whose record is
    unreadable): id -> the error. Missing or half-written analyses are not listed: a resumed run
    recomputes those anyway."""
    damaged: dict[str, RunCorruptError] = {}
    for analysis_id in run.ids:
        if not run.is_complete(analysis_id):
            continue
        try:
            run.record(analysis_id)
        except RunCorruptError as exc:
            damaged[analysis_id] = exc
    return damaged


def check_identity(
    out: Path,
    stored: dict[str, Any],
    models: dict[str, Any],
    task: dict[str, Any],
    control: dict[str, Any] | None = None,
    series: dict[str, Any] | None = None,
) -> None:
    """RunError unless the models and prompts (and the control pair's models, and the series'
    checkpoints) are the ones the stored run was made with."""
    checks = [
        ("reference weights", stored["models"]["reference"]["weights_hash"], models["reference"]["weights_hash"]),
        ("intervened weights", stored["models"]["intervened"]["weights_hash"], models["intervened"]["weights_hash"]),
        ("tokenizer", stored["models"].get("tokenizer_hash"), models.get("tokenizer_hash")),
        ("prompt set", stored["task"].get("prompt_hash"), task.get("prompt_hash")),
    ]  # fmt: skip
    if control is not None or stored.get("control_models") is not None:
        before, now = stored.get("control_models") or {}, control or {}
        for role in ("reference", "intervened"):
            checks.append(
                (
                    f"control {role} weights",
                    (before.get(role) or {}).get("weights_hash"),
                    (now.get(role) or {}).get("weights_hash"),
                )
            )
    if series is not None or stored.get("series") is not None:
        before_s, now_s = stored.get("series") or {}, series or {}
        checks.append(
            (
                "series checkpoints",
                [(c["label"], c["weights_hash"]) for c in before_s.get("checkpoints", [])],
                [(c["label"], c["weights_hash"]) for c in now_s.get("checkpoints", [])],
            )
        )
    for what, before, now in checks:
        if before != now:
            raise RunError(
                f"{os.fspath(out)!r} was run with other {what} (hash {before}, now {now}): its "
                "stored results would not match a resumed run. Choose a new --out (or pass "
                "--overwrite to start this one over)."
            )
