"""Checking a ``kind = "series"`` analysis: its ``analysis``, ``compare`` and ``threshold``, and
its per-pair analysis' keys, checked as an analysis of that kind checks them (private to
:mod:`mechdelta.runs.analyses`: :meth:`AnalysisSpec._check_series` and :meth:`AnalysisSpec.inner`).
"""

from __future__ import annotations

from dataclasses import fields

from mechdelta.core.directions import Direction
from mechdelta.errors import ConfigError
from mechdelta.runs.analyses import KIND_KEYS, SERIES_ANALYSES, SERIES_COMPARE, AnalysisSpec

__all__ = ["check_series", "inner_keys", "inner_spec"]


def inner_keys(analysis: str) -> tuple[str, ...]:
    """The keys of a series' per-pair analysis (its kind's, but ``verify``)."""
    return tuple(k for k in KIND_KEYS[analysis] if k != "verify")


def check_series(spec: AnalysisSpec) -> None:
    """``analysis``, ``compare``, ``threshold`` and the inner analysis' keys (checked as an
    analysis of that kind checks them, whose defaults are filled in)."""
    where = spec.where
    if spec.analysis is None:
        raise ConfigError(
            f"{where}: needs analysis = 'sweep', 'attribute' or 'circuit' (what runs on each "
            "pair of the [series])"
        )
    analysis = str(spec.analysis).strip().lower()
    if analysis not in SERIES_ANALYSES:
        raise ConfigError(
            f"{where}: unknown analysis {spec.analysis!r}; choose one of "
            f"{', '.join(repr(a) for a in SERIES_ANALYSES)}"
        )
    compare = "reference" if spec.compare is None else str(spec.compare).strip().lower()
    if compare not in SERIES_COMPARE:
        raise ConfigError(
            f"{where}: compare = {spec.compare!r} is unknown; use 'reference' (each checkpoint "
            "against the series' reference) or 'consecutive' (each against the one before it)"
        )
    if Direction(spec.direction) is Direction.BOTH:
        raise ConfigError(
            f"{where}: a series analysis takes one direction, not 'both'; write one "
            "[[analyses]] block per direction"
        )
    keys = inner_keys(analysis)
    defaults = {f.name: f.default for f in fields(spec)}
    for key in KIND_KEYS["series"]:
        if key not in ("analysis", "compare", "threshold", *keys) and (
            getattr(spec, key) != defaults[key]
        ):
            raise ConfigError(
                f"{where}: {key!r} does not apply to a series of {analysis!r} analyses; "
                f"allowed keys: kind, name, analysis, compare, threshold, {', '.join(keys)}"
            )
    if spec.threshold is not None:
        t = spec.threshold
        if analysis == "circuit":
            raise ConfigError(
                f"{where}: threshold (of the emergence of a site's score) applies to series "
                "of sweeps and attributions, not to circuit searches"
            )
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < 1:
            raise ConfigError(
                f"{where}: threshold must be a fraction of the series' shift in [0, 1), e.g. "
                f"0.1, got {t!r}"
            )
        object.__setattr__(spec, "threshold", float(t))
    object.__setattr__(spec, "analysis", analysis)
    object.__setattr__(spec, "compare", compare)
    inner_where = f"[[analyses]] #{spec.index + 1} ({analysis})"
    try:
        inner = inner_spec(spec)
    except ConfigError as exc:
        raise ConfigError(
            str(exc).replace(inner_where, f"{where} (analysis = {analysis!r})")
        ) from None
    for key in keys:
        object.__setattr__(spec, key, getattr(inner, key))


def inner_spec(spec: AnalysisSpec) -> AnalysisSpec:
    """A series analysis' per-pair analysis, as an analysis of its own kind."""
    assert spec.kind == "series" and spec.analysis is not None
    keys = inner_keys(spec.analysis)
    return AnalysisSpec(kind=spec.analysis, index=spec.index, **{k: getattr(spec, k) for k in keys})
