"""Storing one analysis in a run directory (the layout: :mod:`mechdelta.runs.rundir`).

:func:`save_analysis` writes the result's own save, its table, an attribution's verification and
what the run computed with it (:class:`~mechdelta.runs.rundir.AnalysisExtras`: the split-half
reliability, the control pair's result), then ``analysis.json`` last: its presence marks the
analysis complete, and it holds the SHA-256 of every other file, which
:meth:`~mechdelta.runs.rundir.StoredRun.record` checks on reading. :func:`clear_analysis` removes
what an interrupted attempt left behind, but a series analysis' finished pairs
(:func:`partial_dir`, kept so that a resumed run skips them); :func:`clear_partial` removes those
once the analysis is stored. :func:`write_manifest` writes the run's manifest.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

from mechdelta.core._io import atomic_write_bytes, atomic_write_json
from mechdelta.runs.rundir import (
    _ANALYSIS_FORMAT,
    ANALYSIS,
    CONTROL,
    MANIFEST,
    PARTIAL,
    RELIABILITY,
    RESULTS,
    RUN_FORMAT_VERSION,
    TABLE,
    VERIFICATION,
    VERIFICATION_TABLE,
    AnalysisExtras,
    _direction_dir,
    _parts,
    _sha256,
    _verification,
)
from mechdelta.stats.reliability import save_reliability

__all__ = [
    "clear_analysis",
    "clear_partial",
    "partial_dir",
    "save_analysis",
    "write_manifest",
    "write_table",
]


def save_analysis(
    run_dir: Path,
    analysis_id: str,
    *,
    kind: str,
    params: dict[str, Any],
    result: Any,
    seconds: float,
    warnings: list[str],
    extras: AnalysisExtras | None = None,
) -> dict[str, Any]:
    """Store one analysis: the result's own save, its table, an attribution's verification,
    the extras (split-half reliability, the control pair's result), then ``analysis.json``
    (last: its checksums cover the extras too)."""
    root = run_dir / RESULTS / analysis_id
    result.save(root)
    write_table(root / TABLE, result.to_dataframe())
    _save_verifications(root, result)
    extra_record: dict[str, Any] = {}
    if extras is not None:
        if extras.reliability is not None:
            save_reliability(root / RELIABILITY, extras.reliability)
        if extras.control is not None:
            extras.control.save(root / CONTROL)
            extra_record["control_type"] = type(extras.control).__name__
        extra_record.update(extras.info)
        if extras.notes:
            extra_record["notes"] = list(extras.notes)
    record = {
        "format": _ANALYSIS_FORMAT,
        "format_version": RUN_FORMAT_VERSION,
        "id": analysis_id,
        "kind": kind,
        "params": params,
        "result_type": type(result).__name__,
        "seconds": round(seconds, 3),
        "warnings": warnings,
        **extra_record,
        "files": {p.relative_to(root).as_posix(): _sha256(p) for p in _payload_files(root)},
    }
    atomic_write_json(root / ANALYSIS, record)
    return record


def clear_analysis(run_dir: Path, analysis_id: str) -> None:
    """Remove what an interrupted attempt at an analysis left behind."""
    root = run_dir / RESULTS / analysis_id
    if root.exists():
        shutil.rmtree(root)


def partial_dir(run_dir: Path, analysis_id: str) -> Path:
    """Where a series analysis keeps its finished pairs until it is stored."""
    return run_dir / RESULTS / PARTIAL / analysis_id


def clear_partial(run_dir: Path, analysis_id: str) -> None:
    """Remove a stored series analysis' finished pairs (and ``.partial`` once empty)."""
    path = partial_dir(run_dir, analysis_id)
    if path.exists():
        shutil.rmtree(path)
    if path.parent.is_dir() and not any(path.parent.iterdir()):
        path.parent.rmdir()


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    """The run's ``manifest.json``, atomically."""
    atomic_write_json(run_dir / MANIFEST, manifest)


def write_table(path: Path, frame: Any) -> None:
    """A DataFrame as parquet, atomically."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def _save_verifications(root: Path, result: Any) -> None:
    """Each direction's verification under ``verification/<direction>/``, with one table."""
    import pandas as pd

    frames = []
    for part in _parts(result):
        v = _verification(part)
        if v is None:
            continue
        v.save(root / VERIFICATION / _direction_dir(part.direction))
        frame = v.to_dataframe()
        frame.insert(0, "direction", part.direction.value)
        frames.append(frame)
    if frames:
        write_table(root / VERIFICATION_TABLE, pd.concat(frames, ignore_index=True))


def _payload_files(root: Path) -> list[Path]:
    """Every file under an analysis directory but the marker and temporary files."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.name != ANALYSIS and not p.name.startswith(".")
    )
