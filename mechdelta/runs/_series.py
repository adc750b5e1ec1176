"""``kind = "series"`` analyses in runs: loading the experiment's ``[series]``, its provenance, the
pre-flight checks, and the executor that runs a sweep, attribution or circuit search on every
pair of the series (:class:`~mechdelta.circuits.CheckpointSeries`).

Resuming is per pair: each pair's finished result is saved at once under
``results/.partial/<analysis id>/pair_<k>/`` (the result's own save, then ``done.json`` naming its
label and type, written last), and a re-launched run loads the pairs found there instead of
recomputing them. The directory is removed once the whole analysis is stored; a run resumed with
another configuration or other weights is refused before anything is computed
(:func:`~mechdelta.runs._resume.check_identity` checks every checkpoint's weights hash), so a
stored pair is always one the current run would compute.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechdelta.core._io import atomic_write_json
from mechdelta.errors import ConfigError, MechDeltaError
from mechdelta.runs.experiment import AnalysisSpec, Experiment

__all__ = [
    "DONE",
    "DirCache",
    "finished_pairs",
    "preflight_series",
    "run_series",
    "series_figure_name",
    "series_figure_sources",
    "series_pair",
    "series_provenance",
]

#: The marker of a finished pair in a partial series analysis.
DONE = "done.json"


def series_pair(series: Any) -> Any:
    """The experiment's pair when ``[pair]`` is omitted (``series = true``): the series'
    reference checkpoint (reference) vs its last checkpoint (intervened; its first when the
    reference is the last)."""
    from mechdelta.core.pair import ModelPair

    r = series.reference
    other = len(series) - 1 if r != len(series) - 1 else 0
    return ModelPair(
        series.models[r],
        series.models[other],
        names=(series.names[r], series.names[other]),
        allow_identical=series.allow_identical,
    )


def series_provenance(series: Any) -> dict[str, Any]:
    """The series' checkpoints for the manifest: label, name, weights hash each, and the
    reference's label."""
    from mechdelta.core.provenance import weights_hash

    return {
        "reference": series.labels[series.reference],
        "checkpoints": [
            {"label": lab, "name": name, "weights_hash": weights_hash(m.state_dict())}
            for lab, name, m in zip(series.labels, series.names, series.models, strict=True)
        ],
    }


def preflight_series(exp: Experiment, series: Any, task: Any) -> None:
    """Check every series analysis against the series' models and the task before computing."""
    from mechdelta.core.graph import Graph
    from mechdelta.patching.sweep import sweep_grid

    specs = [a for a in exp.analyses if a.kind == "series"]
    if not specs:
        return
    first = series.pairs("reference")[0]
    try:
        prepared = task.prepare(
            first.tokenizer, n_ctx=int(first.cfg.n_ctx), d_vocab=int(first.cfg.d_vocab)
        )
    except MechDeltaError as exc:
        raise ConfigError(f"[series] cannot run the experiment's task: {exc}") from None
    for spec in specs:
        inner = spec.inner()
        try:
            if inner.kind in ("sweep", "attribute"):
                assert inner.component is not None
                length = prepared.seq_len if inner.kind == "sweep" else prepared.frame_len
                _, dims, _ = sweep_grid(inner.component, first.shape, length, **inner.grid())
                if "position" in dims:
                    prepared.require_aligned("a by-position series analysis")
            if inner.kind == "circuit" and inner.level == "edge":
                Graph.from_model(first)
        except MechDeltaError as exc:
            raise ConfigError(f"{spec.where} cannot run on this series and task: {exc}") from None


class DirCache:
    """A :class:`~mechdelta.circuits.series.PairCache` in a directory (see the module
    docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _dir(self, index: int) -> Path:
        return self.root / f"pair_{index:03d}"

    def load(self, index: int, label: Any) -> Any | None:
        from mechdelta.runs.rundir import result_loaders

        path = self._dir(index)
        try:
            record = json.loads((path / DONE).read_text("utf-8"))
            loader = result_loaders()[record["type"]]
            if record["label"] != label:
                return None
            return loader(path)
        except (OSError, ValueError, KeyError, TypeError, MechDeltaError):
            return None  # not finished (or unreadable): computed again

    def save(self, index: int, label: Any, result: Any) -> None:
        path = self._dir(index)
        if path.exists():
            shutil.rmtree(path)
        result.save(path)
        atomic_write_json(path / DONE, {"label": label, "type": type(result).__name__})


def finished_pairs(root: Path) -> int:
    """How many pairs a partial series analysis holds (0: none, or no such directory)."""
    return sum(1 for p in Path(root).glob(f"pair_*/{DONE}")) if Path(root).is_dir() else 0


def run_series(ctx: Any, spec: AnalysisSpec, cache_dir: Path | None) -> Any:
    """The series analysis ``spec`` on the context's series and task: a
    :class:`~mechdelta.circuits.SeriesResult` (sweeps, attributions) or a
    :class:`~mechdelta.circuits.SeriesCircuits` (circuit searches); pairs found in
    ``cache_dir`` are not recomputed."""
    from mechdelta.circuits.series_result import SeriesCircuits

    series, inner, mode = ctx.series, spec.inner(), spec.compare
    assert series is not None and mode is not None  # validated by Experiment / AnalysisSpec
    common: dict[str, Any] = {
        "mode": mode,
        "progress": ctx.progress,
        "cache": None if cache_dir is None else DirCache(cache_dir),
        "executor": ctx.executor,  # passed through to each pair's sweep / attribute / search
    }
    if inner.kind == "sweep":
        assert inner.component is not None
        return series.sweep(
            ctx.task,
            inner.component,
            inner.direction,
            **common,
            **inner.grid(),
            batch_budget=inner.batch_budget,
            **ctx.boot,
        )
    if inner.kind == "attribute":
        kw = inner.attribution_kwargs()
        component, direction = kw.pop("component"), kw.pop("direction")
        kw.pop("verify")
        return series.attribute(ctx.task, component, direction, **common, **kw, **ctx.boot)
    circuits = series.search_circuit(
        ctx.task, direction=inner.direction, **inner.circuit_kwargs(), **common
    )
    pairs = tuple((series.labels[r], series.labels[i]) for r, i in series.pair_indices(mode))
    return SeriesCircuits.from_dict(circuits, pairs, mode, series.labels)


# --- figures ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SeriesScale:
    """A series' score trajectories at the series' scale, as a figure source."""

    result: Any

    def figure(self) -> Any:
        return self.result.figure(scale="series")


def series_figure_name(analysis_id: str) -> str:
    """The name of a series' trajectory figure at the series' scale (``<id>``: the pairs')."""
    return f"{analysis_id}.series"


def series_figure_sources(analysis_id: str, result: Any) -> list[tuple[str, Any]] | None:
    """The figures of a series result (None for other results): a series of sweeps or
    attributions has ``<id>`` (score trajectories, each score a fraction of its own pair's
    shift) and ``<id>.series`` (each site's effect as a fraction of the whole series' shift,
    :meth:`~mechdelta.circuits.SeriesResult.scored`); a series of circuits has ``<id>`` (circuit
    membership over the checkpoints)."""
    from mechdelta.circuits.series_result import SeriesCircuits, SeriesResult

    if isinstance(result, SeriesResult):
        return [(analysis_id, result), (series_figure_name(analysis_id), _SeriesScale(result))]
    if isinstance(result, SeriesCircuits):
        return [(analysis_id, result)]
    return None
