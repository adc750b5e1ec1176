"""The keys of an ``explain`` analysis (``kind = "explain"``: :func:`~mechdelta.explain.explain`
in an experiment), checked and given their defaults.

.. code-block:: toml

    [[analyses]]
    kind = "explain"
    budget = "auto"              # "exact", "attribution", or the most exactly patched sites
    alpha = 0.05                 # the claims' level and the intervals' (default: [run] alpha)
    min_effect = 0.05            # the smallest claimed effect (fraction of the shift)
    steering_alphas = [0.0, 1.0, 2.0]
    circuit = "auto"             # true, false or "auto" (graphs of at most 64 nodes)
    pdf = true                   # also print the audit report as PDF (needs Chromium)

    [analyses.intervention]      # what the user declares (copied verbatim into the report)
    kind = "fine-tune"           # or an inline table: intervention = { kind = "...", ... }
    data = "planted trigger set v1"
    date = 2026-01-15            # a TOML date or text
    owner = "model team"
    extra = { ticket = "ML-42" } # further fields, text -> text

``n_boot`` and ``seed`` come from the experiment's ``[run]``, as for every kind.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from typing import Any

from mechdelta.errors import ConfigError

__all__ = [
    "EXPLAIN_DEFAULTS",
    "INTERVENTION_KEYS",
    "check_explain",
    "explain_kwargs",
    "explain_value",
    "id_extra",
]

#: An explain analysis' defaults (those of :func:`~mechdelta.explain.explain`); ``alpha``
#: defaults to the experiment's ``[run] alpha``.
EXPLAIN_DEFAULTS: dict[str, Any] = {
    "budget": "auto",
    "min_effect": 0.05,
    "steering_alphas": (0.0, 1.0, 2.0),
    "circuit": "auto",
    "pdf": True,
}
#: The keys of an intervention table (:class:`~mechdelta.explain.Intervention`'s fields).
INTERVENTION_KEYS = ("kind", "description", "data", "date", "owner", "extra")
_BUDGETS = ("auto", "exact", "attribution")


def _number(value: Any, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where} must be {what}, got {value!r}")
    return float(value)


def _budget(value: Any, where: str) -> str | int:
    if isinstance(value, str) and value.strip().lower() in _BUDGETS:
        return value.strip().lower()
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ConfigError(
        f"{where} budget must be 'auto', 'exact', 'attribution' or a positive integer (the most "
        f"exactly patched sites per component and direction), got {value!r}"
    )


def _alphas(value: Any, where: str) -> tuple[float, ...]:
    if isinstance(value, str | Mapping) or not isinstance(value, Sequence) or not value:
        raise ConfigError(
            f"{where} steering_alphas must be a non-empty list of numbers such as "
            f"[0.0, 1.0, 2.0] (the dose-response grid), got {value!r}"
        )
    return tuple(_number(a, f"{where} steering_alphas[]", "a finite number") for a in value)


def _text(value: Any, where: str) -> str:
    """Text, or a TOML date / time / date-time (written as ISO 8601)."""
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be text (in quotes) or a date, got {value!r}")
    return value


def _intervention(value: Any, where: str) -> dict[str, Any]:
    """The declared intervention: known keys only (further fields go in ``extra``), text."""
    from mechdelta.explain.intervention import Intervention

    where = f"{where} intervention"
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{where} must be a table: an [analyses.intervention] table after the "
            "[[analyses]] entry, or intervention = { kind = 'fine-tune', data = '...', date = "
            f"'2026-01-15', owner = '...' }}; got {value!r}"
        )
    unknown = [k for k in value if k not in INTERVENTION_KEYS]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(INTERVENTION_KEYS)} "
            f"(put further fields in extra = {{ {unknown[0]} = '...' }})"
        )
    out: dict[str, Any] = {}
    for key, v in value.items():
        if key == "extra":
            if not isinstance(v, Mapping):
                raise ConfigError(
                    f"{where} extra must be a table of text, e.g. extra = {{ ticket = 'ML-42' }}, "
                    f"got {v!r}"
                )
            out["extra"] = {str(k): _text(x, f"{where} extra.{k}") for k, x in v.items()}
        else:
            out[key] = _text(v, f"{where} {key}")
    Intervention.coerce(out)  # the declaration explain() will take
    return out


def explain_value(key: str, value: Any, where: str) -> Any:
    """One key of an explain analysis, checked and normalised (``budget`` lower-case,
    numbers as floats, ``steering_alphas`` a tuple, TOML dates in the intervention as text)."""
    if key == "budget":
        return _budget(value, where)
    if key == "alpha":
        alpha = _number(value, f"{where} alpha", "a number in (0, 1), e.g. 0.05")
        if not 0.0 < alpha < 1.0:
            raise ConfigError(f"{where} alpha must lie in (0, 1), e.g. 0.05; got {value!r}")
        return alpha
    if key == "min_effect":
        what = "a number >= 0 (the smallest claimed effect, as a fraction of the shift)"
        min_effect = _number(value, f"{where} min_effect", what)
        if min_effect < 0:
            raise ConfigError(f"{where} min_effect must be {what}, got {value!r}")
        return min_effect
    if key == "steering_alphas":
        return _alphas(value, where)
    if key == "circuit":
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if not isinstance(value, bool):
            raise ConfigError(
                f"{where} circuit must be true, false or 'auto' (search a circuit on graphs of "
                f"at most 64 nodes), got {value!r}"
            )
        return value
    if key == "pdf":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} pdf must be true or false, got {value!r}")
        return value
    if key == "intervention":
        return _intervention(value, where)
    raise ConfigError(f"{where}: {key!r} is not a key of an explain analysis")


def check_explain(spec: Any) -> None:
    """Check an explain :class:`~mechdelta.runs.analyses.AnalysisSpec`'s keys and fill in their
    defaults (idempotent: a resolved configuration read back from a manifest passes unchanged)."""
    for key, default in EXPLAIN_DEFAULTS.items():
        if getattr(spec, key) is None:
            object.__setattr__(spec, key, default)
    for key in (*EXPLAIN_DEFAULTS, "alpha", "intervention"):
        if getattr(spec, key) is not None:
            object.__setattr__(spec, key, explain_value(key, getattr(spec, key), spec.where))


def id_extra(spec: Any) -> dict[str, Any]:
    """What an explain analysis' id hashes: the parameters that change results and differ from
    the defaults (not ``pdf``, ``batch_budget`` or the declared intervention)."""
    out: dict[str, Any] = {}
    for key in ("budget", "min_effect", "steering_alphas", "circuit"):
        if getattr(spec, key) != EXPLAIN_DEFAULTS[key]:
            value = getattr(spec, key)
            out[key] = list(value) if isinstance(value, tuple) else value
    if spec.alpha is not None:
        out["alpha"] = spec.alpha
    return out


def explain_kwargs(spec: Any, run: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`~mechdelta.explain.explain` but the pair, task, ``out`` and
    progress: the analysis' keys, ``n_boot`` and ``seed`` of the experiment's ``[run]`` (and its
    ``alpha`` unless the analysis sets one)."""
    return {
        "budget": spec.budget,
        "intervention": spec.intervention,
        "alpha": float(run.alpha) if spec.alpha is None else spec.alpha,
        "min_effect": spec.min_effect,
        "n_boot": run.n_boot,
        "seed": run.seed,
        "steering_alphas": tuple(spec.steering_alphas),
        "circuit": spec.circuit,
        "pdf": spec.pdf,
        "batch_budget": spec.batch_budget,
    }
