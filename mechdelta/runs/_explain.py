"""``kind = "explain"`` analyses: :func:`~mechdelta.explain.explain` inside a run.

The explanation is computed with ``out=`` the analysis' partial directory
(``results/.partial/<id>/``, :func:`~mechdelta.runs._store.partial_dir`), which a run does not
delete when it (re)starts an analysis: every stage explain finishes is stored there at once, so a
re-run of an interrupted ``mechdelta run`` resumes the explanation at its first missing stage
(explain's own stage store, :mod:`mechdelta.explain._store`). Once the explanation is finished, its
whole directory (stages, ``explain.json``, ``located.json``, the audit report
``report.{md,html,json,pdf}`` and its ``figures/``) is copied into the stored analysis as
``results/<id>/explanation/`` (covered by the analysis' checksums), and the partial directory is
removed. :meth:`~mechdelta.runs.rundir.StoredRun.load` returns the
:class:`~mechdelta.explain.Explanation` (:func:`load_explanation`), with ``reports`` naming the
stored audit report files.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechdelta.errors import RunError

__all__ = [
    "EXPLANATION_DIR",
    "REPORT_FORMATS",
    "StoredExplanation",
    "explain_extras",
    "explain_figure_sources",
    "kept_stages",
    "load_explanation",
    "report_files",
    "run_explain",
]

#: Where a stored explain analysis keeps the explanation's directory, under ``results/<id>/``.
EXPLANATION_DIR = "explanation"
#: The audit report's formats, in the order the run report lists them.
REPORT_FORMATS = ("html", "pdf", "md", "json")
_LOCK = ".mechdelta.lock"


@dataclass(frozen=True)
class StoredExplanation:
    """An :class:`~mechdelta.explain.Explanation` computed into ``source`` (its ``out``), as a
    run stores it: :meth:`save` copies ``source`` into ``<root>/explanation/``, and the
    analysis' table is the explanation's warranted claims (:meth:`to_dataframe`)."""

    explanation: Any
    source: Path

    def save(self, root: str | os.PathLike[str]) -> None:
        target = Path(root) / EXPLANATION_DIR
        if target.exists():
            shutil.rmtree(target)
        ignore = shutil.ignore_patterns(_LOCK, ".*.tmp")
        shutil.copytree(self.source, target, ignore=ignore)

    def to_dataframe(self) -> Any:
        """The warranted claims, one row each (:meth:`~mechdelta.explain.Explanation.to_dataframe`)."""
        return self.explanation.to_dataframe()


def run_explain(ctx: Any, spec: Any) -> StoredExplanation:
    """The explain analysis ``spec`` on the context's pair and task, its stages kept in the
    analysis' partial directory (resumed from there after an interruption)."""
    from mechdelta.explain.pipeline import explain
    from mechdelta.runs._explain_spec import explain_kwargs
    from mechdelta.runs._store import partial_dir

    if ctx.run_dir is None:
        raise RunError("an explain analysis needs the run directory to store its stages in")
    out = partial_dir(Path(ctx.run_dir), spec.id)
    explanation = explain(
        ctx.pair,
        ctx.task,
        out=out,
        **explain_kwargs(spec, ctx.experiment.run),
        overwrite=True,  # stages of other parameters (a renamed analysis) are recomputed
        progress=ctx.progress,
        executor=ctx.executor,
    )
    return StoredExplanation(explanation, out)


def explain_extras(result: StoredExplanation) -> Any:
    """What the analysis record (``analysis.json``) keeps about the explanation: its status,
    and the stages loaded from an interrupted attempt instead of computed."""
    from mechdelta.runs.rundir import AnalysisExtras

    e = result.explanation
    return AnalysisExtras(
        info={
            "explain": {
                "status": e.status,
                "loaded_stages": list(e.provenance.get("loaded_stages", [])),
                "timings_s": {k: round(float(v), 3) for k, v in e.timings.items()},
            }
        }
    )


def kept_stages(partial: Path) -> int:
    """How many finished stages an interrupted explanation left in its partial directory."""
    stages = Path(partial) / "stages"
    return sum(1 for _ in stages.glob("*.done")) if stages.is_dir() else 0


def report_files(explanation_dir: Path) -> dict[str, Path]:
    """Format -> path of the audit report files an explanation directory holds."""
    out: dict[str, Path] = {}
    for fmt in REPORT_FORMATS:
        path = Path(explanation_dir) / f"report.{fmt}"
        if path.is_file():
            out[fmt] = path
    return out


def load_explanation(path: Path) -> Any:
    """The :class:`~mechdelta.explain.Explanation` stored with an explain analysis."""
    from mechdelta.explain.explanation import Explanation

    root = Path(path) / EXPLANATION_DIR
    return Explanation.load(root).with_reports(report_files(root))


def explain_figure_sources(analysis_id: str, result: Any) -> list[tuple[str, Any]] | None:
    """(figure name, figure source) of an explanation's figures in the run's ``figures/``
    (None for other results): ``<id>`` the shift (the metric per prompt on both models), and
    when it was explained ``<id>.<component>`` (each patching map, both directions),
    ``<id>.steering`` (the dose-response against random directions) and ``<id>.circuit``."""
    from mechdelta.explain.explanation import Explanation

    if not isinstance(result, Explanation):
        return None
    out: list[tuple[str, Any]] = [(analysis_id, result.shift)]
    if not result.explained:
        return out
    out += [(f"{analysis_id}.{comp}", both) for comp, both in result.patching.items()]
    if result.steering is not None:
        out.append((f"{analysis_id}.steering", result.steering))
    if result.circuit is not None:
        out.append((f"{analysis_id}.circuit", result.circuit))
    return out
