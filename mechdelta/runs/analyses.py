"""Analysis specifications: one ``[[analyses]]`` entry of an experiment, validated, with a stable id.

Kinds: ``shift``, ``weight_diff``, ``factorial`` (no parameters), ``sweep``, ``patch``,
``attribute`` (estimates of a sweep grid, :func:`~mechdelta.attribute`), ``attribute_edges``
(:func:`~mechdelta.attribute_edges`), ``circuit`` (:func:`~mechdelta.circuits.search_circuit`)
and ``series`` (a sweep, attribution or circuit search on every pair of the experiment's
``[series]``: :class:`~mechdelta.circuits.CheckpointSeries`) and ``explain``
(:func:`~mechdelta.explain.explain`, :mod:`mechdelta.runs._explain`). A new kind adds its keys to
``KIND_KEYS`` here, an executor in :data:`mechdelta.runs._executors.EXECUTORS` and a report
section (:func:`mechdelta.report._build.register_section`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from mechdelta.core.directions import Direction
from mechdelta.core.sites import Component, Site
from mechdelta.errors import ConfigError, MechDeltaError
from mechdelta.runs._config import (
    check_bool,
    check_int,
    check_ints,
    check_keys,
    check_str,
    jsonable,
    short_hash,
)
from mechdelta.runs._explain_spec import explain_value

__all__ = ["ANALYSIS_KINDS", "KIND_KEYS", "AnalysisSpec"]

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,79}$")

# Keys an analysis of each kind accepts besides ``kind`` and ``name``.
KIND_KEYS: dict[str, tuple[str, ...]] = {
    "shift": (),
    "weight_diff": (),
    "factorial": (),
    "sweep": (
        "component",
        "direction",
        "per_position",
        "layers",
        "heads",
        "positions",
        "neurons",
        "batch_budget",
    ),
    "patch": ("sites", "direction", "batch_budget"),
    "attribute": (
        "component",
        "direction",
        "method",
        "per_position",
        "layers",
        "heads",
        "positions",
        "neurons",
        "steps",
        "verify",
        "graddrop",
        "batch_budget",
    ),
    "attribute_edges": ("direction", "method", "steps", "batch_budget"),
    "circuit": ("level", "method", "direction", "semantics", "target", "max_size", "batch_budget"),
}
#: What a series analysis runs on each pair (its kind's keys apply, but ``verify``).
SERIES_ANALYSES = ("sweep", "attribute", "circuit")
# A series takes its own keys and those of the kinds it runs (but ``verify``), batch_budget last.
KIND_KEYS["series"] = (
    "analysis",
    "compare",
    "threshold",
    *dict.fromkeys(
        k
        for kind in SERIES_ANALYSES
        for k in KIND_KEYS[kind]
        if k not in ("verify", "batch_budget")
    ),
    "batch_budget",
)
KIND_KEYS["explain"] = (
    *("budget", "alpha", "min_effect", "steering_alphas", "circuit", "pdf", "intervention"),
    "batch_budget",
)
#: ``compare`` -> the id's suffix (the pairs: each checkpoint against the reference, or against
#: the one before it).
SERIES_COMPARE = {"reference": "ref", "consecutive": "cons"}
#: A circuit analysis' defaults (those of :func:`~mechdelta.circuits.search_circuit`, but the
#: direction, which defaults to ``"reference->intervened"`` as in every analysis).
CIRCUIT_DEFAULTS: dict[str, Any] = {"level": "node", "method": "attribution", "target": 0.9}
#: level -> its default semantics.
CIRCUIT_SEMANTICS = {"node": "graft", "edge": "splice"}
#: kind -> (its default method, the methods it takes, the one method ``steps`` applies to).
_METHODS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "attribute": ("atp", ("atp", "atp*", "ig"), "ig"),
    "attribute_edges": ("eap", ("eap", "eap-ig"), "eap-ig"),
}
#: Integration points of ``"ig"`` / ``"eap-ig"`` when ``steps`` is not given (the functions' own).
DEFAULT_STEPS = 16
ANALYSIS_KINDS = tuple(KIND_KEYS)
_DIRECTION_SHORT = {
    Direction.REFERENCE_TO_INTERVENED: "r2i",
    Direction.INTERVENED_TO_REFERENCE: "i2r",
    Direction.BOTH: "both",
}


@dataclass(frozen=True)
class AnalysisSpec:
    """One ``[[analyses]]`` entry. Which keys apply depends on ``kind``:

    - ``shift``, ``weight_diff``, ``factorial``: none.
    - ``sweep``: ``component`` (required), ``direction``, ``per_position``, ``layers``,
      ``heads``, ``positions``, ``neurons``, ``batch_budget``.
    - ``patch``: ``sites`` (required, shorthand strings such as ``"L1H2"``), ``direction``,
      ``batch_budget``.
    - ``attribute``: the sweep's keys plus ``method`` (``"atp"`` default, ``"atp*"``, ``"ig"``),
      ``steps`` (``"ig"`` only; default 16), ``verify`` (k: exact patches of the top k sites and
      k random others) and ``graddrop`` (``"atp*"`` only).
    - ``attribute_edges``: ``direction``, ``method`` (``"eap"`` default, ``"eap-ig"``), ``steps``
      (``"eap-ig"`` only; default 16), ``batch_budget``.
    - ``circuit``: ``level`` (``"node"`` default, ``"edge"``), ``method`` (``"attribution"``
      default, ``"greedy"``, ``"acdc"``), ``direction`` (one, or ``"both"``: one search per
      direction), ``semantics`` (node: ``"graft"`` default or ``"splice"``; edge: ``"splice"``
      default or ``"ablate"``), ``target`` (in (0, 1]; default 0.9), ``max_size``,
      ``batch_budget`` (:func:`~mechdelta.circuits.search_circuit`).
    - ``series``: ``analysis`` (required: ``"sweep"``, ``"attribute"`` or ``"circuit"``, run on
      every pair of the experiment's ``[series]``) with that kind's keys (one direction; no
      ``verify``), ``compare`` (``"reference"`` default: each checkpoint against the series'
      reference; ``"consecutive"``: each against the one before it) and ``threshold`` (sweeps and
      attributions: the report's second emergence column, the first checkpoint whose effect's CI
      lies beyond ± this fraction of the whole series' shift; it does not change results).
    - ``explain``: ``budget``, ``alpha`` (default: ``[run] alpha``), ``min_effect``,
      ``steering_alphas``, ``circuit``, ``pdf``, ``intervention`` (a table),
      ``batch_budget`` (:mod:`mechdelta.runs._explain_spec`).

    ``name`` sets the analysis id; by default it is derived from the kind and the parameters
    (``batch_budget`` excluded, it does not change results), so ids are stable across runs.
    """

    kind: str
    name: str | None = None
    component: str | None = None
    direction: str = Direction.REFERENCE_TO_INTERVENED.value
    per_position: bool = False
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None
    neurons: tuple[int, ...] | None = None
    sites: tuple[str, ...] | None = None
    method: str | None = None
    steps: int | None = None
    verify: int | None = None
    graddrop: bool = False
    level: str | None = None
    semantics: str | None = None
    target: float | None = None
    max_size: int | None = None
    batch_budget: int | None = None
    analysis: str | None = None
    compare: str | None = None
    threshold: float | None = None
    budget: str | int | None = None
    alpha: float | None = None
    min_effect: float | None = None
    steering_alphas: tuple[float, ...] | None = None
    circuit: bool | str | None = None
    pdf: bool | None = None
    intervention: dict[str, Any] | None = None
    index: int = field(default=0, compare=False, repr=False)

    def grid(self) -> dict[str, Any]:
        """The sweep grid's keyword arguments (for :func:`~mechdelta.sweep` and its pre-flight)."""
        return {
            "per_position": self.per_position,
            "layers": self.layers,
            "heads": self.heads,
            "positions": self.positions,
            "neurons": self.neurons,
        }

    def __post_init__(self) -> None:
        where = self.where
        if self.kind not in KIND_KEYS:
            raise ConfigError(
                f"{where}: unknown kind {self.kind!r}; choose one of {', '.join(ANALYSIS_KINDS)}"
            )
        allowed = set(KIND_KEYS[self.kind])
        defaults = {f.name: f.default for f in fields(self)}
        for key in _ALL_PARAM_KEYS - allowed:
            if getattr(self, key) != defaults[key]:
                raise ConfigError(
                    f"{where}: {key!r} does not apply to kind {self.kind!r}; allowed keys: "
                    f"{', '.join(('kind', 'name', *KIND_KEYS[self.kind]))}"
                )
        if self.name is not None and not _ID_RE.match(self.name):
            raise ConfigError(
                f"{where}: name {self.name!r} must be 1-80 characters of letters, digits and "
                "'_.+-', starting with a letter or digit (it names a directory)"
            )
        try:
            direction = Direction.coerce(self.direction)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        object.__setattr__(self, "direction", direction.value)
        if self.kind in ("sweep", "attribute"):
            if self.component is None:
                raise ConfigError(
                    f"{where}: {'a sweep' if self.kind == 'sweep' else 'an attribution'} needs "
                    "component = '...' (e.g. 'head_out')"
                )
            try:
                object.__setattr__(self, "component", Component.coerce(self.component).value)
            except MechDeltaError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            if self.positions is not None:  # positions imply a by-position grid
                object.__setattr__(self, "per_position", True)
        if self.kind == "patch":
            if not self.sites:
                raise ConfigError(f"{where}: a patch needs sites = ['L1H2', ...]")
            try:
                parsed = tuple(str(Site.parse(s)) for s in self.sites)
            except MechDeltaError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            if len(set(parsed)) != len(parsed):
                raise ConfigError(f"{where}: sites has duplicates: {list(self.sites)}")
            object.__setattr__(self, "sites", parsed)
        if self.kind in _METHODS:
            self._check_method()
        if self.kind == "circuit":
            self._check_circuit()
        if self.kind == "series":
            self._check_series()
        if self.kind == "explain":
            from mechdelta.runs._explain_spec import check_explain

            check_explain(self)
        if self.batch_budget is not None:
            check_int(self.batch_budget, f"{where} batch_budget", minimum=1)

    def _check_method(self) -> None:
        """``method``, ``steps``, ``verify``, ``graddrop`` of the attribution kinds; fills in the
        default method, and ``steps`` for the integrated-gradient methods."""
        where = self.where
        default, methods, ig = _METHODS[self.kind]
        method = default if self.method is None else str(self.method).strip().lower()
        if method not in methods:
            raise ConfigError(
                f"{where}: unknown method {self.method!r}; choose one of "
                f"{', '.join(repr(m) for m in methods)}"
            )
        object.__setattr__(self, "method", method)
        if self.steps is not None:
            check_int(self.steps, f"{where} steps", minimum=1)
            if method != ig:
                raise ConfigError(
                    f"{where}: steps (integration points) applies to method {ig!r}, not "
                    f"{method!r}; drop it or set method = {ig!r}"
                )
        elif method == ig:
            object.__setattr__(self, "steps", DEFAULT_STEPS)
        if self.verify is not None:
            check_int(self.verify, f"{where} verify", minimum=1)
        check_bool(self.graddrop, f"{where} graddrop")
        if self.graddrop and method != "atp*":
            raise ConfigError(f"{where}: graddrop = true belongs to method 'atp*', not {method!r}")

    def _check_circuit(self) -> None:
        """``level``, ``method``, ``semantics``, ``target``, ``max_size`` of a circuit search
        (checked as :func:`~mechdelta.circuits.search_circuit` checks them); fills in defaults."""
        from mechdelta.circuits.search import _check

        where = self.where
        level = CIRCUIT_DEFAULTS["level"] if self.level is None else self.level
        semantics = self.semantics
        if semantics is None:
            semantics = CIRCUIT_SEMANTICS.get(str(level).strip().lower(), "graft")
        target = CIRCUIT_DEFAULTS["target"] if self.target is None else self.target
        if self.max_size is not None:
            check_int(self.max_size, f"{where} max_size", minimum=1)
        # the direction is checked per search: "both" is two searches of one direction each
        one = Direction.REFERENCE_TO_INTERVENED.value
        try:
            lv, m, sem, _, t = _check(
                level,
                CIRCUIT_DEFAULTS["method"] if self.method is None else self.method,
                semantics,
                one,
                target,
                self.max_size,
            )
        except MechDeltaError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        for key, value in (("level", lv), ("method", m), ("semantics", sem), ("target", t)):
            object.__setattr__(self, key, value)

    def _check_series(self) -> None:
        """``analysis``, ``compare``, ``threshold`` and the per-pair analysis' keys
        (:func:`mechdelta.runs._series_analysis.check_series`)."""
        from mechdelta.runs._series_analysis import check_series

        check_series(self)

    def inner(self) -> AnalysisSpec:
        """A series analysis' per-pair analysis, as an analysis of its own kind."""
        from mechdelta.runs._series_analysis import inner_spec

        return inner_spec(self)

    def circuit_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~mechdelta.circuits.search_circuit` (one search), but
        the pair, task, direction and progress."""
        assert self.kind == "circuit"
        return {
            "level": self.level,
            "method": self.method,
            "semantics": self.semantics,
            "target": self.target,
            "max_size": self.max_size,
            "batch_budget": self.batch_budget,
        }

    @property
    def where(self) -> str:
        return f"[[analyses]] #{self.index + 1} ({self.kind})"

    @classmethod
    def from_dict(cls, table: Mapping[str, Any], index: int = 0) -> AnalysisSpec:
        if "kind" not in table:
            raise ConfigError(
                f"[[analyses]] #{index + 1}: needs kind = one of {', '.join(ANALYSIS_KINDS)}"
            )
        kind = table["kind"]
        if kind not in KIND_KEYS:
            raise ConfigError(
                f"[[analyses]] #{index + 1}: unknown kind {kind!r}; choose one of "
                f"{', '.join(ANALYSIS_KINDS)}"
            )
        where = f"[[analyses]] #{index + 1} ({kind})"
        check_keys(table, ("kind", "name", *KIND_KEYS[kind]), where)

        kw: dict[str, Any] = {"kind": kind, "index": index}
        for key, value in table.items():
            if key == "kind":
                continue
            if kind == "explain" and key not in ("name", "batch_budget"):
                kw[key] = explain_value(key, value, where)
                continue
            if key in (
                "name",
                "component",
                "direction",
                "method",
                "level",
                "semantics",
                "analysis",
                "compare",
            ):
                kw[key] = check_str(value, f"{where} {key}")
            elif key in ("per_position", "graddrop"):
                kw[key] = check_bool(value, f"{where} {key}")
            elif key in ("layers", "heads", "positions", "neurons"):
                kw[key] = check_ints(value, f"{where} {key}")
            elif key in ("target", "threshold"):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    span = "(0, 1]" if key == "target" else "[0, 1)"
                    raise ConfigError(f"{where} {key} must be a number in {span}, got {value!r}")
                kw[key] = float(value)
            elif key in ("batch_budget", "steps", "verify", "max_size"):
                kw[key] = check_int(value, f"{where} {key}", minimum=1)
            elif key == "sites":
                if isinstance(value, str) or not isinstance(value, Sequence):
                    raise ConfigError(
                        f"{where} sites must be a list such as ['L1H2'], got {value!r}"
                    )
                kw[key] = tuple(check_str(s, f"{where} sites[]") for s in value)
        return cls(**kw)

    def params(self) -> dict[str, Any]:
        """The kind's parameters that were set (``positions`` implies ``per_position``)."""
        out: dict[str, Any] = {}
        for key in KIND_KEYS[self.kind]:
            out[key] = jsonable(getattr(self, key))
        if self.kind in ("sweep", "attribute") and self.positions is not None:
            out["per_position"] = True
        return out

    def attribution_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~mechdelta.attribute` (``attribute``) or
        :func:`~mechdelta.attribute_edges` (``attribute_edges``), but the pair, task, bootstrap
        settings and progress."""
        steps = DEFAULT_STEPS if self.steps is None else self.steps
        if self.kind == "attribute_edges":
            return {
                "direction": self.direction,
                "method": self.method,
                "steps": steps,
                "batch_budget": self.batch_budget,
            }
        assert self.kind == "attribute"
        return {
            "component": self.component,
            "direction": self.direction,
            "method": self.method,
            **self.grid(),
            "steps": steps,
            "batch_budget": self.batch_budget,
            "verify": self.verify,
            "graddrop": self.graddrop,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, **self.params(), "id": self.id}

    @property
    def id(self) -> str:
        """The analysis id: ``name`` if given, else derived from the kind and parameters."""
        if self.name is not None:
            return self.name
        if self.kind in ("shift", "weight_diff", "factorial"):
            return self.kind
        if self.kind == "explain":
            from mechdelta.runs._explain_spec import id_extra

            return f"explain-{short_hash(changed)}" if (changed := id_extra(self)) else "explain"
        if self.kind == "series":
            assert self.compare is not None  # filled in by __post_init__
            return f"series-{self.inner().id}-{SERIES_COMPARE[self.compare]}"
        short = _DIRECTION_SHORT[Direction(self.direction)]
        if self.kind == "sweep":
            stem = f"sweep-{self.component}-{short}"
            if self.per_position or self.positions is not None:
                stem += "-pos"
            restrict = {
                k: list(v)
                for k in ("layers", "heads", "positions", "neurons")
                if (v := getattr(self, k)) is not None
            }
            return f"{stem}-{short_hash(restrict)}" if restrict else stem
        if self.kind in ("attribute", "attribute_edges"):
            return self._attribution_id(short)
        if self.kind == "circuit":
            extra: dict[str, Any] = {}
            if self.target != CIRCUIT_DEFAULTS["target"]:
                extra["target"] = self.target
            if self.max_size is not None:
                extra["max_size"] = self.max_size
            stem = f"circuit-{self.level}-{self.semantics}-{self.method}-{short}"
            return f"{stem}-{short_hash(extra)}" if extra else stem
        assert self.sites is not None  # validated in __post_init__
        joined = "+".join(self.sites)
        if len(joined) <= 48 and _ID_RE.match(f"patch-{joined}"):
            return f"patch-{joined}-{short}"
        return f"patch-{len(self.sites)}sites-{short}-{short_hash(list(self.sites))}"

    def _attribution_id(self, short: str) -> str:
        """``attribute-head_out-atp-both[-pos][-gd][-v4][-<hash of the grid, steps>]`` and
        ``edges-eap-ig-both[-<hash of steps>]`` (steps only when not the default)."""
        assert self.method is not None  # filled in by __post_init__
        method = self.method.replace("*", "star")
        restrict: dict[str, Any] = {}
        if self.steps is not None and self.steps != DEFAULT_STEPS:
            restrict["steps"] = self.steps
        if self.kind == "attribute_edges":
            stem = f"edges-{method}-{short}"
        else:
            stem = f"attribute-{self.component}-{method}-{short}"
            if self.per_position or self.positions is not None:
                stem += "-pos"
            if self.graddrop:
                stem += "-gd"
            if self.verify is not None:
                stem += f"-v{self.verify}"
            restrict.update(
                {
                    k: list(v)
                    for k in ("layers", "heads", "positions", "neurons")
                    if (v := getattr(self, k)) is not None
                }
            )
        return f"{stem}-{short_hash(restrict)}" if restrict else stem


_ALL_PARAM_KEYS = frozenset(k for keys in KIND_KEYS.values() for k in keys)
