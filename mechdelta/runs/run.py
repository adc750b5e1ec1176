"""Reproducible runs: execute an :class:`~mechdelta.runs.experiment.Experiment` into a run directory.

:func:`run_experiment` loads the pair, writes ``manifest.json`` (versions, weight and tokenizer
hashes, the prompt-set hash, seeds, the resolved configuration), runs each analysis and stores it
(see :mod:`mechdelta.runs.rundir` for the layout), then writes every figure from the *stored* results.
Re-launching an interrupted run into the same directory resumes it: analyses already complete are
skipped after checking that the configuration and the model weights are the ones the run began
with, and the final results are identical to an uninterrupted run's. Stored results whose files
fail their checksums are refused (:class:`~mechdelta.errors.RunCorruptError`) unless
``repair=True``, which recomputes just those. :func:`regenerate_figures` rebuilds every figure from
the stored results alone (no model loaded).

Sweeps are also run on two disjoint random halves of the task's prompts (tasks of
:data:`SPLIT_HALF_MIN_PROMPTS` prompts or more; about one more run of the sweep), and the
agreement of their site rankings (:func:`~mechdelta.split_half`) is stored with the analysis;
with a ``[control]`` pair, every sweep is run on it too (same task) and stored with the analysis,
for :func:`~mechdelta.claims`'s seed-variation control (:mod:`mechdelta.runs._controls`). Both
are part of the analysis: stored in its directory before ``analysis.json``, so an interrupted
analysis is recomputed whole; but a series analysis (``kind = "series"``, over the
experiment's ``[series]``) keeps each finished pair, and a resumed run computes only the pairs
left (:mod:`mechdelta.runs._series`), and an explain analysis keeps each finished stage of
its explanation (:mod:`mechdelta.runs._explain`). Inside an analysis, the patched forwards run
on the experiment's ``[executor]`` (in this process, or on a Ray cluster), and with ``shards =
true`` (the default) each finished shard is kept in ``RUN/shards`` until the run completes: a
resumed run, with any executor, computes only the shards left
(:mod:`mechdelta.runs._executor_spec`). The pair is loaded and each analysis computed by
:mod:`mechdelta.runs._executors`; :mod:`mechdelta.runs._store` writes each analysis.

Every writer (a run, figures, the report) holds the directory's exclusive lock
(:mod:`mechdelta.runs._lock`) while it writes: a second process gets
:class:`~mechdelta.errors.RunLockedError` at once instead of mixing its results into the run.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mechdelta.core.provenance import environment
from mechdelta.errors import (
    ConfigError,
    ExportError,
    MechDeltaError,
    RunCorruptError,
    RunError,
    TaskError,
)
from mechdelta.runs._controls import SPLIT_HALF_MIN_PROMPTS, analysis_extras, preflight_control
from mechdelta.runs._executor_spec import (
    ExecutorSpec,
    executor_record,
    open_executor,
    remove_shards,
    stored_shards,
)
from mechdelta.runs._executors import EXECUTORS, RunContext, load_pair
from mechdelta.runs._executors import tiny_task as tiny_task  # the built-in pair's task
from mechdelta.runs._explain import explain_extras, kept_stages
from mechdelta.runs._lock import run_lock
from mechdelta.runs._resume import check_identity, damaged_analyses, prepare_dir
from mechdelta.runs._series import (
    finished_pairs,
    preflight_series,
    series_pair,
    series_provenance,
)
from mechdelta.runs._store import (
    clear_analysis,
    clear_partial,
    partial_dir,
    save_analysis,
    write_manifest,
)
from mechdelta.runs.experiment import Experiment, short_hash
from mechdelta.runs.rundir import (
    FIGURES,
    RUN_FORMAT,
    RUN_FORMAT_VERSION,
    StoredRun,
    result_figures,
)

if TYPE_CHECKING:
    from mechdelta.scale.executor import Executor

__all__ = ["SPLIT_HALF_MIN_PROMPTS", "RunResult", "regenerate_figures", "run_experiment"]

ExperimentLike = Experiment | Mapping[str, Any] | str | os.PathLike[str]


# --- before computing ---------------------------------------------------------------------------


def _preflight(exp: Experiment, pair: Any, prepared: Any) -> None:
    """Check every analysis against the model and prompts before spending compute on any."""
    from mechdelta.core.graph import Graph
    from mechdelta.core.sites import Site
    from mechdelta.patching.sweep import sweep_grid

    for spec in exp.analyses:
        try:
            if spec.kind == "factorial" and prepared.corrupted is None:
                raise TaskError(
                    "the factorial design needs a task with corrupted prompts "
                    "([task] corrupted = [...])"
                )
            if spec.kind == "sweep":
                assert spec.component is not None
                _, dims, _ = sweep_grid(
                    spec.component,
                    pair.shape,
                    prepared.seq_len,
                    **spec.grid(),
                )
                if "position" in dims:
                    prepared.require_aligned("a by-position sweep")
            if spec.kind == "attribute":
                assert spec.component is not None
                _, dims, _ = sweep_grid(
                    spec.component, pair.shape, prepared.frame_len, **spec.grid()
                )
                if "position" in dims:
                    prepared.require_aligned("a by-position attribution")
            if spec.kind == "attribute_edges" or (spec.kind == "circuit" and spec.level == "edge"):
                Graph.from_model(pair)
            if spec.kind == "patch":
                sites = [Site.parse(s) for s in spec.sites or ()]
                for site in sites:
                    site.validate(pair.shape, prepared.seq_len)
                if any(site.position is not None for site in sites):
                    prepared.require_aligned("a patch at a fixed position")
        except MechDeltaError as exc:
            raise ConfigError(f"{spec.where} cannot run on this pair and task: {exc}") from None


# --- the run --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    """What :func:`run_experiment` did: the run directory, its manifest, and which analyses it
    computed now or found complete (``skipped``); ``repaired`` lists the computed ones that
    replaced damaged results. :meth:`load` reads a stored result back."""

    run_dir: Path
    manifest: dict[str, Any]
    computed: tuple[str, ...]
    skipped: tuple[str, ...]
    figures: dict[str, dict[str, Path]] = field(default_factory=dict)
    repaired: tuple[str, ...] = ()

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(a["id"] for a in self.manifest["analyses"])

    def load(self, analysis_id: str) -> Any:
        return StoredRun(self.run_dir, self.manifest).load(analysis_id)

    def __str__(self) -> str:
        name = self.manifest["config"]["name"]
        return f"run {name!r} in {os.fspath(self.run_dir)}: {self.counts()}"

    def counts(self) -> str:
        """``"2 analyses computed, 3 already complete"`` (and how many were repaired)."""
        text = f"{len(self.computed)} analyses computed, {len(self.skipped)} already complete"
        return text + (f", {len(self.repaired)} repaired" if self.repaired else "")


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def run_experiment(
    config_or_path: ExperimentLike,
    out_dir: str | os.PathLike[str],
    *,
    quiet: bool = False,
    overwrite: bool = False,
    repair: bool = False,
    executor: ExecutorSpec | Executor | None = None,
) -> RunResult:
    """Run an experiment (an :class:`Experiment`, its dict, or a TOML path) into ``out_dir``.

    A directory holding an interrupted (or finished) run of the same experiment is resumed:
    complete analyses are skipped once the configuration and the models' weight hashes are
    checked against the manifest (:class:`~mechdelta.errors.RunError` on any mismatch; choose a
    new ``out_dir``). Stored results that fail their checksums raise
    :class:`~mechdelta.errors.RunCorruptError`; ``repair=True`` recomputes just those and keeps
    the others. ``overwrite=True`` deletes an existing run's contents first and starts over
    (never a directory that is not a mechdelta run). ``quiet`` silences progress output;
    warnings are re-issued once each, after their analysis is stored.

    The patched forwards run on the experiment's ``[executor]`` (``executor``: an
    :class:`~mechdelta.runs.experiment.ExecutorSpec` overriding it, or an
    :class:`~mechdelta.scale.executor.Executor` used as it is and left open), built once when
    there is something to compute and closed at the end. With ``shards = true`` (the default)
    each finished shard is stored in ``out_dir/shards`` and a resumed run skips it, whichever
    executor it uses (the executor is recorded in the manifest, not checked on resume);
    ``out_dir/shards`` is removed once every analysis is stored
    (:mod:`mechdelta.runs._executor_spec`).

    The directory is locked for the whole run: another process writing it (a run, ``mechdelta
    figures`` or ``report``) raises :class:`~mechdelta.errors.RunLockedError` here at once, and
    so does this run for them. Two runs of the same experiment are not merged: the second is
    refused, and re-launching it once the first is done finds everything complete.
    """
    if overwrite and repair:
        raise RunError(
            "overwrite=True (--overwrite) starts the run over, repair=True (--repair) keeps its "
            "intact results and recomputes the damaged ones: pass only one"
        )
    exp = Experiment.coerce(config_or_path)
    source = None
    if not isinstance(config_or_path, Experiment | Mapping):
        source = os.path.abspath(config_or_path)
    out = Path(out_dir)
    with run_lock(out, f"mechdelta run {source or exp.name}", create=True):
        return _run_locked(
            exp,
            out,
            source,
            quiet=quiet,
            overwrite=overwrite,
            repair=repair,
            executor=exp.executor if executor is None else executor,
        )


def _run_locked(
    exp: Experiment,
    out: Path,
    source: str | None,
    *,
    quiet: bool,
    overwrite: bool,
    repair: bool,
    executor: ExecutorSpec | Executor,
) -> RunResult:
    t_start = time.perf_counter()
    stored = prepare_dir(out, exp, overwrite=overwrite)
    damaged = damaged_analyses(StoredRun(out, stored)) if stored is not None else {}
    if damaged and not repair:  # the error names --repair and --overwrite
        first = next(iter(damaged.values()))
        if len(damaged) == 1:
            raise first
        raise RunCorruptError(
            f"{len(damaged)} stored analyses are damaged ({', '.join(damaged)}); the first: {first}"
        )
    _say(quiet, f"mechdelta run {exp.name!r} -> {os.fspath(out)} ({len(exp.analyses)} analyses)")

    t0 = time.perf_counter()
    series = None if exp.series is None else exp.series.load()
    if series is not None and exp.pair.series:  # no [pair]: the series' reference vs its last
        pair, default_task = series_pair(series), None
    else:
        pair, default_task = load_pair(exp.pair)
    if default_task is None and exp.series is not None:  # a zoo series brings its task
        default_task = exp.series.default_task()
    task = exp.task.build() if exp.task is not None else default_task
    if task is None:  # a zoo entry without a task: say so rather than fail later
        raise ConfigError(f"[pair] {exp.pair.source} pair brings no task; add a [task] table")
    prepared = task.prepare(
        pair.tokenizer, n_ctx=int(pair.cfg.n_ctx), d_vocab=int(pair.cfg.d_vocab)
    )
    models = pair.provenance_models()
    task_info = prepared.info()
    control_pair = None if exp.control is None else load_pair(exp.control)[0]
    control_models = None if control_pair is None else control_pair.provenance_models()
    series_info = None if series is None else series_provenance(series)
    load_s = time.perf_counter() - t0
    if stored is not None:
        check_identity(out, stored, models, task_info, control_models, series_info)
    _preflight(exp, pair, prepared)
    if series is not None:
        preflight_series(exp, series, task)
    if control_pair is not None:
        preflight_control(exp, pair, control_pair, task)
    for analysis_id in damaged:  # only now: the directory is known to be this run's
        _say(quiet, f"{analysis_id}: stored result damaged, recomputing it (--repair)")
        clear_analysis(out, analysis_id)

    env = environment()
    session = {"started": env["created"], "environment": env, "computed": [], "skipped": []}
    if damaged:
        session["repaired"] = list(damaged)
    experiment_info: dict[str, Any] = {"name": exp.name, "description": exp.description}
    if source is not None:
        experiment_info["source"] = source
    manifest: dict[str, Any] = {
        "format": RUN_FORMAT,
        "format_version": RUN_FORMAT_VERSION,
        "status": "running",
        "experiment": experiment_info,
        "environment": env,
        "models": models,
        "control_models": control_models,
        "series": series_info,
        "task": task_info,
        "seeds": exp.run.to_dict(),
        "config": exp.to_dict(),
        "config_hash": short_hash(exp.compute_dict()),
        "analyses": [
            {"id": a.id, "kind": a.kind, "status": "pending", "seconds": None} for a in exp.analyses
        ],
        "timings": {"load_pair_s": round(load_s, 3), "analyses_s": {}, "figures_s": None},
        "static_figures_skipped": None,
        "sessions": [*(stored or {}).get("sessions", []), session],
    }
    run = StoredRun(out, manifest)
    for entry in manifest["analyses"]:
        if run.is_complete(entry["id"]):
            rec = run.record(entry["id"])
            entry.update(status="complete", seconds=rec["seconds"])
            manifest["timings"]["analyses_s"][entry["id"]] = rec["seconds"]
    write_manifest(out, manifest)

    pending = [e["id"] for e in manifest["analyses"] if e["status"] != "complete"]
    kept_shards = stored_shards(out) if pending else 0
    if kept_shards:
        _say(quiet, f"{kept_shards} finished shards kept from before (shards/)")
    opened = open_executor(executor, out) if pending else contextlib.nullcontext(None)
    with opened as ex:  # built only when there is something to compute; closed after
        manifest["executor"] = session["executor"] = executor_record(executor, ex)
        write_manifest(out, manifest)
        ctx = RunContext(
            pair,
            task,
            exp,
            progress=False if quiet else None,
            control=control_pair,
            series=series,
            run_dir=out,
            executor=ex,
        )
        computed: list[str] = []
        skipped: list[str] = []
        shown: set[tuple[type[Warning], str]] = set()  # each distinct warning once per run
        for i, (spec, entry) in enumerate(zip(exp.analyses, manifest["analyses"], strict=True)):
            label = f"[{i + 1}/{len(exp.analyses)}] {spec.id}"
            if entry["status"] == "complete":
                skipped.append(spec.id)
                _say(quiet, f"{label}: complete, skipped")
                continue
            kept = finished_pairs(partial_dir(out, spec.id))
            what = "pairs"
            if spec.kind == "explain":  # an explanation keeps its finished stages
                kept, what = kept_stages(partial_dir(out, spec.id)), "explanation stages"
            _say(
                quiet, f"{label}: running" + (f" ({kept} {what} kept from before)" if kept else "")
            )
            clear_analysis(out, spec.id)
            torch.manual_seed(exp.run.seed)
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = EXECUTORS[spec.kind](ctx, spec)
            extras = analysis_extras(ctx, spec, result)
            if spec.kind == "explain":
                extras = explain_extras(result)
            seconds = time.perf_counter() - t0
            messages = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
            save_analysis(
                out,
                spec.id,
                kind=spec.kind,
                params=spec.params(),
                result=result,
                seconds=seconds,
                warnings=messages,
                extras=extras,
            )
            clear_partial(out, spec.id)
            entry.update(status="complete", seconds=round(seconds, 3))
            manifest["timings"]["analyses_s"][spec.id] = round(seconds, 3)
            session["computed"] = [*session["computed"], spec.id]
            write_manifest(out, manifest)
            computed.append(spec.id)
            _say(quiet, f"{label}: done in {seconds:.1f} s")
            for w in caught:  # shown once each per run, after the result is safely stored
                key = (w.category, str(w.message))
                if key not in shown:
                    shown.add(key)
                    warnings.warn(w.message, w.category, stacklevel=3)
    session["skipped"] = skipped
    remove_shards(out)  # every analysis is stored: its shards are not needed any more

    t0 = time.perf_counter()
    figures, skipped_static = _write_figures(run, exp, quiet=quiet)
    manifest["timings"]["figures_s"] = round(time.perf_counter() - t0, 3)
    manifest["static_figures_skipped"] = skipped_static
    manifest["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
    session["finished"] = environment()["created"]
    manifest["status"] = "complete"
    write_manifest(out, manifest)
    return RunResult(
        out, manifest, tuple(computed), tuple(skipped), figures, repaired=tuple(damaged)
    )


# --- figures ----------------------------------------------------------------------------------------


def _write_figures(
    run: StoredRun,
    exp: Experiment,
    *,
    formats: tuple[str, ...] | None = None,
    quiet: bool = False,
) -> tuple[dict[str, dict[str, Path]], str | None]:
    from mechdelta.core.progress import progress
    from mechdelta.plotting import FigureWriter, find_browser, write_figure

    fmts = tuple(dict.fromkeys(("json", *(exp.output.figures if formats is None else formats))))
    static = [f for f in fmts if f not in ("json", "html")]
    skipped: str | None = None
    if static:
        try:
            find_browser()
        except ExportError as exc:
            if exp.output.require_static:
                raise ExportError(
                    f"{exc} The results are stored; once fixed, `mechdelta figures "
                    f"{os.fspath(run.path)}` writes the figures (or set [output] figures = "
                    "['html'])."
                ) from None
            skipped = f"{', '.join(static)} not written: {exc}"
            _say(  # shown even when quiet: an output the experiment asked for is missing
                False,
                f"note: static figures skipped ({', '.join(static)}): no browser found; HTML "
                "figures written. Install Chromium (bash scripts/setup.sh) and run `mechdelta "
                f"figures {os.fspath(run.path)}` for them.",
            )
            fmts = tuple(f for f in fmts if f not in static)
    written: dict[str, dict[str, Path]] = {}
    (run.path / FIGURES).mkdir(parents=True, exist_ok=True)
    with FigureWriter():
        enabled = False if quiet else None
        for analysis_id in progress(run.ids, total=len(run.ids), desc="figures", enabled=enabled):
            figs = result_figures(
                analysis_id,
                run.load(analysis_id),
                reliability=run.reliability(analysis_id, verify=False),
                alpha=float(exp.run.alpha),
            )
            for name, fig in figs.items():
                written[name] = write_figure(fig, run.figure_stem(name), fmts)
    return written, skipped


def regenerate_figures(
    run_dir: str | os.PathLike[str],
    *,
    formats: tuple[str, ...] | None = None,
    quiet: bool = False,
) -> dict[str, dict[str, Path]]:
    """Rebuild every figure of a complete run from its stored results alone (no model loaded).

    ``formats`` defaults to the run's ``[output] figures``; ``<id>.json`` is always written, and
    the same stored results always give the same figure JSON. Returns figure name -> format ->
    path, one name per figure (:func:`~mechdelta.runs.rundir.result_figures`: ``<id>``, plus
    e.g. ``<id>.verification``). Raises
    :class:`~mechdelta.errors.RunError` for partial or corrupt run directories, and
    :class:`~mechdelta.errors.RunLockedError` while another process writes the directory.
    """
    with run_lock(run_dir, "mechdelta figures"):
        run = StoredRun.open(run_dir)
        run.require_complete()
        figures, _ = _write_figures(run, run.experiment, formats=formats, quiet=quiet)
    return figures
