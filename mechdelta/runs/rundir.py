"""The run directory: its layout, its manifest, and reading stored analyses back.

.. code-block:: text

    RUN/
      manifest.json               versions, model and prompt hashes, seeds, resolved config, timings
      results/<analysis id>/      the result's own save (safetensors + JSON), table.parquet, and
                                  analysis.json, written last: its presence marks the analysis
                                  complete, and it holds a SHA-256 of every other file
      figures/<analysis id>.json  the figure JSON, plus .html / .png / ... per [output] figures
      report.md, report.html      from ``mechdelta report RUN``
      .mechdelta.lock             exists while a process writes the directory: holds an exclusive
                                  lock (pid, host, command inside; see mechdelta.runs._lock)

Every file is written atomically (temporary name, then rename). Anything missing, partial,
corrupt or of another format raises :class:`~mechdelta.errors.RunError` saying what and where
(:class:`~mechdelta.errors.RunIncompleteError` for unfinished runs,
:class:`~mechdelta.errors.RunCorruptError` for damaged results, which ``--repair`` recomputes).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechdelta.core._io import atomic_write_bytes, atomic_write_json
from mechdelta.errors import MechDeltaError, RunCorruptError, RunError, RunIncompleteError
from mechdelta.runs.experiment import Experiment

__all__ = [
    "RUN_FORMAT",
    "RUN_FORMAT_VERSION",
    "StoredRun",
    "read_manifest",
    "result_loaders",
    "run_command",
]

RUN_FORMAT = "mechdelta-run"
RUN_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RESULTS = "results"
FIGURES = "figures"
ANALYSIS = "analysis.json"
TABLE = "table.parquet"
_ANALYSIS_FORMAT = "mechdelta-analysis"
_MANIFEST_KEYS = ("format", "format_version", "status", "config", "models", "task", "analyses")


def result_loaders() -> dict[str, Callable[[Path], Any]]:
    """Result type name (as stored in ``analysis.json``) -> its ``load``."""
    from mechdelta.core.weights import WeightDiff
    from mechdelta.patching.results import BothDirections, PatchResult, SweepResult
    from mechdelta.patching.shift import FactorialResult, ShiftResult

    return {
        "ShiftResult": ShiftResult.load,
        "SweepResult": SweepResult.load,
        "PatchResult": PatchResult.load,
        "BothDirections": BothDirections.load,
        "FactorialResult": FactorialResult.load,
        "WeightDiff": WeightDiff.load,
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _payload_files(root: Path) -> list[Path]:
    """Every file under an analysis directory but the marker and temporary files."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.name != ANALYSIS and not p.name.startswith(".")
    )


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise RunError(f"{what} {os.fspath(path)!r} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{what} {os.fspath(path)!r} is corrupt (not JSON: {exc})") from None
    if not isinstance(data, dict):
        raise RunError(f"{what} {os.fspath(path)!r} is corrupt (not a JSON object)")
    return data


def read_manifest(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated manifest of a run directory; :class:`RunError` if absent or corrupt."""
    root = Path(run_dir)
    if not root.is_dir():
        raise RunError(f"{os.fspath(root)!r} is not a directory: no run there")
    path = root / MANIFEST
    if not path.is_file():
        raise RunError(
            f"{os.fspath(root)!r} has no {MANIFEST}: not a mechdelta run directory (or the run "
            "was stopped before it started)"
        )
    data = _read_json(path, "the run manifest")
    missing = [k for k in _MANIFEST_KEYS if k not in data]
    if data.get("format") != RUN_FORMAT or missing:
        raise RunError(
            f"{os.fspath(path)!r} is not a mechdelta run manifest"
            + (f" (missing {missing})" if missing else "")
        )
    if data.get("format_version") != RUN_FORMAT_VERSION:
        raise RunError(
            f"{os.fspath(path)!r} has run format version {data.get('format_version')}; this "
            f"mechdelta reads version {RUN_FORMAT_VERSION}"
        )
    return data


def run_command(run_dir: Path, manifest: dict[str, Any] | None, *flags: str) -> str:
    """The ``mechdelta run`` command line that resumes (or, with flags, repairs) a run.

    Names the experiment file the run was started from when the manifest recorded it."""
    source = None
    if manifest is not None and isinstance(manifest.get("experiment"), dict):
        source = manifest["experiment"].get("source")
    exp = shlex.quote(source) if isinstance(source, str) else "EXPERIMENT.toml"
    return " ".join(["mechdelta run", exp, "--out", shlex.quote(os.fspath(run_dir)), *flags])


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(run_dir / MANIFEST, manifest)


def write_table(path: Path, frame: Any) -> None:
    """A DataFrame as parquet, atomically."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def save_analysis(
    run_dir: Path,
    analysis_id: str,
    *,
    kind: str,
    params: dict[str, Any],
    result: Any,
    seconds: float,
    warnings: list[str],
) -> dict[str, Any]:
    """Store one analysis: the result's own save, its table, then ``analysis.json`` (last)."""
    root = run_dir / RESULTS / analysis_id
    result.save(root)
    write_table(root / TABLE, result.to_dataframe())
    record = {
        "format": _ANALYSIS_FORMAT,
        "format_version": RUN_FORMAT_VERSION,
        "id": analysis_id,
        "kind": kind,
        "params": params,
        "result_type": type(result).__name__,
        "seconds": round(seconds, 3),
        "warnings": warnings,
        "files": {p.relative_to(root).as_posix(): _sha256(p) for p in _payload_files(root)},
    }
    atomic_write_json(root / ANALYSIS, record)
    return record


def clear_analysis(run_dir: Path, analysis_id: str) -> None:
    """Remove what an interrupted attempt at an analysis left behind."""
    root = run_dir / RESULTS / analysis_id
    if root.exists():
        shutil.rmtree(root)


@dataclass(frozen=True)
class StoredRun:
    """A run directory opened for reading: its manifest and its analyses' stored results."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, run_dir: str | os.PathLike[str]) -> StoredRun:
        root = Path(run_dir)
        return cls(root, read_manifest(root))

    @property
    def experiment(self) -> Experiment:
        try:
            return Experiment.from_resolved(self.manifest["config"])
        except (MechDeltaError, KeyError, TypeError, AttributeError) as exc:
            raise RunError(
                f"the configuration stored in {os.fspath(self.path / MANIFEST)!r} is invalid: {exc}"
            ) from None

    @property
    def ids(self) -> tuple[str, ...]:
        """The experiment's analysis ids, in order."""
        return self.experiment.ids

    def result_dir(self, analysis_id: str) -> Path:
        return self.path / RESULTS / analysis_id

    def figure_stem(self, analysis_id: str) -> Path:
        return self.path / FIGURES / analysis_id

    def is_complete(self, analysis_id: str) -> bool:
        return (self.result_dir(analysis_id) / ANALYSIS).is_file()

    def incomplete(self) -> tuple[str, ...]:
        return tuple(i for i in self.ids if not self.is_complete(i))

    def command(self, *flags: str) -> str:
        """The ``mechdelta run`` command line that resumes this run (see :func:`run_command`)."""
        return run_command(self.path, self.manifest, *flags)

    def require_complete(self) -> None:
        """Raise :class:`RunIncompleteError` unless every analysis of the experiment is stored."""
        missing = self.incomplete()
        if missing:
            raise RunIncompleteError(
                f"the run in {os.fspath(self.path)!r} is partial: {len(missing)} of "
                f"{len(self.ids)} analyses are not complete ({', '.join(missing)}); resume it "
                f"with the command that started it, `{self.command()}` (complete analyses are "
                "kept)."
            )

    def require_finished(self) -> None:
        """Raise :class:`RunIncompleteError` unless every analysis is stored *and* the run
        finished (manifest status ``complete``: its figures were written)."""
        self.require_complete()
        status = self.manifest.get("status")
        if status != "complete":
            raise RunIncompleteError(
                f"the run in {os.fspath(self.path)!r} is incomplete: its manifest says status "
                f"{status!r}, so it was interrupted before it finished (its figures may be "
                f"missing). Finish it with the command that started it: `{self.command()}` "
                "(complete analyses are kept), then write the report."
            )

    def record(self, analysis_id: str, *, verify: bool = True) -> dict[str, Any]:
        """The analysis' ``analysis.json``, its files checked against their SHA-256."""
        root = self.result_dir(analysis_id)
        if not self.is_complete(analysis_id):
            raise RunError(
                f"analysis {analysis_id!r} in {os.fspath(self.path)!r} is not complete (no "
                f"{RESULTS}/{analysis_id}/{ANALYSIS}); re-launch the run to finish it"
            )
        try:
            rec = _read_json(root / ANALYSIS, f"the record of analysis {analysis_id!r}")
        except RunError as exc:
            raise self._corrupt(str(exc)) from None
        if rec.get("format") != _ANALYSIS_FORMAT or rec.get("id") != analysis_id:
            raise self._corrupt(
                f"{os.fspath(root / ANALYSIS)!r} is not the record of {analysis_id!r}"
            )
        files = rec.get("files")
        if not isinstance(files, dict) or not files:
            raise self._corrupt(f"{os.fspath(root / ANALYSIS)!r} lists no files: corrupt")
        if verify:
            for rel, digest in sorted(files.items()):
                p = root / rel
                if not p.is_file():
                    raise self._corrupt(
                        f"analysis {analysis_id!r}: {os.fspath(p)!r} is missing (the run "
                        "directory was modified after the run)"
                    )
                if _sha256(p) != digest:
                    raise self._corrupt(
                        f"analysis {analysis_id!r}: {os.fspath(p)!r} is corrupt (its SHA-256 "
                        "differs from the one recorded when it was written)"
                    )
        return rec

    def _corrupt(self, what: str) -> RunCorruptError:
        return RunCorruptError(
            f"{what}. Repair the run: `{self.command('--repair')}` recomputes only the damaged "
            "analyses and keeps the others (run_experiment(..., repair=True)); `--overwrite` "
            "instead starts the whole run over."
        )

    def load(self, analysis_id: str, *, verify: bool = True) -> Any:
        """The stored result of one analysis (a ShiftResult, SweepResult, BothDirections, ...)."""
        rec = self.record(analysis_id, verify=verify)
        loader = result_loaders().get(str(rec.get("result_type")))
        if loader is None:
            raise RunError(
                f"analysis {analysis_id!r} stores an unknown result type {rec.get('result_type')!r}"
            )
        try:
            return loader(self.result_dir(analysis_id))
        except MechDeltaError as exc:
            raise self._corrupt(f"analysis {analysis_id!r} cannot be read: {exc}") from None

    def table(self, analysis_id: str) -> Any:
        """The analysis' stored parquet table as a DataFrame."""
        import pandas as pd

        self.record(analysis_id)
        return pd.read_parquet(self.result_dir(analysis_id) / TABLE)
