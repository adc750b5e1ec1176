"""The run directory: its layout, its manifest, and reading stored analyses back (they are
written by :func:`mechdelta.runs._store.save_analysis`).

.. code-block:: text

    RUN/
      manifest.json               versions, model and prompt hashes, seeds, resolved config, timings
      results/<analysis id>/      the result's own save (safetensors + JSON), table.parquet, and
                                  analysis.json, written last: its presence marks the analysis
                                  complete, and it holds a SHA-256 of every other file
        verification/<direction>/ an attribution's exact-patch check (``verify = k``): the
                                  Verification's own save, one per direction
        verification.parquet      its table (with a direction column)
        reliability/[<direction>/] split-half reliability of a sweep's (or an attribution's)
                                  site ranking (tasks of 8 prompts or more): Spearman, top-k
                                  overlap and both halves' scores, safetensors + JSON
                                  (:func:`mechdelta.stats.reliability.save_reliability`)
        control/                  the same sweep on the experiment's control pair ([control])
        explanation/              an explain analysis' explanation (mechdelta.runs._explain)
      results/.partial/<id>/      a series (explain) analysis' finished pairs (stages) while it
                                  runs, removed once it is stored: a resumed run skips them
      figures/<analysis id>.json  the figure JSON, plus .html / .png / ... per [output] figures;
                                  more figures of one analysis are <id>.<what>.json (see
                                  :func:`result_figures`: <id>.verification, <id>.reliability,
                                  a circuit's faithfulness curve <id>.curve, a series'
                                  trajectories at the series' scale <id>.series)
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
import json
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechdelta.errors import MechDeltaError, RunCorruptError, RunError, RunIncompleteError
from mechdelta.runs.experiment import Experiment
from mechdelta.stats.reliability import load_reliability

__all__ = [
    "RUN_FORMAT",
    "RUN_FORMAT_VERSION",
    "AnalysisExtras",
    "StoredRun",
    "circuit_figure_name",
    "figure_names",
    "read_manifest",
    "reliability_figure_name",
    "result_figures",
    "result_loaders",
    "run_command",
    "verification_figure_name",
]

RUN_FORMAT = "mechdelta-run"
RUN_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RESULTS = "results"
FIGURES = "figures"
ANALYSIS = "analysis.json"
TABLE = "table.parquet"
VERIFICATION = "verification"
VERIFICATION_TABLE = "verification.parquet"
RELIABILITY = "reliability"
CONTROL = "control"
PARTIAL = ".partial"
_ANALYSIS_FORMAT = "mechdelta-analysis"
_MANIFEST_KEYS = ("format", "format_version", "status", "config", "models", "task", "analyses")


def result_loaders() -> dict[str, Callable[[Path], Any]]:
    """Result type name (as stored in ``analysis.json``) -> its ``load``."""
    from mechdelta.attribution._edge_result import EdgeAttribution
    from mechdelta.attribution.results import AttributionResult
    from mechdelta.circuits.circuit import Circuit
    from mechdelta.circuits.series_result import SeriesCircuits, SeriesResult
    from mechdelta.core.weights import WeightDiff
    from mechdelta.patching.results import PatchResult, SweepResult
    from mechdelta.patching.shift import FactorialResult, ShiftResult
    from mechdelta.runs._explain import load_explanation

    return {
        "AttributionResult": AttributionResult.load,
        "EdgeAttribution": EdgeAttribution.load,
        "ShiftResult": ShiftResult.load,
        "SweepResult": SweepResult.load,
        "PatchResult": PatchResult.load,
        "BothDirections": _load_both,
        "FactorialResult": FactorialResult.load,
        "WeightDiff": WeightDiff.load,
        "Circuit": Circuit.load,
        "SeriesResult": SeriesResult.load,
        "SeriesCircuits": SeriesCircuits.load,
        "StoredExplanation": load_explanation,
    }


def _load_both(path: Path) -> Any:
    """A stored two-direction result; circuits (``both.json`` naming ``Circuit``) included."""
    from mechdelta.circuits.circuit import Circuit
    from mechdelta.errors import ResultFormatError
    from mechdelta.patching.results import BothDirections

    marker = Path(path) / "both.json"
    try:
        kind = json.loads(marker.read_text("utf-8")).get("result")
    except (OSError, ValueError, AttributeError):
        kind = None  # BothDirections.load says what is wrong
    if kind == "Circuit":
        try:
            return BothDirections(
                Circuit.load(Path(path) / "reference_to_intervened"),
                Circuit.load(Path(path) / "intervened_to_reference"),
            )
        except MechDeltaError as exc:
            raise ResultFormatError(f"{os.fspath(path)!r}: {exc}") from exc
    return BothDirections.load(path)


def _parts(result: Any) -> list[Any]:
    """The one-direction results of a result (both of a BothDirections, else itself)."""
    from mechdelta.patching.results import BothDirections

    return list(result) if isinstance(result, BothDirections) else [result]


def _direction_dir(direction: Any) -> str:
    return str(direction.value).replace("->", "_to_")


def _direction_short(direction: Any) -> str:
    from mechdelta.runs.analyses import _DIRECTION_SHORT

    return _DIRECTION_SHORT[direction]


def _verification(part: Any) -> Any:
    """The :class:`~mechdelta.Verification` an attribution result carries (else None)."""
    from mechdelta.attribution.results import AttributionResult

    return part.verification if isinstance(part, AttributionResult) else None


def _attach_verifications(root: Path, result: Any) -> None:
    """Give a loaded attribution result back the verification it was stored with."""
    from mechdelta.attribution.results import AttributionResult, Verification

    for part in _parts(result):
        if not isinstance(part, AttributionResult):
            continue
        path = root / VERIFICATION / _direction_dir(part.direction)
        if path.is_dir():
            # AttributionResult.verification reads this attribute (set by verify())
            object.__setattr__(part, "_verification", Verification.load(path))


def figure_names(analysis_id: str, result: Any, reliability: Any = None) -> list[str]:
    """The names of :func:`result_figures` (without building the figures)."""
    names = [name for name, _ in _figure_sources(analysis_id, result)]
    return names + ([reliability_figure_name(analysis_id)] if reliability is not None else [])


def result_figures(
    analysis_id: str, result: Any, *, reliability: Any = None, alpha: float = 0.05
) -> dict[str, Any]:
    """Every figure of one result, by name (its file stem under ``figures/``).

    ``<id>``: the result's own figure; a two-direction edge attribution has one per direction
    instead, ``<id>.r2i`` and ``<id>.i2r``. A circuit adds its faithfulness curve,
    ``<id>.curve`` (both directions: ``<id>.r2i``, ``<id>.r2i.curve``, ``<id>.i2r``, ...). An attribution verified against exact patching adds
    the estimated-vs-exact scatter, ``<id>.verification`` (``<id>.verification.r2i`` and
    ``.i2r`` for both directions). With a stored split-half ``reliability``, ``<id>.reliability``
    (one panel per direction). A series: see :func:`mechdelta.runs._series.series_figure_sources`.
    Sweep heat maps grey the sites not significant at ``alpha``.
    Built from the result alone: the same stored result gives the same figures.
    """
    out = {name: _figure(source, alpha) for name, source in _figure_sources(analysis_id, result)}
    if reliability is not None:
        from mechdelta.plotting import reliability_figure

        out[reliability_figure_name(analysis_id)] = reliability_figure(reliability)
    return out


def _figure(source: Any, alpha: float) -> Any:
    """``source.figure()``, with the significance overlay at ``alpha`` for sweep grids."""
    from mechdelta.patching.results import BothDirections, SweepResult

    if isinstance(source, SweepResult):
        from mechdelta.plotting import sweep_figure

        return sweep_figure(source, alpha=alpha)
    if isinstance(source, BothDirections) and isinstance(
        source.reference_to_intervened, SweepResult
    ):
        from mechdelta.plotting import both_directions_figure

        return both_directions_figure(source, alpha=alpha)
    return source.figure()


def _figure_sources(analysis_id: str, result: Any) -> list[tuple[str, Any]]:
    """(figure name, the object whose ``figure()`` draws it) for every figure of a result."""
    from mechdelta.attribution._edge_result import EdgeAttribution
    from mechdelta.circuits.circuit import Circuit
    from mechdelta.patching.results import BothDirections
    from mechdelta.runs._explain import explain_figure_sources
    from mechdelta.runs._series import series_figure_sources

    for composite in (series_figure_sources, explain_figure_sources):  # series, explanations
        if (sources := composite(analysis_id, result)) is not None:
            return sources
    parts = _parts(result)
    out: list[tuple[str, Any]] = []
    if isinstance(parts[0], Circuit):
        for p in parts:
            name = circuit_figure_name(analysis_id, p.direction, len(parts) > 1)
            out += [(name, p), (f"{name}.curve", _CircuitCurve(p))]
        return out
    if isinstance(result, BothDirections) and isinstance(parts[0], EdgeAttribution):
        out += [(f"{analysis_id}.{_direction_short(p.direction)}", p) for p in parts]
    else:
        out.append((analysis_id, result))
    for part in parts:
        v = _verification(part)
        if v is not None:
            out.append((verification_figure_name(analysis_id, part.direction, len(parts) > 1), v))
    return out


@dataclass(frozen=True)
class _CircuitCurve:
    """A circuit's faithfulness curve, as a figure source."""

    circuit: Any

    def figure(self) -> Any:
        from mechdelta.plotting import circuit_curve_figure

        return circuit_curve_figure(self.circuit)


def circuit_figure_name(analysis_id: str, direction: Any, both: bool) -> str:
    """The name of a circuit's graph figure (``both``: one of a two-direction search); its
    faithfulness curve is ``<that>.curve``."""
    return f"{analysis_id}.{_direction_short(direction)}" if both else analysis_id


def reliability_figure_name(analysis_id: str) -> str:
    """The name of an analysis' split-half reliability figure."""
    return f"{analysis_id}.{RELIABILITY}"


def verification_figure_name(analysis_id: str, direction: Any, both: bool) -> str:
    """The name of an attribution's verification figure (``both``: of a two-direction result)."""
    name = f"{analysis_id}.{VERIFICATION}"
    return f"{name}.{_direction_short(direction)}" if both else name


# --- what a run stores with an analysis -------------------------------------------------------


@dataclass(frozen=True)
class AnalysisExtras:
    """What a run stores with an analysis besides its result: the split-half ``reliability``
    of its site ranking, its result on the control pair, what was done or why not (``info``,
    kept in ``analysis.json``), and warnings of these extra computations (``notes``)."""

    reliability: Any = None
    control: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        """The stored result of one analysis (a ShiftResult, SweepResult, BothDirections, ...;
        an attribution with its ``verification`` when it was verified)."""
        rec = self.record(analysis_id, verify=verify)
        loader = result_loaders().get(str(rec.get("result_type")))
        if loader is None:
            raise RunError(
                f"analysis {analysis_id!r} stores an unknown result type {rec.get('result_type')!r}"
            )
        try:
            result = loader(self.result_dir(analysis_id))
            _attach_verifications(self.result_dir(analysis_id), result)
            return result
        except MechDeltaError as exc:
            raise self._corrupt(f"analysis {analysis_id!r} cannot be read: {exc}") from None

    def reliability(self, analysis_id: str, *, verify: bool = True) -> Any:
        """The analysis' stored split-half reliability (a Reliability, a dict by direction, or
        None when the run did not compute one: see the record's ``reliability`` entry)."""
        self.record(analysis_id, verify=verify)
        try:
            return load_reliability(self.result_dir(analysis_id) / RELIABILITY)
        except MechDeltaError as exc:
            raise self._corrupt(
                f"analysis {analysis_id!r}: its reliability cannot be read: {exc}"
            ) from None

    def control(self, analysis_id: str, *, verify: bool = True) -> Any:
        """The analysis' result on the experiment's control pair (None without one)."""
        rec = self.record(analysis_id, verify=verify)
        kind = rec.get("control_type")
        if kind is None:
            return None
        loader = result_loaders().get(str(kind))
        if loader is None:
            raise RunError(f"analysis {analysis_id!r} stores an unknown control type {kind!r}")
        try:
            return loader(self.result_dir(analysis_id) / CONTROL)
        except MechDeltaError as exc:
            raise self._corrupt(
                f"analysis {analysis_id!r}: its control result cannot be read: {exc}"
            ) from None

    def table(self, analysis_id: str) -> Any:
        """The analysis' stored parquet table as a DataFrame."""
        import pandas as pd

        self.record(analysis_id)
        return pd.read_parquet(self.result_dir(analysis_id) / TABLE)
